"""Flax drop-in: linen ``TrainState`` and ``nnx.Optimizer`` with lookahead, unchanged.

Each training loop is checked against the plain-optax loop (``tests.helpers.run``)
and the paper's Algorithm 1 (``tests.references.reference_lookahead``); slow-weight
evaluation and ``force_sync`` are checked against the fast weights recorded
right after the last sync, which Algorithm 1 says are the slow weights.
"""

from __future__ import annotations

import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from flax.training import train_state

from lookahead_optax import (
  find_lookahead_state,
  force_sync,
  lookahead,
  slow_model,
  slow_params,
  slow_train_state,
  sync_nnx,
  sync_train_state,
)
from tests.helpers import run
from tests.references import reference_lookahead

K, ALPHA, LR = 3, 0.5, 0.05
# One optimizer object per flavour, so that the jitted steps compile once per module.
LINEN_TX = lookahead(optax.adam(LR), K, ALPHA)
NNX_TX = lookahead(optax.adamw(LR), K, ALPHA)


def batch(t: int):
  """A deterministic regression batch for step ``t``."""
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(7), t))
  return jax.random.normal(kx, (8, 4)), jax.random.normal(ky, (8, 3))


def assert_equal(a, b, msg=""):
  chex.assert_trees_all_equal(a, b, custom_message=msg)


def assert_close(a, b, msg=""):
  chex.assert_trees_all_close(a, b, rtol=2e-5, atol=2e-6, custom_message=msg)


# ------------------------------------------------------------------ linen


LINEN = nn.Dense(3)


def linen_loss(params, t):
  x, y = batch(t)
  return jnp.mean((LINEN.apply(params, x) - y) ** 2)


linen_grad = jax.jit(jax.grad(linen_loss))


def linen_state(tx):
  params = LINEN.init(jax.random.key(0), jnp.ones((1, 4)))
  return train_state.TrainState.create(apply_fn=LINEN.apply, params=params, tx=tx)


@jax.jit
def linen_step(state, t):
  return state.apply_gradients(grads=linen_grad(state.params, t))


def test_train_state_matches_plain_optax_loop_and_algorithm_1():
  steps = 4 * K + 2
  state = linen_state(LINEN_TX)
  params0 = state.params
  fasts, slows = [], []
  for t in range(steps):
    state = linen_step(state, t)
    fasts.append(state.params)
    slows.append(slow_params(state.opt_state))
  assert int(state.step) == steps
  plain_fasts, plain_states = run(lookahead(optax.adam(LR), K, ALPHA), params0, linen_grad, steps)
  ref_fasts, ref_slows = reference_lookahead(optax.adam(LR), K, ALPHA, params0, linen_grad, steps)
  for t in range(steps):
    assert_equal(fasts[t], plain_fasts[t], f"TrainState vs plain optax, fast weights, step {t}")
    assert_equal(slows[t], plain_states[t].slow, f"TrainState vs plain optax, slow weights, step {t}")
    assert_close(fasts[t], ref_fasts[t], f"TrainState vs Algorithm 1, fast weights, step {t}")
    assert_close(slows[t], ref_slows[t], f"TrainState vs Algorithm 1, slow weights, step {t}")


def train_linen_mid_cycle(tx, after_sync: int = 2):
  """Two cycles and ``after_sync`` more steps; returns the state and the params right after the last sync."""
  state = linen_state(tx)
  for t in range(2 * K):
    state = linen_step(state, t)
  synced = state.params
  for t in range(2 * K, 2 * K + after_sync):
    state = linen_step(state, t)
  return state, synced


@pytest.mark.parametrize("recipe", ["slow_train_state", "replace"])
def test_train_state_evaluated_on_the_slow_weights(recipe):
  state, synced = train_linen_mid_cycle(LINEN_TX)
  fast = state.params
  if recipe == "slow_train_state":
    eval_state = slow_train_state(state)
  else:
    eval_state = state.replace(params=slow_params(state.opt_state))
  assert_equal(eval_state.params, synced, "slow weights vs fast weights right after the last sync")
  with pytest.raises(AssertionError):
    assert_equal(fast, synced)  # mid-cycle, the fast weights have moved on
  x, _ = batch(100)
  assert_equal(eval_state.apply_fn(eval_state.params, x), LINEN.apply(synced, x))
  # Training is not disturbed: the training state still holds the fast weights.
  assert_equal(state.params, fast)
  assert eval_state.step == state.step and eval_state.opt_state is state.opt_state


@pytest.mark.parametrize("recipe", ["sync_train_state", "force_sync"])
def test_force_sync_under_train_state(recipe):
  state, synced = train_linen_mid_cycle(LINEN_TX)
  fast = state.params
  if recipe == "sync_train_state":
    synced_state = sync_train_state(state)
  else:
    opt_state, params = force_sync(state.opt_state, state.params, state.tx)
    synced_state = state.replace(params=params, opt_state=opt_state)
  expected = jax.tree.map(lambda s, f: s + ALPHA * (f - s), synced, fast)
  assert_close(synced_state.params, expected, "phi + alpha (theta - phi)")
  assert_equal(slow_params(synced_state.opt_state), synced_state.params, "saved model is the slow model")
  assert int(find_lookahead_state(synced_state.opt_state).count) == 0
  assert_equal(state.params, fast, "force_sync is pure")
  # A new cycle of K steps starts at the forced sync.
  for t in range(100, 100 + K):
    synced_state = linen_step(synced_state, t)
    count = int(find_lookahead_state(synced_state.opt_state).count)
    assert count == (t - 99) % K
  assert_equal(synced_state.params, slow_params(synced_state.opt_state), "synced again K steps later")


def test_force_sync_inside_chain_under_jit():
  opt = optax.chain(optax.clip_by_global_norm(10.0), lookahead(optax.sgd(LR, momentum=0.9), K, ALPHA))
  params = linen_state(opt).params
  state = opt.init(params)
  step = jax.jit(lambda p, s, t: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(linen_grad(p, t), s, p)))
  for t in range(K + 2):
    params, state = step(params, state, t)
    if t == K - 1:
      synced = params
  new_state, new_params = jax.jit(lambda s, p: force_sync(s, p, opt))(state, params)
  assert_close(new_params, jax.tree.map(lambda s, f: s + ALPHA * (f - s), synced, params))
  assert_equal(new_state[0], state[0], "the other transformations' states are kept")
  assert_equal(new_state[1].inner_state, state[1].inner_state, "the inner state is kept (maintain)")
  assert int(new_state[1].count) == 0 and int(state[1].count) == 2


# -------------------------------------------------------------------- nnx


def nnx_loss(model, t):
  x, y = batch(t)
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def nnx_step(model, optimizer, t):
  optimizer.update(model, nnx.grad(nnx_loss)(model, t))


def nnx_setup(tx):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def pure(state):
  return nnx.to_pure_dict(state)


def train_nnx_mid_cycle(tx, after_sync: int = 2):
  model, optimizer = nnx_setup(tx)
  for t in range(2 * K):
    nnx_step(model, optimizer, t)
  synced = pure_params(model)
  for t in range(2 * K, 2 * K + after_sync):
    nnx_step(model, optimizer, t)
  return model, optimizer, synced


def test_nnx_optimizer_matches_plain_optax_loop_and_algorithm_1():
  steps = 4 * K + 2
  model, optimizer = nnx_setup(NNX_TX)
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.to_pure_dict(params0)
  grad_fn = jax.jit(jax.grad(lambda p, t: nnx_loss(nnx.merge(graphdef, p), t)))
  fasts, slows = [], []
  for t in range(steps):
    nnx_step(model, optimizer, t)
    fasts.append(pure_params(model))
    slows.append(slow_params(optimizer.opt_state))
  plain_fasts, plain_states = run(lookahead(optax.adamw(LR), K, ALPHA), params0, grad_fn, steps)
  ref_fasts, ref_slows = reference_lookahead(optax.adamw(LR), K, ALPHA, params0, grad_fn, steps)
  for t in range(steps):
    slow = pure(slows[t])
    assert_close(fasts[t], plain_fasts[t], f"nnx vs plain optax, fast weights, step {t}")
    assert_close(slow, plain_states[t].slow, f"nnx vs plain optax, slow weights, step {t}")
    assert_close(fasts[t], ref_fasts[t], f"nnx vs Algorithm 1, fast weights, step {t}")
    assert_close(slow, ref_slows[t], f"nnx vs Algorithm 1, slow weights, step {t}")


def test_nnx_slow_params_accepts_optimizer_opt_state():
  model, optimizer, synced = train_nnx_mid_cycle(NNX_TX)
  slow = slow_params(optimizer.opt_state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(slow)), "plain arrays, no nnx Variables"
  assert_equal(pure(slow), synced)
  with_params = slow_params(optimizer.opt_state, nnx.state(model, nnx.Param))
  assert_equal(pure(with_params), synced)


@pytest.mark.parametrize("recipe", ["slow_model", "clone and update"])
def test_nnx_slow_model_copy_leaves_training_undisturbed(recipe):
  model, optimizer, synced = train_nnx_mid_cycle(NNX_TX)
  twin, twin_optimizer, _ = train_nnx_mid_cycle(NNX_TX)
  fast = pure_params(model)
  if recipe == "slow_model":
    evaluated = slow_model(model, optimizer)
  else:
    evaluated = nnx.clone(model)
    nnx.update(evaluated, slow_params(optimizer.opt_state))
  x, _ = batch(100)
  assert_equal(pure_params(evaluated), synced)
  assert_equal(evaluated(x), nnx.merge(nnx.graphdef(model), synced)(x))
  assert_equal(pure_params(model), fast, "the trained model keeps its fast weights")
  for t in range(2 * K + 2, 4 * K):
    nnx_step(model, optimizer, t)
    nnx_step(twin, twin_optimizer, t)
  assert_equal(pure_params(model), pure_params(twin), "training continues as if no copy was made")


def test_sync_nnx_writes_back_into_the_model_and_the_optimizer():
  model, optimizer, synced = train_nnx_mid_cycle(optax.chain(optax.clip(10.0), lookahead(optax.adamw(LR), K, ALPHA)))
  fast = pure_params(model)
  sync_nnx(model, optimizer)
  assert_close(pure_params(model), jax.tree.map(lambda s, f: s + ALPHA * (f - s), synced, fast))
  assert_equal(pure(slow_params(optimizer.opt_state)), pure_params(model))
  assert isinstance(optimizer.opt_state[1].count, nnx.Variable), "opt_state keeps its nnx Variables"
  assert int(find_lookahead_state(optimizer.opt_state).count) == 0
  for t in range(100, 100 + K):
    nnx_step(model, optimizer, t)
    assert int(find_lookahead_state(optimizer.opt_state).count) == (t - 99) % K
  assert_equal(pure(slow_params(optimizer.opt_state)), pure_params(model))


def test_core_imports_neither_flax_nor_orbax():
  code = "import sys, lookahead_optax; print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax'}))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"
