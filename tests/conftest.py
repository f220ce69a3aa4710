"""Shared fixtures: the paper's Algorithm 1 as a plain loop, and small problems.

The reference below uses only optax and jax.tree: no code of lookahead_optax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Scripts that tests run in subprocesses: not test modules (pytest --doctest-modules would import them).
collect_ignore_glob = ["distributed/*_worker.py", "distributed/*_checks.py"]


def make_params(seed: int = 0, dtype=jnp.float32):
  """Nested-dict params of mixed shapes."""
  rng = np.random.default_rng(seed)
  return {
      "dense": {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=(3,)), dtype)},
      "scale": jnp.asarray(rng.normal(size=()), dtype),
      "emb": [jnp.asarray(rng.normal(size=(2, 2, 2)), dtype)],
  }


def quadratic_grad(params, t: int):
  """Gradient of a noisy ill-conditioned quadratic, deterministic in (params, t)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    curv = jnp.linspace(0.5, 4.0, p.size, dtype=jnp.float32).reshape(p.shape)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(i), t), p.shape, jnp.float32)
    out.append((curv * p.astype(jnp.float32) - 1.0 + 0.1 * noise).astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


def reference_lookahead(inner, k, alpha, params, grad_fn, steps, policy="maintain"):
  """Algorithm 1 as the paper writes it: an outer loop over syncs, an inner loop of k steps.

  Returns the fast and slow weights after every inner step (fast weights after a
  sync are the new slow weights). ``alpha`` may be a callable of the sync index.
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
          state = inner.init(fast)
        elif policy == "interpolate":
          state = jax.tree.map(
              lambda s0, s1: s0 + a * (s1 - s0) if jnp.issubdtype(s1.dtype, jnp.inexact) else s1,
              slow_state, state)
          slow_state = state
      fasts.append(fast)
      slows.append(slow)
  return fasts, slows


def run(opt, params, grad_fn, steps, jit=True, extra=None):
  """Train with a lookahead-bearing optimizer; returns fast params and states after each step."""
  state = opt.init(params)

  def step(params, state, t):
    updates, state = opt.update(grad_fn(params, t), state, params, **(extra or {}))
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  fasts, states = [], []
  for t in range(steps):
    params, state = step(params, state, t)
    fasts.append(params)
    states.append(state)
  return fasts, states


def jit_and_count_traces(opt, params, steps):
  """Run ``steps`` jitted, donated steps; returns (traces, compiled executables, final state)."""
  traces = 0

  def step(params, state, t):
    nonlocal traces
    traces += 1
    updates, state = opt.update(quadratic_grad(params, t), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params)
  params = jax.tree.map(jnp.copy, params)
  for t in range(steps):
    params, state = step(params, state, t)
  return traces, step._cache_size(), state


INNERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
    "chain_wd": lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.scale_by_adam(), optax.scale(-0.05)),
}


@pytest.fixture
def params():
  return make_params()
