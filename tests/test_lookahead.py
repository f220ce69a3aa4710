"""The combinator against Algorithm 1, optax.lookahead, and its own contracts."""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import LookaheadState, adaptive_alpha, find_lookahead_state, lookahead, slow_params, streaming
from tests.helpers import INNERS, assert_trajectories_close, jit_and_count_traces, make_params, quadratic_grad, run
from tests.references import reference_lookahead

CASES = [(inner, policy) for inner in sorted(INNERS) for policy in ["maintain", "reset", "interpolate"]]


@pytest.mark.parametrize(
  "inner,policy,k,alpha",
  [
    (inner, policy, k, alpha)
    for (inner, policy), (k, alpha) in zip(CASES, [(1, 0.5), (3, 0.8), (5, 0.3), (2, 0.6)] * 3)
  ],
)
def test_matches_algorithm_1(inner, policy, k, alpha, params):
  steps = 4 * k + 2
  ref_fasts, ref_slows = reference_lookahead(INNERS[inner](), k, alpha, params, quadratic_grad, steps, policy)
  fasts, states = run(lookahead(INNERS[inner](), k, alpha, inner_state_policy=policy), params, quadratic_grad, steps)
  assert_trajectories_close(fasts, [s.slow for s in states], ref_fasts, ref_slows)


class TestVariants(chex.TestCase):
  """One body, run under jit and without it (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_adam_interpolate_schedule(self):
    params = make_params(1)
    schedule = lambda n: 0.3 + 0.1 * jnp.minimum(n, 4)
    opt = lookahead(optax.adam(0.05), 4, schedule, inner_state_policy="interpolate")
    update = self.variant(opt.update)
    state = opt.init(params)
    p = params
    fasts, slows = [], []
    for t in range(18):
      u, state = update(quadratic_grad(p, t), state, p)
      p = optax.apply_updates(p, u)
      fasts.append(p)
      slows.append(state.slow)
    ref_f, ref_s = reference_lookahead(
      optax.adam(0.05), 4, lambda n: 0.3 + 0.1 * min(n, 4), params, quadratic_grad, 18, "interpolate"
    )
    assert_trajectories_close(fasts, slows, ref_f, ref_s)


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_agrees_with_optax_lookahead(inner, reset, params):
  k, alpha, steps = 4, 0.6, 17
  peer = optax.lookahead(INNERS[inner](), sync_period=k, slow_step_size=alpha, reset_state=reset)
  peer_params = optax.LookaheadParams.init_synced(params)
  peer_state = peer.init(peer_params)
  ours = lookahead(INNERS[inner](), k, alpha, inner_state_policy="reset" if reset else "maintain")
  fasts, states = run(ours, params, quadratic_grad, steps)
  for t in range(steps):
    u, peer_state = peer.update(quadratic_grad(peer_params.fast, t), peer_state, peer_params)
    peer_params = optax.apply_updates(peer_params, u)
    # optax.lookahead applies the slow step one update late (its fast weights
    # after a sync are the pre-sync ones); compare at its resynchronised points.
    chex.assert_trees_all_close(states[t].slow, peer_params.slow, rtol=2e-5, atol=2e-6)
    if (t + 1) % k != 0:
      chex.assert_trees_all_close(fasts[t], peer_params.fast, rtol=2e-5, atol=2e-6)


ALPHA_ONE_PATHS = {
  "maintain": dict(),
  "interpolate": dict(inner_state_policy="interpolate"),
  "slow_dtype": dict(slow_dtype=jnp.float32),  # float32 slow weights under bfloat16 params
  # The sync branch of a fragment computes the inner step a second time, which XLA may round differently
  # (a fused multiply-add): within rounding, not bitwise.
  "fragments": dict(schedule=streaming(2)),
}


@pytest.mark.parametrize("path", list(ALPHA_ONE_PATHS))
@pytest.mark.parametrize("inner,k", list(zip(sorted(INNERS), [1, 3, 7, 4])))
def test_alpha_one_is_the_inner_optimizer_bitwise(inner, k, path, params):
  """On every path that keeps the inner state (reset re-initialises it, by design); fragments within rounding."""
  steps = 100 if path == "maintain" else 30
  if path == "slow_dtype":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  kwargs = ALPHA_ONE_PATHS[path]
  opt = lookahead(INNERS[inner](), max(k, 2) if "schedule" in kwargs else k, 1.0, **kwargs)
  fasts, _ = run(opt, params, quadratic_grad, steps)
  same = chex.assert_trees_all_equal
  if path == "fragments":
    same = functools.partial(chex.assert_trees_all_close, rtol=2e-5, atol=2e-6)
  bare = INNERS[inner]()
  state, p = bare.init(params), params

  @jax.jit
  def step(p, state, t):
    u, state = bare.update(quadratic_grad(p, t), state, p)
    return optax.apply_updates(p, u), state

  for t in range(steps):
    p, state = step(p, state, t)
    same(fasts[t], p, custom_message=f"step {t}")


@pytest.mark.parametrize("policy,alpha", [("maintain", 0.37), ("maintain", 0.0), ("reset", 0.5), ("interpolate", 0.9)])
def test_fast_equals_slow_bitwise_after_each_sync(policy, alpha, params):
  k = 3
  fasts, states = run(lookahead(optax.adam(0.1), k, alpha, inner_state_policy=policy), params, quadratic_grad, 30)
  for t, (f, s) in enumerate(zip(fasts, states)):
    if (t + 1) % k == 0:
      chex.assert_trees_all_equal(f, s.slow, custom_message=f"sync at step {t}")
      assert int(s.count) == 0
    else:
      assert int(s.count) == (t + 1) % k


def test_alpha_zero_keeps_slow_weights(params):
  fasts, states = run(lookahead(optax.sgd(0.1), 2, 0.0), params, quadratic_grad, 20)
  for s in states:
    chex.assert_trees_all_close(s.slow, params, rtol=1e-6, atol=1e-7)


def test_counter_is_int32_and_stays_below_k(params):
  fasts, states = run(lookahead(optax.sgd(0.1), 7, 0.5), params, quadratic_grad, 50)
  assert all(s.count.dtype == jnp.int32 and 0 <= int(s.count) < 7 for s in states)
  assert int(states[-1].syncs) == 50 // 7


def test_non_float_leaves_pass_through():
  params = {"w": jnp.ones(3), "step": jnp.array(4, jnp.int32), "on": jnp.array([True, False])}
  inner = optax.sgd(0.5)
  opt = lookahead(inner, 2, 0.5)
  state = opt.init(params)
  assert isinstance(state.slow["step"], optax.MaskedNode) and isinstance(state.slow["on"], optax.MaskedNode)
  grads = {"w": jnp.ones(3), "step": jnp.array(2, jnp.int32), "on": jnp.array([False, True])}
  for _ in range(2):
    u, state = opt.update(grads, state, params)
    ref_u, _ = inner.update(grads, inner.init(params), params)
    chex.assert_trees_all_equal(u["step"], ref_u["step"])
    chex.assert_trees_all_equal(u["on"], ref_u["on"])
  assert slow_params(state, params)["step"] == 4


def test_update_without_params_raises(params):
  opt = lookahead(optax.sgd(0.1))
  with pytest.raises(ValueError, match="lookahead: update needs params"):
    opt.update(params, opt.init(params))


def test_extra_args_reach_the_inner_optimizer():
  """optax.lbfgs needs value, grad and value_fn (its line search); lookahead forwards them."""
  loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2 * jnp.arange(1.0, 4.0))
  k, alpha, steps = 3, 0.5, 9
  params = {"w": jnp.zeros(3)}

  def step(opt, params, state):
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  opt = lookahead(optax.lbfgs(), k, alpha)
  ours, state = params, opt.init(params)
  inner = optax.lbfgs()
  fast, slow, inner_state = params, params, inner.init(params)  # Algorithm 1, by hand
  ours_step, inner_step = jax.jit(functools.partial(step, opt)), jax.jit(functools.partial(step, inner))
  for t in range(steps):
    ours, state = ours_step(ours, state)
    fast, inner_state = inner_step(fast, inner_state)
    if (t + 1) % k == 0:
      slow = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
      fast = slow
    chex.assert_trees_all_close(ours, fast, rtol=1e-5, atol=1e-6)
  assert float(loss(ours)) < 0.05 * float(loss(params))


def test_compiles_once_over_200_steps(params):
  traces, compiled, _ = jit_and_count_traces(
    lookahead(optax.adam(0.01), 5, 0.5, inner_state_policy="interpolate"), params, 200
  )
  assert (traces, compiled) == (1, 1)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(alpha=0.5),
    dict(inner_state_policy="reset"),
    dict(inner_state_policy="interpolate"),
    dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True)),
    dict(slow_dtype=jnp.float32),
    dict(alpha=adaptive_alpha()),
    dict(schedule=streaming(2)),
  ],
  ids=["plain", "reset", "interpolate", "outer", "slow_dtype", "adaptive alpha", "fragments"],
)
def test_eager_steps_compile_once(kwargs):
  """Outside jit, from the third call on an update compiles nothing: the step runs as one cached program."""
  compiles = []
  listener = lambda event, seconds, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None
  opt = lookahead(optax.adam(0.1), 3, **kwargs)
  dtype = jnp.bfloat16 if "slow_dtype" in kwargs else jnp.float32  # float32 slow weights under bfloat16 params
  params = {"w": jnp.ones(4, dtype), "b": jnp.zeros((), dtype)}
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):  # op by op, then the compiled step (and apply_updates's sum) compiles
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(6):  # through two syncs
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    jax.block_until_ready(params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # 8 steps at k=3: syncs after steps 2 and 5; with 2 fragments, fragment syncs at steps 2, 5 and 0, 3, 6.
  assert compiles == [] and int(state.syncs) == (5 if "schedule" in kwargs else 2)


def test_vmap_over_independent_runs():
  opt = lookahead(optax.sgd(0.1, momentum=0.5), 3, 0.5)
  batch = jax.vmap(make_params_fn := (lambda x: {"w": x}))(jnp.arange(4.0)[:, None] * jnp.ones((4, 2)))
  del make_params_fn
  state = jax.vmap(opt.init)(batch)
  grads = jax.tree.map(jnp.ones_like, batch)
  for _ in range(3):
    u, state = jax.vmap(opt.update)(grads, state, batch)
    batch = optax.apply_updates(batch, u)
  for i in range(4):
    single = {"w": jnp.full((2,), float(i))}
    s = opt.init(single)
    for _ in range(3):
      u, s = opt.update({"w": jnp.ones(2)}, s, single)
      single = optax.apply_updates(single, u)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batch), single)


def test_pmap_single_device_through_syncs(params):
  k, steps = 2, 5
  opt = lookahead(optax.adam(0.1), k, 0.5)
  rep = jax.tree.map(lambda x: x[None], params)
  state = jax.pmap(opt.init)(rep)

  def step(p, s, t):
    u, s = opt.update(quadratic_grad(p, t), s, p)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, in_axes=(0, 0, None))
  for t in range(steps):
    rep, state = pstep(rep, state, t)
  ref_f, ref_s = reference_lookahead(optax.adam(0.1), k, 0.5, params, quadratic_grad, steps)
  assert int(state.syncs[0]) == steps // k
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], rep), ref_f[-1], rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], state.slow), ref_s[-1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("under_eval_shape", [True, False])
def test_init_on_abstract_inputs(params, under_eval_shape):
  """jax.ShapeDtypeStruct params: init gives the state's shapes and dtypes, as jax.eval_shape(init) does."""
  opt = lookahead(optax.adam(0.1), 4, 0.5, inner_state_policy="interpolate")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shapes = jax.eval_shape(opt.init, abstract) if under_eval_shape else opt.init(abstract)
  assert isinstance(shapes, LookaheadState)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes.slow, abstract)
  concrete = opt.init(params)
  chex.assert_trees_all_equal_structs(shapes, concrete)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete)


def test_init_copies_params_so_both_can_be_donated(params):
  state = lookahead(optax.sgd(0.1)).init(params)
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(state.slow)):
    assert p.unsafe_buffer_pointer() != s.unsafe_buffer_pointer()


def test_tree_map_params_maps_the_slow_weights(params):
  opt = optax.chain(
    optax.clip_by_global_norm(1.0), lookahead(optax.adam(0.1), 3, 0.5, inner_state_policy="interpolate")
  )
  state = opt.init(params)
  marked = optax.tree_utils.tree_map_params(
    opt, lambda p: jnp.full_like(p, 7.0), state, transform_non_params=lambda x: x
  )
  la = marked[1]
  chex.assert_trees_all_equal(la.slow, jax.tree.map(lambda p: jnp.full_like(p, 7.0), params))
  chex.assert_trees_all_equal(la.inner_state[0].mu, jax.tree.map(lambda p: jnp.full_like(p, 7.0), params))
  assert int(la.count) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes(dtype):
  params = make_params(2, dtype)
  k, alpha = 3, 0.5
  fasts, states = run(lookahead(optax.sgd(0.05, momentum=0.5), k, alpha), params, quadratic_grad, 12)
  ref_f, ref_s = reference_lookahead(optax.sgd(0.05, momentum=0.5), k, alpha, params, quadratic_grad, 12)
  for t in range(12):
    chex.assert_trees_all_equal_dtypes(fasts[t], params)
    chex.assert_trees_all_equal_dtypes(states[t].slow, params)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    chex.assert_trees_all_close(fasts[t], ref_f[t], rtol=tol, atol=tol)
    if (t + 1) % k == 0:
      chex.assert_trees_all_equal(fasts[t], states[t].slow)


def test_complex_params():
  params = {"z": jnp.array([1 + 2j, -1j, 3.0], jnp.complex64)}
  grad_fn = lambda p, t: {"z": 0.5 * p["z"] + (0.1 + 0.2j) * t}
  fasts, states = run(lookahead(optax.sgd(0.2, momentum=0.3), 3, 0.4), params, grad_fn, 9)
  ref_f, ref_s = reference_lookahead(optax.sgd(0.2, momentum=0.3), 3, 0.4, params, grad_fn, 9)
  for t in range(9):
    assert fasts[t]["z"].dtype == jnp.complex64
    chex.assert_trees_all_close(fasts[t], ref_f[t], rtol=1e-5)
    chex.assert_trees_all_close(states[t].slow, ref_s[t], rtol=1e-5)


# ---------------------------------------------------------------- composition


def _slow_of(state):
  return slow_params(state)


def test_last_in_chain(params):
  opt = optax.chain(optax.clip_by_global_norm(10.0), lookahead(optax.adam(0.05), 3, 0.5))
  inner = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.05))
  fasts, states = run(opt, params, quadratic_grad, 9)
  ref_f, ref_s = reference_lookahead(inner, 3, 0.5, params, quadratic_grad, 9)
  for t in range(9):
    chex.assert_trees_all_close(fasts[t], ref_f[t], rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(_slow_of(states[t]), ref_s[t], rtol=2e-5, atol=2e-6)
  found = optax.tree_utils.tree_get(states[-1], "slow")
  chex.assert_trees_all_equal(found, _slow_of(states[-1]))


def run_from(opt, params, state, t0, steps):
  for t in range(t0, t0 + steps):
    u, state = opt.update(quadratic_grad(params, t), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_inject_hyperparams_alpha_and_k_changed_during_a_run(params):
  """k and alpha injected as hyperparameters, then both changed mid-run through the state."""
  opt = optax.inject_hyperparams(lookahead)(inner=optax.adam(0.05), k=3, alpha=0.5)
  p, state = run_from(opt, params, opt.init(params), 0, 9)  # three syncs with k=3, alpha=0.5
  state.hyperparams["k"] = jnp.asarray(4)
  state.hyperparams["alpha"] = jnp.asarray(0.8)
  p, state = run_from(opt, p, state, 9, 8)  # two syncs with k=4, alpha=0.8
  assert int(find_lookahead_state(state).syncs) == 5
  # Reference: Algorithm 1 by hand with the same change after step 9.
  inner = optax.adam(0.05)
  fast, slow, inner_state = params, params, inner.init(params)
  for t in range(17):
    k, a = (3, 0.5) if t < 9 else (4, 0.8)
    u, inner_state = inner.update(quadratic_grad(fast, t), inner_state, fast)
    fast = optax.apply_updates(fast, u)
    if (t + 1 if t < 9 else t + 1 - 9) % k == 0:
      slow = jax.tree.map(lambda s, f: s + a * (f - s), slow, fast)
      fast = slow
  chex.assert_trees_all_close(p, fast, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(slow_params(state), slow, rtol=2e-5, atol=2e-6)
  assert float(find_lookahead_state(state).alpha) == pytest.approx(0.8)


def test_inject_hyperparams_alpha_one_is_the_inner_optimizer(params):
  """alpha set to 1 through the injected hyperparameters: from the synced point on, plain SGD."""
  opt = optax.inject_hyperparams(lookahead)(inner=optax.sgd(0.05), k=3, alpha=0.5)
  p, state = run_from(opt, params, opt.init(params), 0, 9)
  state.hyperparams["alpha"] = jnp.asarray(1.0)
  bare, ref, ours = optax.sgd(0.05), p, p
  for t in range(6):  # the lookahead's own trajectory, step by step against plain SGD's
    ours, state = run_from(opt, ours, state, t, 1)
    u, _ = bare.update(quadratic_grad(ref, t), bare.init(ref), ref)
    ref = optax.apply_updates(ref, u)
    chex.assert_trees_all_equal(ours, ref, custom_message=f"step {t}")


def test_inject_hyperparams_alpha_schedule(params):
  sched = optax.linear_schedule(0.2, 0.8, 30)
  opt = optax.inject_hyperparams(lookahead, static_args=("k",))(inner=optax.sgd(0.05), k=3, alpha=sched)
  fasts, states = run(opt, params, quadratic_grad, 9)
  # inject_hyperparams evaluates the schedule at its own step count: alpha at the sync of step t is sched(t).
  ref_f, ref_s = reference_lookahead(optax.sgd(0.05), 3, lambda n: float(sched(3 * n + 2)), params, quadratic_grad, 9)
  assert_trajectories_close(fasts, [slow_params(s) for s in states], ref_f, ref_s)
  assert float(find_lookahead_state(states[-1]).alpha) == pytest.approx(float(sched(8)))


def test_multisteps_counts_optimizer_steps(params):
  every = 2
  opt = optax.MultiSteps(lookahead(optax.sgd(0.05), 3, 0.5), every_k_schedule=every)
  state = opt.init(params)
  p = params
  for t in range(12):
    u, state = opt.update(quadratic_grad(p, t // every), state, p)  # same grad within an accumulation
    p = optax.apply_updates(p, u)
  ref_f, _ = reference_lookahead(optax.sgd(0.05), 3, 0.5, params, quadratic_grad, 6)
  chex.assert_trees_all_close(p, ref_f[-1], rtol=2e-5, atol=2e-6)
  assert int(find_lookahead_state(state).syncs) == 2


def test_masked(params):
  mask = jax.tree.map(lambda x: x.ndim >= 1, params)
  opt = optax.masked(lookahead(optax.sgd(0.1), 2, 0.5), mask)
  fasts, states = run(opt, params, quadratic_grad, 4)
  slow = slow_params(states[-1], fasts[-1])
  chex.assert_trees_all_equal(slow, fasts[-1])  # synced at step 4
  with pytest.raises(ValueError, match="pass params"):
    slow_params(states[-1])


def test_multi_transform(params):
  labels = jax.tree.map(lambda x: "la" if x.ndim == 2 else "plain", params)
  opt = optax.multi_transform({"la": lookahead(optax.adam(0.05), 3, 0.5), "plain": optax.sgd(0.01)}, labels)
  fasts, states = run(opt, params, quadratic_grad, 6)
  slow = slow_params(states[-1], fasts[-1])
  chex.assert_trees_all_equal(slow["dense"]["w"], fasts[-1]["dense"]["w"])
  two = optax.multi_transform({"la": lookahead(optax.sgd(0.1)), "plain": lookahead(optax.sgd(0.1))}, labels)
  with pytest.raises(ValueError, match="found 2 LookaheadStates"):
    slow_params(two.init(params))


def test_apply_if_finite_skips_nan_and_keeps_slow(params):
  opt = optax.apply_if_finite(lookahead(optax.sgd(0.1), 2, 0.5), max_consecutive_errors=5)
  state = opt.init(params)
  p = params
  good = jax.tree.map(jnp.ones_like, params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  for g in [good, bad, good]:  # the NaN step is skipped: the second good step syncs
    u, state = opt.update(g, state, p)
    p = optax.apply_updates(p, u)
  chex.assert_tree_all_finite((p, slow_params(state)))
  expected = jax.tree.map(lambda x: x - 0.1, params)  # slow: x + 0.5 * ((x - 0.2) - x)
  chex.assert_trees_all_close(slow_params(state), expected, rtol=1e-6)
  chex.assert_trees_all_equal(p, slow_params(state))


def test_no_slow_state_raises():
  with pytest.raises(ValueError, match="found no LookaheadState"):
    slow_params(optax.adam(0.1).init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("k", [1, np.int64(3), jnp.array(4)])
def test_valid_k_forms_sync_every_k_steps(k, params):
  fasts, states = run(lookahead(optax.sgd(0.1), k=k), params, quadratic_grad, 8)
  assert [int(s.syncs) for s in states] == [(t + 1) // int(k) for t in range(8)]


# -------------------------------------------------------- property-based


@st.composite
def pytrees(draw):
  n = draw(st.integers(1, 3))
  shapes = [tuple(draw(st.lists(st.integers(1, 3), max_size=2))) for _ in range(n)]
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  return {f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  params=pytrees(),
  k=st.integers(1, 6),
  alpha=st.floats(0.0, 1.0),
  policy=st.sampled_from(["maintain", "reset", "interpolate"]),
  inner=st.sampled_from(["sgd", "momentum", "adam"]),
)
def test_property_matches_reference(params, k, alpha, policy, inner):
  steps = 2 * k + 1
  fasts, states = run(
    lookahead(INNERS[inner](), k, alpha, inner_state_policy=policy), params, quadratic_grad, steps, jit=False
  )
  ref_f, ref_s = reference_lookahead(INNERS[inner](), k, alpha, params, quadratic_grad, steps, policy)
  assert_trajectories_close(fasts, [s.slow for s in states], ref_f, ref_s, rtol=1e-4, atol=1e-5)
  for t in range(steps):
    if (t + 1) % k == 0:
      chex.assert_trees_all_equal(fasts[t], states[t].slow)


# ------------------------------------------------ slow_dtype with every path


def reference_slow_dtype(inner, k, slow_step, params, grad_fn, steps, policy):
  """bfloat16 fast weights, float32 slow weights, by hand: each step rounds to bf16, each sync lands on round(slow)."""
  fast, slow = params, jax.tree.map(lambda p: p.astype(jnp.float32), params)
  state = inner.init(params)
  snapshot, outer_state, fasts, slows = state, None, [], []
  for t in range(steps):
    updates, state = inner.update(grad_fn(fast, t), state, fast)
    fast = optax.apply_updates(fast, updates)
    if (t + 1) % k == 0:
      slow, outer_state, a = slow_step(slow, jax.tree.map(lambda f: f.astype(jnp.float32), fast), outer_state)
      fast = jax.tree.map(lambda s, p: s.astype(p.dtype), slow, params)
      if policy == "reset":
        state = inner.init(fast)
      elif policy == "interpolate":
        state = jax.tree.map(
          lambda s0, s1: (s0 + a * (s1 - s0)).astype(s1.dtype) if jnp.issubdtype(s1.dtype, jnp.inexact) else s1,
          snapshot,
          state,
        )
        snapshot = state
    fasts.append(fast)
    slows.append(slow)
  return fasts, slows


def plain_step(alpha):
  return lambda slow, fast, _: (jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast), None, alpha)


def nesterov_step(lr, mu):
  def step(slow, fast, b):
    s = jax.tree.map(lambda w, f: w - f, slow, fast)
    b = s if b is None else jax.tree.map(lambda b, s: mu * b + s, b, s)
    return jax.tree.map(lambda w, b, s: w - lr * (mu * b + s), slow, b, s), b, None

  return step


@pytest.mark.parametrize(
  "policy,outer", [("maintain", False), ("reset", False), ("interpolate", False), ("maintain", True), ("reset", True)]
)
def test_slow_dtype_float32_under_bfloat16_params(policy, outer):
  params, k, steps = make_params(3, jnp.bfloat16), 3, 10
  inner = lambda: optax.sgd(0.05, momentum=0.5)
  if outer:
    opt = lookahead(
      inner(), k, inner_state_policy=policy, slow_dtype=jnp.float32, outer=optax.sgd(0.7, momentum=0.5, nesterov=True)
    )
    step = nesterov_step(0.7, 0.5)
  else:
    opt, step = lookahead(inner(), k, 0.6, inner_state_policy=policy, slow_dtype=jnp.float32), plain_step(0.6)
  fasts, states = run(opt, params, quadratic_grad, steps, jit=False)  # eager: every op rounds, as the reference
  ref_f, ref_s = reference_slow_dtype(inner(), k, step, params, quadratic_grad, steps, policy)
  for t in range(steps):
    chex.assert_trees_all_equal_dtypes(states[t].slow, ref_s[t])
    # Exact to float32 through the first sync; later a landing off by one bf16 unit (rare) may separate them.
    tol = dict(rtol=1e-5, atol=1e-6) if t < k else dict(rtol=2**-7, atol=2**-7)
    chex.assert_trees_all_close(states[t].slow, ref_s[t], **tol, custom_message=f"slow, step {t}")
    chex.assert_trees_all_close(fasts[t], ref_f[t], rtol=2**-7, atol=2**-7, custom_message=f"fast, step {t}")
    if (t + 1) % k == 0:  # on the float32 slow weights rounded to bf16: exactly, or within one rounding
      exact = []
      for f, s, before in zip(*(jax.tree.leaves(x) for x in (fasts[t], states[t].slow, fasts[t - 1]))):
        f, r = np.asarray(f, np.float32), np.asarray(s.astype(jnp.bfloat16), np.float32)
        scale = np.maximum(np.abs(r), np.abs(np.asarray(before, np.float32)))  # the rounding of r - before
        assert (np.abs(f - r) <= 2.0 ** (np.floor(np.log2(scale + 1e-30)) - 7)).all()
        exact += list((f == r).ravel())
      assert np.mean(exact) >= 0.5
