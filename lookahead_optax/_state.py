"""Reading and acting on a lookahead state nested anywhere in an optimizer state."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._lookahead import LookaheadState
from lookahead_optax._tree import fill, is_masked


def _is_state(x) -> bool:
  return isinstance(x, LookaheadState)


def _unwrap(x):
  """The array inside a Flax nnx variable (``nnx.Optimizer.opt_state`` leaves); arrays as they are."""
  if hasattr(x, "get_value"):
    return x.get_value()
  return getattr(x, "value", x) if not isinstance(x, (jax.Array, jnp.ndarray)) else x


def find_lookahead_state(opt_state) -> LookaheadState:
  """The single :class:`LookaheadState` inside ``opt_state``.

  It may be nested anywhere: in ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``masked``, ``multi_transform``, ``apply_if_finite``, or the
  ``opt_state`` of a Flax ``TrainState`` or ``nnx.Optimizer``.

  Raises:
    ValueError: if there is no lookahead state, or more than one.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
  if len(found) != 1:
    what = "no LookaheadState" if not found else f"{len(found)} LookaheadStates"
    raise ValueError(
        f"opt_state: expected exactly one lookahead state, found {what} in an optimizer state of "
        f"type {type(opt_state).__name__}. Pass the state returned by an optimizer built with "
        "lookahead_optax.lookahead (with one lookahead in it)."
    )
  return jax.tree.map(_unwrap, found[0], is_leaf=lambda x: x is not found[0] and hasattr(x, "get_value"))


def slow_params(opt_state, params: Optional[Any] = None):
  """The slow weights held in ``opt_state``, shaped like params.

  Leaves that lookahead does not track (integer or boolean params, or params
  masked out by ``optax.masked``) come from ``params``, which is then required.
  Given ``params``, the slow weights are cast to the params' dtypes (relevant
  with ``slow_dtype``); without, they keep the dtype they are stored in.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import lookahead, slow_params
    >>> opt = optax.chain(optax.clip(1.0), lookahead(optax.sgd(0.1)))
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> slow_params(state)["w"]
    Array([1., 1.], dtype=float32)
  """
  slow = find_lookahead_state(opt_state).slow
  if params is None:
    if any(is_masked(x) for x in jax.tree.leaves(slow, is_leaf=is_masked)):
      raise ValueError(
          "slow_params: the slow weights do not cover every param (integer, boolean or masked-out "
          "leaves are not tracked); pass params=... to fill them in, got params=None."
      )
    return slow
  params = jax.tree.map(_unwrap, params, is_leaf=lambda x: hasattr(x, "get_value"))
  slow = fill(slow, params)
  return jax.tree.map(lambda s, p: jnp.asarray(s).astype(jnp.asarray(p).dtype), slow, params)


def force_sync(params, opt_state, alpha: Optional[Any] = None):
  r"""Take the slow step now, mid-cycle: returns ``(params, opt_state)``, synced.

  For the end of training, or before a checkpoint that must hold the slow model
  (what timm calls ``sync_lookahead()``). With the current params as the fast
  weights :math:`\theta`:

  .. math::  \phi \leftarrow \phi + \alpha(\theta - \phi), \qquad \theta \leftarrow \phi

  and the cycle counter restarts at 0. The inner and outer optimizer states are
  left as they are. ``alpha`` defaults to the alpha of the last sync
  (``LookaheadState.alpha``: the constant alpha, or the schedule's or adaptive
  rule's latest value); pass ``alpha=0.0`` to just reset the fast weights onto
  the slow ones. Pure: the arguments are not modified. The returned state
  holds plain arrays where the lookahead state was; with an ``nnx.Optimizer``
  write it back with ``nnx.update(optimizer.opt_state, nnx.state(opt_state))``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import lookahead, force_sync, slow_params
    >>> opt = lookahead(optax.sgd(1.0), k=5, alpha=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(2)}, state, params)
    >>> params = optax.apply_updates(params, updates)  # fast: -1, slow: 0
    >>> params, state = force_sync(params, state)
    >>> params["w"]
    Array([-0.5, -0.5], dtype=float32)
  """
  old = find_lookahead_state(opt_state)
  a = old.alpha if alpha is None else jnp.asarray(alpha, jnp.float32)

  def step(s, p):
    if is_masked(s):
      return s
    p = jnp.asarray(_unwrap(p))
    return s + (a * (p.astype(s.dtype) - s)).astype(s.dtype)

  slow = jax.tree.map(step, old.slow, params, is_leaf=is_masked)
  new = old._replace(slow=slow, count=jnp.zeros_like(old.count))
  new_params = jax.tree.map(
      lambda s, p: p if is_masked(s) else s.astype(jnp.asarray(_unwrap(p)).dtype),
      slow, params, is_leaf=is_masked,
  )
  new_state = jax.tree.map(lambda x: new if _is_state(x) else x, opt_state, is_leaf=_is_state)
  return new_params, new_state
