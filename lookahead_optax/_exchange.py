r"""The pseudo-gradient exchange of DiLoCo as an optax transformation: the replica mean, full or compressed.

:func:`replica_mean` averages what it receives over a mapped axis. Chained in
front of an outer optimizer, it is DiLoCo's exchange:
``lookahead(inner, k, outer=optax.chain(replica_mean("replica"), optax.sgd(0.7, momentum=0.9, nesterov=True)))``.

**Who takes part.** A replica whose pseudo-gradient is not finite everywhere is
left out of the round, as is one given ``replica_weight=0``; the mean is the
weighted mean over the replicas present,

.. math:: \bar u = \frac{\sum_m w_m\, u^{(m)}}{\sum_m w_m},
   \qquad w_m = 0 \text{ for a replica left out.}

With no replica present the mean is zero and the state says so
(``present == 0``); :func:`lookahead_optax.lookahead` then leaves the slow
weights and the outer state as they were.

**What travels.** In full precision, one all-reduce of the weighted values and
one of the weights. With a ``dtype`` each replica sends its values compressed
(:mod:`lookahead_optax._compression`) and the mean is taken in float32 after
decompression. A leaf of ``R`` rows goes one of two ways over ``M`` replicas,
whichever sends fewer bytes:

- **Reduce-scatter, then all-gather** (when ``2 ceil(R / M) < R``): the rows
  are split into ``M`` blocks (zero rows pad the last); an all-to-all gives
  replica ``i`` every replica's block ``i``, which it averages in float32 and
  compresses again; an all-gather of those compressed means gives every
  replica the whole mean: :math:`2 (M - 1) / M` values sent per value, as a
  ring all-reduce. The mean is compressed once more, per row, on its way back.
- **All-gather** (vectors, scalars and matrices with few rows): every replica
  receives every replica's compressed leaf and averages them itself.

With ``top_k`` each replica sends only the entries of largest magnitude of
each leaf (values and int32 positions, all-gathered); the mean is the sum of
what was sent, scattered into place, over the weight present. Every replica
ends with the same mean, bit for bit.

**Error feedback.** The part that a replica's own compression lost,
:math:`e \leftarrow x - \mathrm{sent}(x)` for :math:`x = u + e`, is kept per
replica and added to its next values (one float32 copy of the params in the
state). A replica left out of a round keeps its residual.

**Eager** (Kale et al., 2025). The mean of this round is kept for the next
one; the update a replica returns now is its own values standing in for its
share, corrected by the last round's mean once that has arrived:

.. math:: \tilde u_t = \tfrac{1}{M} u_t + \bar u_{t-1} - \tfrac{1}{M} u_{t-1},

so nothing returned waits on this round's exchange.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from lookahead_optax import _compression
from lookahead_optax._compression import compress, decompress
from lookahead_optax._tree import unfolded_true, vary_as


def _moved(collective, values):
  """``collective(values)`` on the values' raw bytes: XLA:CPU widens bfloat16 and float8 operands of collectives."""
  if values.dtype in (jnp.int8, jnp.uint8) or values.dtype.itemsize == 4:
    return collective(values)
  raw = jnp.uint16 if values.dtype.itemsize == 2 else jnp.uint8
  return jax.lax.bitcast_convert_type(collective(jax.lax.bitcast_convert_type(values, raw)), values.dtype)


def _gathered(collective, values, scale):
  """``collective`` applied to the compressed values and their scales (None stays None)."""
  return _moved(collective, values), (None if scale is None else collective(scale))


def scattered_rows(shape, replicas: int) -> int:
  """Rows per replica block when a leaf of ``shape`` is reduce-scattered over ``replicas``; 0 if all-gathered."""
  if len(shape) < 2:
    return 0
  rows = math.prod(shape[:-1])
  block = -(-rows // replicas)
  return block if 2 * block < rows else 0


class Round(NamedTuple):
  """One round of the exchange, as a replica sees it."""

  weight: jax.Array
  """This replica's weight in the mean (float32; 0 when it is left out)."""
  weights: jax.Array
  """Every replica's weight, in replica order (float32, ``[M]``)."""
  total: jax.Array
  """The sum of the weights (float32; 0: no replica is present)."""
  axis_name: Hashable


def _weighted_mean(rnd: Round, x):
  """``sum_m w_m x[m] / total`` over the leading (replica) axis of ``x``, in float32.

  The sum is written out replica by replica (the axis is short and static): one element-wise loop, where
  XLA:CPU's reduction over a major axis took seconds on a leaf of a few million values.
  """
  terms = [rnd.weights[m] * x[m] for m in range(x.shape[0])]
  return functools.reduce(operator.add, terms) / jnp.where(rnd.total > 0, rnd.total, 1.0)


def _mean_by_all_gather(rnd: Round, values, scale, shape):
  values, scale = _gathered(lambda v: jax.lax.all_gather(v, rnd.axis_name), values, scale)
  return _weighted_mean(rnd, decompress(values, scale, (values.shape[0], *shape)))


def _mean_by_reduce_scatter(rnd: Round, x, values, scale, dtype, block):
  replicas, rows, n = rnd.weights.shape[0], math.prod(x.shape[:-1]), x.shape[-1]
  blocks = lambda a: jnp.pad(a, ((0, block * replicas - rows), (0, 0))).reshape(replicas, block, a.shape[-1])
  scale = None if scale is None else blocks(scale)
  mine, scales = _gathered(lambda v: jax.lax.all_to_all(v, rnd.axis_name, 0, 0), blocks(values), scale)
  part = _weighted_mean(rnd, decompress(mine, scales, (replicas, block, n)))  # block i of the mean, on replica i
  values, scale = _gathered(lambda v: jax.lax.all_gather(v, rnd.axis_name), *compress(part, dtype))
  return decompress(values, scale, (replicas, block, n)).reshape(block * replicas, n)[:rows].reshape(x.shape)


def _compressed(rnd: Round, x, dtype):
  """The mean of a dense compressed leaf, and what this replica sent (float32)."""
  block = scattered_rows(x.shape, rnd.weights.shape[0])
  values, scale = compress(x.reshape(-1, x.shape[-1]) if block else x, dtype)
  sent = decompress(values, scale, x.reshape(-1, x.shape[-1]).shape if block else x.shape).reshape(x.shape)
  if block:
    return _mean_by_reduce_scatter(rnd, x, values, scale, dtype, block), sent
  return _mean_by_all_gather(rnd, values, scale, x.shape), sent


def _sparse(rnd: Round, x, dtype, fraction):
  """The mean of a leaf of which each replica sends its top-k entries, and what this replica sent (float32)."""
  where, values = _compression.top_k(x, fraction)
  values, scale = (values, None) if dtype is None else compress(values, dtype)
  sent = _compression.scatter(x.size, where, decompress(values, scale, where.shape)).reshape(x.shape)
  gather = lambda v: jax.lax.all_gather(v, rnd.axis_name)
  (values, scale), where = _gathered(gather, values, scale), gather(where)
  weighted = rnd.weights[:, None] * decompress(values, scale, where.shape)
  total = jnp.where(rnd.total > 0, rnd.total, 1.0)
  return (_compression.scatter(x.size, where, weighted) / total).reshape(x.shape), sent


def exchange(delta, residual, rnd: Round, dtype=None, fraction=None):
  """The weighted replica mean of ``delta`` (a tree), and the new error-feedback residual (None without).

  A replica of weight 0 (left out) counts for nothing in the mean: of its
  values, which may not be finite, it sends none, and it keeps its residual. ``dtype`` and
  ``fraction`` None: an all-reduce in the values' own dtype. Otherwise each
  leaf is compressed (and sparsified) and averaged in float32 (see the module
  docstring).
  """
  present = rnd.weight > 0
  if dtype is None and fraction is None:
    total = jnp.where(rnd.total > 0, rnd.total, 1.0)
    mean = lambda d: jax.lax.psum(jnp.where(present, d * rnd.weight.astype(d.dtype), 0), rnd.axis_name) / total
    return jax.tree.map(lambda d: mean(d).astype(d.dtype), delta), residual

  def leaf(d, e):
    x = jnp.where(present, d.astype(jnp.float32), 0.0) + (0.0 if e is None else e)  # a NaN stays home
    mean, sent = _compressed(rnd, x, dtype) if fraction is None else _sparse(rnd, x, dtype, fraction)
    return mean.astype(d.dtype), (None if e is None else jnp.where(present, x - sent, e))

  leaves, structure = jax.tree.flatten(delta)
  residuals = [None] * len(leaves) if residual is None else jax.tree.leaves(residual)  # same structure as delta
  out = [leaf(d, e) for d, e in zip(leaves, residuals)]
  new_residual = None if residual is None else jax.tree.unflatten(structure, [r for _, r in out])
  return jax.tree.unflatten(structure, [m for m, _ in out]), new_residual


def all_finite(tree):
  """One boolean: is every element of every leaf of ``tree`` finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


class ReplicaMeanState(NamedTuple):
  """State of :func:`replica_mean`."""

  residual: optax.Updates | optax.EmptyState
  """``error_feedback=True``: what compressing each leaf's last exchange lost, float32; else ``EmptyState()``."""
  excluded: jax.Array
  """How many times a replica was left out of a round because its values were not finite, summed over the
  replicas (int32, the same on every replica)."""
  present: jax.Array
  """The total weight of the replicas in the last round's mean (float32; with no ``replica_weight``, their number);
  0 before the first round and after a round with none present."""
  mean: optax.Updates | optax.EmptyState
  """``eager=True``: the last round's mean, applied at the next round; else ``EmptyState()``."""
  sent: optax.Updates | optax.EmptyState
  """``eager=True``: this replica's own values over ``M`` returned at the last round; else ``EmptyState()``."""


def replica_mean(
  axis_name: Hashable = "replica",
  *,
  dtype: DTypeLike | None = None,
  error_feedback: bool = False,
  top_k: float | None = None,
  eager: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The mean of the updates over the replicas of a mapped axis: robust, weighted, optionally compressed.

  .. math:: \bar u = \frac{\sum_m w_m\, u^{(m)}}{\sum_m w_m}

  Chained in front of the outer optimizer of :func:`lookahead_optax.lookahead`,
  it averages the pseudo-gradient over the replicas at each sync (DiLoCo); the
  lookahead runs it only inside the sync branch, so a non-sync step
  communicates nothing. ``update`` must run inside ``jax.shard_map``,
  ``jax.pmap`` or ``jax.vmap`` over ``axis_name``, each replica with its own
  values. Every replica ends with the same mean, bit for bit.

  A replica whose values are not all finite is left out (and counted in
  ``state.excluded``, the same on every replica), so one bad batch on one host cannot poison the others;
  with none present the mean is zero and ``state.present`` is 0, and a
  lookahead then keeps its slow weights and outer state. ``update`` takes an
  optional ``replica_weight``: this replica's weight, a float32 scalar >= 0
  (for example the tokens it processed since the last round; 0: absent this
  round). :func:`lookahead_optax.lookahead` forwards it to ``outer``.

  Args:
    axis_name: the mapped axis over the replicas.
    dtype: ``None`` (an all-reduce in the values' own dtype) or the
      communication dtype: ``"bfloat16"``, ``"float8_e4m3fn"``,
      ``"float8_e5m2"``, ``"int8"`` or ``"int4"`` (the float8 and integer ones
      scaled per row; int4 packs two values per byte).
    error_feedback: with a ``dtype`` or ``top_k``: keep what compression lost
      (one float32 copy of the values in the state) and add it to the next
      exchange.
    top_k: a fraction in (0, 1): send only that fraction of each leaf's
      entries, those of largest magnitude (at least one), with their int32
      positions; the values in ``dtype`` (one scale per leaf) or float32.
    eager: return this replica's own values over ``M`` in place of its share
      now, plus the last round's mean less its own share of it, and keep this
      round's mean for the next (Kale et al.): nothing returned waits for the
      exchange. Two more copies of the values in the state.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ReplicaMeanState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lookahead_optax import replica_mean
    >>> tx = replica_mean("replica", dtype="int8", error_feedback=True)
    >>> u = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 0.0]])}  # one row per replica
    >>> state = jax.vmap(tx.init)(u)
    >>> mean, state = jax.vmap(tx.update, axis_name="replica")(u, state)
    >>> mean["w"][0], state.excluded  # the third replica is left out, as every replica records
    (Array([2., 3.], dtype=float32), Array([1, 1, 1], dtype=int32))

  References:
    Douillard et al., `DiLoCo: Distributed Low-Communication Training of
    Language Models <https://arxiv.org/abs/2311.08105>`_, 2023.
    Kale, Douillard, Donchev, `Eager updates for overlapped communication and
    computation in DiLoCo <https://arxiv.org/abs/2502.12996>`_, 2025.
  """
  return make("replica_mean", axis_name, dtype, error_feedback, top_k=top_k, eager=eager)


def make(
  caller: str, axis_name, dtype, error_feedback, dtype_argument: str = "dtype", *, top_k=None, eager=False
) -> optax.GradientTransformationExtraArgs:
  """:func:`replica_mean`, with errors that name ``caller`` and its own argument names (``diloco`` builds one)."""
  try:
    hash(axis_name)
  except TypeError as e:
    raise ValueError(f"{caller}: axis_name must be a mapped axis name (a string), got {axis_name!r}.") from e
  if axis_name is None:
    raise ValueError(f"{caller}: axis_name must name the mapped replica axis, got None.")
  given = dtype
  dtype = _compression.check_dtype(caller, dtype, dtype_argument)
  if top_k is not None and (
    isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, numbers.Real) or not 0.0 < float(top_k) < 1.0
  ):
    raise ValueError(f"{caller}: top_k must be a fraction in (0, 1) or None, got {top_k!r}.")
  for name, flag in (("error_feedback", error_feedback), ("eager", eager)):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{caller}: {name} must be True or False, got {flag!r}.")
  error_feedback, eager = bool(error_feedback), bool(eager)
  if error_feedback and dtype is None and top_k is None:
    raise ValueError(
      f"{caller}: error_feedback=True keeps what compression loses, but {dtype_argument}={given!r} and "
      f"top_k={top_k!r} (no compression) lose nothing. Pass a narrower {dtype_argument} or a top_k, or "
      "error_feedback=False."
    )
  fraction = None if top_k is None else float(top_k)

  def init_fn(params):
    zeros = lambda dtype=None: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype or jnp.result_type(p)), params)
    return ReplicaMeanState(
      residual=zeros(jnp.float32) if error_feedback else optax.EmptyState(),
      excluded=jnp.zeros((), jnp.int32),
      present=jnp.zeros((), jnp.float32),
      mean=zeros() if eager else optax.EmptyState(),
      sent=zeros() if eager else optax.EmptyState(),
    )

  def update_fn(updates, state, params=None, *, replica_weight=None, **extra_args):
    del params, extra_args
    replicas = replica_count(caller, axis_name)
    finite = all_finite(updates)
    weight = jnp.float32(1.0) if replica_weight is None else checked_weight(caller, replica_weight)
    # A traced weight that is negative, NaN or infinite counts as absent: one replica cannot skew the mean.
    weight = jnp.where(finite & jnp.isfinite(weight), jnp.maximum(weight, 0.0), 0.0)
    total, bad = jax.lax.psum(jnp.stack([weight, jnp.logical_not(finite).astype(jnp.float32)]), axis_name)
    rnd = Round(weight, jax.lax.all_gather(weight, axis_name), total, axis_name)
    residual = state.residual if error_feedback else None
    mean, residual = exchange(updates, residual, rnd, dtype, fraction)
    new_state = ReplicaMeanState(
      residual=optax.EmptyState() if residual is None else residual,
      excluded=state.excluded + bad.astype(jnp.int32),
      present=rnd.total,
      mean=mean if eager else optax.EmptyState(),
      sent=optax.EmptyState(),
    )
    if not eager:
      return mean, new_state
    own = jax.tree.map(lambda u: jnp.where(finite, u, 0) / jnp.asarray(replicas, u.dtype), updates)
    now = jax.tree.map(lambda o, m, s: o + (m - s), own, state.mean, state.sent)
    # The new mean and share, made to depend on ``now``: XLA reads the stored ones first and then overwrites
    # them in place, instead of copying both on every step.
    later = lambda x, n: jnp.where(unfolded_true(rnd.total), x, n).astype(x.dtype)
    return now, new_state._replace(mean=jax.tree.map(later, mean, now), sent=jax.tree.map(later, own, now))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def replica_count(caller: str, axis_name) -> int:
  """The size of the mapped axis ``axis_name``; a ValueError naming it when it is not mapped here."""
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"{caller}: axis_name={axis_name!r} is not a mapped axis here. Call update inside jax.shard_map, "
      f"jax.pmap or jax.vmap over the axis {axis_name!r} (each replica with its own values)."
    ) from e


def checked_weight(caller: str, weight: Any):
  """``replica_weight`` as a float32 scalar; a ValueError naming it for another shape or a negative value."""
  if jnp.ndim(weight) != 0:
    raise ValueError(
      f"{caller}: replica_weight must be one scalar per replica (inside the mapped function), got shape "
      f"{jnp.shape(weight)}."
    )
  if not isinstance(weight, jax.core.Tracer) and not 0 <= float(weight) < math.inf:
    raise ValueError(
      f"{caller}: replica_weight must be a finite number >= 0 (0: absent this round), got {float(weight)!r}."
    )
  return jnp.asarray(weight, jnp.float32)


def _nodes(outer_state) -> list:
  is_node = lambda x: isinstance(x, ReplicaMeanState)
  return [x for x in jax.tree.leaves(outer_state, is_leaf=is_node) if is_node(x)]


def in_state(outer_state) -> bool:
  """Whether an outer optimizer's state holds a :class:`ReplicaMeanState`: its slow step averages over replicas."""
  return bool(_nodes(outer_state))


def empty_round(outer_state):
  """True (a traced bool) when a (not eager) replica mean in ``outer_state`` just averaged no replica; None if none."""
  flags = [x.present == 0 for x in _nodes(outer_state) if isinstance(x.mean, optax.EmptyState)]
  return jnp.any(jnp.stack(flags)) if flags else None


def hold(empty, new, old):
  """An outer optimizer's state after a round: ``old`` if ``empty`` (no replica present), else ``new``.

  The replica means' own states stay ``new``: they record the round. A
  conditional, not an element-wise select, so that XLA still updates the state
  in place.
  """
  is_node = lambda x: isinstance(x, ReplicaMeanState)
  new_leaves, structure = jax.tree.flatten(new, is_leaf=is_node)
  old_leaves = jax.tree.leaves(old, is_leaf=is_node)
  held = [i for i, x in enumerate(new_leaves) if not is_node(x)]
  n = [vary_as(new_leaves[i], [old_leaves[i]]) for i in held]  # under shard_map: both typed alike
  o = [vary_as(old_leaves[i], [new_leaves[i]]) for i in held]
  kept = dict(zip(held, jax.lax.cond(empty, lambda n, o: o, lambda n, o: n, n, o)))
  return jax.tree.unflatten(structure, [kept.get(i, x) for i, x in enumerate(new_leaves)])
