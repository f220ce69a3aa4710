"""Small pytree helpers shared by the combinator and the state utilities."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def is_inexact(x) -> bool:
  """True for a floating-point or complex array leaf."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def map_inexact(f, params, *rest):
  """``f`` over the floating-point leaves of ``params``; ``MaskedNode()`` elsewhere."""
  return jax.tree.map(lambda p, *r: f(p, *r) if is_inexact(p) else optax.MaskedNode(), params, *rest)


def is_concrete(tree) -> bool:
  """True when every leaf is a concrete array or number: a call made outside ``jit``, ``vmap`` and ``grad``."""
  return all(
    isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)) and not isinstance(x, jax.core.Tracer)
    for x in jax.tree.leaves(tree)
  )


def unfolded_true(token) -> jax.Array:
  """``True``, computed from a scalar ``token`` of the step that is never below 0 (or NaN), so XLA cannot fold it.

  ``jnp.where(unfolded_true(t), x, y)`` is ``x`` bit for bit but depends on
  ``y``: XLA then computes ``y`` first, and may write ``x`` over a buffer that
  ``y`` read (in place) instead of copying that buffer.
  """
  return jnp.logical_not(token < 0)


def ordered_after(token, tree):
  """``tree`` unchanged, computed after ``token`` (an array of the step whose values are never below 0).

  Each numeric leaf is selected by :func:`unfolded_true` of the token's first
  element, so it depends on the token: XLA orders every reader of the result
  after the computation of the token (and can then update buffers in place
  instead of copying them). Keys and booleans pass as they are; an empty
  token orders nothing.
  """
  if token.size == 0:
    return tree
  one = unfolded_true(token.ravel()[0])
  numeric = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.number)  # not a key, not a bool
  return jax.tree.map(lambda x: jnp.where(one, x, 0).astype(x.dtype) if numeric(x) else x, tree)


def mask_like(params, tree):
  """``tree`` (shaped like ``params``) with ``MaskedNode()`` where params are not floating point."""
  return map_inexact(lambda p, x: x, params, tree)


def fill(tree, fallback):
  """``tree`` with its ``MaskedNode`` leaves taken from ``fallback``."""
  return jax.tree.map(lambda t, f: f if is_masked(t) else t, tree, fallback, is_leaf=is_masked)


def cast_like(tree, ref):
  """``tree`` cast leaf by leaf to the type of ``ref``: dtype, varying mesh axes and sharding.

  So that the two branches of a ``lax.cond`` agree: a constant in one branch is
  per-replica in the other under ``shard_map``, and a fresh ``init`` has no
  sharding under an explicit-sharding mesh.
  """

  def leaf(x, r):
    x = jnp.asarray(x).astype(jnp.asarray(r).dtype)
    xt, rt = jax.typeof(x), jax.typeof(r)
    missing = tuple(sorted(_varying_axes(rt) - _varying_axes(xt)))
    if missing:
      x = jax.lax.pcast(x, missing, to="varying")
    if not rt.sharding.mesh.empty and xt.sharding.spec != rt.sharding.spec:
      x = jax.sharding.reshard(x, rt.sharding.spec)
    return x

  return jax.tree.map(leaf, tree, ref)


def _varying_axes(aval) -> frozenset:
  mat = getattr(aval, "manual_axis_type", None)  # older jax: ``vma`` (None on an eval_shape result: unknown)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", None) or ())


def _knows_varying(aval) -> bool:
  return getattr(aval, "manual_axis_type", None) is not None or getattr(aval, "vma", None) is not None


def _vary_over(x, axes):
  missing = tuple(a for a in axes if a not in _varying_axes(jax.typeof(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_as(x, sources):
  """``x`` typed as varying over every mesh axis that one of ``sources`` varies over (no data moves)."""
  wanted = frozenset().union(*(_varying_axes(jax.typeof(s)) for s in sources)) - _varying_axes(jax.typeof(x))
  return jax.lax.pcast(x, tuple(sorted(wanted)), to="varying") if wanted else x


def vary_like(operands, branches):
  """``operands`` typed as varying over every mesh axis that some ``branches[j](operands)`` varies over.

  Under ``shard_map``'s type checks an all-gathered mean is varying even when
  every replica holds the same value; the stored values a conditional returns
  when no branch is taken are cast alike (no data moves), so that the branches
  agree. Outside ``shard_map`` (``pmap``, ``vmap``, plain ``jit``) there are no
  such types and ``operands`` come back as they are.
  """
  manual = tuple(sorted(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())))
  if not manual:
    return operands

  def leaf(x, *results):
    wanted = frozenset().union(*(_varying_axes(r) for r in results)) - _varying_axes(jax.typeof(x))
    return jax.lax.pcast(x, tuple(sorted(wanted)), to="varying") if wanted else x

  # Varying operands make more results varying (a varying slow weight, a varying residual): to a fixed point.
  for _ in range(len(jax.tree.leaves(operands)) + 1):
    outs = [jax.eval_shape(branch, operands) for branch in branches]
    if not all(_knows_varying(r) for r in jax.tree.leaves(outs)):  # an older jax: every operand per replica
      return jax.tree.map(functools.partial(_vary_over, axes=manual), operands)
    before = [_varying_axes(jax.typeof(x)) for x in jax.tree.leaves(operands)]
    operands = jax.tree.map(leaf, operands, *outs)
    if before == [_varying_axes(jax.typeof(x)) for x in jax.tree.leaves(operands)]:
      break
  return operands
