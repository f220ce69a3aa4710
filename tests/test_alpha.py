"""The slow step size: adaptive alpha (section 2.1) against Proposition 1 and hand-written loops; schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import AdaptiveAlphaState, adaptive_alpha, find_lookahead_state, lookahead, ranger, theory
from lookahead_optax.theory import adaptive_alpha_value


def test_exact_fisher_and_gradient_give_proposition_1():
  """With A-hat = A (diagonal) and the gradient at the fast weights, the unclipped alpha is alpha*."""
  rng = np.random.default_rng(0)
  value = jax.jit(adaptive_alpha_value)
  for trial in range(20):
    a = rng.uniform(0.1, 5.0, size=6)
    b, slow, fast = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    grad = a * fast - b  # the exact gradient of 1/2 x^T A x - b^T x at the fast weights
    tree = lambda x: {"w": jnp.asarray(x[:4], jnp.float32), "v": [jnp.asarray(x[4:], jnp.float32)]}
    got = value(tree(slow), tree(fast), tree(grad), tree(a))
    want = theory.optimal_alpha_quadratic(a, b, slow, fast)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5), trial
  # Outside [0, 1] too: the value is returned before clipping.
  assert float(adaptive_alpha_value(jnp.array([3.0]), jnp.array([2.0]), jnp.array([2.0]), jnp.array([2.0]))) == 2.0


def test_fast_weights_that_did_not_move_give_one():
  x = {"w": jnp.ones(3)}
  assert float(adaptive_alpha_value(x, x, {"w": jnp.ones(3)}, {"w": jnp.ones(3)})) == 1.0


def hand_alpha(slow, fast, grad, fisher, eps=0.0):
  """Section 2.1's estimate written out: ((slow - (fast - g / F)) . F d) / (d . F d), d = slow - fast."""
  slow, fast, grad, fisher = (np.asarray(x, np.float64) for x in (slow, fast, grad, fisher))
  fisher = fisher + eps
  d = slow - fast
  return float(np.sum((slow - (fast - grad / fisher)) * fisher * d) / np.sum(fisher * d * d))


@pytest.mark.parametrize("second", [1.0, -0.3, -0.9])
def test_ema_fisher_and_clipping_inside_lookahead(second):
  """k=2, SGD: gradients g then `second * g`; alpha is clipped to [alpha_low, 1] (raw > 1, in range, < alpha_low)."""
  lr, k, alpha_low, b2 = 1.0, 2, 0.1, 0.9
  g = np.array([0.5, -1.0, 1.5], np.float32)
  grads = [g, second * g, 0.7 * g]
  opt = lookahead(optax.sgd(lr), k, adaptive_alpha(alpha_low, fisher="ema", b2=b2))
  params = jnp.zeros(3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  assert isinstance(state.alpha_state, AdaptiveAlphaState)
  ema = np.zeros(3)
  slow = np.zeros(3)
  for t, grad in enumerate(grads, start=1):
    updates, state = update(jnp.asarray(grad), state, params)
    ema = b2 * ema + (1 - b2) * grad.astype(np.float64) ** 2  # the hand-written EMA, every step
    np.testing.assert_allclose(state.alpha_state.fisher, ema, rtol=1e-6)
    assert int(state.alpha_state.count) == t
    if t == k:
      fast = np.asarray(params) - lr * grad
      raw = hand_alpha(slow, fast, grad, ema / (1 - b2**t))
      expected = min(max(raw, alpha_low), 1.0)
      assert float(state.alpha) == pytest.approx(expected, rel=1e-5)
      slow = slow + expected * (fast - slow)
      np.testing.assert_allclose(state.slow, slow, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(np.asarray(params) + np.asarray(updates), slow, rtol=1e-5, atol=1e-7)
      np.testing.assert_array_equal(optax.apply_updates(params, updates), state.slow)  # fast == slow, bitwise
      # Which case this parameter exercises:
      assert {1.0: raw > 1, -0.3: alpha_low < raw < 1, -0.9: raw < alpha_low}[second], raw
    params = optax.apply_updates(params, updates)


def test_eps_is_added_to_the_fisher():
  """An eps as large as the Fisher itself: the alpha chosen is the hand estimate with F + eps, not with F."""
  lr, k, b2, eps = 1.0, 2, 0.9, 0.5
  g = np.array([0.5, -1.0, 1.5], np.float32)
  opt = lookahead(optax.sgd(lr), k, adaptive_alpha(0.01, fisher="ema", b2=b2, eps=eps))
  params, state = jnp.zeros(3), opt.init(jnp.zeros(3))
  ema = np.zeros(3)
  for t, grad in enumerate([g, -0.3 * g], start=1):
    updates, state = jax.jit(opt.update)(jnp.asarray(grad), state, params)
    ema = b2 * ema + (1 - b2) * grad.astype(np.float64) ** 2
    if t < k:
      params = optax.apply_updates(params, updates)
  fast = np.asarray(params) - lr * (-0.3 * g)
  with_eps = hand_alpha(np.zeros(3), fast, -0.3 * g, ema / (1 - b2**k), eps=eps)
  without = hand_alpha(np.zeros(3), fast, -0.3 * g, ema / (1 - b2**k))
  assert 0.01 < with_eps < 1 and abs(with_eps - without) > 0.05  # in range, and eps changes it
  assert float(state.alpha) == pytest.approx(with_eps, rel=1e-5)


def test_inner_fisher_reads_adams_second_moment():
  """fisher='inner' uses the inner's nu (here of clipped gradients, so it differs from an EMA of raw ones)."""
  lr, k, b2, clip, low = 0.1, 3, 0.95, 0.5, 0.05
  inner = optax.chain(optax.clip(clip), optax.scale_by_adam(b1=0.9, b2=b2), optax.scale(-lr))
  opts = {name: lookahead(inner, k, adaptive_alpha(low, fisher=name, b2=b2)) for name in ("inner", "auto", "ema")}
  states = {name: opt.init(jnp.zeros(4)) for name, opt in opts.items()}
  assert isinstance(states["inner"].alpha_state, optax.EmptyState)  # no copy kept
  assert isinstance(states["auto"].alpha_state, optax.EmptyState)
  assert isinstance(states["ema"].alpha_state, AdaptiveAlphaState)
  # The reference: the inner optimizer run by hand (its state is maintained across syncs), and
  # the two squared-gradient averages written out.
  ref_inner = {name: inner.init(jnp.zeros(4)) for name in opts}
  inner_update, updates_of = jax.jit(inner.update), {name: jax.jit(opt.update) for name, opt in opts.items()}
  chosen = {name: [] for name in opts}
  params = {name: jnp.zeros(4) for name in opts}
  slow = {name: np.zeros(4) for name in opts}
  nu_clipped, nu_raw = np.zeros(4), np.zeros(4)
  rng = np.random.default_rng(1)
  for t in range(1, 3 * k + 1):
    grad = rng.normal(size=4).astype(np.float32) * 2
    nu_clipped = b2 * nu_clipped + (1 - b2) * np.clip(grad, -clip, clip).astype(np.float64) ** 2
    nu_raw = b2 * nu_raw + (1 - b2) * grad.astype(np.float64) ** 2
    for name in opts:
      inner_updates, ref_inner[name] = inner_update(jnp.asarray(grad), ref_inner[name], params[name])
      fast = np.asarray(params[name], np.float64) + np.asarray(inner_updates, np.float64)
      updates, states[name] = updates_of[name](jnp.asarray(grad), states[name], params[name])
      params[name] = optax.apply_updates(params[name], updates)
      if t % k == 0:
        chosen[name].append(float(states[name].alpha))
        fisher = (nu_raw if name == "ema" else nu_clipped) / (1 - b2**t)
        expected = min(max(hand_alpha(slow[name], fast, grad, fisher), low), 1.0)
        assert float(states[name].alpha) == pytest.approx(expected, rel=1e-4), (name, t)
        slow[name] = slow[name] + expected * (fast - slow[name])
        np.testing.assert_allclose(states[name].slow, slow[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(params[name], slow[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(params[name], states[name].slow)  # fast == slow, bitwise
  assert any(low < a < 1 for a in chosen["inner"] + chosen["ema"]), chosen  # not every sync clipped
  assert chosen["inner"] == chosen["auto"]
  assert chosen["inner"] != pytest.approx(chosen["ema"], rel=1e-3)  # the two sources really differ here


def test_auto_fisher_falls_back_to_ema_for_sgd():
  state = lookahead(optax.sgd(0.1, momentum=0.9), 3, adaptive_alpha(0.2)).init({"w": jnp.zeros(2)})
  assert isinstance(state.alpha_state, AdaptiveAlphaState)
  assert state.alpha_state.fisher["w"].shape == (2,)  # one param-sized copy: the memory cost
  assert float(state.alpha) == 0.0  # no slow step taken before the first sync


def test_inner_fisher_without_second_moment_is_an_error():
  with pytest.raises(ValueError, match="fisher='ema'"):
    lookahead(optax.sgd(0.1), 3, adaptive_alpha(0.2, fisher="inner")).init({"w": jnp.zeros(2)})


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(alpha_low=0.0), "alpha_low"),
    (dict(alpha_low=1.5), "alpha_low"),
    (dict(alpha_low=True), "alpha_low"),
    (dict(alpha_low="0.5"), "alpha_low"),
    (dict(fisher="diag"), "fisher"),
    (dict(b2=1.0), "b2"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(eps=float("nan")), "eps"),
  ],
)
def test_adaptive_alpha_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=f"adaptive_alpha: {name} must") as info:
    adaptive_alpha(**kwargs)
  assert repr(next(iter(kwargs.values())))[:4] in str(info.value)  # the message shows the value


def test_schedule_receives_the_number_of_completed_syncs():
  k, lr = 3, 0.1
  schedule = lambda n: 0.9 / (1.0 + n)  # 0.9, 0.45, 0.3, ... at the 1st, 2nd, 3rd sync
  opt = lookahead(optax.sgd(lr), k, schedule)
  step = jax.jit(opt.update)
  params = jnp.array([1.0, -2.0])
  state = opt.init(params)
  assert float(state.alpha) == 0.0  # no slow step yet
  slow, fast = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for t in range(1, 4 * k + 1):
    grad = np.array([0.3 * t, -0.1 * t * t], np.float32)
    updates, state = step(jnp.asarray(grad), state, params)
    params = optax.apply_updates(params, updates)
    fast = fast - lr * grad
    if t % k == 0:
      done = t // k - 1  # syncs completed before this one
      slow = slow + 0.9 / (1.0 + done) * (fast - slow)
      fast = slow.copy()
      assert float(state.alpha) == pytest.approx(0.9 / (1.0 + done))
      assert int(state.syncs) == done + 1
    np.testing.assert_allclose(params, fast, rtol=1e-5)
    np.testing.assert_allclose(find_lookahead_state(state).slow, slow, rtol=1e-5)


# ------------------------------------------------------------------ precision and range


@pytest.mark.parametrize("policy", ["maintain", "interpolate"])
@pytest.mark.parametrize("how", ["constant", "schedule", "injected"])
def test_float64_matches_algorithm_1_at_1e_12(x64, how, policy):
  """alpha, the slow step and the interpolate policy are computed in float64 when the slow weights are."""
  from tests.helpers import run
  from tests.references import reference_lookahead

  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64).reshape(2, 3), "b": jnp.ones(3, jnp.float64)}
  alphas = {"constant": 0.8, "schedule": lambda n: 0.8 - 0.1 * (n % 3), "injected": 0.8}
  grad_fn = lambda p, t: jax.tree.map(
    lambda w: (1.0 + 0.1 * (t % 4)) * w * jnp.arange(1, w.size + 1).reshape(w.shape) - 0.5, p
  )
  if how == "injected":
    opt = optax.inject_hyperparams(lookahead, static_args=("inner_state_policy",))(
      inner=optax.sgd(0.1, momentum=0.9), k=3, alpha=0.8, inner_state_policy=policy
    )
  else:
    opt = lookahead(optax.sgd(0.1, momentum=0.9), 3, alphas[how], inner_state_policy=policy)
  fasts, states = run(opt, params, grad_fn, 10)
  ref_fasts, ref_slows = reference_lookahead(optax.sgd(0.1, momentum=0.9), 3, alphas[how], params, grad_fn, 10, policy)
  for t in range(10):
    for got, want in ((fasts[t], ref_fasts[t]), (find_lookahead_state(states[t]).slow, ref_slows[t])):
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12, err_msg=f"step {t}")
  assert find_lookahead_state(states[-1]).alpha.dtype == jnp.float64


def test_adaptive_alpha_sums_in_float64(x64):
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64)}
  opt = lookahead(optax.adam(0.1), 2, adaptive_alpha(0.1))
  state = opt.init(params)
  for t in range(2):
    updates, state = opt.update({"w": params["w"] * (1.0 + 1e-9 * t)}, state, params)
    params = optax.apply_updates(params, updates)
  assert state.alpha.dtype == jnp.float64 and 0.1 <= float(state.alpha) <= 1.0


@pytest.mark.parametrize("how", ["schedule", "injected"])
def test_an_alpha_outside_0_1_at_run_time_is_reported_under_jit(how):
  """A schedule or an injected alpha is only known when the step runs: 1.5 at a sync gives an AlphaRangeWarning."""
  from lookahead_optax import AlphaRangeWarning

  params = {"w": jnp.ones(3)}
  if how == "schedule":
    opt = lookahead(optax.sgd(0.1), k=2, alpha=lambda n: jnp.where(n >= 1, 1.5, 0.5))
    state = opt.init(params)
  else:
    opt = optax.inject_hyperparams(lookahead)(inner=optax.sgd(0.1), k=2, alpha=0.5)
    state = opt.init(params)
    state.hyperparams["alpha"] = jnp.asarray(1.5)
  step = jax.jit(opt.update)
  assert jax.make_jaxpr(step)(params, state, params).effects == set()
  with pytest.warns(AlphaRangeWarning, match=r"lookahead: alpha must be in \[0, 1\], got alpha=1.5") as caught:
    for _ in range(4):
      updates, state = step(params, state, params)
      params = optax.apply_updates(params, updates)
    jax.block_until_ready(params)
  assert len([w for w in caught if issubclass(w.category, AlphaRangeWarning)]) == (1 if how == "schedule" else 2)


@pytest.mark.parametrize(
  "value,match",
  [(jnp.array([0.5]), r"must return a real scalar, got float32\[1\]"), ("x", r"must return a number, got 'x'")],
)
def test_an_alpha_schedule_that_returns_no_real_scalar_is_named(value, match):
  """Found when the step is traced, before anything runs, with the argument named."""
  params = {"w": jnp.ones(3)}
  opt = ranger(0.1, k=1, alpha=lambda n: value)
  with pytest.raises(ValueError, match=r"^ranger: alpha=<function .*>, a schedule, " + match):
    jax.jit(opt.update)(params, opt.init(params), params)


def test_an_alpha_in_range_from_a_schedule_is_not_reported():
  import warnings

  from lookahead_optax import AlphaRangeWarning

  params = {"w": jnp.ones(3)}
  opt = lookahead(optax.sgd(0.1), k=2, alpha=optax.linear_schedule(0.2, 1.0, 3))
  state = opt.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", AlphaRangeWarning)
    for _ in range(10):
      updates, state = jax.jit(opt.update)(params, state, params)
      params = optax.apply_updates(params, updates)
    jax.block_until_ready(params)
