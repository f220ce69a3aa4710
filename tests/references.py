"""The references the library is checked against, written with optax, jax.tree and numpy only.

No code of lookahead_optax:

- :func:`reference_lookahead`: the paper's Algorithm 1 as a plain loop.
- :func:`reference_snoo`: SNOO (Kallusky et al. 2025, Algorithm 1): every k inner
  steps, with the pseudo-gradient s = w - fast_k, b = mu * b + s; w = w - lr * (mu * b + s).
- :func:`reference_diloco`: DiLoCo (Douillard et al. 2023): M replicas run the
  inner optimizer on their own gradients; every k steps the pseudo-gradients are
  averaged over replicas before the same Nesterov step, and every replica
  restarts from the new w.
- :func:`reference_compress`, :func:`reference_mean`, :func:`reference_top_k`: the compressed exchange in numpy
  and ml_dtypes; :func:`reference_weighted_mean` (replicas left out when not finite or of weight 0);
  :func:`reference_eager` (Kale et al.'s eager update).
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


def reference_diloco(inner, k, lr, mu, params, replicas, steps, bad=(), weight=None):
  """DiLoCo as a Python loop over M copies; returns per step the list of M fast weights and the slow weights.

  ``bad``: the (step, replica) pairs whose gradient is NaN. ``weight(t, m)``: replica m's weight in the mean of
  the sync at step t (default 1). A replica whose fast weights are not finite at a sync, or of weight 0, is left
  out of the mean; with none left the slow weights and the momentum stay; every replica restarts from the slow
  weights.
  """
  slow, b = params, jax.tree.map(jnp.zeros_like, params)
  fast = [params] * replicas
  states = [inner.init(params) for _ in range(replicas)]
  fasts, slows = [], []
  for t in range(steps):
    for m in range(replicas):
      g = replica_grad(fast[m], t, m)
      if (t, m) in bad:
        g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g)
      updates, states[m] = inner.update(g, states[m], fast[m])
      fast[m] = optax.apply_updates(fast[m], updates)
    if (t + 1) % k == 0:
      finite = [all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(f)) for f in fast]
      w = [(1.0 if weight is None else weight(t, m)) * finite[m] for m in range(replicas)]
      if sum(w) > 0:
        delta = jax.tree.map(
          lambda s, *fs: sum(wm * (s - f) for wm, f in zip(w, fs) if wm) / np.float32(sum(w)), slow, *fast
        )
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
  integer = {"int8": 127.0, "int4": 7.0}
  if dtype in integer:
    top = integer[dtype]
  else:
    narrow = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}[dtype]
    top = float(ml_dtypes.finfo(narrow).max)
  amax = np.max(np.abs(x), axis=-1, keepdims=True) if x.ndim >= 2 else np.max(np.abs(x), keepdims=True)
  scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
  y = x / scale
  y = np.clip(np.round(y), -top, top) if dtype in integer else y.astype(narrow)
  return y.astype(np.float32) * scale


def reference_weighted_mean(xs, weights):
  """sum_m w_m x_m / sum_m w_m over the replicas whose x_m is finite and w_m > 0 (zeros when there is none)."""
  present = [w if np.all(np.isfinite(x)) and w > 0 else 0.0 for x, w in zip(xs, weights)]
  total = float(np.sum(np.asarray(present, np.float32)))
  if total == 0:
    return np.zeros_like(np.asarray(xs[0], np.float32))
  return sum(np.float32(w) * np.nan_to_num(np.asarray(x, np.float32)) for x, w in zip(xs, present)) / np.float32(total)


def reference_top_k(x, fraction, dtype=None):
  """What one replica sends with top-k: its ceil(fraction * n) entries of largest magnitude (values compressed
  per tensor in dtype), scattered into zeros; as float32 of x's shape."""
  x = np.asarray(x, np.float32)
  flat = x.reshape(-1)
  c = max(1, math.ceil(fraction * flat.size))
  where = np.argsort(-np.abs(flat), kind="stable")[:c]
  out = np.zeros_like(flat)
  out[where] = reference_compress(flat[where], dtype)
  return out.reshape(x.shape)


def reference_eager(rounds, replicas):
  """Eager replica means over rounds: per round t and replica m, x_t[m] / M + mean_{t-1} - x_{t-1}[m] / M.

  ``rounds``: per round the list of each replica's (finite) values. Returns per round the list of M outputs.
  """
  mean_prev = np.zeros_like(np.asarray(rounds[0][0], np.float32))
  sent_prev = [np.zeros_like(mean_prev) for _ in range(replicas)]
  out = []
  for xs in rounds:
    own = [np.asarray(x, np.float32) / replicas for x in xs]
    out.append([own[m] + (mean_prev - sent_prev[m]) for m in range(replicas)])
    mean_prev, sent_prev = np.mean(np.stack(xs), axis=0, dtype=np.float32), own
  return out


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
