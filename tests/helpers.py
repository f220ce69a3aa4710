"""Shared test helpers: small problems, runners and trajectory comparisons.

The references the library is checked against are in ``tests/references.py``;
the readers of compiled programs (jaxpr and HLO) in ``tests/compiled.py``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

INNERS = {
  "sgd": lambda: optax.sgd(0.05),
  "momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "adam": lambda: optax.adam(0.05),
  "chain_wd": lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.scale_by_adam(), optax.scale(-0.05)),
}
TOL = dict(rtol=2e-5, atol=2e-6)


def make_params(seed: int = 0, dtype=jnp.float32):
  """Nested-dict params of mixed shapes."""
  rng = np.random.default_rng(seed)
  return {
    "dense": {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=(3,)), dtype)},
    "scale": jnp.asarray(rng.normal(size=()), dtype),
    "emb": [jnp.asarray(rng.normal(size=(2, 2, 2)), dtype)],
  }


def small_params(seed: int = 5):
  """Two leaves: enough for tree handling, cheap to compile."""
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


def quadratic_grad(params, t: int):
  """Gradient of a noisy ill-conditioned quadratic, deterministic in (params, t)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    curv = jnp.linspace(0.5, 4.0, p.size, dtype=jnp.float32).reshape(p.shape)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(i), t), p.shape, jnp.float32)
    out.append((curv * p.astype(jnp.float32) - 1.0 + 0.1 * noise).astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


def replica_grad(params, t, m):
  """Replica m's gradient at step t: the quadratic above with replica-specific noise and target."""
  g = quadratic_grad(params, 1000 * m + t)
  return jax.tree.map(lambda g: g - 0.3 * m, g)


def replica_step(opt):
  """A jitted step of ``opt`` on every replica (``vmap`` over the axis ``"replica"``), each with its own gradient.

  Called as ``step(stacked_params, stacked_state, t, jnp.arange(replicas))``.
  """

  @jax.jit
  @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0))
  def step(params, state, t, m):
    updates, state = opt.update(replica_grad(params, t, m), state, params)
    return optax.apply_updates(params, updates), state

  return step


def stack_replicas(params, replicas: int):
  """``replicas`` copies of ``params`` along a new leading axis."""
  return jax.tree.map(lambda x: jnp.stack([x] * replicas), params)


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


def assert_trajectories_close(fasts, slows, ref_fasts, ref_slows, rtol=2e-5, atol=2e-6):
  assert len(fasts) == len(slows) == len(ref_fasts) == len(ref_slows)
  for t, (f, s, rf, rs) in enumerate(zip(fasts, slows, ref_fasts, ref_slows)):
    chex.assert_trees_all_close(f, rf, rtol=rtol, atol=atol, custom_message=f"fast weights, step {t}")
    chex.assert_trees_all_close(s, rs, rtol=rtol, atol=atol, custom_message=f"slow weights, step {t}")
