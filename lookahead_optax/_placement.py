"""Guards for the mistakes that would otherwise train a wrong model without a word.

- Placement: Lookahead's sync contract says that, right after a sync, the params
  are the slow weights. So at the first update of each cycle the params received
  must equal the slow weights: bitwise where the slow weights are exactly
  ``params + updates``, within a few units in the last place elsewhere
  (``slow_dtype``, DiLoCo replicas), on an evenly spaced sample of each leaf
  (:func:`sample`). When they do not, a transformation after
  ``lookahead`` changed its updates, or the params were changed outside the
  optimizer. The comparison runs inside a ``lax.cond`` taken once per cycle and
  counts, per leaf, the cycles that began misplaced in the state
  (``LookaheadState.misplaced``); no host is called from the compiled step, so
  it has no side effects and never waits on the host. The count is reported
  (:class:`LookaheadPlacementWarning`) where the host touches a state: an
  eager ``update``, ``slow_params``, ``force_sync``, ``find_lookahead_state``.
- State: a state made by another configuration (interpolation snapshot, outer
  optimizer, slow dtype, a counter beyond ``k``) is named as such.
- ``force_sync`` finds the lookahead inside any optimizer by running its update
  once with :func:`probing` on: the lookahead's update announces itself and
  stops.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _alpha, _streaming
from lookahead_optax._tree import is_inexact, map_inexact, vary_as


class LookaheadPlacementWarning(UserWarning):
  """The params at the start of a cycle differ from the slow weights.

  Silence it with ``warnings.filterwarnings("ignore", category=LookaheadPlacementWarning)``.
  """


# -------------------------------------------------------------- construction


def check_inner_state(cfg, inner_state) -> None:
  """Reject an inner optimizer that accumulates micro-steps: lookahead would count them."""
  nodes = jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
  if any(isinstance(x, optax.MultiStepsState) for x in nodes):
    raise ValueError(
      f"{cfg.caller}: the inner optimizer contains an optax.MultiSteps (gradient accumulation): lookahead "
      f"would count micro-steps and sync in the middle of an accumulation. Put the accumulation outside: "
      f"optax.MultiSteps({cfg.caller}(...), every_k_schedule=...)."
    )


# ---------------------------------------------------------------- the update


def check_plain(name, what, tree) -> None:
  """Reject an ``optax.LookaheadParams``: this library takes plain params and keeps the slow weights itself."""
  if isinstance(tree, optax.LookaheadParams):
    raise ValueError(
      f"{name}: {what} is an optax.LookaheadParams (fast, slow), the params of optax.lookahead; {name} takes "
      f"the plain params and keeps the slow weights in its state. Pass {what}.fast (see docs/migrating.md)."
    )


def check_update(cfg, updates, state, params) -> None:
  """Trace-time checks of ``update``'s arguments; errors name what differs."""
  name = cfg.caller
  if params is None:
    raise ValueError(
      f"{name}: update needs params (the fast weights) to place the slow step; got params=None. "
      "Call opt.update(grads, state, params)."
    )
  check_plain(name, "params", params)
  check_plain(name, "updates", updates)
  fields = (
    "count",
    "syncs",
    "alpha",
    "slow",
    "inner_state",
    "slow_inner_state",
    "outer_state",
    "alpha_state",
    "misplaced",
  )
  if getattr(state, "_fields", None) != fields:
    if getattr(state, "_fields", None) == (*fields[:-1], "residual"):
      raise ValueError(
        f"{name}: this is a lookahead-optax 0.1 state: init a 0.2 state and restore into it (the 0.1 "
        "`residual` now lives in outer_state's ReplicaMeanState, and `misplaced` is new); see the changelog."
      )
    raise ValueError(
      f"{name}: state must be the LookaheadState made by this optimizer's init, got {type(state).__name__}."
    )
  made_with = lambda what: (
    f"{name}: this state was made by a lookahead with {what}. Restore or init it with "
    "an optimizer of the same configuration."
  )
  interpolate = not isinstance(state.slow_inner_state, optax.EmptyState)
  if interpolate != (cfg.policy == "interpolate"):
    was = "inner_state_policy='interpolate'" if interpolate else "inner_state_policy 'maintain' or 'reset'"
    raise ValueError(made_with(was) + f" This one has inner_state_policy={cfg.policy!r}.")
  has_outer = not isinstance(state.alpha, jax.Array) and isinstance(state.alpha, optax.EmptyState)
  if has_outer != (cfg.outer is not None):
    was = "an outer optimizer (it has no alpha)" if has_outer else "alpha and no outer optimizer"
    raise ValueError(made_with(was) + f" This one has outer={cfg.outer!r}.")
  ema = isinstance(state.alpha_state, _alpha.AdaptiveAlphaState)
  if ema != _alpha.keeps_ema(cfg.alpha, state.inner_state):
    was = (
      "adaptive_alpha keeping its own gradient EMA"
      if ema
      else "no gradient EMA for alpha (a constant or scheduled alpha, an outer optimizer, or adaptive_alpha "
      "reading the inner optimizer's second moment)"
    )
    raise ValueError(made_with(was) + f" This one has alpha={cfg.alpha!r}.")
  if str(jax.tree.structure(map_inexact(lambda p: 0, params))) != str(
    jax.tree.structure(jax.tree.map(lambda s: 0, state.slow))
  ):
    raise ValueError(
      f"{name}: the params passed to update are not shaped like the slow weights in the state: params "
      f"{jax.tree.structure(params)} vs slow weights {jax.tree.structure(state.slow)}."
    )
  wrong = [
    (p.dtype, s.dtype)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(jax.tree.map(lambda s: s, state.slow)))
    if is_inexact(p) and s.dtype != (cfg.slow_dtype or p.dtype)
  ]
  if wrong:
    raise ValueError(
      made_with(f"slow weights of dtype {wrong[0][1]}") + f" This one has slow_dtype={cfg.slow_dtype!r} "
      f"and params of dtype {wrong[0][0]}."
    )


def check(cfg, state, params, exact, ids):
  """``state.misplaced`` plus 1 for each leaf checked at this update that differs from its slow weights.

  The check runs once per cycle, in a ``lax.cond`` taken at the update after
  a sync (with one fragment: on ``count == 0``): it compares the leaves of the
  fragment that synced with their slow weights, on a sample of each
  (:func:`sample`), all leaves in one pass. No host is called: the counts go
  into the state (``LookaheadState.misplaced``). The sync decision is read
  after them, so that the landing, which overwrites the params in place,
  comes after the comparison that reads them.
  """
  k, n = cfg.k, cfg.n_fragments
  pairs = list(zip(*(jax.tree.leaves(t) for t in (map_inexact(lambda p: p, params), state.slow, exact))))
  if not pairs:
    return state.misplaced
  # Typed like the counts a check computes from the params (per replica under shard_map).
  misplaced = vary_as(state.misplaced, [x for pair in pairs for x in pair[:2]] + [state.misplaced])
  # The fragment that synced at the previous update (``F``: none): its leaves are checked at this one.
  previous = _streaming.synced_last(state.count, k, n)

  def counted(counts):
    wrong = _differ(pairs)
    if n > 1:  # only the leaves of the fragment that synced
      wrong &= jnp.asarray(ids) == previous
    return jnp.minimum(counts, jnp.iinfo(counts.dtype).max - 1) + wrong.astype(counts.dtype)  # saturates: >= 0

  starts = previous < n  # a cycle (or a fragment's) starts at this update
  return jax.lax.cond(starts, counted, lambda counts: counts, misplaced)


def report(state, name: str = "lookahead") -> None:
  """Warn (:class:`LookaheadPlacementWarning`) if a concrete state counts misplaced cycles; nothing under a trace.

  Called where the host touches a state: an eager ``update``,
  :func:`lookahead_optax.slow_params`, :func:`lookahead_optax.force_sync`,
  :func:`lookahead_optax.find_lookahead_state`.
  """
  counts = getattr(state, "misplaced", None)
  if counts is None or isinstance(counts, jax.core.Tracer) or not isinstance(counts, (jax.Array, np.ndarray)):
    return
  if isinstance(counts, jax.Array) and not counts.is_fully_addressable:  # multi-process: what this process holds
    local = np.zeros(counts.shape, np.int32)
    for shard in counts.addressable_shards:
      local[shard.index] = np.asarray(shard.data)
    counts = local
  counts = np.asarray(counts)
  if counts.ndim > 1:  # batched (vmap, pmap): the most of any run or replica
    counts = counts.reshape(-1, counts.shape[-1]).max(axis=0)
  if counts.any():
    _report_placement(name, _leaf_names(state.slow), counts)


SAMPLE = 32
"""The placement check compares between this many and twice this many, less one, evenly spaced elements of a leaf."""


def sample(x):
  """Evenly spaced elements of ``x`` (all of them up to ``2 * SAMPLE``): a strided read of a sliver of the leaf.

  A transformation placed after lookahead changes the updates of most elements
  (a scale, a clip, weight decay), so a sample finds it, and reading it costs
  next to nothing beside the step.
  """
  flat = jnp.ravel(x)
  stride = max(1, flat.size // SAMPLE)
  return flat[::stride]


def replicated(x):
  """``x`` whole on every device: a sample of a leaf sharded over an explicit mesh, gathered to be stacked."""
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or all(axis is None for axis in sharding.spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _differ(pairs):
  """Per ``(params, slow, exact)`` leaf: do the params differ from the slow weights more than a landing allows?

  Exactly where the slow weights are ``params + updates``; elsewhere (another
  slow dtype, replicas) the landing rounds once or twice, by at most a few
  units in the last place of the sample's largest value. Every leaf's sample
  goes into one padded ``(leaves, samples)`` array, compared in one pass in a
  dtype that holds every leaf exactly. When every leaf is exact, the per-leaf
  "any" is written out column by column: one small loop, which XLA:CPU runs
  several times faster than a row reduction.
  """
  width = max(sample(p).size for p, _, _ in pairs)
  dtype = jnp.result_type(*(p.dtype for p, _, _ in pairs))

  def row(x, like):  # a leaf's sample in the params' dtype (as the landing rounds), padded to the widest
    x = replicated(sample(x)).astype(like.dtype).astype(dtype)
    return jnp.pad(x, (0, width - x.size))

  p = jnp.stack([row(p_, p_) for p_, _, _ in pairs])
  s = jnp.stack([row(s_, p_) for p_, s_, _ in pairs])
  off = jnp.abs(p - s)  # NaNs compare as equal: a diverged run is not a misplaced one
  if all(bool(e) for _, _, e in pairs):
    return functools.reduce(jnp.logical_or, [off[:, i] > 0 for i in range(width)])
  exact = jnp.array([bool(e) for _, _, e in pairs])
  eps = jnp.array([4 * float(jnp.finfo(p_.dtype).eps) for p_, _, _ in pairs], jnp.float32)
  tiny = jnp.array([float(jnp.finfo(p_.dtype).tiny) for p_, _, _ in pairs], jnp.float32)
  tol = jnp.where(exact, 0.0, eps * jnp.maximum(jnp.max(jnp.abs(s), axis=1).astype(jnp.float32), tiny))
  return jnp.max(off, axis=1).astype(jnp.float32) > tol


def _leaf_names(tree) -> tuple:
  """The key paths of the floating-point leaves (``MaskedNode`` subtrees have none)."""
  return tuple(jax.tree_util.keystr(path) for path, p in jax.tree_util.tree_leaves_with_path(tree) if is_inexact(p))


def _report_placement(name, leaves, counts) -> None:
  counts = np.asarray(counts)
  where = np.flatnonzero(counts)
  names = ", ".join(f"params{leaves[i]}" for i in where[:3])
  more = "" if len(where) <= 3 else f" and {len(where) - 3} more"
  message = (
    f"{name}: at the start of {int(counts.max())} cycle(s) the params passed to update differed from the slow "
    f"weights ({names}{more}; LookaheadState.misplaced counts them per leaf). Right after a sync the params must "
    f"be the slow weights: either a transformation placed after {name} changed its updates, or the params were "
    f"changed outside the optimizer. Put {name} last, with every other transformation inside it or before it: "
    f"optax.chain(optax.clip_by_global_norm(1.0), {name}(optax.adam(...))), or "
    f"{name}(optax.chain(optax.adam(...), <transformation>)). To silence this check: "
    "warnings.filterwarnings('ignore', category=lookahead_optax.LookaheadPlacementWarning)."
  )
  warnings.warn(message, LookaheadPlacementWarning, stacklevel=3)


# ------------------------------------------------------------- force_sync


_probe = threading.local()


class FoundLookahead(Exception):
  """Raised by a lookahead's update while :func:`probing` is on: its configuration and the updates it received."""

  def __init__(self, cfg, updates):
    super().__init__(cfg.caller)
    self.cfg, self.updates = cfg, updates


@contextlib.contextmanager
def probing():
  """While on, a lookahead's update raises :class:`FoundLookahead` instead of updating."""
  _probe.active = True
  try:
    yield
  finally:
    _probe.active = False


def announce(cfg, updates, params=None) -> None:
  if getattr(_probe, "active", False):
    raise FoundLookahead(cfg, updates)
