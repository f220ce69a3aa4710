"""The paper suite end to end on tiny configurations: every task trains, reports and prints its verdicts."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import paper
from benchmarks.common import tuning
from benchmarks.paper import __main__ as cli


def tiny_configs() -> dict:
  """The quick configurations shrunk to a few steps of tiny models (the suite's CPU budget).

  Compilation dominates the cost: the LSTM trains its Lookahead family only; the translation Transformer, the
  costliest to compile, is left to the quick run (its optimizers are built in ``test_every_optimizer_builds``).
  """
  cfgs = paper.configs(quick=True)
  cfgs["image"].update(
    widths=(16,),
    steps=8,
    eval_every=4,
    grids={"SGD": (0.1, 0.3), "LA(SGD)": (0.3,)},
    methods=("SGD", "Polyak", "LA(SGD)"),
    sensitivity=True,
    extras=True,
    k_alpha_ks=(5,),
    trace_updates=0,
  )  # the trace's segments: see test_grid
  cfgs["noise"].update(steps=6, eval_every=3, sensitivity=True)
  cfgs["lm"].update(
    steps=4,
    eval_every=2,
    batch=2,
    seq_len=8,
    embed=4,
    hidden=8,
    curve_windows=2,
    train_eval_chars=64,
    eval_chunk=4,
    max_chars=3000,
    methods=("LA(Adam)",),
    pairs=(),
  )
  return cfgs


TINY_TASKS = ("image", "lm", "noise")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("paper"))
  return out, paper.run(TINY_TASKS, quick=True, seeds=2, out=out, cfgs=tiny_configs(), log=lambda _: None)


def test_every_task_writes_its_results(tiny_run):
  out, summary = tiny_run
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert set(on_disk["tasks"]) == set(TINY_TASKS) and on_disk["quick"] is True
  assert on_disk["environment"]["jax"] == jax.__version__
  for name, res in on_disk["tasks"].items():
    task = paper.TASKS[name].TASK
    assert res["seeds"] == [0, 1] and res["budget"] == 2
    for method in res["config"]["methods"]:
      best = res["methods"][method]["settings"][res["methods"][method]["best"]]
      assert best["eligible"] and len(best["metrics"][task.headline.key]) == 2
      assert all(math.isfinite(v) for v in best["metrics"][task.select.key]), (name, method)
      assert np.asarray(best["curves"][task.select.key]).shape == (2, len(res["eval_steps"]))
    for program in res["programs"]:
      assert program["compile_s"] > 0 and program["run_s"] > 0
  for figure in ("image_anytime.png", "image_sensitivity.png", "noise_anytime.png", "noise_sensitivity.png"):
    assert os.path.getsize(os.path.join(out, figure)) > 0


def test_image_extras_and_polyak_come_from_the_same_runs(tiny_run):
  _, summary = tiny_run
  image = summary["tasks"]["image"]
  sgd, polyak = image["methods"]["SGD"]["settings"], image["methods"]["Polyak"]["settings"]
  assert [r["lr"] for r in sgd] == [r["lr"] for r in polyak]
  assert [r["metrics"]["train_loss"] for r in sgd] == [r["metrics"]["train_loss"] for r in polyak]  # one training
  la = image["methods"]["LA(SGD)"]["settings"]
  assert [(r["lr"], r["alpha"], r["eligible"]) for r in la] == [(0.3, 0.5, True), (0.3, 0.8, True), (0.1, 0.5, False)]
  rows = image["extras"]["k_alpha"]["rows"]
  assert [(r["k"], r["alpha"]) for r in rows] == [(5, 0.5), (5, 0.8)]


def test_report_and_printed_verdict_table(tiny_run, capsys):
  out, _ = tiny_run
  text = open(os.path.join(out, "paper.md")).read()
  for heading in (
    "## Protocol",
    "## Verdicts",
    "### Robustness",
    "### Learning-rate sensitivity",
    "### Anytime",
    "### k and alpha",
    "Welch",
  ):
    assert heading in text, heading
  assert "95.27 ± .06" in text and "57.72" in text  # the paper's numbers beside ours
  cli.main(["--report-only", "--out", out])
  printed = capsys.readouterr().out
  assert "verdict" in printed and "compile" in printed
  for name in TINY_TASKS:
    assert name in printed
  assert any(f"LA(SGD) {word} SGD" in printed for word in ("ties", "beats", "loses to"))


@pytest.mark.parametrize("name", list(paper.TASKS))
def test_every_optimizer_builds_and_steps(name):
  """Every family of every task, built from traced-like hyperparameters, takes a step on small params."""
  mod = paper.TASKS[name]
  params = {"w": jnp.ones((40, 3)), "b": jnp.zeros(3)}
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  for family in dict.fromkeys(tuning.family_of(mod.TASK, m)[0] for m in mod.FULL["methods"]):
    tx = mod.TASK.optimizer(family, dict(mod.FULL, variant=None))({"lr": jnp.asarray(0.01), "alpha": jnp.asarray(0.5)})
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(u).all() and np.abs(u).max() > 0 for u in jax.tree.leaves(updates)), family


def test_arguments_are_checked():
  with pytest.raises(ValueError, match="tasks must be among"):
    paper.run(("vision",))
  with pytest.raises(ValueError, match="seeds must be >= 2"):
    paper.run(("noise",), seeds=1)
  with pytest.raises(ValueError, match="cifar10"):
    paper.image.splits(dict(paper.image.FULL, dataset="cifar10"))
