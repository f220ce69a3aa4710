"""Inner-state policies act on moment buffers only: schedules, injected hyperparameters and counters run on.

The reference loops re-initialise (or interpolate) the moment states chosen by
type (``tests.helpers.MOMENT_STATES``); the library finds them by structure.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import find_lookahead_state, lookahead
from lookahead_optax._policy import is_moment_node, params_shape
from tests.helpers import make_params, quadratic_grad, run
from tests.references import MOMENT_STATES, reference_lookahead, reset_moments

K, STEPS = 4, 14
WARMUP = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 200)
INNERS = {
  "adamw with a warmup schedule": lambda: optax.adamw(WARMUP, weight_decay=1e-2),
  "inject_hyperparams(adamw)": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=WARMUP, weight_decay=1e-2),
  "clip, then adamw with a schedule": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(WARMUP)),
}


def counts(state):
  """Every integer scalar of an inner state, by path: schedule and bias-correction step counts."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(p): int(x) for p, x in flat if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_reset_reinitialises_the_moments_and_keeps_the_schedule(name):
  params = make_params()
  fasts, states = run(lookahead(INNERS[name](), K, 0.5, inner_state_policy="reset"), params, quadratic_grad, STEPS)
  ref_fasts, ref_slows = reference_lookahead(INNERS[name](), K, 0.5, params, quadratic_grad, STEPS, policy="reset")
  for t in range(STEPS):
    chex.assert_trees_all_close(fasts[t], ref_fasts[t], rtol=2e-5, atol=2e-6, custom_message=f"step {t}")
    chex.assert_trees_all_close(states[t].slow, ref_slows[t], rtol=2e-5, atol=2e-6, custom_message=f"step {t}")
  got = counts(states[-1].inner_state)
  adam_counts = {p: c for p, c in got.items() if "mu" not in p and "count" in p and c == STEPS % K}
  schedule_counts = {p: c for p, c in got.items() if c == STEPS}
  assert adam_counts, f"Adam's bias-correction count restarts with its moments: {got}"
  assert schedule_counts, f"the learning-rate schedule keeps counting: {got}"
  # and the learning rate has left its warmup: the schedule is not stuck near zero
  lr = WARMUP(max(schedule_counts.values()))
  assert lr > 5e-3


def test_interpolate_moves_the_moments_and_keeps_the_schedule():
  """alpha 0.3, not 0.5: moving the moments by alpha or by 1 - alpha toward the snapshot would differ."""
  params = make_params()
  inner = INNERS["adamw with a warmup schedule"]
  fasts, states = run(lookahead(inner(), K, 0.3, inner_state_policy="interpolate"), params, quadratic_grad, STEPS)
  ref_fasts, _ = reference_lookahead(inner(), K, 0.3, params, quadratic_grad, STEPS, policy="interpolate")
  for t in range(STEPS):
    chex.assert_trees_all_close(fasts[t], ref_fasts[t], rtol=2e-5, atol=2e-6, custom_message=f"step {t}")
  assert STEPS in counts(states[-1].inner_state).values()


@pytest.mark.parametrize(
  "state,moments",
  [
    (optax.adam(0.1).init(make_params()), True),
    (optax.sgd(0.1, momentum=0.9).init(make_params()), True),
    (optax.scale_by_schedule(WARMUP).init(make_params()), False),
    (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(make_params()), False),
    (optax.MultiSteps(optax.adam(0.1), 2).init(make_params()), False),
    (optax.add_noise(0.1, 0.5, key=jax.random.key(0)).init(make_params()), False),
  ],
)
def test_which_nodes_hold_moments(state, moments):
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "_fields"))
  nodes = [x for x in nodes if isinstance(x, tuple) and hasattr(x, "_fields")]
  found = [type(x).__name__ for x in nodes if is_moment_node(x, params_shape(make_params()))]
  assert bool(found) == moments, found
  assert all(name in {t.__name__ for t in MOMENT_STATES} for name in found), found


@pytest.mark.parametrize("policy", ["reset", "interpolate"])
@pytest.mark.parametrize("params", [jnp.ones(3), {"w": jnp.ones(3)}], ids=["one array", "a dict"])
def test_a_plateau_scale_keeps_its_progress_with_any_params(policy, params):
  """reduce_on_plateau's scale (a float scalar) is not a moment buffer, also when the params are one array
  (every scalar has their tree structure then): it keeps the value the plateau gave it at each sync."""
  inner = lambda: optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau(factor=0.5, patience=0, cooldown=0))
  opt = lookahead(inner(), 3, 0.5, inner_state_policy=policy)
  state, plain = opt.init(params), inner()
  plain_state = plain.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for t in range(7):  # a loss that never improves: the scale halves at every step, syncs at steps 2 and 5
    updates, state = opt.update(grads, state, params, value=jnp.asarray(1.0 + t))
    params = optax.apply_updates(params, updates)
    _, plain_state = plain.update(grads, plain_state, params, value=jnp.asarray(1.0 + t))
    assert float(state.inner_state[1].scale) == float(plain_state[1].scale) < 1.0, t
  # and it still acts on the moments: reset restarts Adam's count at the last sync (step 5)
  if policy == "reset":
    assert int(state.inner_state[0][0].count) == 1


def test_reset_under_multisteps_counts_optimizer_steps():
  """MultiSteps(lookahead(..., reset)): the accumulation's counters are outside, the moments inside reset."""
  params = make_params()
  opt = optax.MultiSteps(lookahead(optax.adam(0.05), 2, 0.5, inner_state_policy="reset"), every_k_schedule=2)
  state = opt.init(params)
  p = params
  for t in range(8):
    u, state = opt.update(quadratic_grad(p, t // 2), state, p)
    p = optax.apply_updates(p, u)
  la = find_lookahead_state(state)
  assert int(la.syncs) == 2 and int(state.gradient_step) == 4
  ref, _ = reference_lookahead(optax.adam(0.05), 2, 0.5, params, quadratic_grad, 4, policy="reset")
  chex.assert_trees_all_close(p, ref[-1], rtol=2e-5, atol=2e-6)


def test_reference_reset_helper_keeps_schedule_counts():
  """The references' reset is itself right: moments fresh, schedule count kept."""
  inner = INNERS["adamw with a warmup schedule"]()
  params = make_params()
  state = inner.init(params)
  for t in range(3):
    _, state = inner.update(quadratic_grad(params, t), state, params)
  fresh = reset_moments(state, inner.init(params))
  assert sorted(counts(fresh).values()) == [0, 3]
