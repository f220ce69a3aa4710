r"""The pseudo-gradient exchange of DiLoCo: the average over replicas, in full or compressed precision.

In full precision it is one ``pmean`` (an all-reduce). With a
``communication_dtype`` each replica sends its pseudo-gradient compressed and
the mean is taken in float32 after decompression, so the sum never loses
precision to the narrow type: the compressed values (and their float32 scales)
are all-gathered, which is what the compiled program's collective operands then
hold. Compression:

- ``bfloat16``: a cast.
- ``float8_e4m3fn`` / ``float8_e5m2``: scaled per row (per tensor for 0-d and
  1-d leaves) so the row's largest magnitude maps to the format's largest
  finite value, then cast.
- ``int8``: scaled per row likewise to 127, rounded to nearest.

With error feedback the part that compression lost,
:math:`e \leftarrow x - \mathrm{decompress}(\mathrm{compress}(x))` for
:math:`x = \Delta + e`, is kept per replica and added to that leaf's next
pseudo-gradient (one more float32 copy of the params in the state).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

COMMUNICATION_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8")


def check_communication_dtype(caller: str, dtype: Any):
  """The dtype as a ``jnp.dtype`` (None for full precision); a ValueError naming the choices otherwise."""
  if dtype is None:
    return None
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(f"{caller}: communication_dtype must be one of {COMMUNICATION_DTYPES} or None, "
                     f"got {dtype!r}.") from e
  if name not in COMMUNICATION_DTYPES:
    raise ValueError(f"{caller}: communication_dtype must be one of {COMMUNICATION_DTYPES} or None, got {dtype!r}.")
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


def exchange(delta, residual, dtype, axis_name):
  """The replica mean of ``delta`` (a tree), and the new error-feedback residual (None without).

  ``dtype`` None: ``pmean`` in the pseudo-gradient's own dtype. Otherwise each
  leaf is compressed, all-gathered, decompressed and averaged in float32.
  """
  if dtype is None:
    return jax.lax.pmean(delta, axis_name), residual

  def leaf(d, e):
    x = d.astype(jnp.float32) + (0.0 if e is None else e)
    values, scale = compress(x, dtype)
    sent = decompress(values, scale)
    gathered = jax.lax.all_gather(values, axis_name)
    scales = None if scale is None else jax.lax.all_gather(scale, axis_name)
    mean = jnp.mean(decompress(gathered, scales), axis=0)
    return mean.astype(d.dtype), (None if e is None else x - sent)

  leaves, structure = jax.tree.flatten(delta)
  residuals = [None] * len(leaves) if residual is None else jax.tree.leaves(residual)  # same structure as delta
  out = [leaf(d, e) for d, e in zip(leaves, residuals)]
  new_residual = None if residual is None else jax.tree.unflatten(structure, [r for _, r in out])
  return jax.tree.unflatten(structure, [m for m, _ in out]), new_residual
