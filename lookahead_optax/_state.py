"""Reading and acting on a lookahead state nested anywhere in an optimizer state."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _placement
from lookahead_optax._lookahead import LookaheadState, sync_now
from lookahead_optax._tree import fill, is_masked


def _is_state(x) -> bool:
  return isinstance(x, LookaheadState)


def _unwrap(x):
  """The array inside a Flax nnx variable (``nnx.Optimizer.opt_state`` leaves); arrays as they are."""
  if hasattr(x, "get_value"):
    return x.get_value()
  return getattr(x, "value", x) if not isinstance(x, (jax.Array, jnp.ndarray)) else x


def _plain(tree):
  return jax.tree.map(_unwrap, tree, is_leaf=lambda x: hasattr(x, "get_value"))


def find_lookahead_state(opt_state: optax.OptState) -> LookaheadState:
  """The single :class:`LookaheadState` inside ``opt_state``.

  It may be nested anywhere: in ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``masked``, ``multi_transform``, ``apply_if_finite``, or the
  ``opt_state`` of a Flax ``TrainState`` or ``nnx.Optimizer``.

  Args:
    opt_state: an optimizer state with one :class:`LookaheadState` in it.

  Returns:
    That :class:`LookaheadState`. Reading it from the host emits a
    :class:`LookaheadPlacementWarning` if it counts misplaced cycles.

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
  state = _plain(found[0])
  _placement.report(state)
  return state


def slow_params(opt_state: optax.OptState, params: optax.Params | None = None) -> optax.Params:
  """The slow weights held in ``opt_state``, shaped like params.

  The arrays returned are copies: they stay valid after the next training step
  even when that step donates the optimizer state (``donate_argnums``), so an
  evaluation or "best model" copy taken here survives. (Under ``jit`` XLA
  drops the copy when nothing needs it.)

  Leaves that lookahead does not track (integer or boolean params, or params
  masked out by ``optax.masked``) come from ``params``, which is then required.
  Given ``params``, the slow weights are cast to the params' dtypes (relevant
  with ``slow_dtype``); without, they keep the dtype they are stored in.

  Args:
    opt_state: an optimizer state with one :class:`LookaheadState` in it,
      wherever it sits (see :func:`find_lookahead_state`).
    params: the current params: required when some leaves are not tracked,
      and then the source of those leaves and of the returned dtypes.

  Returns:
    The slow weights, a tree shaped like the params.

  Raises:
    ValueError: if some leaves are not tracked and ``params`` is ``None``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import lookahead, slow_params
    >>> opt = optax.chain(optax.clip(1.0), lookahead(optax.sgd(0.1)))
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> slow_params(state)["w"]
    Array([1., 1.], dtype=float32)
  """
  # Copies, not the state's own buffers: a donated step (jax.jit(..., donate_argnums=...)) deletes those.
  slow = jax.tree.map(lambda x: jnp.array(x, copy=True), find_lookahead_state(opt_state).slow)
  if params is None:
    if any(is_masked(x) for x in jax.tree.leaves(slow, is_leaf=is_masked)):
      raise ValueError(
        "slow_params: the slow weights do not cover every param (integer, boolean or masked-out "
        "leaves are not tracked); pass params=... to fill them in, got params=None."
      )
    return slow
  params = _plain(params)
  slow = fill(slow, params)
  return jax.tree.map(lambda s, p: jnp.asarray(s).astype(jnp.asarray(p).dtype), slow, params)


def force_sync(
  opt_state: optax.OptState,
  params: optax.Params,
  tx: optax.GradientTransformation,
  *,
  grads: optax.Updates | None = None,
) -> tuple[optax.OptState, optax.Params]:
  r"""Take a regular sync now, mid-cycle: returns ``(opt_state, params)``, synced.

  For the end of training, or before a checkpoint that must hold the slow model
  (what timm calls ``sync_lookahead()``). With the current params as the fast
  weights :math:`\theta_j` after :math:`j < k` inner steps, it does exactly what
  the regular sync of an optimizer with ``k = j`` does at that point: the slow
  step (plain, scheduled or adaptive alpha, or the ``outer`` optimizer with its
  state; averaged over ``axis_name``), the params landing on the new slow
  weights, the inner-state policy, the counters. Right after a sync
  (:math:`j = 0`) there is nothing to sync: the state is kept as it is (with
  fragments, that of the fragment that synced at the last update). Pure: the
  arguments are not modified.

  ``tx`` is the optimizer that made ``opt_state`` (a lookahead, a chain holding
  one, a Flax ``TrainState.tx`` or ``nnx.Optimizer.tx``): ``force_sync`` runs
  its update once in a probing mode to find the lookahead's configuration, then
  acts on the lookahead state only; every other part of ``opt_state`` is
  returned unchanged. Under ``axis_name`` call it inside the mapped axis, as the
  update.

  Args:
    opt_state: the optimizer state holding one :class:`LookaheadState`.
    params: the current (fast) params.
    tx: the optimizer that made ``opt_state``.
    grads: adaptive alpha only: the gradients of the last update (its estimate
      uses the gradient at the fast weights). Other alphas take no gradient.

  Returns:
    ``(opt_state, params)`` after the sync: ``params`` equal the slow weights.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import lookahead, force_sync
    >>> opt = lookahead(optax.sgd(1.0), k=5, alpha=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(2)}, state, params)
    >>> params = optax.apply_updates(params, updates)  # fast: -1, slow: 0
    >>> state, params = force_sync(state, params, opt)
    >>> params["w"]
    Array([-0.5, -0.5], dtype=float32)
  """
  old = find_lookahead_state(opt_state)
  params = _plain(params)
  probe_grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
  problem: Exception | str | None = None
  try:
    with _placement.probing():
      tx.update(probe_grads, _plain(opt_state), params)
  except _placement.FoundLookahead as found:
    cfg, received = found.cfg, found.updates
  except Exception as e:  # noqa: BLE001 -- any failure means tx is not the optimizer of opt_state
    problem = e
  else:
    problem = "its update finished without reaching one"
  if problem is not None:
    raise ValueError(
      f"force_sync: tx does not reach a lookahead update ({problem}); pass the optimizer that made "
      f"opt_state (got {tx!r})."
    ) from (problem if isinstance(problem, Exception) else None)
  if cfg.adaptive and grads is None:
    raise ValueError(
      f"force_sync: this {cfg.caller} uses adaptive_alpha, whose slow step needs the gradient of the last "
      "update: pass grads=..."
    )
  if not cfg.adaptive and grads is not None:
    raise ValueError(
      f"force_sync: grads is only used by adaptive_alpha; this {cfg.caller} has alpha={cfg.alpha!r} and "
      f"outer={cfg.outer!r}. Leave grads out."
    )
  # What the lookahead itself sees: MaskedNode where it keeps no slow weight (non-float or masked out).
  tracked = jax.tree.map(lambda s, p: s if is_masked(s) else p, old.slow, params, is_leaf=is_masked)
  new, synced = sync_now(cfg, old, tracked, received if cfg.adaptive else None)
  new_params = jax.tree.map(lambda s, p, q: p if is_masked(s) else q, old.slow, params, synced, is_leaf=is_masked)
  new_state = jax.tree.map(lambda x: new if _is_state(x) else x, _plain(opt_state), is_leaf=_is_state)
  return new_state, new_params


def resize_replicas(tree, replicas: int):
  r"""A state (or params) of ``M`` replicas, stacked on a leading axis, for ``replicas`` replicas (elastic resume).

  For a DiLoCo run saved with ``M`` replicas and resumed with ``M'``: every
  leaf's leading axis is the replica axis (the layout of ``jax.vmap`` or
  ``jax.pmap``, or of ``shard_map`` blocks gathered on the host). New replica
  ``i`` takes replica ``i mod M``'s values: the slow weights, outer state,
  counters (the same on every replica) carry over as they are, and each
  replica's inner state (its moments) and fast weights are those of replica
  ``i mod M`` (with fewer replicas, the last ones are dropped). The
  error-feedback residuals of :func:`replica_mean` keep the total they add to
  the next mean, :math:`\tfrac{1}{M}\sum_m e_m`: shrinking, new replica ``i``
  takes :math:`\tfrac{M'}{M}\sum_{m \equiv i \ (M')} e_m`; growing, the first
  ``M`` take :math:`\tfrac{M'}{M} e_i` and the new ones zero. An eager
  exchange's own last share (``sent``) is zero for new replicas.

  Resume right after a sync (fast weights equal to the slow weights) to
  resize the fast weights with nothing lost.

  Args:
    tree: a pytree whose leaves all have the same leading (replica) dimension
      ``M``, e.g. a stacked :class:`LookaheadState` or the stacked params.
    replicas: the new number of replicas ``M' >= 1``.

  Returns:
    The same pytree with leading dimension ``replicas``, as numpy-backed or
    jax arrays like its input.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lookahead_optax import diloco, resize_replicas
    >>> opt = diloco(optax.sgd(0.1), k=5)
    >>> params = {"w": jnp.zeros((4, 3))}  # 4 replicas
    >>> state = jax.vmap(opt.init)(params)
    >>> jax.tree.map(jnp.shape, resize_replicas(params, 2))
    {'w': (2, 3)}
  """
  from lookahead_optax._exchange import ReplicaMeanState

  if isinstance(replicas, (bool, np.bool_)) or not isinstance(replicas, numbers.Integral) or replicas < 1:
    raise ValueError(f"resize_replicas: replicas must be an int >= 1, got {replicas!r}.")
  replicas = int(replicas)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      "resize_replicas: every leaf of tree must have the same leading (replica) dimension, got leading "
      f"dimensions {sorted(sizes, key=str)}."
    )
  old = int(sizes.pop() or 0)
  order = jnp.arange(replicas) % old
  take = lambda x: x[order]

  def residual(e):
    if replicas < old:  # new replica i: the residuals of replicas i, i + M', ... summed, scaled by M'/M
      groups = jnp.arange(old) % replicas
      return jax.ops.segment_sum(e, groups, replicas) * (replicas / old)
    return jnp.where((jnp.arange(replicas) < old).reshape((-1,) + (1,) * (e.ndim - 1)), take(e), 0) * (replicas / old)

  def node(x):
    if not isinstance(x, ReplicaMeanState):
      return jax.tree.map(take, x)
    new = jax.tree.map(take, x)._replace(residual=jax.tree.map(residual, x.residual))
    fresh = lambda s: jnp.where((jnp.arange(replicas) < old).reshape((-1,) + (1,) * (s.ndim - 1)), take(s), 0)
    return new._replace(sent=jax.tree.map(fresh, x.sent))

  return jax.tree.map(node, tree, is_leaf=lambda x: isinstance(x, ReplicaMeanState))
