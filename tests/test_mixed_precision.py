"""bfloat16 params with float32 slow weights (``slow_dtype``), on benchmarks/mixed_precision.py's noisy quadratic.

The reference is a closed form: no bfloat16 vector gets below the problem's
grid floor, the loss at the targets rounded to bfloat16.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mixed_precision as mp

STEPS, K = 8000, 20  # 400 syncs, the last one at the last step


@pytest.fixture(scope="module")
def runs():
  problem = mp.make_problem(dim=512, seed=1)
  out = {}
  out["f32"] = mp.train(problem, mp.averaging(K, jnp.float32), jnp.bfloat16, STEPS, seed=1)
  out["bf16"] = mp.train(problem, mp.averaging(K, None), jnp.bfloat16, STEPS, seed=1)
  return problem, out


def test_grid_floor_is_the_best_bfloat16_vector():
  problem = mp.make_problem(dim=64)
  floor = mp.grid_floor(problem)
  # the neighbours of the rounded targets on the bf16 grid are all worse
  rounded = problem.target.astype(jnp.bfloat16)
  for direction in (np.inf, -np.inf):
    neighbour = jnp.asarray(np.nextafter(np.asarray(rounded, np.float32), direction)).astype(jnp.bfloat16)
    per_coord = lambda w: (np.asarray(w, np.float32) - np.asarray(problem.target)) ** 2
    assert (per_coord(rounded) <= per_coord(neighbour)).all()
  assert 0 < floor < 2.0**-14  # half a squared bf16 spacing in [1, 2) at most


def test_float32_slow_weights_go_below_bfloat16_resolution(runs):
  problem, out = runs
  losses, params, state = out["f32"]
  assert state.slow.dtype == jnp.float32 and params.dtype == jnp.bfloat16
  floor = mp.grid_floor(problem)
  assert losses[-1] < 0.7 * floor, (losses[-1], floor)  # no bfloat16 vector can do this
  assert losses[-1] < losses[STEPS // 2 - 1] / 1.5  # still making progress in the second half


def test_bfloat16_slow_weights_stall(runs):
  problem, out = runs
  losses, params, state = out["bf16"]
  assert state.slow.dtype == jnp.bfloat16
  # the slow step (fast - slow) / n fell below half a bf16 spacing: no progress in the second half
  assert losses[-1] > 0.8 * losses[STEPS // 2 - 1]
  assert losses[-1] > 5 * out["f32"][0][-1]


def test_fast_weights_reset_to_rounded_slow_weights(runs):
  _, out = runs
  _, params, state = out["f32"]  # STEPS is a multiple of K: the last step synced
  slow = np.asarray(state.slow)
  fast = np.asarray(params, np.float32)
  rounded = np.asarray(jnp.asarray(slow).astype(jnp.bfloat16), np.float32)
  spacing = 2.0 ** (np.floor(np.log2(np.abs(slow))) - 7)  # bf16 spacing at |slow| (normal numbers)
  # one rounding: the fast weights are the slow weights rounded to bfloat16, up to one bf16 spacing
  assert (np.abs(fast - slow) <= spacing).all()
  assert np.mean(fast == rounded) > 0.9
