"""The Lookahead combinator: k fast steps of any optax optimizer, then one slow step.

``update_fn`` checks its arguments, decides which fragment (if any) syncs at
this step (:func:`lookahead_optax._streaming.syncing`, read after the
once-per-cycle placement check, :func:`lookahead_optax._placement.check`) and
hands over to :func:`step`, a short pipeline of module-level functions read
top to bottom:

1. the inner step, ``inner.update``: the inner updates, and the fast weights
   ``params + updates`` (:func:`fast_weights`);
2. :func:`slow_step`: the new slow weights, from plain alpha or any ``outer``
   optimizer applied to the pseudo-gradient, with the outer state and the alpha
   used;
3. the landing: element-wise ``where(sync, land on the new slow weights, inner
   updates)`` (:func:`landing_updates`), which XLA fuses into the inner
   optimizer's own loop;
4. :func:`commit`: one ``lax.cond`` that writes what changes only at a sync
   (:class:`Written`): the slow weights, the inner-state policy and the sync
   counter.

Where the slow step runs is decided by one rule, :func:`is_fused`: element-wise
in every step (plain alpha), or in a branch taken only at a sync
(:func:`staged_sync`: an ``outer`` optimizer, adaptive alpha, another slow
dtype, fragments). :func:`sync_now` (``force_sync``) runs the same
:func:`step` with a zero inner step. The replica exchange is not part of this
module: it is a transformation of the pseudo-gradient inside ``outer``
(:func:`lookahead_optax.replica_mean`), and the fragment schedule is its own
piece (:func:`lookahead_optax.streaming`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from lookahead_optax import _alpha, _exchange, _outer, _placement, _policy, _streaming
from lookahead_optax._config import AlphaLike, Config, make_config
from lookahead_optax._tree import (
  cast_like,
  fill,
  is_concrete,
  is_inexact,
  map_inexact,
  mask_like,
  ordered_after,
  unfolded_true,
  vary_like,
)


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`."""

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax's states
  """Inner steps taken since the last sync, in ``[0, k)`` (int32)."""
  syncs: jax.Array
  """Number of sync steps taken (int32; with ``F`` fragments, ``F`` per cycle); the argument of an alpha schedule."""
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
  misplaced: jax.Array
  """Per floating-point leaf (``jax.tree.leaves`` order), the cycles whose first update found the params away
  from the slow weights (int32, saturating at its maximum; all 0 in a correct loop). Reported as a
  :class:`LookaheadPlacementWarning` where the host reads the state."""


def lookahead(
  inner: optax.GradientTransformation,
  k: int = 5,
  alpha: AlphaLike | None = None,
  *,
  outer: optax.GradientTransformation | None = None,
  inner_state_policy: str = "maintain",
  slow_dtype: DTypeLike | None = None,
  schedule: _streaming.Streaming | None = None,
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
  (:func:`snoo`); with :func:`replica_mean` chained in front, the
  pseudo-gradient is averaged over the replicas of a mapped axis (DiLoCo,
  :func:`diloco`). ``outer`` runs only inside the sync branch.

  Contracts: right after each sync, ``optax.apply_updates(params, updates)`` is
  bitwise equal to the new slow weights (with ``slow_dtype`` or a replica mean:
  the slow weights rounded to the params' dtype, within one rounding);
  ``alpha=1`` gives the inner optimizer's trajectory bit for bit (with
  fragments within float rounding; ``"reset"`` still restarts the moments);
  one trace serves every step; the compiled step has no side effects. Lookahead must be
  the last transformation applied to the updates: at the first update of each
  cycle it checks that the params it receives are its slow weights, and warns
  (:class:`LookaheadPlacementWarning`) otherwise.

  Args:
    inner: any optax gradient transformation, the fast optimizer. Extra keyword
      arguments of ``update`` (``value``, ``grad``, ``value_fn``) are forwarded.
    k: the sync period, an int >= 1 (or an integer array under
      ``optax.inject_hyperparams``; a count at or beyond a lowered ``k`` syncs at
      the next step).
    alpha: the slow step size in [0, 1]; or a schedule, a callable of the number
      of sync steps taken; or :func:`adaptive_alpha`. Default 0.5. Not with
      ``outer``, which takes the slow step instead.
    outer: optional optax transformation that takes the slow step (see above).
    inner_state_policy: what the inner state does at a sync: ``"maintain"``
      (carry on, the paper's default), ``"reset"`` (moment buffers
      re-initialised; learning-rate schedules and other counters keep their
      progress), or ``"interpolate"`` (moment buffers move toward their value
      at the previous sync with the same alpha).
    slow_dtype: dtype of the slow weights (e.g. ``jnp.float32`` under bfloat16
      params); default: the params' dtype.
    schedule: which params sync when; default (None): all of them at the end
      of every cycle. :func:`streaming` syncs fragments in turn, optionally with
      a delayed exchange (Streaming DiLoCo).

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
  return build(make_config("lookahead", inner, k, alpha, inner_state_policy, outer, slow_dtype, schedule))


def build(cfg: Config) -> optax.GradientTransformationExtraArgs:
  """The transformation for a checked configuration (shared by :func:`lookahead` and its aliases)."""

  def init_fn(params):
    _placement.check_plain(cfg.caller, "params", params)
    check_params(cfg, params)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return jax.eval_shape(init_fn, params)  # abstract params: the state's shapes, dtypes and shardings
    slow = map_inexact(lambda p: jnp.array(p, dtype=cfg.slow_dtype or p.dtype, copy=True), params)
    inner_state = cfg.inner.init(params)
    _placement.check_inner_state(cfg, inner_state)
    outer_state = init_outer_state(cfg, slow, _streaming.assign(cfg.caller, cfg.schedule.fragments, params))
    if cfg.schedule.delay and not _exchange.in_state(outer_state):
      raise ValueError(
        f"{cfg.caller}: schedule={cfg.schedule!r} delays the exchange over replicas, but outer={cfg.outer!r} "
        "has no replica_mean(...) in it. Chain replica_mean in front of the outer optimizer, or use delay=0."
      )
    return LookaheadState(
      count=jnp.zeros((), jnp.int32),
      syncs=jnp.zeros((), jnp.int32),
      alpha=_alpha.initial_alpha(slow) if cfg.outer is None else optax.EmptyState(),
      slow=slow,
      inner_state=inner_state,
      slow_inner_state=_policy.snapshot_init(cfg.policy, inner_state),
      outer_state=outer_state,
      alpha_state=_alpha.init_alpha_state(cfg.alpha, slow, inner_state),
      misplaced=jnp.zeros((len(jax.tree.leaves(slow)),), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _placement.check_update(cfg, updates, state, params)
    check_replica_weight(cfg, state, extra_args)
    _placement.announce(cfg, updates, params)  # force_sync looking for this lookahead stops here
    if is_concrete((updates, state, params, extra_args)):
      # Called eagerly: run the whole step as one compiled program (compiled once per optimizer) instead of
      # op by op, which compiles each conditional of the step anew at every call.
      _placement.report(state, cfg.caller)
      new_updates, new_state = compiled_update(updates, state, params, extra_args)
      return new_updates, landed_as_the_caller_adds(cfg, state, new_state, params, new_updates)
    return traced_update(updates, state, params, extra_args)

  def traced_update(updates, state, params, extra_args):
    grads = mask_like(params, updates)
    state = state._replace(alpha_state=_alpha.observe_gradient(cfg.alpha, state.alpha_state, grads))
    leaves = describe(cfg, params, state)
    index = _streaming.syncing(state.count, cfg.k, cfg.n_fragments)  # the sync decision: which fragment (F: none)
    if not cfg.schedule.delay:  # (a delayed exchange lands off the slow weights: nothing to check)
      state = state._replace(misplaced=_placement.check(cfg, state, params, *leaves))
      index = ordered_after(state.misplaced, index)  # decided after the check, which reads the params
    extra_args = dict(extra_args)
    outer_args = {"replica_weight": extra_args.pop("replica_weight")} if "replica_weight" in extra_args else {}
    # ``order``: what the staged sync applies to the inputs to compute the inner step a second time (see slow_step).
    inner_step = lambda inner_state, order=unordered: cfg.inner.update(
      *order((updates, inner_state, params)), **extra_args
    )
    return step(cfg, state, params, grads, index, inner_step, cfg.schedule, leaves, outer_args)

  compiled_update = jax.jit(traced_update)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class Leaves(NamedTuple):
  """What a step knows of the params' floating-point leaves when it is traced."""

  exact: optax.Params
  """Per leaf: is the new slow weight exactly ``params + updates`` (:func:`exact_leaves`)."""
  ids: list
  """The fragment of each leaf, in ``jax.tree.leaves`` order."""


def describe(cfg: Config, params, state: LookaheadState) -> Leaves:
  return Leaves(
    exact_leaves(params, state.slow, state.outer_state), _streaming.assign(cfg.caller, cfg.schedule.fragments, params)
  )


def step(cfg: Config, state: LookaheadState, params, grads, index, inner_step, schedule, leaves: Leaves, outer_args):
  """One update, given the fragment ``index`` that syncs at it (``F``: none) and the inner step to take.

  The pipeline of the module docstring; :func:`sync_now` runs it too, with a
  zero inner step. ``outer_args``: extra keyword arguments of ``outer.update``
  (a :func:`replica_mean`'s ``replica_weight``). Returns ``(updates, new_state)``.
  """
  exact, ids = leaves  # and fragment ``index`` syncs at this step; none does when ``index == F``
  fused = is_fused(cfg, exact)
  if fused:  # the slow step is element-wise: fused into the inner step's loop
    inner_updates, inner_state = inner_step(state.inner_state)
    delta = pseudo_gradient(params, state.slow, fast_weights(params, inner_updates))
    step_, alpha = alpha_step(cfg, state.syncs, delta, grads, inner_state, state.alpha_state, params)
    target = fused_landing(cfg, params, inner_updates, delta, step_)
    slow, outer_state, syncs = state.slow, state.outer_state, state.syncs
  else:  # staged: the slow step in a branch taken only at a sync, before the inner step
    (slow, outer_state, alpha), syncs = staged_sync(cfg, index, ids, state, params, grads, inner_step, outer_args)
    # The inner state, read after the branch: the inner step then overwrites it in place (else XLA copies it).
    inner_updates, inner_state = inner_step(ordered_after(syncs, state.inner_state))
    target = map_inexact(lambda p, u, s: staged_landing(schedule, p, u, s), params, inner_updates, slow)
  updates = landing_updates(leaf_flags(index, ids, params), params, inner_updates, target)
  stored = Written(slow, inner_state, state.slow_inner_state, syncs, state.alpha)
  written, report = commit(cfg, index, ids, params, updates, exact, stored, alpha, counted=not fused)
  # The next count, made to depend on the committed sync counter: every other reader of the stored count
  # comes first, and it is overwritten in place (else XLA copies it).
  count = jnp.where(unfolded_true(written.syncs) & (state.count < cfg.k - 1), state.count + 1, 0)
  return updates, state._replace(
    count=(count + report).astype(jnp.int32),
    outer_state=outer_state,
    **written._asdict(),
  )


def landed_as_the_caller_adds(cfg: Config, old: LookaheadState, new: LookaheadState, params, updates):
  """An eager call's state, with the slow weights that a sync defines as ``params + updates`` added op by op.

  Under ``jit`` XLA evaluates ``params + updates`` once for the commit and the
  caller's ``optax.apply_updates`` alike. Called eagerly, the caller adds the
  rounded updates op by op, while the compiled step may contract the same sum
  into a fused multiply-add: so the exact leaves of the fragment that synced
  are taken from the caller's sum, and fast == slow holds bitwise either way.
  """
  if isinstance(new.count, jax.core.Tracer):  # called inside another trace (a wrapper's cond): nothing to add
    return new
  k, n = int(cfg.k), cfg.n_fragments
  phase = min(int(old.count), k - 1)
  index = next((j for j in range(n) if (phase - (j * k) // n) % k == k - 1), n)  # as _streaming.syncing
  if index >= n:
    return new
  exact, ids = describe(cfg, params, old)
  fragment = iter(ids)
  landed = lambda p, u, s, e: optax.apply_updates(p, u) if next(fragment) == index and e else s
  return new._replace(slow=map_inexact(landed, params, updates, new.slow, exact))


def check_params(cfg: Config, params) -> None:
  """At init: every leaf is an array, and ``slow_dtype`` is at least as wide as each floating leaf's dtype.

  A Python float has no dtype to keep its slow weight in; a narrower slow dtype
  would round away what the fast weights hold.
  """
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    where = f"params{jax.tree_util.keystr(path)}"
    if isinstance(p, (float, complex)) and not isinstance(p, np.generic):  # (numpy's float64 is a float)
      raise ValueError(
        f"{cfg.caller}: {where} is a Python {type(p).__name__} ({p!r}): pass the params as arrays, e.g. "
        "jax.tree.map(jnp.asarray, params), so that they and their slow weights have a dtype."
      )
    if cfg.slow_dtype is not None and is_inexact(p) and jnp.promote_types(p.dtype, cfg.slow_dtype) != cfg.slow_dtype:
      raise ValueError(
        f"{cfg.caller}: slow_dtype={cfg.slow_dtype.name} is narrower than {where}'s dtype {p.dtype}: the slow "
        "weights would lose the precision the fast weights have. Use a slow_dtype at least as wide as the "
        "params (e.g. float32 under bfloat16 params), or leave it out."
      )


def check_replica_weight(cfg: Config, state: LookaheadState, extra_args) -> None:
  """``replica_weight`` goes to the outer optimizer's replica mean: refused when there is none to take it."""
  if "replica_weight" in extra_args and not _exchange.in_state(state.outer_state):
    raise ValueError(
      f"{cfg.caller}: replica_weight={extra_args['replica_weight']!r} weighs this replica in the replica mean, but "
      f"outer={cfg.outer!r} has no replica_mean(...) in it. Chain replica_mean in front of the outer optimizer, or "
      "leave replica_weight out."
    )


def init_outer_state(cfg: Config, slow, ids):
  """The outer optimizer's state: one for the slow weights, or one per fragment (each moves at its own syncs)."""
  if cfg.outer is None:
    return optax.EmptyState()
  if cfg.n_fragments == 1:
    return cfg.outer.init(slow)
  return tuple(cfg.outer.init(_streaming.mask(slow, ids, j)) for j in range(cfg.n_fragments))


def exact_leaves(params, slow, outer_state):
  """Per leaf: is the new slow weight exactly ``params + updates``?

  True when the slow weights have the params' dtype and all replicas hold the
  same params (no :func:`replica_mean` in ``outer``): then a sync defines the
  slow weights as the sum ``optax.apply_updates`` computes, so fast == slow
  bitwise. Otherwise the fast weights are the slow weights rounded to the
  params' dtype.
  """
  replicas = _exchange.in_state(outer_state)
  return map_inexact(lambda p, s: not replicas and s.dtype == p.dtype, params, slow)


def is_fused(cfg: Config, exact) -> bool:
  """Where the slow step runs: fused into every step, or staged in a sync-only branch.

  Fused when the slow step is element-wise arithmetic on the buffers the
  landing reads anyway: a constant, scheduled or injected alpha, no ``outer``,
  slow weights in the params' dtype, one fragment. XLA then
  evaluates it inside the inner optimizer's loop, and the only extra work of a
  non-sync step is one read of the slow weights.

  Everything else is staged: computed in a ``lax.cond`` branch taken only at a
  sync (one branch per fragment), before the landing. That is where collectives
  (:func:`replica_mean`'s exchange), global reductions (adaptive alpha, or a
  ``clip_by_global_norm`` inside ``outer``), the outer optimizer's state and a
  slow copy of another dtype are read and written; a non-sync step does exactly
  what a fused one does.
  """
  return cfg.outer is None and not cfg.adaptive and cfg.n_fragments == 1 and all(jax.tree.leaves(exact))


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


def alpha_step(cfg: Config, syncs, delta, grads, inner_state, alpha_state, params):
  r"""Plain Lookahead's slow step :math:`-\alpha\Delta` and the alpha used, in the slow weights' dtype."""
  dtype = _alpha.alpha_dtype(delta)
  alpha = _alpha.alpha_at_sync(
    cfg.alpha, syncs, alpha_state, inner_state, delta, grads, lambda tree: mask_like(params, tree), dtype, cfg.caller
  )
  return jax.tree.map(lambda d: (-alpha * d).astype(d.dtype), delta), alpha


def slow_step(cfg: Config, syncs, pseudo, grads, inner_state, alpha_state, outer_state, slow, params, outer_args):
  r"""The slow step from the pseudo-gradient: ``(step, outer_state, alpha)``; the new slow weights are ``slow + step``.

  ``pseudo(order)`` is the pseudo-gradient :math:`\Delta`, computed from
  inputs passed through ``order`` (the identity, or
  :func:`lookahead_optax._tree.ordered_after` for a second computation of the
  same values that XLA does not share with the first).

  Plain Lookahead: :math:`\mathrm{step} = -\alpha\Delta`, and ``alpha`` is the
  step size used. With ``outer``: ``step, outer_state = outer.update(delta,
  outer_state, slow)`` (a :func:`replica_mean` in it averages ``delta`` over
  the replicas), and there is no alpha (``EmptyState()``). :func:`snoo`'s
  Nesterov step takes its updates from a second computation of ``delta``
  (:meth:`lookahead_optax._outer.NesterovUpdate.split`): XLA then computes it in
  each of the two loops that write the momentum and the slow weights, instead
  of keeping it in a params-sized buffer between them.
  """
  delta = pseudo(unordered)
  if cfg.outer is None:
    step, alpha = alpha_step(cfg, syncs, delta, grads, inner_state, alpha_state, params)
    return step, outer_state, alpha
  if isinstance(update := cfg.outer.update, _outer.NesterovUpdate):
    step, outer_state = update.split(delta, lambda: pseudo(functools.partial(ordered_after, syncs)), outer_state)
  else:
    step, outer_state = update(delta, outer_state, slow, **outer_args)
  return step, outer_state, optax.EmptyState()


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


def staged_landing(schedule: _streaming.Streaming, p, u, new_slow):
  r"""Update from the params onto the new slow weights rounded to the params' dtype.

  ``rounded - p`` is computed exactly in the wider dtype; when it fits the
  updates' dtype (``p`` and the target within a factor of two: the common case)
  ``p + update`` lands on the rounded slow weights exactly, otherwise within
  one rounding. A delayed schedule mixes in this step's inner update
  (:func:`lookahead_optax._streaming.delayed_landing`).
  """
  wide = jnp.promote_types(p.dtype, new_slow.dtype)
  land = rounded_to(p.dtype, new_slow).astype(wide) - p.astype(wide)
  return _streaming.delayed_landing(schedule, land, u).astype(u.dtype)


class SlowStep(NamedTuple):
  """What a staged sync branch writes: the new slow weights, the outer state and the alpha used."""

  slow: optax.Params
  outer_state: optax.OptState
  alpha: jax.Array | optax.EmptyState


def unordered(tree):
  """``tree`` as it is: the inputs of the first computation of a value (see :func:`slow_step`)."""
  return tree


def fragment_sync(
  cfg: Config, j: int, ids, state: LookaheadState, current: SlowStep, params, fast, grads, inner_state, outer_args
):
  """Fragment ``j``'s slow step (all params when there is one fragment): ``current`` with fragment ``j`` updated.

  Slice the fragment, pseudo-gradient, outer step (the replica mean inside it),
  merge: each fragment has its own outer state. A round of the replica mean
  with no replica present leaves the fragment's slow weights and outer state
  as they were: a zero step, and the stored outer state
  (:func:`lookahead_optax._exchange.hold`). ``fast(order)``: the fast weights,
  from inputs passed through ``order`` (see :func:`slow_step`).
  """
  one = cfg.n_fragments == 1
  part = (lambda tree: tree) if one else (lambda tree: _streaming.mask(tree, ids, j))
  pseudo = lambda order: part(pseudo_gradient(order(params), order(current.slow), fast(order)))
  per_fragment = cfg.outer is not None and not one
  outer_state = current.outer_state[j] if per_fragment else current.outer_state
  step, new_outer_state, alpha = slow_step(
    cfg, state.syncs, pseudo, grads, inner_state, state.alpha_state, outer_state, part(current.slow), params, outer_args
  )
  if (empty := _exchange.empty_round(new_outer_state)) is not None:  # no replica present: nothing moves
    step = jax.tree.map(lambda u: u * jnp.logical_not(empty).astype(u.dtype), step)  # 0 (the mean is 0, finite)
    new_outer_state = _exchange.hold(empty, new_outer_state, outer_state)
  slow, outer_state = new_slow_weights(part(current.slow), step), new_outer_state
  if one:
    return SlowStep(slow, outer_state, alpha)
  if per_fragment:
    outer_state = tuple(outer_state if i == j else s for i, s in enumerate(current.outer_state))
  return SlowStep(_streaming.merge(current.slow, {j: slow}, ids), outer_state, alpha)


def staged_sync(cfg: Config, index, ids, state: LookaheadState, params, grads, inner_step, outer_args):
  """The sync-only branches of a staged slow step, one per fragment, chosen by ``index`` (F: no sync).

  A branch computes the k-th inner step for the fast weights (with a delayed
  schedule it takes the params received instead, so that its exchange does not
  wait for this step's gradient), then the fragment's slow step. Returns a
  :class:`SlowStep`: new at a sync, the stored one otherwise. The inner state
  is updated, as on every step, by the inner step that follows (ordered after
  the branch with :func:`lookahead_optax._tree.ordered_after`, so that every buffer is updated in place).
  """

  def at_sync(j, operands):
    current, syncs = operands
    # The fast weights, from inputs passed through ``order`` (see slow_step).
    if cfg.schedule.delay:
      inner_state = state.inner_state
      fast = lambda order: map_inexact(lambda p: p, order(params))
    else:
      inner_updates, inner_state = inner_step(state.inner_state)
      again = lambda order: inner_step(state.inner_state, order)[0]  # a second computation (snoo's split)
      fast = lambda order: fast_weights(order(params), inner_updates if order is unordered else again(order))
    new = fragment_sync(cfg, j, ids, state, current, params, fast, grads, inner_state, outer_args)
    return cast_like((new, optax.safe_increment(syncs)), operands)

  branches = [functools.partial(at_sync, j) for j in range(cfg.n_fragments)]
  # An all-gathered mean is typed varying over the replicas under shard_map: the stored values are cast alike.
  stored = vary_like((SlowStep(state.slow, state.outer_state, state.alpha), state.syncs), branches)
  return at_most_one(index, branches, stored)


def at_most_one(index, branches, operands):
  """``branches[index](operands)`` for ``index < len(branches)``; the operands unchanged otherwise.

  One two-way ``lax.cond`` per branch, in sequence, rather than one
  ``lax.switch``: XLA updates a two-way conditional's outputs in place, while it
  copies those of a switch with more branches on every call.
  """
  for j, branch in enumerate(branches):
    operands = jax.lax.cond(index == j, branch, lambda x: x, operands)
  return operands


def landing_updates(sync, params, inner_updates, target):
  """``where(sync, target, inner updates)`` element-wise, ``sync`` per leaf; other leaves keep the inner updates."""
  return fill(map_inexact(lambda p, s, u, t: jnp.where(s, t, u), params, sync, inner_updates, target), inner_updates)


class Written(NamedTuple):
  """The fields of :class:`LookaheadState` that a sync writes (:func:`commit`) and a non-sync step keeps."""

  slow: optax.Params
  inner_state: optax.OptState
  slow_inner_state: optax.OptState
  syncs: jax.Array
  alpha: jax.Array | optax.EmptyState


def commit(cfg: Config, index, ids, params, updates, exact, stored: Written, alpha, counted: bool):
  """What changes only at a sync, in one conditional per fragment: :class:`Written` and an int32 zero.

  The zero is the result of the report of a scheduled or injected alpha
  outside [0, 1] (:func:`lookahead_optax._alpha.report_out_of_range`), or a
  Python 0 when alpha cannot leave [0, 1].

  Where the slow weight is exactly ``params + updates`` (:func:`exact_leaves`)
  it is taken from that sum, the expression ``optax.apply_updates`` evaluates
  (XLA shares it with the caller's), so fast == slow bitwise; the other slow
  weights already hold their new value (staged). With fragments, the branch of
  fragment ``j`` writes fragment ``j``'s leaves. The inner state enters the
  branch only under a policy that changes it. The branch also stores
  ``alpha``, the alpha of this sync, and counts the sync unless the staged
  branch ``counted`` it already. Non-sync steps neither read nor write
  anything here.
  """
  n = cfg.n_fragments
  policy = cfg.policy != "maintain"
  reports = _alpha.varies(cfg.alpha)
  if n > 1 and not any(jax.tree.leaves(exact)):
    return stored._replace(alpha=alpha), 0  # the staged branch holds every new slow weight and counter
  new_params = map_inexact(lambda p, u: (p + u).astype(p.dtype), params, updates)  # what the caller computes
  unfolded = lambda x, other: jnp.where(unfolded_true(index), x, other).astype(x.dtype)  # x, after ``other``
  # Into the branches goes only what a sync may change; the rest passes around them.
  operands = (
    stored.slow,
    (stored.inner_state, stored.slow_inner_state) if policy else (),
    (stored.syncs, stored.alpha),  # the next count is ordered after the branch through them
    jnp.zeros((), jnp.int32) if reports else (),
  )

  def at_sync(j, operands):
    slow, states, counts, report = operands
    # Where exact, the new params. Fused, they are returned as they are: XLA copies them into the slow
    # weights' buffer inside this branch with a plain copy, the cheapest write of a params-sized buffer.
    # Staged, the slow weights come out of the staged branch, and XLA would instead copy them in the branch
    # that does nothing, at every step: there a new value equal to the new params is computed.
    # Elsewhere the slow weights as they are, made to depend on the new params when the inner state passes
    # through: the landing, which reads the inner state, is then ordered before this branch, and the inner
    # state passes through in place.
    exact_slow = (lambda p: unfolded(p, 0)) if counted else (lambda p: p)
    keep = (lambda s, p: unfolded(s, p.astype(s.dtype))) if policy else (lambda s, p: s)
    written = map_inexact(lambda p, s, e: exact_slow(p) if e else keep(s, p), new_params, slow, exact)
    new_slow = written if n == 1 else _streaming.merge(slow, {j: _streaming.mask(written, ids, j)}, ids)
    if policy:
      inner, snapshot = states
      states = _policy.at_sync(cfg.policy, inner, snapshot, alpha, params, fresh=lambda: cfg.inner.init(params))
    counts = (counts[0] if counted else optax.safe_increment(counts[0]), alpha)
    if reports:
      report = _alpha.report_out_of_range(cfg.caller, alpha)
    return cast_like((new_slow, states, counts, report), operands)

  slow, states, counts, report = at_most_one(index, [functools.partial(at_sync, j) for j in range(n)], operands)
  written = stored._replace(slow=slow)
  if policy:
    written = written._replace(inner_state=states[0], slow_inner_state=states[1])
  return written._replace(syncs=counts[0], alpha=counts[1]), report if reports else 0


def sync_now(cfg: Config, state: LookaheadState, params, grads=None):
  """A regular sync of every fragment at the current params, with a zero inner step.

  What :func:`lookahead_optax.force_sync` runs: :func:`step` once per fragment,
  landing on the new slow weights (a delayed schedule has no inner step to mix
  in). The fragment that synced at the last update (with one fragment: all
  params, when ``count == 0``) has no inner step to sync and is left as it is.
  Returns ``(new_state, new_params)``; the params are the slow weights, rounded
  to the params' dtype.
  """
  grads = mask_like(params, grads) if grads is not None else map_inexact(jnp.zeros_like, params)
  zero_step = lambda inner_state, order=unordered: (map_inexact(jnp.zeros_like, params), inner_state)
  leaves = describe(cfg, params, state)
  n, synced = cfg.n_fragments, _streaming.synced_last(state.count, cfg.k, cfg.n_fragments)
  for j in range(n):
    index = jnp.where(synced == j, n, j).astype(jnp.int32)  # ``n``: no fragment syncs
    _, state = step(cfg, state, params, grads, index, zero_step, _streaming.EVERY_STEP, leaves, {})
  landed = map_inexact(lambda p, s: rounded_to(p.dtype, s), params, state.slow)
  return state._replace(count=jnp.zeros_like(state.count)), fill(landed, params)


def rounded_to(dtype, x):
  """``x`` rounded to ``dtype`` (XLA kept from skipping the rounding of a narrower float)."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < x.dtype.itemsize:
    info = jnp.finfo(dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return x.astype(dtype)
