"""The SNOO/DiLoCo benchmark runs end to end (tiny), and counts communication rounds correctly."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from benchmarks import outer


def test_count_all_reduces_separates_every_step_from_the_sync_branch():
  def program(x, sync):
    x = jax.lax.psum(x, "r")  # every step
    return jax.lax.cond(sync, lambda y: jax.lax.pmean(y, "r"), lambda y: 2.0 * y, x)

  jaxpr = jax.make_jaxpr(program, axis_env=[("r", 4)])(jnp.ones(3), True)
  assert outer.count_all_reduces(jaxpr) == {"every_step": 1, "sync_branch": 1, "other_branch": 0}


def test_quick_run_writes_results_and_diloco_communicates_once_per_sync(tmp_path):
  with jax.numpy_rank_promotion("allow"):  # models.TransformerLM broadcasts its position table
    # Only the replica experiment: compiling each configuration is what costs here.
    outer.run(quick=True, out_dir=str(tmp_path), progress=False, single=())
  for name in ("outer.md", "outer.json", "outer_lm.png", "outer_diloco_rounds.png", "outer_diloco_samples.png"):
    assert os.path.getsize(tmp_path / name) > 0
  saved = json.loads((tmp_path / "outer.json").read_text())
  steps, (h,) = saved["config"]["dp_steps"], saved["config"]["sync_periods"]
  dp = saved["distributed"]["Synchronous DP AdamW"]
  dl = saved["distributed"][f"DiLoCo(AdamW), H={h}, lr=0.7, mu=0.9"]
  # Synchronous DP: the gradient all-reduce is outside any cond, so it runs every step.
  assert dp["all_reduces_in_program"]["every_step"] > 0 and dp["all_reduces_in_program"]["sync_branch"] == 0
  assert dp["rounds_total"] == steps
  # DiLoCo: no all-reduce outside the sync branch, none in the non-sync branch: 1 round per H steps.
  counts = dl["all_reduces_in_program"]
  assert counts["every_step"] == 0 and counts["other_branch"] == 0 and counts["sync_branch"] > 0
  assert dl["rounds_per_period"] == 1 and dl["rounds_total"] == steps // h
  uniform = math.log(len(outer.data.char_corpus(max_chars=1000).vocab))
  for res in (dp, dl):
    assert res["runs"][0]["final_val_loss"] < uniform  # learned something in 10 steps
  assert "DiLoCo" in (tmp_path / "outer.md").read_text()


def test_help_documents_the_options(capsys):
  with pytest.raises(SystemExit) as exit_:
    outer.main(["--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  assert "--quick" in text and "--out" in text and "DiLoCo" in text


def test_translation_quick_run_writes_its_own_results_and_learns(tmp_path):
  with jax.numpy_rank_promotion("allow"):  # models.Seq2SeqTransformer broadcasts its position table
    outer.main(["--task", "translation", "--quick", "--out", str(tmp_path), "--no-progress"])
  for name in ("outer_translation.md", "outer_translation.json", "outer_translation.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert not (tmp_path / "outer.md").exists() and not (tmp_path / "outer.json").exists()  # the LM results untouched
  saved = json.loads((tmp_path / "outer_translation.json").read_text())
  assert saved["task"] == "translation" and saved["config"]["seeds"] == 1
  (name, (run,)), = saved["runs"].items()
  assert name.startswith("SNOO(AdamW)")
  assert len(run["losses"]) == saved["config"]["steps"] and all(math.isfinite(v) for v in run["losses"])
  assert math.isfinite(run["test_loss"]) and 0.0 <= run["exact_match"] <= 1.0
  # Training decreased the loss: last step below the loss at initialisation (step 1, same model).
  assert run["train_loss"] < run["first_loss"]
  assert name in (tmp_path / "outer_translation.md").read_text()
