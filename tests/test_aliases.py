"""Ready-made combinations: ``ranger`` against Algorithm 1 around optax's own RAdam."""

from __future__ import annotations

import chex
import jax
import optax
import pytest

from lookahead_optax import lookahead, ranger
from tests.helpers import quadratic_grad, run
from tests.references import reference_lookahead

LR = 0.05
# optax's RAdam alone differs compiled vs op by op by ~1e-5 at its rectification switch (step 6), and
# an update called eagerly runs compiled from its second call: the plain loops of Algorithm 1 take
# their inner steps compiled too (`compiled`), and these runs are eager.
EAGER = {"jit": False}
RTOL, ATOL = 2e-5, 2e-6


def compiled(inner):
  return optax.GradientTransformation(inner.init, jax.jit(inner.update))


def assert_trajectories_close(fasts, states, ref_fasts, ref_slows):
  assert len(fasts) == len(ref_fasts)
  for t, (f, s, rf, rs) in enumerate(zip(fasts, states, ref_fasts, ref_slows)):
    chex.assert_trees_all_close(f, rf, rtol=RTOL, atol=ATOL, custom_message=f"fast weights, step {t}")
    chex.assert_trees_all_close(s.slow, rs, rtol=RTOL, atol=ATOL, custom_message=f"slow weights, step {t}")


def test_ranger_defaults_are_radam_in_lookahead_k6_alpha_half(params):
  # PyTorch Ranger's defaults: betas=(0.95, 0.999), eps=1e-5, k=6, alpha=0.5.
  steps = 3 * 6 + 2
  ref = reference_lookahead(
    compiled(optax.radam(LR, b1=0.95, b2=0.999, eps=1e-5)), 6, 0.5, params, quadratic_grad, steps
  )
  fasts, states = run(ranger(LR), params, quadratic_grad, steps, **EAGER)
  assert_trajectories_close(fasts, states, *ref)
  assert [int(s.count) for s in states[:7]] == [1, 2, 3, 4, 5, 0, 1]


def test_ranger_with_weight_decay_equals_lookahead_of_the_radam_chain_built_by_hand(params):
  steps, wd = 2 * 6 + 3, 0.1
  by_hand = lookahead(
    optax.chain(
      optax.scale_by_radam(b1=0.95, b2=0.999, eps=1e-5), optax.add_decayed_weights(wd), optax.scale_by_learning_rate(LR)
    ),
    k=6,
    alpha=0.5,
  )
  fasts, states = run(ranger(LR, weight_decay=wd), params, quadratic_grad, steps, **EAGER)
  hand_fasts, hand_states = run(by_hand, params, quadratic_grad, steps, **EAGER)
  chex.assert_trees_all_equal(fasts, hand_fasts)
  chex.assert_trees_all_equal([s.slow for s in states], [s.slow for s in hand_states])
  # and AdamW-style: the decay is scaled by the learning rate, as in the plain loop of Algorithm 1
  radamw = optax.chain(optax.radam(LR, b1=0.95, b2=0.999, eps=1e-5), optax.add_decayed_weights(-LR * wd))
  assert_trajectories_close(
    fasts, states, *reference_lookahead(compiled(radamw), 6, 0.5, params, quadratic_grad, steps)
  )


def test_ranger_passes_its_arguments_on(params):
  steps, k, alpha = 4 * 3 + 1, 3, 0.8
  schedule = optax.linear_schedule(LR, LR / 10, steps)
  inner = optax.radam(schedule, b1=0.9, b2=0.99, eps=1e-6)
  ref = reference_lookahead(compiled(inner), k, alpha, params, quadratic_grad, steps, policy="reset")
  opt = ranger(schedule, b1=0.9, b2=0.99, eps=1e-6, k=k, alpha=alpha, inner_state_policy="reset")
  fasts, states = run(opt, params, quadratic_grad, steps, **EAGER)
  assert_trajectories_close(fasts, states, *ref)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"k": 0}, "ranger: k must be an int >= 1, got 0"),
    ({"k": 2.5}, "ranger: k must be an int >= 1, got 2.5"),
    ({"alpha": 1.5}, "ranger: alpha must be a finite number in \\[0, 1\\], got 1.5"),
    ({"inner_state_policy": "keep"}, "ranger: inner_state_policy must be one of .*got 'keep'"),
  ],
)
def test_ranger_argument_errors_name_the_argument_and_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ranger(1e-3, **kwargs)


def test_ranger_rejects_unknown_arguments():
  with pytest.raises(TypeError, match="sync_period"):
    ranger(1e-3, sync_period=6)
