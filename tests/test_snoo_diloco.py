"""The outer optimizer of the slow step: SNOO and single-process DiLoCo against plain loops.

The references below are written from the papers' equations with optax and
jax.tree only; no code of lookahead_optax:

- SNOO (Kallusky et al. 2025, Algorithm 1): every k inner steps, with the
  pseudo-gradient s = w - fast_k,  b = mu * b + s;  w = w - lr * (mu * b + s);
  fast = w.
- DiLoCo (Douillard et al. 2023): M replicas run the inner optimizer on their
  own gradients; every k steps the pseudo-gradients are averaged over replicas
  before the same Nesterov step, and every replica restarts from the new w.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import diloco, find_lookahead_state, lookahead, slow_params, snoo
from tests.helpers import TOL, jit_and_count_traces, make_params, quadratic_grad, replica_grad, run
from tests.references import reference_diloco, reference_lookahead, reference_snoo


def assert_close(got, want, what, t):
  chex.assert_trees_all_close(got, want, **TOL, custom_message=f"{what}, step {t}")


# ----------------------------------------------------------------------- SNOO


@pytest.mark.parametrize("inner,k", [("momentum", 1), ("adam", 4)])
def test_snoo_matches_its_algorithm_1(inner, k, small):
  params = small
  make = {"momentum": lambda: optax.sgd(0.05, momentum=0.9), "adam": lambda: optax.adam(0.05)}[inner]
  lr, mu, steps = 0.7, 0.9, 3 * k + 2
  ref_f, ref_s, ref_b = reference_snoo(make(), k, lr, mu, params, quadratic_grad, steps)
  fasts, states = run(snoo(make(), k=k, outer_learning_rate=lr, outer_momentum=mu), params, quadratic_grad, steps)
  for t in range(steps):
    assert_close(fasts[t], ref_f[t], "fast weights", t)
    assert_close(states[t].slow, ref_s[t], "slow weights", t)
  # The outer momentum buffer is the reference's b (optax.sgd keeps it in a TraceState).
  assert_close(find_lookahead_state(states[-1]).outer_state[0].trace, ref_b[-1], "outer momentum", steps - 1)


def test_outer_nesterov_sgd_is_snoo_and_keeps_the_inner_state_policy(small):
  params = small
  k, lr, mu, steps = 3, 0.5, 0.6, 11
  ref_f, ref_s, _ = reference_snoo(optax.adam(0.05), k, lr, mu, params, quadratic_grad, steps, policy="reset")
  opt = lookahead(optax.adam(0.05), k, inner_state_policy="reset", outer=optax.sgd(lr, momentum=mu, nesterov=True))
  fasts, states = run(opt, params, quadratic_grad, steps)
  for t in range(steps):
    assert_close(fasts[t], ref_f[t], "fast weights", t)
    assert_close(states[t].slow, ref_s[t], "slow weights", t)


def test_snoo_with_zero_momentum_is_lookahead(small):
  params = small
  """The paper's remark: mu = 0 and learning rate alpha is Lookahead (Algorithm 1 of Zhang et al.)."""
  k, alpha, steps = 4, 0.6, 14
  ref_f, ref_s = reference_lookahead(optax.adam(0.05), k, alpha, params, quadratic_grad, steps)
  fasts, states = run(
    snoo(optax.adam(0.05), k=k, outer_learning_rate=alpha, outer_momentum=0.0), params, quadratic_grad, steps
  )
  for t in range(steps):
    assert_close(fasts[t], ref_f[t], "fast weights", t)
    assert_close(states[t].slow, ref_s[t], "slow weights", t)


@pytest.mark.parametrize("policy,alpha", [("maintain", 0.3), ("reset", 0.5)])
def test_outer_sgd_alpha_is_plain_lookahead(policy, alpha, small):
  """outer=optax.sgd(alpha) is the slow step of plain Lookahead (staged instead of fused: to a rounding)."""
  params, k, steps = small, 3, 10
  plain_f, plain_s = run(
    lookahead(optax.adam(0.05), k, alpha, inner_state_policy=policy), params, quadratic_grad, steps
  )
  outer_f, outer_s = run(
    lookahead(optax.adam(0.05), k, inner_state_policy=policy, outer=optax.sgd(alpha)), params, quadratic_grad, steps
  )
  for t in range(steps):
    chex.assert_trees_all_close(outer_f[t], plain_f[t], rtol=1e-6, atol=1e-7, custom_message=f"fast, step {t}")
    chex.assert_trees_all_close(
      outer_s[t].slow, plain_s[t].slow, rtol=1e-6, atol=1e-7, custom_message=f"slow, step {t}"
    )


@pytest.mark.parametrize("policy", ["maintain", "reset"])
def test_fast_equals_slow_bitwise_after_each_sync_with_an_outer_optimizer(policy, small):
  params, k = small, 3
  opt = snoo(optax.adam(0.1), k=k, outer_learning_rate=0.7, outer_momentum=0.9, inner_state_policy=policy)
  fasts, states = run(opt, params, quadratic_grad, 4 * k)
  for t, (f, s) in enumerate(zip(fasts, states)):
    if (t + 1) % k == 0:
      chex.assert_trees_all_equal(f, s.slow, custom_message=f"sync at step {t}")
    else:
      assert not np.array_equal(jax.tree.leaves(f)[0], jax.tree.leaves(s.slow)[0])
    assert int(s.count) == (t + 1) % k


def value_scaled_sgd(lr):
  """An inner optimizer that needs an extra argument: the step is -lr * value * grad."""

  def update(updates, state, params=None, *, value):
    return jax.tree.map(lambda g: -lr * value * g, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def test_extra_args_reach_the_inner_optimizer_with_an_outer_optimizer(small):
  loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  k, lr, mu, steps = 3, 0.7, 0.5, 9
  opt = snoo(value_scaled_sgd(0.05), k=k, outer_learning_rate=lr, outer_momentum=mu)

  @jax.jit
  def step(params, state):
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grad, state, params, value=value)
    return optax.apply_updates(params, updates), state

  ours, state = small, opt.init(small)
  fast, slow, b = small, small, jax.tree.map(jnp.zeros_like, small)  # SNOO by hand
  for t in range(steps):
    ours, state = step(ours, state)
    value, grad = jax.value_and_grad(loss)(fast)
    fast = jax.tree.map(lambda f, g: f - 0.05 * value * g, fast, grad)
    if (t + 1) % k == 0:
      s = jax.tree.map(lambda w, f: w - f, slow, fast)
      b = jax.tree.map(lambda b, s: mu * b + s, b, s)
      slow = jax.tree.map(lambda w, b, s: w - lr * (mu * b + s), slow, b, s)
      fast = slow
    assert_close(ours, fast, "fast weights", t)
  assert float(loss(ours)) < 0.5 * float(loss(small))


def test_snoo_compiles_once(small):
  traces, compiled, state = jit_and_count_traces(snoo(optax.adam(0.01), k=5, inner_state_policy="reset"), small, 40)
  assert (traces, compiled) == (1, 1)
  assert int(state.syncs) == 8


def test_slow_params_and_outer_state_are_found_inside_a_chain(small):
  params = small
  k, lr, mu, steps = 2, 0.7, 0.9, 7
  opt = optax.chain(
    optax.identity(), snoo(optax.sgd(0.05, momentum=0.9), k=k, outer_learning_rate=lr, outer_momentum=mu)
  )
  fasts, states = run(opt, params, quadratic_grad, steps)
  _, ref_s, ref_b = reference_snoo(optax.sgd(0.05, momentum=0.9), k, lr, mu, params, quadratic_grad, steps)
  chex.assert_trees_all_close(slow_params(states[-1]), ref_s[-1], **TOL)
  chex.assert_trees_all_close(find_lookahead_state(states[-1]).outer_state[0].trace, ref_b[-1], **TOL)


def test_tree_map_params_maps_the_outer_state(params):
  opt = optax.chain(optax.clip_by_global_norm(1.0), snoo(optax.adam(0.1), k=3, inner_state_policy="reset"))
  state = opt.init(params)
  marked = optax.tree_utils.tree_map_params(
    opt, lambda p: jnp.full_like(p, 7.0), state, transform_non_params=lambda x: x
  )
  sevens = jax.tree.map(lambda p: jnp.full_like(p, 7.0), params)
  la = marked[1]
  chex.assert_trees_all_equal(la.slow, sevens)
  chex.assert_trees_all_equal(la.outer_state[0].trace, sevens)  # the Nesterov momentum buffer
  chex.assert_trees_all_equal(la.inner_state[0].mu, sevens)
  assert int(la.count) == 0


def test_outer_state_has_the_slow_weights_dtype():
  params = make_params(3, jnp.bfloat16)
  state = snoo(optax.adam(0.1), k=2, slow_dtype=jnp.float32).init(params)
  chex.assert_trees_all_equal_dtypes(state.outer_state[0].trace, jax.tree.map(lambda p: p.astype(jnp.float32), params))


# --------------------------------------------------------------------- DiLoCo


def test_diloco_under_vmap_matches_m_replicas_in_a_python_loop(small):
  """vmap with an axis name supports lax.pmean: M replicas on one device, no all-reduce of gradients."""
  params, replicas, k, lr, mu, steps = small, 3, 3, 0.7, 0.9, 7
  ref_fasts, ref_slows = reference_diloco(optax.adam(0.05), k, lr, mu, params, replicas, steps)
  opt = diloco(optax.adam(0.05), k=k, outer_learning_rate=lr, outer_momentum=mu, axis_name="replica")

  @jax.jit
  @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0))
  def step(params, state, t, m):
    updates, state = opt.update(replica_grad(params, t, m), state, params)  # this replica's own gradient
    return optax.apply_updates(params, updates), state

  stacked = jax.tree.map(lambda x: jnp.stack([x] * replicas), params)
  state = jax.vmap(opt.init)(stacked)
  for t in range(steps):
    stacked, state = step(stacked, state, t, jnp.arange(replicas))
    for m in range(replicas):
      assert_close(jax.tree.map(lambda x: x[m], stacked), ref_fasts[t][m], f"replica {m} fast weights", t)
      assert_close(jax.tree.map(lambda x: x[m], state.slow), ref_slows[t], f"replica {m} slow weights", t)
    slow0 = jax.tree.map(lambda x: x[0], state.slow)
    for m in range(1, replicas):  # every replica holds the same slow weights, bit for bit
      chex.assert_trees_all_equal(jax.tree.map(lambda x: x[m], state.slow), slow0)
    if (t + 1) % k == 0:
      # Every replica restarts from the shared slow weights (to one rounding: see the report).
      chex.assert_trees_all_close(stacked, jax.tree.map(lambda x: x.astype(jnp.float32), state.slow), rtol=0, atol=1e-6)
    elif t > 0:  # (Adam's first step is lr * sign(g): the replicas may agree there.)
      assert not np.array_equal(stacked["w"][0], stacked["w"][1]), "replicas should diverge between syncs"
