"""The references the library is checked against, written with optax, jax.tree and numpy only.

No code of lookahead_optax:

- :func:`reference_lookahead`: the paper's Algorithm 1 as a plain loop.
- :func:`reference_snoo`: SNOO (Kallusky et al. 2025, Algorithm 1): every k inner
  steps, with the pseudo-gradient s = w - fast_k, b = mu * b + s; w = w - lr * (mu * b + s).
- :func:`reference_diloco`: DiLoCo (Douillard et al. 2023): M replicas run the
  inner optimizer on their own gradients; every k steps the pseudo-gradients are
  averaged over replicas before the same Nesterov step, and every replica
  restarts from the new w.
- :func:`reference_compress`, :func:`reference_mean`: the compressed exchange in numpy and ml_dtypes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from tests.helpers import replica_grad

# The optax states that hold moment buffers, by type: what "reset" re-initialises in the references.
MOMENT_STATES = (
  optax.ScaleByAdamState,
  optax.TraceState,
  optax.ScaleByRmsState,
  optax.ScaleByRStdDevState,
  optax.ScaleByBeliefState,
)


def reset_moments(state, fresh):
  """``state`` with every moment state (by type, :data:`MOMENT_STATES`) taken from a fresh ``init``."""
  is_moment = lambda x: isinstance(x, MOMENT_STATES)
  return jax.tree.map(lambda cur, new: new if is_moment(cur) else cur, state, fresh, is_leaf=is_moment)


def reference_lookahead(inner, k, alpha, params, grad_fn, steps, policy="maintain"):
  """Algorithm 1 as the paper writes it: an outer loop over syncs, an inner loop of k steps.

  Returns the fast and slow weights after every inner step (fast weights after a
  sync are the new slow weights). ``alpha`` may be a callable of the sync index.
  ``policy="reset"`` re-initialises the moment states and keeps everything else
  (a schedule's step count); ``"interpolate"`` moves floating leaves toward
  their value at the previous sync.
  """
  slow, fast = params, params
  state = inner.init(params)
  slow_state = state
  fasts, slows = [], []
  t = 0
  for sync in range(steps // k + 1):
    for _ in range(k):
      if t == steps:
        return fasts, slows
      updates, state = inner.update(grad_fn(fast, t), state, fast)
      fast = optax.apply_updates(fast, updates)
      t += 1
      if t % k == 0:
        a = alpha(sync) if callable(alpha) else alpha
        slow = jax.tree.map(lambda s, f: s + a * (f - s), slow, fast)
        fast = slow
        if policy == "reset":
          state = reset_moments(state, inner.init(fast))
        elif policy == "interpolate":
          state = jax.tree.map(
            lambda s0, s1: s0 + a * (s1 - s0) if jnp.issubdtype(s1.dtype, jnp.inexact) else s1, slow_state, state
          )
          slow_state = state
      fasts.append(fast)
      slows.append(slow)
  return fasts, slows


def reference_snoo(inner, k, lr, mu, params, grad_fn, steps, policy="maintain"):
  """SNOO's Algorithm 1 as a plain loop; returns fast weights, slow weights and momentum b after each step."""
  slow, fast, b = params, params, jax.tree.map(jnp.zeros_like, params)
  state = inner.init(params)
  fasts, slows, bs = [], [], []
  for t in range(steps):
    updates, state = inner.update(grad_fn(fast, t), state, fast)
    fast = optax.apply_updates(fast, updates)
    if (t + 1) % k == 0:
      s = jax.tree.map(lambda w, f: w - f, slow, fast)
      b = jax.tree.map(lambda b, s: mu * b + s, b, s)
      slow = jax.tree.map(lambda w, b, s: w - lr * (mu * b + s), slow, b, s)
      fast = slow
      if policy == "reset":
        state = reset_moments(state, inner.init(fast))
    fasts.append(fast)
    slows.append(slow)
    bs.append(b)
  return fasts, slows, bs


def reference_diloco(inner, k, lr, mu, params, replicas, steps):
  """DiLoCo as a Python loop over M copies; returns per step the list of M fast weights and the slow weights."""
  slow, b = params, jax.tree.map(jnp.zeros_like, params)
  fast = [params] * replicas
  states = [inner.init(params) for _ in range(replicas)]
  fasts, slows = [], []
  for t in range(steps):
    for m in range(replicas):
      updates, states[m] = inner.update(replica_grad(fast[m], t, m), states[m], fast[m])
      fast[m] = optax.apply_updates(fast[m], updates)
    if (t + 1) % k == 0:
      delta = jax.tree.map(lambda w, *fs: sum(w - f for f in fs) / replicas, slow, *fast)
      b = jax.tree.map(lambda b, d: mu * b + d, b, delta)
      slow = jax.tree.map(lambda w, b, d: w - lr * (mu * b + d), slow, b, delta)
      fast = [slow] * replicas
    fasts.append(list(fast))
    slows.append(slow)
  return fasts, slows


def reference_compress(x, dtype):
  """Compress then decompress with numpy and ml_dtypes: what one replica sends, as float32."""
  x = np.asarray(x, np.float32)
  if dtype is None:
    return x
  if dtype == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)
  narrow = {"int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}[dtype]
  top = 127.0 if dtype == "int8" else float(ml_dtypes.finfo(narrow).max)
  amax = np.max(np.abs(x), axis=-1, keepdims=True) if x.ndim >= 2 else np.max(np.abs(x), keepdims=True)
  scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
  y = x / scale
  y = np.clip(np.round(y), -127, 127).astype(np.int8) if dtype == "int8" else y.astype(narrow)
  return y.astype(np.float32) * scale


def reference_mean(sent, dtype):
  """The replica mean that the exchange returns, from what each replica sent (compressed, as float32).

  Averaged in float32. A matrix that goes by reduce-scatter (``reference_block_rows``) travels back
  compressed once more, per row.
  """
  mean = np.mean(np.stack(sent), axis=0, dtype=np.float32)
  if dtype is not None and reference_block_rows(mean.shape, len(sent)):
    mean = reference_compress(mean, dtype)
  return mean


def reference_block_rows(shape, replicas: int) -> int:
  """Rows per replica when a compressed leaf goes by reduce-scatter (``2 ceil(R / M) < R``); 0 when all-gathered."""
  if len(shape) < 2:
    return 0
  rows = math.prod(shape[:-1])
  block = -(-rows // replicas)
  return block if 2 * block < rows else 0
