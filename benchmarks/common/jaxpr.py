"""Reading a traced program: where its cross-device collectives sit."""

from __future__ import annotations

from typing import Iterator


def subjaxprs(value) -> Iterator:
  """The jaxprs nested in one equation parameter (a jaxpr, a closed jaxpr, or tuples of them)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(getattr(value, "jaxpr", None), "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from subjaxprs(v)


def is_all_reduce(primitive_name: str) -> bool:
  return "psum" in primitive_name or primitive_name.startswith("all_")


def count_all_reduces(closed_jaxpr) -> dict:
  """All-reduces in a per-replica program: ``{"every_step": n, "sync_branch": n, "other_branch": n}``.

  One ``psum`` equation reduces a whole pytree in one collective: one round.
  Collectives inside a top-level ``cond`` count only for the branch they sit in
  (``branches[1]``, taken when the predicate is true, is the sync branch).
  """
  counts = {"every_step": 0, "sync_branch": 0, "other_branch": 0}

  def walk(jx, where):
    for eqn in jx.eqns:
      if is_all_reduce(eqn.primitive.name):
        counts[where] += 1
      if eqn.primitive.name == "cond" and where == "every_step":
        for i, branch in enumerate(eqn.params["branches"]):
          walk(branch.jaxpr, "sync_branch" if i == 1 else "other_branch")
        continue
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub, where)

  walk(closed_jaxpr.jaxpr, "every_step")
  return counts
