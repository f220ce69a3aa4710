r"""Streaming DiLoCo's sync schedule: fragments that sync in turn, and an exchange that lands a step late.

:func:`streaming` names the schedule; :func:`lookahead_optax.lookahead` takes
it as ``schedule=``. With ``F`` fragments and sync period ``k``, fragment ``j``
syncs on the steps ``t`` (counted from 0) where

.. math:: (t - \lfloor j k / F \rfloor) \bmod k = k - 1,

so over a cycle of ``k`` steps every fragment syncs once, and no two fragments
on the same step (``F <= k``). ``fragments=F`` as an int splits the params into
``F`` groups of whole leaves, in the order of ``jax.tree.leaves`` (layers stay
together), each as near ``1/F`` of the parameter count as whole leaves allow;
a pytree of ints shaped like the params assigns the leaves by hand.

With ``delay=1`` a sync's pseudo-gradient is taken from the params the update
receives (one inner step before the end of the cycle), so its exchange does
not wait for this step's gradient; the fast weights then land on
:math:`(1 - \beta)\,\phi + \beta\,(\theta + u)`, with :math:`\beta` the
``mixing`` weight of this step's own inner update.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._tree import is_inexact, map_inexact


class Streaming(NamedTuple):
  """A sync schedule made by :func:`streaming` (static: never part of the optimizer state)."""

  fragments: Any
  """The number of fragments ``F``, or a pytree of fragment ids shaped like the params."""
  delay: int
  """0: a sync uses this step's fast weights; 1: the params received (the exchange overlaps the step)."""
  mixing: float
  """``delay=1``: the weight of this step's inner update in the landing."""

  @property
  def n_fragments(self) -> int:
    return count(self.fragments)


EVERY_STEP = Streaming(1, 0, 0.0)  # plain Lookahead: every param syncs at the end of each cycle


def streaming(fragments: Any = 1, *, delay: int = 0, mixing: float | None = None) -> Streaming:
  r"""Streaming DiLoCo's schedule: ``fragments`` that sync in turn, optionally one step late.

  Pass it as ``lookahead(..., schedule=streaming(...))`` (or the same keyword
  arguments to :func:`lookahead_optax.diloco`). Fragment ``j`` of ``F`` syncs
  at the steps :math:`t` with :math:`(t - \lfloor jk/F \rfloor) \bmod k = k-1`:
  each fragment once per cycle, each with its own outer-optimizer state, so a
  sync exchanges only ``1/F`` of the params.

  Args:
    fragments: an int ``F >= 1`` (whole leaves, in ``jax.tree.leaves`` order,
      split into ``F`` groups of near-equal size; at most ``k``) or a pytree of
      fragment ids ``0..F-1`` shaped like the params.
    delay: 0 or 1. With 1 a sync's pseudo-gradient is taken from the params the
      update receives, so the exchange over replicas does not wait for this
      step's gradient and may overlap the forward and backward pass; the fast
      weights land on ``(1 - mixing) * new slow + mixing * (params + inner
      update)``. Needs an exchange over replicas in ``outer``
      (:func:`lookahead_optax.replica_mean`).
    mixing: ``delay=1`` only: the weight in [0, 1] of this step's fast weights
      in that landing; default 0.5.

  Returns:
    A :class:`Streaming` schedule.

  Example:
    >>> import optax
    >>> from lookahead_optax import lookahead, replica_mean, streaming
    >>> outer = optax.chain(replica_mean("replica"), optax.sgd(0.7, momentum=0.9, nesterov=True))
    >>> opt = lookahead(optax.adamw(4e-4), k=100, outer=outer, schedule=streaming(4, delay=1))

  References:
    Douillard et al., `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025.
  """
  return make("streaming", fragments, delay, mixing)


def make(caller: str, fragments: Any, delay: Any, mixing: Any) -> Streaming:
  """:func:`streaming`, with errors that name ``caller`` (``diloco`` builds one)."""
  check_fragments(caller, fragments, None)
  if isinstance(delay, bool) or not isinstance(delay, numbers.Integral) or delay not in (0, 1):
    raise ValueError(f"{caller}: delay must be 0 or 1, got {delay!r}.")
  if mixing is not None:
    if not delay:
      raise ValueError(
        f"{caller}: mixing={mixing!r} weighs the inner step taken during a delayed exchange; it needs "
        "delay=1, got delay=0."
      )
    if isinstance(mixing, bool) or not isinstance(mixing, numbers.Real) or not 0.0 <= float(mixing) <= 1.0:
      raise ValueError(f"{caller}: mixing must be a number in [0, 1], got {mixing!r}.")
  return Streaming(fragments, int(delay), 0.5 if mixing is None else float(mixing))


def delayed_landing(schedule: Streaming, land, u):
  r"""``delay=1``: :math:`(1 - \beta)` of the landing on the new slow weights plus :math:`\beta` of the inner update."""
  if not schedule.delay:
    return land
  return (1.0 - schedule.mixing) * land + schedule.mixing * u.astype(land.dtype)


def check_fragments(caller: str, fragments: Any, k: Any) -> None:
  """At construction: an int >= 1, at most ``k``, or a pytree of ints (checked against the params at init)."""
  if isinstance(fragments, numbers.Integral) and not isinstance(fragments, bool):
    if int(fragments) < 1:
      raise ValueError(f"{caller}: fragments must be an int >= 1 or a pytree of fragment ids, got {fragments!r}.")
  else:
    leaves = jax.tree.leaves(fragments)
    if not leaves or not all(
      isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 0 for x in leaves
    ):
      raise ValueError(
        f"{caller}: fragments must be an int >= 1 or a pytree of non-negative int fragment ids shaped like "
        f"the params, got {fragments!r}."
      )
  if isinstance(k, (jax.Array, np.ndarray)) and not isinstance(k, jax.core.Tracer):
    k = int(k)  # a concrete array (checked by then to be an integer scalar)
  if isinstance(k, numbers.Integral) and not isinstance(k, bool) and count(fragments) > k:
    raise ValueError(
      f"{caller}: fragments={fragments!r} makes {count(fragments)} fragments, more than k={k}: with one "
      "fragment syncing per step, at most k fragments fit in a cycle."
    )


def count(fragments: Any) -> int:
  """The number of fragments F."""
  if isinstance(fragments, numbers.Integral):
    return int(fragments)
  return int(max(jax.tree.leaves(fragments))) + 1


def assign(caller: str, fragments: Any, params) -> list:
  """The fragment id of each floating-point leaf of ``params``, in ``jax.tree.leaves`` order."""
  leaves = [p for p in jax.tree.leaves(params) if is_inexact(p)]
  if not isinstance(fragments, numbers.Integral):
    try:
      ids = jax.tree.leaves(map_inexact(lambda p, i: i, params, fragments))
    except ValueError as e:
      raise ValueError(f"{caller}: fragments must be shaped like the params: {e}") from e
    missing = sorted(set(range(count(fragments))) - set(ids))
    if missing:
      raise ValueError(
        f"{caller}: fragment ids must cover 0..F-1 on floating-point params; ids {missing} have no leaf."
      )
    return ids
  n = int(fragments)
  if n == 1:
    return [0] * len(leaves)
  if n > len(leaves):
    raise ValueError(
      f"{caller}: fragments={n} is more than the {len(leaves)} floating-point leaves of the params "
      "(fragments are made of whole leaves)."
    )
  sizes = np.array([int(np.prod(p.shape)) for p in leaves], dtype=np.float64)
  # Each leaf goes to the fragment holding the middle of its span in the running parameter count ...
  middle = np.cumsum(sizes) - sizes / 2
  wanted = np.minimum((middle * n / sizes.sum()).astype(int), n - 1)
  # ... kept contiguous, non-decreasing and covering every fragment: leaf i's id lies in [i - (L - n), i].
  ids, last = [], -1
  for i, w in enumerate(wanted):
    last = int(min(max(w, i - (len(leaves) - n), last), i, last + 1, n - 1))
    ids.append(last)
  return ids


def mask(tree, ids: list, j: int):
  """``tree`` (shaped like the params' floating leaves, MaskedNode elsewhere) restricted to fragment ``j``."""
  leaves, structure = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  out, i = [], 0
  for leaf in leaves:
    if isinstance(leaf, optax.MaskedNode):
      out.append(leaf)
      continue
    out.append(leaf if ids[i] == j else optax.MaskedNode())
    i += 1
  return jax.tree.unflatten(structure, out)


def merge(base, parts: dict, ids: list):
  """``base`` with the leaves of fragment ``j`` taken from ``parts[j]`` (trees as in :func:`mask`)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  base_leaves, structure = jax.tree.flatten(base, is_leaf=is_masked)
  part_leaves = {j: jax.tree.flatten(t, is_leaf=is_masked)[0] for j, t in parts.items()}
  out, i = [], 0
  for pos, leaf in enumerate(base_leaves):
    if is_masked(leaf):
      out.append(leaf)
      continue
    out.append(part_leaves[ids[i]][pos] if ids[i] in part_leaves else leaf)
    i += 1
  return jax.tree.unflatten(structure, out)


def synced_last(count_, k, n: int):
  """The fragment that synced at the update before phase ``count`` (``n`` when none did); int32."""
  return syncing((jnp.minimum(count_, k - 1) + k - 1) % k, k, n)


def syncing(count_, k, n: int):
  """The fragment that syncs at phase ``count`` (``t mod k``), or ``n`` when none does; int32.

  A count at or beyond ``k - 1`` (``k`` lowered mid-cycle, e.g. injected) is read as ``k - 1``: the
  cycle ends at this step.
  """
  if n == 1:  # the plain schedule: the cycle's last step
    return jnp.where(count_ >= k - 1, 0, 1).astype(jnp.int32)
  count_ = jnp.minimum(count_, k - 1)
  j = jnp.arange(n)
  due = (count_ - (j * k) // n) % k == k - 1
  return jnp.where(jnp.any(due), jnp.argmax(due), n).astype(jnp.int32)
