"""What the inner optimizer's state does at a sync: maintain, reset or interpolate.

The policies act on the inner state's *moment buffers* and nothing else. The
rule, applied to every state node (a ``NamedTuple``, as optax states are):

- A node that has a field holding a params-shaped tree of floating-point arrays
  (one buffer per parameter, like Adam's ``mu`` and ``nu`` or momentum's
  ``trace``; with a single array as params, not a scalar unless the params
  are one) is a moment node. ``"reset"`` replaces the whole node by its fresh
  ``init`` value, so the counters that belong to those buffers (Adam's
  bias-correction ``count``) restart with them. ``"interpolate"`` moves its
  floating-point leaves toward their value at the previous sync and keeps its
  integer leaves.
- Every other node is kept as it is, and the rule is applied to the nodes inside
  it; so is a node that wraps another optimizer's state (``MultiSteps`` keeps its
  accumulated gradients with its counters): the step count of a learning-rate schedule (``ScaleByScheduleState``),
  ``inject_hyperparams``' count and hyperparameters, ``MultiSteps``' counters, a
  noise transformation's random key all keep their progress.

So ``lookahead(optax.adamw(warmup_cosine_decay_schedule(...)), inner_state_policy="reset")``
restarts Adam's moments every sync while the learning-rate schedule runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._tree import is_inexact

POLICIES = ("maintain", "reset", "interpolate")


def _is_node(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


class ParamsShape(NamedTuple):
  """What a moment buffer is compared with: the params' tree structure, and whether the params are one scalar."""

  structure: Any
  scalar: bool


def params_shape(params) -> ParamsShape:
  leaves, structure = jax.tree.flatten(params)
  return ParamsShape(structure, len(leaves) == 1 and jnp.ndim(leaves[0]) == 0)


def _is_moment_buffer(x: Any, like: ParamsShape) -> bool:
  """A params-shaped tree with at least one floating-point leaf: one buffer per parameter.

  When the params are a single array, every leaf has their structure: there a
  scalar (a plateau's scale, another state's scalar field) is a buffer only if
  the params are a scalar too.
  """
  leaves, structure = jax.tree.flatten(x)
  if structure != like.structure or not any(is_inexact(leaf) for leaf in leaves):
    return False
  return like.structure.num_leaves != 1 or like.scalar or jnp.ndim(leaves[0]) > 0


def _holds_states(x: Any) -> bool:
  """True if ``x`` contains an optimizer state node (a wrapper's inner state)."""
  nodes = jax.tree.leaves(x, is_leaf=_is_node)
  return any(_is_node(n) and not isinstance(n, optax.MaskedNode) for n in nodes)


def is_moment_node(node: Any, like: ParamsShape) -> bool:
  """True for a state node that holds moment buffers and wraps no other state (see the module docstring)."""
  if not _is_node(node):
    return False
  buffers = [_is_moment_buffer(field, like) for field in node]
  return any(buffers) and not any(_holds_states(f) for f, b in zip(node, buffers) if not b)


def _map_moment_nodes(fn: Callable, like: ParamsShape, state, *others):
  """``fn(node, *other_nodes)`` on each moment node of ``state``; everything else kept from ``state``."""
  if is_moment_node(state, like):
    return fn(state, *others)
  if _is_node(state):
    return type(state)(*(_map_moment_nodes(fn, like, *xs) for xs in zip(state, *others)))
  if isinstance(state, (tuple, list)):
    return type(state)(_map_moment_nodes(fn, like, *xs) for xs in zip(state, *others))
  if isinstance(state, dict):
    return type(state)((key, _map_moment_nodes(fn, like, state[key], *(o[key] for o in others))) for key in state)
  return state


def reset_moments(state, fresh, params):
  """``state`` with its moment nodes taken from ``fresh`` (a new ``init``); all else kept."""
  return _map_moment_nodes(lambda _, new: new, params_shape(params), state, fresh)


def interpolate_moments(state, snapshot, alpha, params):
  r"""Moment buffers moved toward ``snapshot``: :math:`m \leftarrow m_0 + \alpha (m - m_0)`; all else kept.

  Evaluated as :math:`m + (1 - \alpha)(m_0 - m)`, which is ``m`` bit for bit at ``alpha=1``.
  """

  def node(current, previous):
    return jax.tree.map(
      lambda x, x0: (x + (1 - alpha) * (x0 - x)).astype(x.dtype) if is_inexact(x) else x, current, previous
    )

  return _map_moment_nodes(node, params_shape(params), state, snapshot)


def at_sync(policy: str, inner_state, slow_inner_state, alpha, params, fresh: Callable[[], Any]):
  """The inner state and the interpolation snapshot after a sync, under ``policy``."""
  if policy == "reset":
    return reset_moments(inner_state, fresh(), params), slow_inner_state
  if policy == "interpolate":
    new = interpolate_moments(inner_state, slow_inner_state, alpha, params)
    return new, new
  return inner_state, slow_inner_state


def snapshot_init(policy: str, inner_state):
  """The interpolation snapshot kept in the state: a copy of the inner state, or nothing."""
  if policy == "interpolate":
    return jax.tree.map(lambda x: jnp.array(x, copy=True), inner_state)
  return optax.EmptyState()
