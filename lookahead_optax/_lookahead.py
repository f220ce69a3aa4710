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

import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from lookahead_optax import _alpha, _exchange, _fragments, _placement, _policy
from lookahead_optax._config import AlphaLike, Config, make_config
from lookahead_optax._tree import cast_like, fill, is_concrete, is_inexact, map_inexact, mask_like, vary


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`."""

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax's states
  """Inner steps taken since the last sync, in ``[0, k)`` (int32)."""
  syncs: jax.Array
  """Number of completed syncs (int32); the argument of an alpha schedule."""
  alpha: jax.Array | optax.EmptyState
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
  residual: optax.OptState
  """``error_feedback=True`` only: what compressing each leaf's last exchange lost (float32); else ``EmptyState()``."""


def lookahead(
  inner: optax.GradientTransformation,
  k: int = 5,
  alpha: AlphaLike | None = None,
  *,
  inner_state_policy: str = "maintain",
  outer: optax.GradientTransformation | None = None,
  slow_dtype: DTypeLike | None = None,
  axis_name: Hashable | None = None,
  fragments: Any = None,
  communication_dtype: DTypeLike | None = None,
  error_feedback: bool = False,
  delay: int | None = None,
  mixing: float | None = None,
  placement_check: str | None = None,
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
    fragments: Streaming DiLoCo's fragments: an int ``F`` (whole leaves, in
      ``jax.tree.leaves`` order, split into ``F`` groups of near-equal size) or
      a pytree of fragment ids shaped like the params. Fragment ``j`` syncs on
      the steps ``t`` with ``(t - j k // F) % k == k - 1``: every fragment once
      per cycle, one at a time, each with its own outer state. Default: 1.
    communication_dtype: with ``axis_name``: the pseudo-gradient is exchanged
      in ``bfloat16``, ``float8_e4m3fn``, ``float8_e5m2`` or ``int8`` (the
      float8 and int8 ones scaled per row) and averaged in float32 (a
      matrix by reduce-scatter, its mean sent back compressed; see
      ``docs/behaviour.md``); default (None): a float32 all-reduce.
    error_feedback: with a ``communication_dtype``: keep what compression lost
      (one more float32 copy of the params) and add it to that leaf's next
      pseudo-gradient.
    delay: 0 (the default) or 1. With 1 (and ``axis_name``) a sync's pseudo-gradient is taken
      from the params the update receives, so its exchange does not wait for
      this step's gradient and may overlap with the forward and backward pass;
      the fast weights then land on ``(1 - mixing) * new slow + mixing * (params
      + inner update)``.
    mixing: ``delay=1`` only: the weight of this step's fast weights in that
      landing, in [0, 1]; default 0.5.
    placement_check: ``"warn"`` (the default), ``"raise"`` or ``"off"``: what to
      do when, at the first update of a cycle, the params differ from the slow
      weights (a transformation placed after lookahead, or params changed
      outside the optimizer). The check runs once per cycle. Off with
      ``delay=1``, whose fast weights are a mix by design.

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
  return build(
    make_config(
      "lookahead",
      inner,
      k,
      alpha,
      inner_state_policy,
      outer,
      slow_dtype,
      axis_name,
      placement_check,
      fragments=fragments,
      communication_dtype=communication_dtype,
      error_feedback=error_feedback,
      delay=delay,
      mixing=mixing,
    )
  )


def build(cfg: Config) -> optax.GradientTransformationExtraArgs:
  """The transformation for a checked configuration (shared by :func:`lookahead` and its aliases)."""
  called_eagerly = False  # update_fn has run outside jit once: from the next such call on, it runs compiled

  def init_fn(params):
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return jax.eval_shape(init_fn, params)  # abstract params: the state's shapes, dtypes and shardings
    slow = map_inexact(lambda p: jnp.array(p, dtype=cfg.slow_dtype or p.dtype, copy=True), params)
    inner_state = cfg.inner.init(params)
    _placement.check_inner_state(cfg, inner_state)
    ids = _fragments.assign(cfg.caller, cfg.fragments, params)
    return LookaheadState(
      count=jnp.zeros((), jnp.int32),
      syncs=jnp.zeros((), jnp.int32),
      alpha=_alpha.initial_alpha() if cfg.outer is None else optax.EmptyState(),
      slow=slow,
      inner_state=inner_state,
      slow_inner_state=_policy.snapshot_init(cfg.policy, inner_state),
      outer_state=init_outer_state(cfg, slow, ids),
      alpha_state=_alpha.init_alpha_state(cfg.alpha, slow, inner_state),
      residual=jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), slow)
      if cfg.error_feedback
      else optax.EmptyState(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    nonlocal called_eagerly
    _placement.check_update(cfg, state, params)
    _placement.announce(cfg, updates, params)  # force_sync looking for this lookahead stops here
    if is_concrete((updates, state, params, extra_args)):
      # Called eagerly: op by op, every conditional of the step compiles anew at each call. From the
      # second call of this transformation on, the step runs as one compiled program instead (one
      # built afresh at every call, as optax.inject_hyperparams does, stays op by op).
      if called_eagerly:
        return compiled_update(updates, state, params, extra_args)
      called_eagerly = True
    grads = mask_like(params, updates)
    ids = _fragments.assign(cfg.caller, cfg.fragments, params)
    exact = exact_leaves(cfg, params, state.slow)
    alpha_state = _alpha.observe_gradient(cfg.alpha, state.alpha_state, grads)
    index = _placement.check_then_sync(cfg, state, params, exact, ids)  # the fragment that syncs; F: none
    sync = index < cfg.n_fragments

    fused = is_fused(cfg, exact)
    if fused:
      inner_updates, inner_state = cfg.inner.update(updates, state.inner_state, params, **extra_args)
      delta = pseudo_gradient(params, state.slow, fast_weights(params, inner_updates))
      step, outer_state, alpha = slow_step(
        cfg, state.syncs, delta, grads, inner_state, alpha_state, state.outer_state, state.slow, params
      )
      target = fused_landing(cfg, params, inner_updates, delta, step)
      slow, syncs, residual = (
        state.slow,
        jnp.where(sync, optax.safe_increment(state.syncs), state.syncs),
        state.residual,
      )
    else:
      slow, outer_state, alpha, syncs, residual = staged_sync(
        cfg, index, ids, state, params, updates, grads, alpha_state, extra_args
      )
      inner_updates, inner_state = cfg.inner.update(updates, after(state.inner_state, syncs), params, **extra_args)
      target = map_inexact(lambda p, u, s: staged_landing(cfg, p, u, s), params, inner_updates, slow)
    new_updates = landing_updates(leaf_flags(index, ids, params), params, inner_updates, target)
    slow, inner_state, slow_inner_state = commit(
      cfg, index, ids, params, new_updates, exact, slow, inner_state, state.slow_inner_state, alpha
    )
    new_state = LookaheadState(
      count=jnp.where(state.count >= cfg.k - 1, 0, state.count + 1).astype(jnp.int32),
      syncs=syncs,
      alpha=jax.tree.map(lambda a, last: jnp.where(sync, a, last), alpha, state.alpha),
      slow=slow,
      inner_state=inner_state,
      slow_inner_state=slow_inner_state,
      outer_state=outer_state,
      alpha_state=alpha_state,
      residual=residual,
    )
    return new_updates, new_state

  compiled_update = jax.jit(lambda updates, state, params, extra_args: update_fn(updates, state, params, **extra_args))
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def init_outer_state(cfg: Config, slow, ids):
  """The outer optimizer's state: one for the slow weights, or one per fragment (each moves at its own syncs)."""
  if cfg.outer is None:
    return optax.EmptyState()
  if cfg.n_fragments == 1:
    return cfg.outer.init(slow)
  return tuple(cfg.outer.init(_fragments.mask(slow, ids, j)) for j in range(cfg.n_fragments))


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
  no ``axis_name``, slow weights in the params' dtype, one fragment. XLA then
  evaluates it inside the inner optimizer's loop, and the only extra work of a
  non-sync step is one read of the slow weights.

  Everything else is staged: computed in a ``lax.cond`` branch taken only at a
  sync (one branch per fragment), before the landing. That is where collectives
  (DiLoCo's exchange), global reductions (adaptive alpha, or a
  ``clip_by_global_norm`` inside ``outer``), the outer optimizer's state and a
  slow copy of another dtype are read and written; a non-sync step does exactly
  what a fused one does.
  """
  return (
    cfg.outer is None
    and cfg.axis_name is None
    and not cfg.adaptive
    and cfg.n_fragments == 1
    and all(jax.tree.leaves(exact))
  )


def leaf_flags(index, ids, params):
  """Per floating leaf, a scalar: does its fragment sync now (``index`` is the fragment syncing)."""
  it = iter(ids)
  return map_inexact(lambda p: index == next(it), params)


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


def pseudo_gradient(params, slow, fast):
  r"""The pseudo-gradient :math:`\Delta = \phi - \theta_k`, in the slow weights' dtype."""
  return map_inexact(lambda p, s, f: s - f.astype(s.dtype), params, slow, fast)


def exchange(cfg: Config, delta, residual):
  """The pseudo-gradient averaged over ``axis_name`` (compressed as configured); as it is without an axis."""
  if cfg.axis_name is None:
    return delta, residual
  return _exchange.exchange(delta, residual, cfg.communication_dtype, cfg.axis_name)


def slow_step(cfg: Config, syncs, delta, grads, inner_state, alpha_state, outer_state, slow, params):
  r"""The slow step from the (exchanged) pseudo-gradient: ``(step, outer_state, alpha)``, new slow ``slow + step``.

  Plain Lookahead: :math:`\mathrm{step} = -\alpha\Delta`, and ``alpha`` is the
  step size used. With ``outer``: ``step, outer_state = outer.update(delta,
  outer_state, slow)``, and there is no alpha (``EmptyState()``).
  """
  if cfg.outer is not None:
    step, outer_state = cfg.outer.update(delta, outer_state, slow)
    return step, outer_state, optax.EmptyState()
  alpha = _alpha.alpha_at_sync(
    cfg.alpha, syncs, alpha_state, inner_state, delta, grads, lambda tree: mask_like(params, tree), cfg.axis_name
  )
  step = jax.tree.map(lambda d: (-alpha * d).astype(d.dtype), delta)
  return step, outer_state, alpha


def new_slow_weights(slow, step):
  """``slow + step`` in the slow weights' dtype (``optax.apply_updates`` on the slow weights)."""
  return jax.tree.map(lambda s, o: (s + o.astype(s.dtype)).astype(s.dtype), slow, step)


def fused_landing(cfg: Config, params, inner_updates, delta, step):
  r"""Updates from :math:`\theta_{k-1}` onto the new slow weights, element-wise: :math:`u + (\Delta + \mathrm{step})`.

  Written so that ``alpha=1`` gives exactly the inner updates (``delta + step``
  is then exactly 0); a Python ``alpha=1`` skips the term, so XLA compiles the
  inner update exactly as without lookahead.
  """
  if isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool) and cfg.alpha == 1.0:
    return inner_updates
  return map_inexact(
    lambda p, u, d, s: (u + (d + s).astype(u.dtype)).astype(u.dtype), params, inner_updates, delta, step
  )


def staged_landing(cfg: Config, p, u, new_slow):
  r"""Update from the params onto the new slow weights rounded to the params' dtype.

  ``rounded - p`` is computed exactly in the wider dtype; when it fits the
  updates' dtype (``p`` and the target within a factor of two: the common case)
  ``p + update`` lands on the rounded slow weights exactly, otherwise within
  one rounding. With ``delay=1`` the fast weights land on a mix of the new slow
  weights and this step's inner step, :math:`(1 - \beta)\,\phi + \beta\,(p + u)`
  with :math:`\beta` = ``mixing``.
  """
  wide = jnp.promote_types(p.dtype, new_slow.dtype)
  rounded = new_slow.astype(p.dtype)
  if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize < new_slow.dtype.itemsize:
    info = jnp.finfo(p.dtype)  # keep XLA from skipping the rounding (excess precision)
    rounded = jax.lax.reduce_precision(new_slow, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(p.dtype)
  land = rounded.astype(wide) - p.astype(wide)
  if cfg.delay:
    land = (1.0 - cfg.mixing) * land + cfg.mixing * u.astype(wide)
  return land.astype(u.dtype)


def fragment_sync(cfg: Config, j: int, ids, state: LookaheadState, params, fast, grads, inner_state, alpha_state):
  """Fragment ``j``'s slow step (all params when there is one fragment).

  Returns the slow weights, outer state, alpha and residual with fragment
  ``j``'s leaves (and its outer state) updated.
  """
  one = cfg.n_fragments == 1
  part = (lambda tree: tree) if one else (lambda tree: _fragments.mask(tree, ids, j))
  delta = part(pseudo_gradient(params, state.slow, fast))
  residual = None if not cfg.error_feedback else part(state.residual)
  delta, residual = exchange(cfg, delta, residual)
  per_fragment = cfg.outer is not None and not one  # one outer state per fragment
  outer_state = state.outer_state[j] if per_fragment else state.outer_state
  step, outer_state, alpha = slow_step(
    cfg, state.syncs, delta, grads, inner_state, alpha_state, outer_state, part(state.slow), params
  )
  slow = new_slow_weights(part(state.slow), step)
  if one:
    return slow, outer_state, alpha, state.residual if residual is None else residual
  outer_states = (
    tuple(outer_state if i == j else s for i, s in enumerate(state.outer_state)) if per_fragment else outer_state
  )
  residual = state.residual if residual is None else _fragments.merge(state.residual, {j: residual}, ids)
  return _fragments.merge(state.slow, {j: slow}, ids), outer_states, alpha, residual


def staged_sync(cfg: Config, index, ids, state: LookaheadState, params, updates, grads, alpha_state, extra_args):
  """The sync-only branches of a staged slow step, one per fragment, chosen by ``index`` (F: no sync).

  A branch computes the k-th inner step for the fast weights (with ``delay=1``
  it takes the params received instead, so that its exchange does not wait for
  this step's gradient), then the fragment's slow step. Returns the slow
  weights, outer state, alpha, sync count and residual: new at a sync, stored
  otherwise. The inner state is updated, as on every step, by the inner step
  that follows (ordered after the branch with :func:`after`, so that every
  buffer is updated in place).
  """

  def at_sync(j, slow, outer_state, alpha, syncs, residual):
    current = state._replace(slow=slow, outer_state=outer_state, syncs=syncs, residual=residual)
    if cfg.delay:
      fast, inner_state = map_inexact(lambda p: p, params), state.inner_state
    else:
      inner_updates, inner_state = cfg.inner.update(updates, state.inner_state, params, **extra_args)
      fast = fast_weights(params, inner_updates)
    slow, outer_state, alpha, residual = fragment_sync(
      cfg, j, ids, current, params, fast, grads, inner_state, alpha_state
    )
    return slow, outer_state, alpha, optax.safe_increment(syncs), residual

  stored = (state.slow, state.outer_state, state.alpha, state.syncs, state.residual)
  if cfg.communication_dtype is not None:  # an all-gathered mean is typed varying over the replicas
    slow, outer_state, alpha, residual = vary(
      (state.slow, state.outer_state, state.alpha, state.residual), cfg.axis_name
    )
    stored = (slow, outer_state, alpha, state.syncs, residual)
  branches: list[Callable[..., Any]] = [
    lambda *x, j=j: cast_like(at_sync(j, *x), stored) for j in range(cfg.n_fragments)
  ]
  return at_most_one(index, branches, *stored)


def at_most_one(index, branches, *operands):
  """``branches[index](*operands)`` for ``index < len(branches)``; the operands unchanged otherwise.

  One two-way ``lax.cond`` per branch, in sequence, rather than one
  ``lax.switch``: XLA updates a two-way conditional's outputs in place, while it
  copies those of a switch with more branches on every call.
  """
  for j, branch in enumerate(branches):
    operands = jax.lax.cond(index == j, branch, lambda *x: x, *operands)
  return operands


def after(tree, syncs):
  """``tree`` unchanged, read only after the staged sync branch (which produced ``syncs``).

  Multiplying by a 1 that XLA cannot fold (``syncs >= 0``) makes the inner
  step depend on the branch: it then overwrites the inner state in place after
  the branch has read it, instead of XLA copying the state to keep both.
  """
  one = syncs >= 0
  return jax.tree.map(lambda x: x * one.astype(x.dtype) if is_inexact(x) else x, tree)


def landing_updates(sync, params, inner_updates, target):
  """``where(sync, target, inner updates)`` element-wise, ``sync`` per leaf; non-floating leaves keep the inner updates."""
  return fill(map_inexact(lambda p, s, u, t: jnp.where(s, t, u), params, sync, inner_updates, target), inner_updates)


def commit(cfg: Config, index, ids, params, updates, exact, slow, inner_state, slow_inner_state, alpha):
  """What changes only at a sync, in one conditional per fragment: the slow weights and the inner-state policy.

  Where the slow weight is exactly ``params + updates`` (:func:`exact_leaves`)
  it is taken from that sum, the expression ``optax.apply_updates`` evaluates
  (XLA shares it with the caller's), so fast == slow bitwise; the other slow
  weights already hold their new value (staged). With fragments, the branch of
  fragment ``j`` writes fragment ``j``'s leaves. Non-sync steps neither read nor
  write anything here.
  """
  n = cfg.n_fragments
  stored = (slow, inner_state, slow_inner_state)
  if n > 1 and not any(jax.tree.leaves(exact)):
    return stored  # nothing to write: the staged branch holds every new slow weight (policy is maintain)
  landed = map_inexact(lambda p, u, s, e: (p + u).astype(p.dtype) if e else s, params, updates, slow, exact)

  def at_sync(j, slow, inner_state, slow_inner_state):
    new_slow = landed if n == 1 else _fragments.merge(slow, {j: _fragments.mask(landed, ids, j)}, ids)
    policy = _policy.at_sync(
      cfg.policy, inner_state, slow_inner_state, alpha, params, fresh=lambda: cfg.inner.init(params)
    )
    return cast_like((new_slow, *policy), stored)

  return at_most_one(index, [functools.partial(at_sync, j) for j in range(n)], *stored)


def sync_now(cfg: Config, state: LookaheadState, params, grads=None):
  """A sync at the current params, of every fragment, with no inner step: slow steps, landing and commit.

  What :func:`lookahead_optax.force_sync` runs; returns ``(new_state, new_params)``.
  """
  grads = mask_like(params, grads) if grads is not None else map_inexact(jnp.zeros_like, params)
  ids = _fragments.assign(cfg.caller, cfg.fragments, params)
  fast = map_inexact(lambda p: p, params)
  exact = exact_leaves(cfg, params, state.slow)
  zeros = map_inexact(jnp.zeros_like, params)
  alpha = state.alpha
  for j in range(cfg.n_fragments):
    slow, outer_state, alpha, residual = fragment_sync(
      cfg, j, ids, state, params, fast, grads, state.inner_state, state.alpha_state
    )
    state = state._replace(
      slow=slow, outer_state=outer_state, residual=residual, syncs=optax.safe_increment(state.syncs)
    )
  delta = pseudo_gradient(params, state.slow, fast)  # exact leaves: new slow - params, computed as a sync would
  target = map_inexact(
    lambda p, z, s, e, d: d.astype(p.dtype) if e else staged_landing(cfg._replace(delay=0), p, z, s),
    params,
    zeros,
    state.slow,
    exact,
    delta,
  )
  updates = landing_updates(map_inexact(lambda p: True, params), params, zeros, target)
  slow, inner_state, slow_inner_state = commit(
    cfg._replace(fragments=1),
    jnp.int32(0),
    [0] * len(ids),
    params,
    updates,
    exact,
    state.slow,
    state.inner_state,
    state.slow_inner_state,
    alpha,
  )
  new_state = state._replace(
    count=jnp.zeros_like(state.count),
    alpha=alpha if cfg.outer is None else state.alpha,
    slow=slow,
    inner_state=inner_state,
    slow_inner_state=slow_inner_state,
  )
  # Unlike an update, force_sync returns the params themselves: exactly the slow weights, rounded.
  landed = map_inexact(
    lambda p, u, s, e: (p + u).astype(p.dtype) if e else s.astype(p.dtype), params, updates, slow, exact
  )
  return new_state, fill(landed, params)
