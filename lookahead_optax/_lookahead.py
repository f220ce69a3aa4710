"""The Lookahead combinator: k fast steps of any optax optimizer, then one slow step."""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _alpha
from lookahead_optax._tree import cast_like, fill, is_inexact, map_inexact, mask_like

INNER_STATE_POLICIES = ("maintain", "reset", "interpolate")

AlphaLike = Union[float, jax.Array, Callable[[jax.Array], jax.Array], _alpha.AdaptiveAlpha]


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`."""

  count: jax.Array
  """Inner steps taken since the last sync, in ``[0, k)`` (int32)."""
  syncs: jax.Array
  """Number of completed syncs (int32); the argument of an alpha schedule."""
  alpha: jax.Array
  """The slow step size used at the last sync (float32), for logging."""
  slow: optax.Params
  """Slow weights, shaped like params; ``optax.MaskedNode()`` where params are not floating point."""
  inner_state: optax.OptState
  """State of the inner (fast) optimizer."""
  slow_inner_state: optax.OptState
  """``inner_state="interpolate"`` only: the inner state after the last sync; else ``EmptyState()``."""
  outer_state: optax.OptState
  """State of the outer optimizer of the slow step; ``EmptyState()`` for plain Lookahead."""
  alpha_state: optax.OptState
  """Adaptive alpha's squared-gradient EMA when it keeps one; else ``EmptyState()``."""


def lookahead(
    inner: optax.GradientTransformation,
    k: int = 5,
    alpha: AlphaLike = 0.5,
    *,
    inner_state: str = "maintain",
    outer: Optional[optax.GradientTransformation] = None,
    slow_dtype: Optional[Any] = None,
    axis_name: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead: ``k`` steps of ``inner`` forward, one slow step back.

  The params you hold are the fast weights :math:`\theta`; the state keeps the
  slow weights :math:`\phi`. Each update is one step of ``inner``. On every
  ``k``-th update (a *sync*) the slow weights move toward the fast weights and
  the returned updates reset the fast weights onto them (Algorithm 1):

  .. math::

    \theta_{t,i} = \theta_{t,i-1} + A(\theta_{t,i-1}), \qquad
    \phi_t = \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}), \qquad
    \theta_{t+1,0} = \phi_t .

  With ``outer`` the slow step is any optax optimizer applied to the
  pseudo-gradient :math:`\phi_{t-1} - \theta_{t,k}` with the slow weights as
  params (``outer=None`` is ``optax.sgd(alpha)``; a Nesterov ``outer`` is
  SNOO). With ``axis_name`` the pseudo-gradient is averaged over that mapped
  axis at each sync, inside the sync branch only (DiLoCo).

  Contracts: right after each sync, ``optax.apply_updates(params, updates)`` is
  bitwise equal to the new slow weights (the slow weights are computed as that
  sum; with ``slow_dtype`` or ``axis_name`` the fast weights are the slow
  weights rounded to the params' dtype, up to one rounding); ``alpha=1`` gives
  the inner optimizer's trajectory bit for bit; one trace serves every step.
  Lookahead must be the last transformation applied to the updates.

  Args:
    inner: any optax gradient transformation, the fast optimizer. Extra keyword
      arguments of ``update`` (``value``, ``grad``, ``value_fn``) are forwarded.
    k: the sync period, an int >= 1 (or an integer array under
      ``optax.inject_hyperparams``).
    alpha: the slow step size in [0, 1]; or a schedule, a callable of the number
      of completed syncs; or :func:`adaptive_alpha`.
    inner_state: what the inner state does at a sync: ``"maintain"`` (carry on,
      the paper's default), ``"reset"`` (re-initialise), or ``"interpolate"``
      (floating-point leaves move toward their value at the previous sync with
      the same alpha; integer leaves such as counts are maintained).
    outer: optional optax transformation for the slow step (see above).
    slow_dtype: dtype of the slow weights (e.g. ``jnp.float32`` under bfloat16
      params); default: the params' dtype.
    axis_name: a mapped axis name (``pmap``/``shard_map``) over which to average
      the pseudo-gradient at each sync; for data-parallel training where each
      replica computes its own gradients (DiLoCo).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`LookaheadState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lookahead_optax import lookahead, slow_params
    >>> opt = lookahead(optax.adam(0.1), k=5, alpha=0.5)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> for _ in range(10):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.all(params["w"] == slow_params(state)["w"]))  # synced at step 10
    True

  References:
    Zhang, Lucas, Hinton, Ba, `Lookahead Optimizer: k steps forward, 1 step back
    <https://arxiv.org/abs/1907.08610>`_, NeurIPS 2019.
  """
  _check_arguments(inner, k, alpha, inner_state, outer, slow_dtype)
  inner = optax.with_extra_args_support(inner)
  policy = inner_state
  # Element-wise work is selected with jnp.where so XLA fuses it with the inner
  # update (see _select_then_commit); collectives (DiLoCo) and adaptive alpha's
  # global reductions go in a lax.cond so that they only run on sync steps.
  use_cond = axis_name is not None or isinstance(alpha, _alpha.AdaptiveAlpha)
  # alpha == 1 known at trace time: the reset term is exactly zero, so leave it
  # out and let XLA fuse (and contract) the inner update exactly as without lookahead.
  alpha_is_one = outer is None and _alpha.is_real_number(alpha) and float(alpha) == 1.0

  def init_fn(params):
    slow = map_inexact(
        lambda p: jnp.array(p, dtype=slow_dtype or jnp.asarray(p).dtype, copy=True), params
    )
    state = inner.init(params)
    return LookaheadState(
        count=jnp.zeros((), jnp.int32),
        syncs=jnp.zeros((), jnp.int32),
        alpha=_alpha.initial_alpha(alpha),
        slow=slow,
        inner_state=state,
        slow_inner_state=inner.init(params) if policy == "interpolate" else optax.EmptyState(),
        outer_state=optax.EmptyState() if outer is None else outer.init(slow),
        alpha_state=_alpha.init_alpha_state(alpha, slow, state),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "lookahead: update needs params (the fast weights) to place the slow step; "
          "got params=None. Call opt.update(grads, state, params)."
      )
    inner_updates, inner_st = inner.update(updates, state.inner_state, params, **extra_args)
    grads = mask_like(params, updates)
    alpha_state = _alpha.observe_gradient(alpha, state.alpha_state, grads)
    sync = state.count >= k - 1

    def on_sync(_):
      fast = map_inexact(lambda p, u: (p + u).astype(p.dtype), params, inner_updates)
      a = _alpha.alpha_at_sync(
          alpha, state.syncs, alpha_state, inner_st, state.slow, fast, grads,
          lambda tree: mask_like(params, tree), axis_name,
      )
      pseudo_grad = map_inexact(lambda p, s, f: s - f.astype(s.dtype), params, state.slow, fast)
      if outer is None:
        shared = _pmean(pseudo_grad, axis_name)
        outer_updates = map_inexact(lambda p, g: (-a * g).astype(g.dtype), params, shared)
        outer_st = state.outer_state
      else:
        outer_updates, outer_st = outer.update(
            _pmean(pseudo_grad, axis_name), state.outer_state, state.slow
        )

      def reset(p, u, s, g, o):
        if axis_name is not None or s.dtype != p.dtype:
          # The slow weights are not params + updates here (replicas hold different
          # params, or another dtype): land on them in one rounding.
          return ((s + o.astype(s.dtype)).astype(p.dtype) - p).astype(u.dtype)
        # new_slow - fast written as g + o so that alpha=1 gives exactly 0.
        return (u + (g + o.astype(g.dtype)).astype(u.dtype)).astype(u.dtype)

      if alpha_is_one:
        new_updates = inner_updates
      else:
        new_updates = fill(map_inexact(reset, params, inner_updates, state.slow, pseudo_grad, outer_updates), inner_updates)

      def new_slow(p, u, s, o):
        if axis_name is None and s.dtype == p.dtype:
          return (p + u).astype(p.dtype)  # exactly what apply_updates will produce
        return s + o.astype(s.dtype)

      slow = map_inexact(new_slow, params, new_updates, state.slow, outer_updates)
      inner_new, slow_inner = at_sync(inner_st, state.slow_inner_state, a, params)
      return new_updates, slow, inner_new, slow_inner, outer_st, a

    def at_sync(inner_st, slow_inner, a, params):
      """The inner state policy: the inner and slow inner states after a sync."""
      if policy == "reset":
        return cast_like(inner.init(params), inner_st), slow_inner
      if policy == "interpolate":
        inner_new = _interpolate(slow_inner, inner_st, a)
        return inner_new, inner_new
      return inner_st, slow_inner

    def no_sync(_):
      return (inner_updates, state.slow, inner_st, state.slow_inner_state,
              state.outer_state, state.alpha)

    if use_cond:
      out = jax.lax.cond(sync, lambda x: cast_like(on_sync(x), no_sync(x)), no_sync, None)
      new_updates, slow, inner_new, slow_inner, outer_st, a = out
    else:
      new_updates, slow, inner_new, slow_inner, outer_st, a = _select_then_commit(
          sync, cast_like(on_sync(None), no_sync(None)), no_sync(None), params, axis_name,
          lambda inner_st, slow_inner, a: at_sync(inner_st, slow_inner, a, params))
    new_state = LookaheadState(
        count=jnp.where(sync, 0, state.count + 1).astype(jnp.int32),
        syncs=jnp.where(sync, optax.safe_increment(state.syncs), state.syncs),
        alpha=a,
        slow=slow,
        inner_state=inner_new,
        slow_inner_state=slow_inner,
        outer_state=outer_st,
        alpha_state=alpha_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _select_then_commit(sync, on_sync, no_sync, params, axis_name, at_sync):
  """Combine the two branches without touching slow copies on non-sync steps.

  The updates are selected element-wise (``jnp.where``), so XLA fuses them with
  the inner update in one pass over memory. Everything that changes only at a
  sync (slow weights, inner state under "reset"/"interpolate", slow inner
  state) is written inside a ``lax.cond``: the other k - 1 steps neither read
  nor write it, and no donated buffer needs a defensive copy. The slow weights
  are taken from ``params + updates``, the expression ``optax.apply_updates``
  evaluates (XLA's CSE shares it with the caller's), so fast == slow bitwise.
  """
  new_updates, slow_sync, _, _, outer_st, a = on_sync
  updates, slow, inner_st, slow_inner, last_outer_st, last_alpha = no_sync
  new_updates = jax.tree.map(lambda x, y: jnp.where(sync, x, y), new_updates, updates)
  a = jnp.where(sync, a, last_alpha)
  exact = lambda p, s: axis_name is None and s.dtype == p.dtype
  # A slow copy of another dtype is not params + updates: select it element-wise.
  slow = map_inexact(lambda p, s, s_sync: s if exact(p, s) else jnp.where(sync, s_sync, s), params, slow, slow_sync)
  fast = map_inexact(lambda p, u, s: (p + u).astype(p.dtype) if exact(p, s) else s, params, new_updates, slow)
  # The outer state (e.g. SNOO's momentum) is committed only at a sync.
  slow, inner_new, slow_inner, outer_st = jax.lax.cond(
      sync,
      lambda: (fast, *cast_like(at_sync(inner_st, slow_inner, a), (inner_st, slow_inner)),
               cast_like(outer_st, last_outer_st)),
      lambda: (slow, inner_st, slow_inner, last_outer_st),
  )
  return new_updates, slow, inner_new, slow_inner, outer_st, a


def _interpolate(slow_state, state, a):
  """Floating leaves of ``state`` moved toward ``slow_state`` with step ``a``; others kept."""
  def leaf(s, x):
    if not is_inexact(x):
      return x
    return (s + a * (x - s)).astype(x.dtype)
  return jax.tree.map(leaf, slow_state, state)


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _check_arguments(inner, k, alpha, inner_state, outer, slow_dtype) -> None:
  for name, tx in (("inner", inner), ("outer", outer)):
    if tx is None and name == "outer":
      continue
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
      raise TypeError(
          f"lookahead: {name} must be an optax GradientTransformation (with init and update), "
          f"got {tx!r} of type {type(tx).__name__}."
      )
  _check_k(k)
  _alpha.check_alpha(alpha)
  if inner_state not in INNER_STATE_POLICIES:
    raise ValueError(
        f"lookahead: inner_state must be one of {', '.join(map(repr, INNER_STATE_POLICIES))}, "
        f"got {inner_state!r}."
    )
  if slow_dtype is not None:
    try:
      dtype = jnp.dtype(slow_dtype)
    except TypeError as e:
      raise ValueError(f"lookahead: slow_dtype must be a floating dtype, got {slow_dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(f"lookahead: slow_dtype must be a floating dtype, got {slow_dtype!r}.")


def _check_k(k) -> None:
  if isinstance(k, jax.core.Tracer):
    if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim:
      raise ValueError(f"lookahead: k must be an integer scalar >= 1, got a traced {k.dtype}{list(k.shape)}.")
    return  # a traced hyperparameter under optax.inject_hyperparams
  bad = f"lookahead: k must be an int >= 1, got {k!r} ({type(k).__name__})."
  if isinstance(k, (bool, np.bool_)):
    raise ValueError(bad)
  if isinstance(k, (jax.Array, np.ndarray)):
    if k.ndim or not jnp.issubdtype(k.dtype, jnp.integer):
      raise ValueError(bad)
    k = int(k)
  if not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(bad)
