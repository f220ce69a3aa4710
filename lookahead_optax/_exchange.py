r"""The pseudo-gradient exchange of DiLoCo as an optax transformation: the replica mean, full or compressed.

:func:`replica_mean` averages what it receives over a mapped axis. Chained in
front of an outer optimizer, it is DiLoCo's exchange:
``lookahead(inner, k, outer=optax.chain(replica_mean("replica"), optax.sgd(0.7, momentum=0.9, nesterov=True)))``.

In full precision it is one ``pmean`` (an all-reduce). With a
``communication_dtype`` each replica sends its pseudo-gradient compressed and
the mean is taken in float32 after decompression, so the sum never loses
precision to the narrow type. Compression:

- ``bfloat16``: a cast.
- ``float8_e4m3fn`` / ``float8_e5m2``: scaled per row (per tensor for 0-d and
  1-d leaves) so the row's largest magnitude maps to the format's largest
  finite value, then cast.
- ``int8``: scaled per row likewise to 127, rounded to nearest.

The float32 scales travel with the values. A leaf of ``R`` rows goes one of
two ways over ``M`` replicas, whichever sends fewer bytes:

- **Reduce-scatter, then all-gather** (when ``2 ceil(R / M) < R``, so for
  matrices with at least as many rows as replicas from ``M = 4`` on): the rows
  are split into ``M`` blocks (zero rows pad the last); an all-to-all gives
  replica ``i`` every replica's block ``i``, which it averages in float32 and
  compresses again; an all-gather of those compressed means gives every
  replica the whole mean. Each value is sent twice in the narrow type:
  :math:`2 (M - 1) / M` values per value, as a ring all-reduce, so an int8
  exchange moves a quarter of the float32 all-reduce's bytes (plus one float32
  scale per row). The mean is compressed once more, per row, on its way back.
- **All-gather** (vectors, scalars and matrices with few rows): every replica
  receives every replica's compressed leaf, :math:`M - 1` values per value,
  and averages them itself.

Every replica ends with the same mean, bit for bit. With error feedback the
part that a replica's own compression lost,
:math:`e \leftarrow x - \mathrm{decompress}(\mathrm{compress}(x))` for
:math:`x = \Delta + e`, is kept per replica and added to that leaf's next
pseudo-gradient (one more float32 copy of the params in the state).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

COMMUNICATION_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8")


def check_communication_dtype(caller: str, dtype: Any, argument: str = "dtype"):
  """The dtype as a ``jnp.dtype`` (None for full precision); a ValueError naming the choices otherwise."""
  if dtype is None:
    return None
  bad = f"{caller}: {argument} must be one of {COMMUNICATION_DTYPES} or None, got {dtype!r}."
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(bad) from e
  if name not in COMMUNICATION_DTYPES:
    raise ValueError(bad)
  return None if name == "float32" else jnp.dtype(name)


def _scale(x, top):
  """Per-row (last axis) scale so that the largest magnitude maps to ``top``; 1 where a row is all zeros."""
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True) if x.ndim >= 2 else jnp.max(jnp.abs(x), keepdims=True)
  return jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)


def compress(x, dtype):
  """``(values, scale)``: ``x`` (float32) in ``dtype``, and the float32 scale (None for a plain cast)."""
  if dtype == jnp.bfloat16:
    return x.astype(dtype), None
  top = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
  scale = _scale(x, top)
  y = x / scale
  if dtype == jnp.int8:
    y = jnp.clip(jnp.round(y), -127, 127)
  return y.astype(dtype), scale


def decompress(values, scale):
  x = values.astype(jnp.float32)
  return x if scale is None else x * scale


def _moved(collective, values):
  """``collective(values)`` on the values' raw bytes: XLA:CPU widens bfloat16 and float8 operands of collectives."""
  if values.dtype == jnp.int8 or values.dtype.itemsize == 4:
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


def _mean_by_all_gather(values, scale, axis_name):
  values, scale = _gathered(lambda v: jax.lax.all_gather(v, axis_name), values, scale)
  return jnp.mean(decompress(values, scale), axis=0)


def _mean_by_reduce_scatter(x, values, scale, dtype, axis_name, replicas, block):
  rows = math.prod(x.shape[:-1])
  blocks = lambda a: jnp.pad(a, ((0, block * replicas - rows), (0, 0))).reshape(replicas, block, a.shape[-1])
  scale = None if scale is None else blocks(scale)
  mine = _gathered(lambda v: jax.lax.all_to_all(v, axis_name, 0, 0), blocks(values), scale)
  part = jnp.mean(decompress(*mine), axis=0)  # block i of the mean, on replica i
  values, scale = _gathered(lambda v: jax.lax.all_gather(v, axis_name), *compress(part, dtype))
  return decompress(values, scale).reshape(block * replicas, x.shape[-1])[:rows].reshape(x.shape)


def exchange(delta, residual, dtype, axis_name):
  """The replica mean of ``delta`` (a tree), and the new error-feedback residual (None without).

  ``dtype`` None: ``pmean`` in the pseudo-gradient's own dtype. Otherwise each
  leaf is compressed and averaged in float32, by reduce-scatter and all-gather
  or by all-gather (see the module docstring).
  """
  if dtype is None:
    return jax.lax.pmean(delta, axis_name), residual
  replicas = jax.lax.axis_size(axis_name)

  def leaf(d, e):
    x = d.astype(jnp.float32) + (0.0 if e is None else e)
    block = scattered_rows(x.shape, replicas)
    values, scale = compress(x.reshape(-1, x.shape[-1]) if block else x, dtype)
    sent = decompress(values, scale).reshape(x.shape)
    if block:
      mean = _mean_by_reduce_scatter(x, values, scale, dtype, axis_name, replicas, block)
    else:
      mean = _mean_by_all_gather(values, scale, axis_name)
    return mean.astype(d.dtype), (None if e is None else x - sent)

  leaves, structure = jax.tree.flatten(delta)
  residuals = [None] * len(leaves) if residual is None else jax.tree.leaves(residual)  # same structure as delta
  out = [leaf(d, e) for d, e in zip(leaves, residuals)]
  new_residual = None if residual is None else jax.tree.unflatten(structure, [r for _, r in out])
  return jax.tree.unflatten(structure, [m for m, _ in out]), new_residual


class ReplicaMeanState(NamedTuple):
  """State of :func:`replica_mean`."""

  residual: optax.Updates | optax.EmptyState
  """``error_feedback=True``: what compressing each leaf's last exchange lost, float32; else ``EmptyState()``."""


def replica_mean(
  axis_name: Hashable = "replica",
  *,
  dtype: DTypeLike | None = None,
  error_feedback: bool = False,
) -> optax.GradientTransformation:
  r"""The mean of the updates over the replicas of a mapped axis, optionally compressed.

  .. math:: u \leftarrow \tfrac{1}{M} \textstyle\sum_{m=1}^{M} u^{(m)}

  Chained in front of the outer optimizer of :func:`lookahead_optax.lookahead`,
  it averages the pseudo-gradient over the replicas at each sync (DiLoCo); the
  lookahead runs it only inside the sync branch, so a non-sync step
  communicates nothing. ``update`` must run inside ``jax.shard_map``,
  ``jax.pmap`` or ``jax.vmap`` over ``axis_name``, each replica with its own
  values. With ``dtype`` each replica sends its values compressed and the mean
  is taken in float32 (see the module docstring); every replica ends with the
  same mean, bit for bit.

  Args:
    axis_name: the mapped axis over the replicas.
    dtype: ``None`` (a float32 all-reduce in the values' own dtype) or the
      communication dtype: ``"bfloat16"``, ``"float8_e4m3fn"``,
      ``"float8_e5m2"`` or ``"int8"`` (the float8 and int8 ones scaled per row).
    error_feedback: with a ``dtype``: keep what compression lost (one float32
      copy of the values in the state) and add it to the next exchange.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`ReplicaMeanState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lookahead_optax import replica_mean
    >>> tx = replica_mean("replica", dtype="int8", error_feedback=True)
    >>> u = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # one row per replica
    >>> state = jax.vmap(tx.init)(u)
    >>> mean, state = jax.vmap(tx.update, axis_name="replica")(u, state)
    >>> mean["w"][0]
    Array([2., 3.], dtype=float32)
  """
  return make("replica_mean", axis_name, dtype, error_feedback)


def make(caller: str, axis_name, dtype, error_feedback, dtype_argument: str = "dtype") -> optax.GradientTransformation:
  """:func:`replica_mean`, with errors that name ``caller`` and its own argument names (``diloco`` builds one)."""
  try:
    hash(axis_name)
  except TypeError as e:
    raise ValueError(f"{caller}: axis_name must be a mapped axis name (a string), got {axis_name!r}.") from e
  if axis_name is None:
    raise ValueError(f"{caller}: axis_name must name the mapped replica axis, got None.")
  given = dtype
  dtype = check_communication_dtype(caller, dtype, dtype_argument)
  if not isinstance(error_feedback, bool):
    raise ValueError(f"{caller}: error_feedback must be True or False, got {error_feedback!r}.")
  if error_feedback and dtype is None:
    raise ValueError(
      f"{caller}: error_feedback=True keeps what compression loses, but {dtype_argument}={given!r} (no compression) "
      f"loses nothing. Pass a narrower {dtype_argument}, or error_feedback=False."
    )

  def init_fn(params):
    if not error_feedback:
      return ReplicaMeanState(optax.EmptyState())
    return ReplicaMeanState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

  def update_fn(updates, state, params=None):
    del params
    try:
      jax.lax.axis_size(axis_name)
    except NameError as e:
      raise ValueError(
        f"{caller}: axis_name={axis_name!r} is not a mapped axis here. Call update inside jax.shard_map, "
        f"jax.pmap or jax.vmap over the axis {axis_name!r} (each replica with its own values)."
      ) from e
    residual = state.residual if error_feedback else None
    mean, residual = exchange(updates, residual, dtype, axis_name)
    return mean, ReplicaMeanState(optax.EmptyState() if residual is None else residual)

  return optax.GradientTransformation(init_fn, update_fn)


def in_state(outer_state) -> bool:
  """Whether an outer optimizer's state holds a :class:`ReplicaMeanState`: its slow step averages over replicas."""
  nodes = jax.tree.leaves(outer_state, is_leaf=lambda x: isinstance(x, ReplicaMeanState))
  return any(isinstance(x, ReplicaMeanState) for x in nodes)
