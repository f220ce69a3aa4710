r"""What one replica sends of its pseudo-gradient: a narrower dtype, and optionally only its largest entries.

The codecs of :func:`lookahead_optax.replica_mean`. Each works on float32
values and gives back float32 values, so the mean over replicas is always
taken in float32:

- ``bfloat16``: a cast.
- ``float8_e4m3fn`` / ``float8_e5m2``: scaled per row (per tensor for 0-d and
  1-d leaves) so the row's largest magnitude maps to the format's largest
  finite value, then cast.
- ``int8``: scaled per row likewise to 127, rounded to nearest.
- ``int4``: scaled per row to 7, rounded to nearest, two values packed in each
  byte (the low nibble holds the even position), so a row of ``n`` values
  travels as ``ceil(n / 2)`` bytes.

A float32 scale travels with each row. Top-k sparsification (:func:`top_k`)
keeps the ``c`` entries of largest magnitude of a leaf, sent as their values
(in the codec's dtype, one scale for the leaf) and their int32 positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "int4")
INT_TOP = {"int8": 127.0, "int4": 7.0}


def check_dtype(caller: str, dtype, argument: str = "dtype"):
  """The dtype as a ``jnp.dtype`` (None for full precision); a ValueError naming the choices otherwise."""
  if dtype is None:
    return None
  bad = f"{caller}: {argument} must be one of {DTYPES} or None, got {dtype!r}."
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(bad) from e
  if name not in DTYPES:
    raise ValueError(bad)
  return None if name == "float32" else jnp.dtype(name)


def _scale(x, top):
  """Per-row (last axis) scale so that the largest magnitude maps to ``top``; 1 where a row is all zeros."""
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True) if x.ndim >= 2 else jnp.max(jnp.abs(x), keepdims=True)
  return jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)


def compress(x, dtype):
  """``(values, scale)``: ``x`` (float32) in ``dtype`` and its float32 scale (None for a plain cast).

  ``int4`` values come packed, two per ``uint8`` along the last axis (0-d
  leaves as one row of one value).
  """
  if dtype == jnp.bfloat16:
    return x.astype(dtype), None
  top = INT_TOP.get(dtype.name, None) or float(jnp.finfo(dtype).max)
  scale = _scale(x, top)
  y = x / scale
  if dtype.name in INT_TOP:
    y = jnp.clip(jnp.round(y), -top, top)
  if dtype == jnp.int4:
    return pack4(y.astype(jnp.int8).reshape(x.shape[:-1] + (-1,) if x.ndim else (1,))), scale
  return y.astype(dtype), scale


def decompress(values, scale, shape=None):
  """float32 values from ``compress`` (gathered or not); packed ``int4`` values need their unpacked ``shape``."""
  if values.dtype == jnp.uint8:
    n = shape[-1] if values.ndim == len(shape) else 1  # a 0-d leaf travels as one row of one value
    x = unpack4(values, n).reshape(shape).astype(jnp.float32)
  else:
    x = values.astype(jnp.float32)
  return x if scale is None else x * scale


def pack4(q):
  """int8 values in [-7, 7] along the last axis, two per byte: ``low nibble = q[2i], high = q[2i + 1]``."""
  if q.shape[-1] % 2:
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
  nibbles = (q & 0xF).astype(jnp.uint8)  # two's complement, 4 bits
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack4(packed, n: int):
  """The ``n`` int8 values per row that :func:`pack4` packed."""
  halves = jnp.stack([packed & 0xF, packed >> 4], axis=-1).astype(jnp.int8)
  signed = jnp.where(halves >= 8, halves - 16, halves).astype(jnp.int8)
  return signed.reshape(packed.shape[:-1] + (-1,))[..., :n]


def kept(size: int, fraction: float) -> int:
  """How many entries top-k keeps of a leaf of ``size``: ``ceil(fraction * size)``, at least 1."""
  return max(1, math.ceil(fraction * size))


def top_k(x, fraction: float):
  """The positions (int32) and values of the ``kept`` entries of largest magnitude of ``x``, flattened."""
  flat = x.reshape(-1)
  _, where = jax.lax.top_k(jnp.abs(flat), kept(flat.size, fraction))
  return where.astype(jnp.int32), flat[where]


def scatter(size: int, where, values):
  """A dense flat vector of ``size`` zeros with ``values`` added at ``where`` (repeated positions add up)."""
  return jnp.zeros((size,), jnp.float32).at[where.reshape(-1)].add(values.reshape(-1))
