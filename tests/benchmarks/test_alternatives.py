"""The alternatives experiment: weight averages against a numpy reference, the compute factor, equal budgets."""

import jax
import numpy as np
import optax
import pytest

from benchmarks.common import baselines, grid, tuning
from benchmarks.outer import alternatives
from tests.benchmarks.problems import softmax_regression


def sgd_trajectory(prob, lr: float, seed: int, steps: int) -> list:
  """Plain-loop SGD on the grid problem's batches: the params after every step, as float64 numpy trees."""
  params, key, out = prob.init(seed), jax.random.key(seed), []
  grad = jax.jit(jax.grad(prob.loss))
  for t in range(steps):
    g = grad(params, prob.batch(prob.data, key, t))
    params = jax.tree.map(lambda p, g: p - lr * g, params, g)
    out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
  return out


def ema_reference(iterates: list, decay: float):
  """Bias-corrected EMA: sum_i (1 - d) d^(T - i) theta_i / (1 - d^T)."""
  m = jax.tree.map(np.zeros_like, iterates[0])
  for theta in iterates:
    m = jax.tree.map(lambda m, x: decay * m + (1 - decay) * x, m, theta)
  return jax.tree.map(lambda m: m / (1 - decay ** len(iterates)), m)


def lawa_reference(iterates: list, k: int, every: int):
  """Mean of the last k of the iterates after steps every, 2 every, ... (the last iterate before any)."""
  snapshots = [iterates[t - 1] for t in range(every, len(iterates) + 1, every)][-k:]
  return jax.tree.map(lambda *xs: np.mean(xs, axis=0), *snapshots) if snapshots else iterates[-1]


def test_ema_and_lawa_kept_inside_the_compiled_grid_match_a_numpy_reference():
  prob, steps, lr = softmax_regression(), 130, 0.3
  names = tuple(alternatives.EMA) + tuple(alternatives.LAWA)
  hparams, seeds = grid.settings_by_seeds([{"lr": lr}], [0, 1])
  g = grid.train_grid(
    prob,
    lambda hp: alternatives.averaged(optax.sgd(hp["lr"]), names),
    hparams,
    seeds,
    steps,
    10,
    weights=alternatives.averaged_weights(names),
  )
  assert set(g.weights) == {"main", *names}
  for run, seed in enumerate((0, 1)):
    iterates = sgd_trajectory(prob, lr, seed, steps)
    final = lambda name: jax.tree.map(lambda x: np.asarray(x[run]), g.weights[name])
    # Training follows SGD unchanged; "last 6, every 50 steps" holds only 2 snapshots (steps 50 and 100).
    expected = {"main": iterates[-1]}
    expected |= {n: ema_reference(iterates, d) for n, d in alternatives.EMA.items()}
    expected |= {n: lawa_reference(iterates, *kw) for n, kw in alternatives.LAWA.items()}
    for name, want in expected.items():
      for got, ref in zip(jax.tree.leaves(final(name)), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6, err_msg=name)
    assert not np.allclose(final("decay 0.99")["w"], iterates[-1]["w"], atol=1e-4)  # the averages are not the params


def test_averages_before_any_snapshot_and_after_one_step_and_bad_arguments():
  params = {"w": np.ones(3, np.float32)}
  sgd = optax.sgd(1.0)
  lawa, ema = baselines.lawa_average(sgd, k=2, every=3), baselines.ema_average(sgd, 0.9)
  grads = {"w": np.full(3, 0.5, np.float32)}
  lawa_state, ema_state = lawa.init(params), ema.init(params)
  _, lawa_state = lawa.update(grads, lawa_state, params)
  _, ema_state = ema.update(grads, ema_state, params)
  np.testing.assert_array_equal(baselines.lawa_params(params, lawa_state)["w"], params["w"])  # no snapshot yet
  np.testing.assert_allclose(baselines.polyak_params(params, ema_state)["w"], 0.5, rtol=1e-6)  # bias-corrected: theta_1
  with pytest.raises(ValueError, match="decay"):
    baselines.ema_average(sgd, 1.0)
  with pytest.raises(ValueError, match="every"):
    baselines.lawa_average(sgd, k=2, every=0)
  with pytest.raises(ValueError, match="LawaState"):
    baselines.lawa_params(params, ema_state)


def test_compute_factor_of_a_hand_computed_curve_with_its_seed_bootstrap():
  steps = np.array([100, 200, 300, 400, 500, 600])
  mean = np.array([5.0, 4.0, 3.0, 2.0, 1.5, 1.0])
  base = np.stack([mean + 0.5, mean - 0.5])  # two seeds
  method = np.array([[3.0, 2.5], [3.0, 2.5]])  # final loss 2.5 at step 200 for both seeds
  f = alternatives.compute_factor(steps, base, method, horizon=200)
  # Mean curve crosses 2.5 half-way from step 300 (3.0) to 400 (2.0): 350 / 200. Resampled seeds: both the
  # upper curve (2.5 at step 400: 2.0x), both the lower one (2.5 at 300: 1.5x), or one of each (1.75x).
  assert f["factor"] == pytest.approx(1.75) and f["target"] == 2.5 and f["reach"] == 3.0
  assert f["interval"] == pytest.approx([1.5, 2.0])
  assert alternatives.factor_text(f) == "1.75x [1.50, 2.00]"
  never = alternatives.compute_factor(steps, base, np.full((2, 2), 0.1), horizon=200)
  assert never["factor"] == float("inf") and alternatives.factor_text(never) == ">3x"
  assert alternatives.steps_to_reach(steps, mean, 9.0) == 100.0  # already there at the first evaluation


@pytest.mark.parametrize(
  "cfg",
  [alternatives.LM_FULL, alternatives.TRANSLATION_FULL, alternatives.LM_QUICK, alternatives.TRANSLATION_QUICK],
)
def test_every_method_gets_the_same_number_of_settings(cfg):
  task = alternatives.LM
  assert tuning.check_budget(task, cfg) == 4
  for method in alternatives.METHODS:
    assert sum(s["eligible"] for s in tuning.method_settings(task, method, cfg)) == 4, method
  ema = [(s["lr"], s["variant"]) for s in tuning.method_settings(task, "EMA(AdamW)", cfg)]
  lrs = cfg["grids"]["EMA(AdamW)"]
  assert ema == [(lr, name) for name in alternatives.EMA for lr in lrs]
  assert set(lrs) <= set(cfg["grids"]["AdamW"])  # evaluated from AdamW's own runs
  against = {(a, b) for a, b in cfg["pairs"]}
  assert all(("AdamW", m) in against for m in alternatives.METHODS[1:])
  assert all(("LA(AdamW)", m) in against for m in alternatives.METHODS[2:])


def test_averages_are_tuned_from_adamw_runs_and_cost_counts_their_copies():
  prob = softmax_regression()
  loss = tuning.Metric("val_loss", "val loss", False)
  task = alternatives.LM._replace(
    name="toy",
    problem=lambda cfg: prob,
    select=loss,
    headline=loss,
    columns=(loss,),
    finals=lambda cfg, p, g: {n: {"val_loss": c["val_loss"][:, -1]} for n, c in g.curves.items()},
  )
  methods = ("AdamW", "SF-AdamW", "EMA(AdamW)", "LAWA(AdamW)")
  cfg = dict(
    alternatives.LM_QUICK,
    steps=50,
    eval_every=10,
    factor_steps=2,
    timing=dict(rounds=1, steps=1),
    methods=methods,
    pairs=(("AdamW", "EMA(AdamW)"),),
    grids={"AdamW": (0.01, 0.03, 0.1, 0.3), "SF-AdamW": (0.01, 0.03, 0.1, 0.3), "EMA(AdamW)": (0.1, 0.3)}
    | {"LAWA(AdamW)": (0.1, 0.3)},
  )
  res = tuning.run_task(task, cfg, [0, 1], log=lambda _: None)
  assert [p["family"] for p in res["programs"]] == ["AdamW", "SF-AdamW"]  # EMA and LAWA: no program of their own
  adamw = {r["lr"]: r["metrics"]["val_loss"] for r in res["methods"]["AdamW"]["settings"]}
  lawa = res["methods"]["LAWA(AdamW)"]["settings"]
  assert [(r["lr"], r["variant"]) for r in lawa] == [(lr, n) for n in alternatives.LAWA for lr in (0.1, 0.3)]
  # Last 6 snapshots every 50 steps, after 50 steps: the one snapshot is the final params, AdamW's own weights.
  assert all(r["metrics"]["val_loss"] == adamw[r["lr"]] for r in lawa if r["variant"] == "last 6, every 50 steps")
  assert all(r["metrics"]["val_loss"] != adamw[r["lr"]] for r in res["methods"]["EMA(AdamW)"]["settings"])
  cost = res["extras"]["cost"]
  params = cost["AdamW"]["params_bytes"]
  assert params == 4 * (64 * 10 + 10)
  assert cost["EMA(AdamW)"]["extra_bytes"] == params + 4  # one copy and its step counter
  k = alternatives.LAWA[tuning.tuned(res, "LAWA(AdamW)")["variant"]][0]
  assert cost["LAWA(AdamW)"]["extra_bytes"] == k * params + 8  # k copies, two counters
  assert set(res["extras"]["compute_factor"]) == set(methods[1:])
  assert len(res["extras"]["adamw_continued"]["steps"]) == 2 * 50 // 10
