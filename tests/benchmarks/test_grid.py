"""The grid trainer: a vmapped grid of runs equals the same runs made one at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.common import baselines, grid, train
from lookahead_optax import lookahead
from tests.benchmarks.problems import softmax_regression


def lookahead_sgd(hp):
  return lookahead(optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"], momentum=0.9), 3, hp["alpha"])


def test_a_vmapped_grid_equals_its_runs_one_at_a_time():
  prob = softmax_regression()
  settings = [{"lr": 0.05, "alpha": 0.5}, {"lr": 0.2, "alpha": 0.8}]
  hparams, seeds = grid.settings_by_seeds(settings, [0, 1])
  assert seeds.tolist() == [0, 1, 0, 1] and hparams["lr"].tolist() == pytest.approx([0.05, 0.05, 0.2, 0.2])
  g = grid.train_grid(prob, lookahead_sgd, hparams, seeds, steps=12, eval_every=4)
  assert g.losses.shape == (4, 12) and g.eval_steps.tolist() == [4, 8, 12]
  assert g.curves["main"]["val_loss"].shape == (4, 3) and g.compile_seconds > 0 and g.run_seconds > 0
  for i in (0, 3):
    one = grid.train_grid(prob, lookahead_sgd, {k: v[i : i + 1] for k, v in hparams.items()}, seeds[i : i + 1], 12, 4)
    np.testing.assert_allclose(g.losses[i], one.losses[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(g.curves["main"]["val_loss"][i], one.curves["main"]["val_loss"][0], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grid.take_runs(g.weights, [i])), jax.tree.leaves(one.weights)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # The slow weights were evaluated: after 12 steps (a sync, k=3) they equal the params, and differ from run to run.
  assert not np.allclose(g.weights["main"]["w"][0], g.weights["main"]["w"][1])


def test_a_seed_fixes_initialisation_and_batches_whatever_the_optimizer():
  prob = softmax_regression()
  hparams, seeds = grid.settings_by_seeds([{"lr": 0.0, "alpha": 0.5}, {"lr": 0.0, "alpha": 0.8}], [3, 4])
  g = grid.train_grid(prob, lookahead_sgd, hparams, seeds, steps=4, eval_every=4)
  # lr 0: nothing moves, so the loss of each step is that of the seed's batch at the seed's init.
  np.testing.assert_array_equal(g.losses[0], g.losses[2])
  assert not np.array_equal(g.losses[0], g.losses[1])


def test_segments_evaluate_where_asked_and_arguments_are_checked():
  prob = softmax_regression()
  hparams, seeds = grid.settings_by_seeds([{"lr": 0.1, "alpha": 0.5}], [0])
  both = lambda params, state: {"fast": params, "slow": train.slow_or_params(params, state)}
  g = grid.train_grid(prob, lookahead_sgd, hparams, seeds, 7, 0, weights=both, segments=[(4, 1), (1, 3)])
  assert g.eval_steps.tolist() == [4, 5, 6, 7]
  fast, slow = g.curves["fast"]["val_loss"][0], g.curves["slow"]["val_loss"][0]
  # k=3: the slow weights move only at the syncs of steps 3 and 6; the fast weights at every step.
  assert slow[0] == slow[1] and slow[2] == slow[3] and slow[1] != slow[2]
  assert len(set(fast.tolist())) == 4 and fast[2] == slow[2]  # at a sync the fast weights land on the slow ones
  with pytest.raises(ValueError, match="eval_every must divide"):
    grid.train_grid(prob, lookahead_sgd, hparams, seeds, 7, 3)
  with pytest.raises(ValueError, match="one value per seed"):
    grid.train_grid(prob, lookahead_sgd, {"lr": [0.1, 0.2], "alpha": [0.5, 0.5]}, seeds, 4, 4)


def test_polyak_average_is_the_mean_of_the_iterates_after_start():
  tx = baselines.polyak_average(optax.sgd(0.5), start=2)
  params = {"w": jnp.asarray([1.0, -2.0])}
  state = tx.init(params)
  iterates = []
  for g in ([1.0, 0.0], [0.5, 1.0], [-1.0, 2.0], [0.25, -0.5], [2.0, 1.0]):
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(params["w"])
  np.testing.assert_allclose(baselines.polyak_params(params, state)["w"], np.mean(iterates[2:], axis=0), rtol=1e-6)
  with pytest.raises(ValueError, match="PolyakState"):
    baselines.polyak_params(params, optax.sgd(0.1).init(params))
