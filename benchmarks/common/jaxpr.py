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
  """All-reduces in a per-replica program: ``{"every_step": n, "conditional": n}``.

  One ``psum`` equation reduces a whole pytree in one collective: one round.
  Collectives outside any ``cond`` run at every call; those inside a branch of
  a top-level ``cond`` (Lookahead's commit at a sync) run only when that
  branch is taken.
  """
  counts = {"every_step": 0, "conditional": 0}

  def walk(jx, where):
    for eqn in jx.eqns:
      if is_all_reduce(eqn.primitive.name):
        counts[where] += 1
      if eqn.primitive.name == "cond" and where == "every_step":
        for branch in eqn.params["branches"]:
          walk(branch.jaxpr, "conditional")
        continue
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub, where)

  walk(closed_jaxpr.jaxpr, "every_step")
  return counts
