"""DiLoCo regime benchmark: its design and budgets, per-length tuning against scipy, a tiny cell run end to end."""

import collections

import jax
import numpy as np
import pytest
from scipy import stats

from benchmarks.common import tuning
from benchmarks.outer import diloco as dl
from benchmarks.outer import diloco_regime as dr

TINY = dict(dr.QUICK, seq_len=8, dim=8, heads=2, layers=1, replica_batch=3, max_chars=20_000, eval_chunk=64)
TINY.update(steps=10, eval_every=5, replica_counts=(2,), periods=(5,), center=(2, 5), outer={"outer lr 0.7": 0.7})
TINY["rates"] = {"DP": (1e-2,), "DiLoCo": (1e-2,)}


def test_design_varies_one_axis_at_a_time_around_the_center():
  cells = dr.design(dr.FULL)
  assert cells == {4: (10, 30, 100), 2: (30,), 8: (30,)}
  assert next(iter(cells)) == 4  # the center runs first


def test_design_refuses_a_period_that_does_not_divide_the_evaluation_interval():
  with pytest.raises(ValueError, match=r"H=\[70\]"):
    dr.design(dict(dr.FULL, periods=(10, 30, 70)))
  with pytest.raises(ValueError, match="center"):
    dr.design(dict(dr.FULL, center=(3, 30)))


def test_every_cell_gives_each_method_the_same_four_settings_and_diloco_each_inner_rate_with_each_outer_rate():
  for m, periods in dr.design(dr.FULL).items():
    cfg = dr.cell_config(dr.FULL, m, periods)
    assert cfg["methods"] == ("DP-AdamW",) + tuple(f"DiLoCo-H{h}(AdamW)" for h in periods)
    eligible = {name: [s for s in tuning.settings(name, cfg) if s["eligible"]] for name in cfg["methods"]}
    assert {name: len(s) for name, s in eligible.items()} == dict.fromkeys(cfg["methods"], 4)
    assert tuning.check_budget(dr.task(m), cfg) == 4
    assert [s["lr"] for s in eligible["DP-AdamW"]] == [0.002, 0.005, 0.01, 0.02]
    for name in cfg["methods"][1:]:
      pairs = sorted((s["lr"], cfg["outer"][s["variant"]]) for s in eligible[name])
      assert pairs == [(0.002, 0.4), (0.002, 0.7), (0.005, 0.4), (0.005, 0.7)]


def _row(lr, val, test):
  """A setting's row: ``val``/``test`` are [seeds][lengths]."""
  return {"lr": lr, "eligible": True, "curves": {"val_loss": val, "test_loss": test}}


def test_each_length_tunes_each_method_on_its_own_and_tests_the_gap_with_welch():
  dp = [
    _row(0.01, [[2.0, 1.5], [2.1, 1.6], [2.0, 1.5]], [[2.05, 1.52], [2.15, 1.61], [2.02, 1.55]]),
    _row(0.02, [[2.2, 1.4], [2.3, 1.4], [2.2, 1.3]], [[2.25, 1.41], [2.31, 1.44], [2.2, 1.37]]),
  ]
  dil = [
    _row(0.002, [[2.5, 1.6], [2.4, 1.7], [2.5, 1.6]], [[2.52, 1.62], [2.41, 1.75], [2.48, 1.66]]),
    # the best validation mean at the second length, but a diverged seed disqualifies it
    _row(0.005, [[2.6, 1.0], [2.6, np.nan], [2.7, 1.0]], [[2.6, 1.0], [2.6, 9.0], [2.7, 1.0]]),
  ]
  cell = {
    "config": {"methods": ["DP-AdamW", "DiLoCo-H5(AdamW)"], "replicas": 2},
    "eval_steps": [10, 20],
    "methods": {"DP-AdamW": {"settings": dp}, "DiLoCo-H5(AdamW)": {"settings": dil}},
  }
  table = dr.gaps({"tasks": {"M=2": cell}})
  assert [(r["replicas"], r["H"], r["steps"]) for r in table] == [(2, 5, 10), (2, 5, 20)]
  assert [(r["dp_setting"], r["diloco_setting"]) for r in table] == [("lr 0.01", "lr 0.002"), ("lr 0.02", "lr 0.002")]
  for r, i, chosen in zip(table, (0, 1), (dp[0], dp[1])):
    a = [s[i] for s in dil[0]["curves"]["test_loss"]]
    b = [s[i] for s in chosen["curves"]["test_loss"]]
    assert r["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert r["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
  assert table[0]["verdict"] == "loses to"


def test_crossing_extrapolates_a_line_in_log2_steps():
  rows = [{"steps": s, "diff": d} for s, d in ((600, 0.3), (1200, 0.2), (2400, 0.1))]
  assert dr.crossing(rows) == pytest.approx(4800.0)
  assert dr.crossing([dict(r, diff=0.1 + r["steps"] / 1e4) for r in rows]) is None


def test_diloco_stops_losing_from_the_first_length_after_its_last_loss():
  rows = lambda *verdicts: [{"steps": 600 * (i + 1), "verdict": v} for i, v in enumerate(verdicts)]
  assert dr.stops_losing(rows("loses to", "ties", "loses to", "ties")) == 2400
  assert dr.stops_losing(rows("loses to", "ties", "beats", "ties")) == 1200
  assert dr.stops_losing(rows("ties", "ties", "ties", "loses to")) is None


def test_what_a_replica_runs_does_not_depend_on_the_training_length():
  """So the first T steps of a 2400-step run are a T-step run: the gaps at shorter lengths come from the long runs."""
  params = {"w": jax.numpy.zeros((3, 2)), "b": jax.numpy.zeros(2)}
  for family, variant in (("DP-AdamW", None), ("DiLoCo-H30(AdamW)", "outer lr 0.4")):
    programs = []
    for steps in (600, 2400):
      tx = dr.per_replica(family, 1e-3, dict(dr.FULL, steps=steps, variant=variant))
      programs.append(str(jax.make_jaxpr(tx.update, axis_env=[(dl.AXIS, 4)])(params, tx.init(params), params)))
    assert programs[0] == programs[1]
    assert ("cond" in programs[0]) == (family != "DP-AdamW")  # DiLoCo's sync branch is in the program


def test_a_tiny_cell_trains_both_methods_on_the_same_windows(tmp_path):
  windows = collections.defaultdict(collections.Counter)
  base = dr.task(2)
  current = []

  def optimizer(family, cfg):
    current.append(family)
    return base.optimizer(family, cfg)

  def problem(cfg):
    prob = base.problem(cfg)

    def batch(d, key, step):
      b = prob.batch(d, key, step)
      record = lambda x: windows[current[-1]].update(w.tobytes() for w in np.asarray(x).reshape(-1, x.shape[-1]))
      jax.debug.callback(record, b.x)
      return b

    return prob._replace(batch=batch)

  task = base._replace(problem=problem, optimizer=optimizer)
  cfg = dr.cell_config(TINY, 2, (5,))
  res = tuning.run_task(task, cfg, [0, 1], log=lambda _: None)
  dp, dil = res["methods"]["DP-AdamW"], res["methods"]["DiLoCo-H5(AdamW)"]
  for m in (dp, dil):
    (row,) = m["settings"]
    assert np.isfinite([v for _, v in row["loss_curve"]]).all()
    assert np.isfinite(row["curves"]["test_loss"]).all() and np.isfinite(row["metrics"]["val_loss"]).all()
  # Same samples: every step, each of the M replicas draws replica_batch windows, the same ones for both methods.
  assert sum(windows["DP-AdamW"].values()) == 2 * TINY["steps"] * 2 * TINY["replica_batch"]  # seeds x steps x M x b
  assert windows["DP-AdamW"] == windows["DiLoCo-H5(AdamW)"]
  # The report: one table row per length, the figure written.
  summary = {"tasks": {"M=2": dict(res, seconds=1.0)}, "seeds": [0, 1], "params": 1, "environment": {"jax": "x"}}
  table = dr.gaps(summary)
  assert [r["steps"] for r in table] == [5, 10]
  dr.figure(table, TINY["center"], str(tmp_path / "gap.png"))
  dr.write_report(summary, table, str(tmp_path), "python -m benchmarks.outer.diloco_regime")
  text = (tmp_path / "diloco_regime.md").read_text()
  assert (tmp_path / "gap.png").stat().st_size > 0
  assert sum(line.startswith("| 2 | 5 | ") for line in text.splitlines()) == 2
