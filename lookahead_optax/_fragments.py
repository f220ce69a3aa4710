r"""Fragments (Streaming DiLoCo): the params split into groups that sync on a staggered schedule.

With ``F`` fragments and sync period ``k``, fragment ``j`` syncs on the steps
``t`` (counted from 0) where

.. math:: (t - \lfloor j k / F \rfloor) \bmod k = k - 1,

so over a cycle of ``k`` steps every fragment syncs once, and no two fragments
on the same step (``F <= k``). ``fragments=F`` as an int splits the params into
``F`` groups of whole leaves, in the order of ``jax.tree.leaves`` (layers stay
together), each as near ``1/F`` of the parameter count as whole leaves allow;
a pytree of ints shaped like the params assigns the leaves by hand.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._tree import is_inexact, map_inexact


def check_fragments(caller: str, fragments: Any, k: Any) -> None:
  """At construction: an int >= 1, at most ``k``, or a pytree of ints (checked against the params at init)."""
  if isinstance(fragments, numbers.Integral) and not isinstance(fragments, bool):
    if int(fragments) < 1:
      raise ValueError(f"{caller}: fragments must be an int >= 1 or a pytree of fragment ids, got {fragments!r}.")
    if isinstance(k, numbers.Integral) and fragments > k:
      raise ValueError(
        f"{caller}: fragments={fragments} is more than k={k}: with one fragment syncing per step, at most k "
        "fragments fit in a cycle."
      )
    return
  leaves = jax.tree.leaves(fragments)
  if not leaves or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 0 for x in leaves):
    raise ValueError(
      f"{caller}: fragments must be an int >= 1 or a pytree of non-negative int fragment ids shaped like the "
      f"params, got {fragments!r}."
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


def syncing(count_, k, n: int):
  """The fragment that syncs at phase ``count`` (``t mod k``), or ``n`` when none does; int32."""
  j = jnp.arange(n)
  due = (count_ - (j * k) // n) % k == k - 1
  return jnp.where(jnp.any(due), jnp.argmax(due), n).astype(jnp.int32)
