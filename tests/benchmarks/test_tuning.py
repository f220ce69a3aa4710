"""The tuning protocol and its report on constructed results: budgets, selection, pairs, tables."""

import pytest

from benchmarks.common import tuning, verdicts
from benchmarks.common.tuning import Metric
from benchmarks.outer import diloco, snoo
from benchmarks.paper import image, lm, noise, translation


def test_names():
  assert tuning.wrapper_of("LA(SGD)") == "LA" and tuning.inner_of("LA(SGD)") == "SGD"
  assert tuning.wrapper_of("DiLoCo-H10(AdamW)") == "DiLoCo-H10" and tuning.inner_of("Adam-") == "Adam-"
  assert tuning.wrapper_of("SGD") is None and not tuning.is_lookahead("SNOO(AdamW)")


def test_lookahead_settings_count_alphas_inside_the_budget_and_add_untuned_sensitivity_runs():
  cfg = {"grids": {"SGD": (0.1, 0.2, 0.3, 0.5), "LA(SGD)": (0.3, 0.8)}}
  la = tuning.settings("LA(SGD)", cfg)
  eligible = [(s["lr"], s["alpha"]) for s in la if s["eligible"]]
  assert eligible == [(0.3, 0.5), (0.3, 0.8), (0.8, 0.5), (0.8, 0.8)]
  extra = [(s["lr"], s["alpha"]) for s in la if not s["eligible"]]
  assert extra == [(0.1, 0.5), (0.2, 0.5), (0.5, 0.5)]  # the inner grid at alpha 0.5, 0.3 already run
  assert [s["lr"] for s in tuning.settings("SGD", cfg)] == [0.1, 0.2, 0.3, 0.5]
  assert len(tuning.settings("LA(SGD)", dict(cfg, sensitivity=False))) == 4
  snoo_sets = tuning.settings("SNOO(AdamW)", {"grids": {"SNOO(AdamW)": (1.0, 2.0)}, "variants": {"SNOO": ("a", "b")}})
  assert [(s["lr"], s["variant"]) for s in snoo_sets] == [(1.0, "a"), (2.0, "a"), (1.0, "b"), (2.0, "b")]


@pytest.mark.parametrize(
  "task, cfg",
  [(m.TASK, c) for m in (image, lm, translation, noise) for c in (m.FULL, m.QUICK)]
  + [
    (snoo.LM, snoo.LM_FULL),
    (snoo.TRANSLATION, snoo.TRANSLATION_FULL),
    (diloco.TASK, diloco.FULL),
    (diloco.TASK, diloco.QUICK),
  ],
)
def test_every_shipped_configuration_gives_every_method_the_same_budget(task, cfg):
  assert tuning.check_budget(task, cfg) >= 2
  for base, la in cfg["pairs"]:
    assert base in cfg["methods"] and la in cfg["methods"]


def test_unequal_budgets_are_refused():
  cfg = dict(noise.FULL, grids={"SGD": (0.1, 0.2), "LA(SGD)": (0.1, 0.2)})
  with pytest.raises(ValueError, match="same number of tuning settings"):
    tuning.check_budget(noise.TASK, cfg)


def test_a_headline_run_keeps_one_pair_without_the_sweep_and_polyak_evaluates_its_inner_runs():
  full = {"steps": 10, "methods": ("SGD", "LA(SGD)", "Adam"), "pairs": (), "sensitivity": True}
  quick = tuning.headline_run(full, {"SGD": (0.1,), "LA(SGD)": (0.3,)}, steps=5)
  assert quick == {
    "steps": 5,
    "methods": ("SGD", "LA(SGD)"),
    "pairs": (("SGD", "LA(SGD)"),),
    "sensitivity": False,
    "grids": {"SGD": (0.1,), "LA(SGD)": (0.3,)},
  }
  with pytest.raises(ValueError, match="X and LA"):
    tuning.headline_run(full, {"LA(SGD)": (0.3,), "SGD": (0.1,)})
  assert tuning.family_of(lm.TASK, "Polyak") == ("SGD", "polyak")
  assert tuning.family_of(lm.TASK, "LA(Adam)") == ("LA(Adam)", "main") == tuning.family_of(noise.TASK, "LA(Adam)")


def row(lr, values, alpha=None, eligible=True):
  out = {"lr": lr, "eligible": eligible, "metrics": {"acc": list(values)}}
  return out if alpha is None else dict(out, alpha=alpha)


def test_selection_takes_the_best_mean_among_eligible_settings_and_never_a_diverged_one():
  acc = Metric("acc", "acc", True)
  rows = [
    row(0.1, [0.8, 0.8]),
    row(0.2, [0.99, float("nan")]),
    row(0.3, [0.9, 0.92]),
    row(0.4, [0.99, 0.99], eligible=False),
  ]
  assert tuning.best_setting(rows, acc) == 2
  assert tuning.best_setting(rows, acc._replace(higher_is_better=False)) == 0


def constructed_result():
  """SGD tuned at 0.2; LA(SGD) tuned at (0.4, 0.8), clearly better; LA at SGD's rate a tie."""
  sgd = [row(0.1, [0.90, 0.91, 0.90]), row(0.2, [0.95, 0.96, 0.95])]
  la = [
    row(0.4, [0.990, 0.991, 0.992], 0.5),
    row(0.4, [0.993, 0.994, 0.995], 0.8),
    row(0.2, [0.95, 0.96, 0.96], 0.5, eligible=False),
    row(0.1, [0.80, 0.70, 0.75], 0.5, eligible=False),
  ]
  res = {
    "task": "toy",
    "config": {
      "pairs": [["SGD", "LA(SGD)"]],
      "methods": ["SGD", "LA(SGD)"],
      "grids": {"SGD": [0.1, 0.2], "LA(SGD)": [0.4]},
      "k": 5,
    },
    "seeds": [0, 1, 2],
    "budget": 2,
    "programs": [{"family": "SGD", "runs": 6, "settings": 2, "compile_s": 1.0, "run_s": 2.0, "final_eval_s": 0.5}],
    "methods": {"SGD": {"settings": sgd}, "LA(SGD)": {"settings": la}},
    "seconds": 4.0,
  }
  acc = Metric("acc", "val acc %", True, 100.0)
  for m in res["methods"].values():
    m["best"] = tuning.best_setting(m["settings"], acc)
  return res, acc


def test_pairs_robustness_and_sensitivity_of_a_constructed_result():
  res, acc = constructed_result()
  assert tuning.tuned(res, "SGD")["lr"] == 0.2 and tuning.tuned(res, "LA(SGD)")["alpha"] == 0.8
  assert tuning.comparison(tuning.tuned(res, "LA(SGD)"), tuning.tuned(res, "SGD"), acc)["verdict"] == "beats"
  robust = tuning.at_inner_rate(res, "SGD", "LA(SGD)")
  assert robust["lr"] == 0.2 and tuning.comparison(robust, tuning.tuned(res, "SGD"), acc)["verdict"] == "ties"
  s = tuning.sensitivity(res, "LA(SGD)", acc, (0.05, False))  # alpha 0.5 rows only, sorted by lr
  assert s["lrs"] == [0.1, 0.2, 0.4] and s["range"]["best"] == 0.4 and s["range"]["low"] == 0.2


def test_verdict_table_and_section_say_what_the_numbers_say(tmp_path):
  res, acc = constructed_result()
  task = tuning.Task(
    name="toy",
    title="Toy",
    select=acc,
    headline=acc,
    columns=(acc,),
    tolerance=(0.05, False),
    paper={"SGD vs LA(SGD)": "the paper's claim"},
    problem=None,
    optimizer=None,
    finals=None,
  )
  table = verdicts.verdict_table({"toy": task}, {"tasks": {"toy": res}})
  assert "LA(SGD) beats SGD" in table and "SGD 95.33 ± 0.47" in table and "the paper's claim" in table
  res["eval_steps"] = [1, 2]
  for m in res["methods"].values():
    for r in m["settings"]:
      r["curves"] = {"acc": [[0.5, v] for v in r["metrics"]["acc"]]}
  text = verdicts.task_section(task, res, str(tmp_path), 1)
  assert "LA(SGD) (lr 0.4, alpha 0.8) beats SGD (lr 0.2)" in text
  assert "LA(SGD) at SGD's lr 0.2, alpha 0.5 vs SGD" in text and "LA(SGD) ties SGD" in text
  assert (tmp_path / "toy_sensitivity.png").stat().st_size > 0 and (tmp_path / "toy_anytime.png").stat().st_size > 0
