"""Reading a traced program: where its cross-device collectives sit."""

from __future__ import annotations

from collections.abc import Iterator


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


def collectives(closed_jaxpr) -> list[tuple]:
  """``(group, branch, primitive, operand bytes)`` of every cross-replica collective in a per-replica program.

  ``group`` is None for a collective outside any top-level ``cond``: it runs at
  every call. Otherwise it is the position of the top-level ``cond`` that holds
  it (counting only the conds that hold a collective), and ``branch`` the
  index of the branch (for ``lax.cond``, 1 is the true branch); that collective runs only when it is taken
  (Lookahead's commit at a sync, one fragment's sync). Operand bytes are the
  sizes and dtypes the program gives the collective's inputs.
  """
  found = []

  def operand_bytes(eqn):
    return sum(int(v.aval.size) * v.aval.dtype.itemsize for v in eqn.invars)

  def walk(jx, where):
    for eqn in jx.eqns:
      if is_all_reduce(eqn.primitive.name):
        found.append(where + (eqn.primitive.name, operand_bytes(eqn)))
      if eqn.primitive.name == "cond" and where == (None, None):
        group = len({g for g, *_ in found if g is not None})
        for b, branch in enumerate(eqn.params["branches"]):
          walk(branch.jaxpr, (group, b))
        continue
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub, where)

  walk(closed_jaxpr.jaxpr, (None, None))
  return found


def count_all_reduces(closed_jaxpr) -> dict:
  """All-reduces in a per-replica program: ``{"every_step": n, "conditional": n}``.

  One ``psum`` equation reduces a whole pytree in one collective: one round.
  Collectives outside any ``cond`` run at every call; those inside a branch of
  a top-level ``cond`` (Lookahead's commit at a sync) run only when that
  branch is taken.
  """
  found = collectives(closed_jaxpr)
  every_step = sum(group is None for group, *_ in found)
  return {"every_step": every_step, "conditional": len(found) - every_step}


def ring_bytes_sent(primitive: str, operand_bytes: int, replicas: int) -> float:
  """Bytes one replica sends for a collective under the usual ring algorithms.

  An all-reduce (``psum``) of ``P`` bytes: reduce-scatter then all-gather,
  ``2 (M - 1) / M * P``. An all-gather of a ``c``-byte block: ``(M - 1) * c``.
  An all-to-all of ``P`` bytes keeps one ``M``-th and sends the rest: ``(M - 1) / M * P``.
  """
  if primitive.startswith("all_gather"):
    return (replicas - 1) * operand_bytes
  if primitive.startswith("all_to_all"):
    return (replicas - 1) / replicas * operand_bytes
  return 2 * (replicas - 1) / replicas * operand_bytes
