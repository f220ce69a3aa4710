"""The Lookahead combinator: k fast steps of any optax optimizer, then one slow step.

An update is a short pipeline of module-level functions, read top to bottom in
``update_fn`` below:

1. the inner step, ``inner.update``: the inner updates, and the fast weights
   ``params + updates`` (:func:`fast_weights`);
2. :func:`slow_step`: the new slow weights, from plain alpha or any ``outer``
   optimizer applied to the pseudo-gradient, with the outer state and the alpha
   used;
3. the landing: element-wise ``where(sync, land on the new slow weights, inner
   updates)`` (:func:`landing_updates`), which XLA fuses into the inner
   optimizer's own loop;
4. :func:`commit`: one ``lax.cond`` that writes what changes only at a sync,
   the slow weights and the inner-state policy.

Where the slow step runs is decided by one rule, :func:`is_fused`.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from lookahead_optax import _alpha, _placement, _policy
from lookahead_optax._config import AlphaLike, Config, make_config
from lookahead_optax._tree import cast_like, fill, is_inexact, map_inexact, mask_like


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`."""

  count: jax.Array
  """Inner steps taken since the last sync, in ``[0, k)`` (int32)."""
  syncs: jax.Array
  """Number of completed syncs (int32); the argument of an alpha schedule."""
  alpha: Union[jax.Array, optax.EmptyState]
  """The slow step size used at the last sync (float32; 0 before the first sync); ``EmptyState()`` with ``outer``."""
  slow: optax.Params
  """Slow weights, shaped like params; ``optax.MaskedNode()`` where params are not floating point."""
  inner_state: optax.OptState
  """State of the inner (fast) optimizer."""
  slow_inner_state: optax.OptState
  """``inner_state_policy="interpolate"`` only: the inner state after the last sync; else ``EmptyState()``."""
  outer_state: optax.OptState
  """State of the outer optimizer of the slow step; ``EmptyState()`` for plain Lookahead."""
  alpha_state: optax.OptState
  """Adaptive alpha's squared-gradient EMA when it keeps one; else ``EmptyState()``."""


def lookahead(
    inner: optax.GradientTransformation,
    k: int = 5,
    alpha: Optional[AlphaLike] = None,
    *,
    inner_state_policy: str = "maintain",
    outer: Optional[optax.GradientTransformation] = None,
    slow_dtype: Optional[DTypeLike] = None,
    axis_name: Optional[Hashable] = None,
    placement_check: str = "warn",
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead: ``k`` steps of ``inner`` forward, one slow step back.

  The params you hold are the fast weights :math:`\theta`; the state keeps the
  slow weights :math:`\phi`. Each update is one step of ``inner``. On every
  ``k``-th update (a *sync*) the slow weights move toward the fast weights and
  the returned updates land the fast weights on them (Algorithm 1):

  .. math::

    \theta_{t,i} = \theta_{t,i-1} + A(\theta_{t,i-1}), \qquad
    \phi_t = \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}), \qquad
    \theta_{t+1,0} = \phi_t .

  With ``outer`` the slow step is any optax optimizer applied to the
  pseudo-gradient :math:`\Delta = \phi_{t-1} - \theta_{t,k}` with the slow
  weights as params: :math:`\phi_t = \phi_{t-1} + \mathrm{outer}(\Delta)`.
  ``outer=optax.sgd(alpha)`` is plain Lookahead; a Nesterov ``outer`` is SNOO
  (:func:`snoo`). With ``axis_name`` the pseudo-gradient is averaged over that
  mapped axis at each sync (DiLoCo, :func:`diloco`).

  Contracts: right after each sync, ``optax.apply_updates(params, updates)`` is
  bitwise equal to the new slow weights (with ``slow_dtype`` or ``axis_name``:
  the slow weights rounded to the params' dtype, within one rounding);
  ``alpha=1`` gives the inner optimizer's trajectory bit for bit; one trace
  serves every step. Lookahead must be the last transformation applied to the
  updates: at the first update of each cycle it checks that the params it
  receives are its slow weights, and warns otherwise (``placement_check``).

  Args:
    inner: any optax gradient transformation, the fast optimizer. Extra keyword
      arguments of ``update`` (``value``, ``grad``, ``value_fn``) are forwarded.
    k: the sync period, an int >= 1 (or an integer array under
      ``optax.inject_hyperparams``).
    alpha: the slow step size in [0, 1]; or a schedule, a callable of the number
      of completed syncs; or :func:`adaptive_alpha`. Default 0.5. Not with
      ``outer``, which takes the slow step instead.
    inner_state_policy: what the inner state does at a sync: ``"maintain"``
      (carry on, the paper's default), ``"reset"`` (moment buffers
      re-initialised; learning-rate schedules and other counters keep their
      progress), or ``"interpolate"`` (moment buffers move toward their value
      at the previous sync with the same alpha).
    outer: optional optax transformation that takes the slow step (see above).
    slow_dtype: dtype of the slow weights (e.g. ``jnp.float32`` under bfloat16
      params); default: the params' dtype.
    axis_name: a mapped axis name (``shard_map``/``pmap``) over which to average
      the pseudo-gradient at each sync; for data-parallel training where each
      replica computes its own gradients (DiLoCo). ``update`` must then run
      inside that mapped axis.
    placement_check: ``"warn"`` (default), ``"raise"`` or ``"off"``: what to do
      when, at the first update of a cycle, the params differ from the slow
      weights (a transformation placed after lookahead, or params changed
      outside the optimizer). The check runs once per cycle.

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
  return build(make_config("lookahead", inner, k, alpha, inner_state_policy, outer, slow_dtype, axis_name,
                           placement_check))


def build(cfg: Config) -> optax.GradientTransformationExtraArgs:
  """The transformation for a checked configuration (shared by :func:`lookahead` and its aliases)."""

  def init_fn(params):
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return jax.eval_shape(init_fn, params)  # abstract params: the state's shapes, dtypes and shardings
    slow = map_inexact(lambda p: jnp.array(p, dtype=cfg.slow_dtype or p.dtype, copy=True), params)
    inner_state = cfg.inner.init(params)
    _placement.check_inner_state(cfg, inner_state)
    return LookaheadState(
        count=jnp.zeros((), jnp.int32),
        syncs=jnp.zeros((), jnp.int32),
        alpha=_alpha.initial_alpha() if cfg.outer is None else optax.EmptyState(),
        slow=slow,
        inner_state=inner_state,
        slow_inner_state=_policy.snapshot_init(cfg.policy, inner_state),
        outer_state=optax.EmptyState() if cfg.outer is None else cfg.outer.init(slow),
        alpha_state=_alpha.init_alpha_state(cfg.alpha, slow, inner_state),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _placement.check_update(cfg, state, params)
    _placement.announce(cfg, updates)  # force_sync looking for this lookahead stops here
    grads = mask_like(params, updates)
    exact = exact_leaves(cfg, params, state.slow)
    alpha_state = _alpha.observe_gradient(cfg.alpha, state.alpha_state, grads)
    sync = _placement.check_then_sync(cfg, state, params, exact)

    fused = is_fused(cfg, exact)
    if fused:
      inner_updates, inner_state = cfg.inner.update(updates, state.inner_state, params, **extra_args)
      delta, step, outer_state, alpha = slow_step(
          cfg, state, params, fast_weights(params, inner_updates), grads, inner_state, alpha_state)
      target = fused_landing(cfg, params, inner_updates, delta, step)
      slow = state.slow
    else:
      slow, outer_state, alpha, syncs = staged_sync(cfg, sync, state, params, updates, grads, alpha_state, extra_args)
      inner_updates, inner_state = cfg.inner.update(
          updates, after(state.inner_state, syncs), params, **extra_args)
      target = map_inexact(staged_landing, params, inner_updates, slow)
    new_updates = landing_updates(sync, params, inner_updates, target)
    slow, inner_state, slow_inner_state = commit(
        cfg, sync, params, new_updates, exact, slow, inner_state, state.slow_inner_state, alpha)
    new_state = LookaheadState(
        count=jnp.where(sync, 0, state.count + 1).astype(jnp.int32),
        syncs=jnp.where(sync, optax.safe_increment(state.syncs), state.syncs) if fused else syncs,
        alpha=jax.tree.map(lambda a, last: jnp.where(sync, a, last), alpha, state.alpha),
        slow=slow,
        inner_state=inner_state,
        slow_inner_state=slow_inner_state,
        outer_state=outer_state,
        alpha_state=alpha_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def exact_leaves(cfg: Config, params, slow):
  """Per leaf: is the new slow weight exactly ``params + updates``?

  True when the slow weights have the params' dtype and all replicas hold the
  same params (no ``axis_name``): then a sync defines the slow weights as the
  sum ``optax.apply_updates`` computes, so fast == slow bitwise. Otherwise the
  fast weights are the slow weights rounded to the params' dtype.
  """
  return map_inexact(lambda p, s: cfg.axis_name is None and s.dtype == p.dtype, params, slow)


def is_fused(cfg: Config, exact) -> bool:
  """Where the slow step runs: fused into every step, or staged in a sync-only branch.

  Fused when the slow step is element-wise arithmetic on the buffers the
  landing reads anyway: a constant, scheduled or injected alpha, no ``outer``,
  no ``axis_name``, slow weights in the params' dtype. XLA then evaluates it
  inside the inner optimizer's loop, and the only extra work of a non-sync step
  is one read of the slow weights.

  Everything else is staged: computed in a ``lax.cond`` taken only at a sync,
  before the landing. That is where collectives (DiLoCo's ``pmean``), global
  reductions (adaptive alpha, or a ``clip_by_global_norm`` inside ``outer``),
  the outer optimizer's state and a slow copy of another dtype are read and
  written; a non-sync step does exactly what a fused one does.
  """
  return cfg.outer is None and cfg.axis_name is None and not cfg.adaptive and all(
      jax.tree.leaves(exact))


def fast_weights(params, inner_updates):
  """The fast weights after the inner step: exactly what ``optax.apply_updates`` computes.

  Rounded explicitly to the params' precision: XLA may otherwise keep a
  bfloat16 or float16 sum in float32 (excess precision), and the slow step
  would not see the fast weights the caller holds.
  """
  def leaf(p, u):
    x = p + u
    if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize < 4:
      info = jnp.finfo(p.dtype)
      x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(p.dtype)
  return map_inexact(leaf, params, inner_updates)


def pseudo_gradient(cfg: Config, params, slow, fast):
  r"""The pseudo-gradient :math:`\Delta = \phi - \theta_k`, in the slow weights' dtype; averaged over ``axis_name``."""
  delta = map_inexact(lambda p, s, f: s - f.astype(s.dtype), params, slow, fast)
  return delta if cfg.axis_name is None else jax.lax.pmean(delta, cfg.axis_name)


def slow_step(cfg: Config, state: LookaheadState, params, fast, grads, inner_state, alpha_state):
  r"""The slow step at a sync: returns ``(delta, step, outer_state, alpha)``, new slow weights ``slow + step``.

  Plain Lookahead: :math:`\mathrm{step} = -\alpha\Delta`, and ``alpha`` is the
  step size used. With ``outer``: ``step, outer_state = outer.update(delta,
  outer_state, slow)``, and there is no alpha (``EmptyState()``).
  """
  delta = pseudo_gradient(cfg, params, state.slow, fast)
  if cfg.outer is not None:
    step, outer_state = cfg.outer.update(delta, state.outer_state, state.slow)
    return delta, step, outer_state, optax.EmptyState()
  alpha = _alpha.alpha_at_sync(cfg.alpha, state.syncs, alpha_state, inner_state, delta, grads,
                               lambda tree: mask_like(params, tree), cfg.axis_name)
  step = jax.tree.map(lambda d: (-alpha * d).astype(d.dtype), delta)
  return delta, step, state.outer_state, alpha


def new_slow_weights(slow, step):
  """``slow + step`` in the slow weights' dtype (``optax.apply_updates`` on the slow weights)."""
  return jax.tree.map(lambda s, o: (s + o.astype(s.dtype)).astype(s.dtype), slow, step)


def fused_landing(cfg: Config, params, inner_updates, delta, step):
  r"""Updates from :math:`\theta_{k-1}` onto the new slow weights, element-wise: :math:`u + (\Delta + \mathrm{step})`.

  Written so that ``alpha=1`` gives exactly the inner updates (``delta + step``
  is then exactly 0); a Python ``alpha=1`` skips the term, so XLA compiles the
  inner update exactly as without lookahead.
  """
  if _alpha.is_real_number(cfg.alpha) and float(cfg.alpha) == 1.0:
    return inner_updates
  return map_inexact(lambda p, u, d, s: (u + (d + s).astype(u.dtype)).astype(u.dtype),
                     params, inner_updates, delta, step)


def staged_landing(p, u, new_slow):
  """Update from the params onto the new slow weights rounded to the params' dtype.

  ``rounded - p`` is computed exactly in the wider dtype; when it fits the
  updates' dtype (``p`` and the target within a factor of two: the common case)
  ``p + update`` lands on the rounded slow weights exactly, otherwise within
  one rounding.
  """
  wide = jnp.promote_types(p.dtype, new_slow.dtype)
  rounded = new_slow.astype(p.dtype)
  if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize < new_slow.dtype.itemsize:
    info = jnp.finfo(p.dtype)  # keep XLA from skipping the rounding (excess precision)
    rounded = jax.lax.reduce_precision(new_slow, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(p.dtype)
  return (rounded.astype(wide) - p.astype(wide)).astype(u.dtype)


def staged_sync(cfg: Config, sync, state: LookaheadState, params, updates, grads, alpha_state, extra_args):
  """The sync-only branch of a staged slow step: the k-th inner step, the slow step, the outer state.

  Returns the slow weights, outer state, alpha and sync count: their new values
  at a sync, the stored ones on other steps. The branch computes the k-th inner
  step for the fast weights only; the inner state is updated, as on every step,
  by the inner step that follows it (ordered after it with :func:`after`, so
  that every buffer is updated in place).
  """

  def at_sync(slow, outer_state, alpha, syncs):
    inner_updates, inner_state = cfg.inner.update(updates, state.inner_state, params, **extra_args)
    current = state._replace(slow=slow, outer_state=outer_state, syncs=syncs)
    _, step, outer_state, alpha = slow_step(
        cfg, current, params, fast_weights(params, inner_updates), grads, inner_state, alpha_state)
    return new_slow_weights(slow, step), outer_state, alpha, optax.safe_increment(syncs)

  stored = (state.slow, state.outer_state, state.alpha, state.syncs)
  return jax.lax.cond(sync, lambda *x: cast_like(at_sync(*x), stored), lambda *x: x, *stored)


def after(tree, syncs):
  """``tree`` unchanged, read only after the staged sync branch (which produced ``syncs``).

  Multiplying by a 1 that XLA cannot fold (``syncs >= 0``) makes the inner
  step depend on the branch: it then overwrites the inner state in place after
  the branch has read it, instead of XLA copying the state to keep both.
  """
  one = syncs >= 0
  return jax.tree.map(lambda x: x * one.astype(x.dtype) if is_inexact(x) else x, tree)


def landing_updates(sync, params, inner_updates, target):
  """``where(sync, target, inner updates)`` element-wise; non-floating leaves keep the inner updates."""
  return fill(map_inexact(lambda p, u, t: jnp.where(sync, t, u), params, inner_updates, target), inner_updates)


def commit(cfg: Config, sync, params, updates, exact, slow, inner_state, slow_inner_state, alpha):
  """One ``lax.cond`` for what changes only at a sync: the slow weights and the inner-state policy.

  Where the slow weight is exactly ``params + updates`` (:func:`exact_leaves`)
  it is taken from that sum, the expression ``optax.apply_updates`` evaluates
  (XLA shares it with the caller's), so fast == slow bitwise; the other slow
  weights already hold their new value (staged). Non-sync steps neither read nor
  write anything here.
  """
  landed = map_inexact(lambda p, u, s, e: (p + u).astype(p.dtype) if e else s, params, updates, slow, exact)
  stored = (slow, inner_state, slow_inner_state)

  def at_sync():
    policy = _policy.at_sync(cfg.policy, inner_state, slow_inner_state, alpha, params,
                             fresh=lambda: cfg.inner.init(params))
    return cast_like((landed, *policy), stored)

  return jax.lax.cond(sync, at_sync, lambda: stored)


def sync_now(cfg: Config, state: LookaheadState, params, grads=None):
  """A sync at the current params, with no inner step: the slow step, the landing and the commit.

  What :func:`lookahead_optax.force_sync` runs; returns ``(new_state, new_params)``.
  """
  grads = mask_like(params, grads) if grads is not None else map_inexact(jnp.zeros_like, params)
  fast = map_inexact(lambda p: p, params)
  delta, step, outer_state, alpha = slow_step(cfg, state, params, fast, grads, state.inner_state, state.alpha_state)
  exact = exact_leaves(cfg, params, state.slow)
  slow = new_slow_weights(state.slow, step)
  zeros = map_inexact(jnp.zeros_like, params)
  target = map_inexact(lambda p, z, s, e, d, o: (d + o).astype(p.dtype) if e else staged_landing(p, z, s),
                       params, zeros, slow, exact, delta, step)
  updates = landing_updates(jnp.bool_(True), params, zeros, target)
  slow, inner_state, slow_inner_state = commit(
      cfg, jnp.bool_(True), params, updates, exact, slow, state.inner_state, state.slow_inner_state, alpha)
  new_state = state._replace(
      count=jnp.zeros_like(state.count), syncs=optax.safe_increment(state.syncs),
      alpha=alpha if cfg.outer is None else state.alpha, slow=slow, inner_state=inner_state,
      slow_inner_state=slow_inner_state, outer_state=outer_state)
  # Unlike an update, force_sync returns the params themselves: exactly the slow weights, rounded.
  landed = map_inexact(lambda p, u, s, e: (p + u).astype(p.dtype) if e else s.astype(p.dtype),
                       params, updates, slow, exact)
  return new_state, fill(landed, params)

