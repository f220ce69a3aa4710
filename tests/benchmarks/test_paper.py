"""The paper-experiment suite: a tiny end-to-end run, and its pieces against independent references."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import data, harness, paper
from benchmarks.paper_tasks import Sweep, nmt, padded_chunks, step_decay, summarize, verdict, warmup_rsqrt, with_lr
from benchmarks.paper_tasks.lm import windows


def tiny_configs():
  """The quick configs shrunk to a handful of steps and tiny models (the suite's CPU budget)."""
  cfgs = paper.configs(quick=True)
  cfgs["image"].update(widths=(4, 8), steps=24, eval_every=12, robust_lrs=(0.3,), robust_momenta=(0.5,),
                       k_alpha=((5, 0.5),), trace_start=0.5, trace_updates=4)
  return cfgs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The image task end to end (every section of it); compilation dominates, so one task only."""
  out = str(tmp_path_factory.mktemp("paper"))
  summary = paper.run(("image",), quick=True, seeds=1, out=out, cfgs=tiny_configs(), progress=False)
  return out, summary


def test_run_writes_summary_report_and_figures(tiny_run):
  out, _ = tiny_run
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert set(on_disk["tasks"]) == {"image"} and on_disk["quick"] is True
  assert on_disk["environment"]["jax"] == jax.__version__ and on_disk["seeds"] == 1
  image = on_disk["tasks"]["image"]
  assert set(image["main"]) == {"SGD", "Polyak", "Adam", "LA(SGD)", "LA(Adam)"}
  for opt, res in image["main"].items():
    acc = res["summary"]["test_acc"]
    assert len(acc["values"]) == 1 and 0.0 <= acc["values"][0] <= 1.0, opt
  assert set(image["robust"]["lr"]) == {"SGD lr=0.3", "LA(SGD) lr=0.3"}
  assert set(image["robust"]["momentum"]) == {"SGD momentum=0.5", "LA(SGD) momentum=0.5"}
  assert set(image["k_alpha"]) == {"k=5 alpha=0.5", "SGD"}
  # k=5, alpha=0.5 is the LA(SGD) setting of the main table: the same run, reused
  assert image["k_alpha"]["k=5 alpha=0.5"]["summary"]["test_acc"] == image["main"]["LA(SGD)"]["summary"]["test_acc"]
  trace = image["trace"]
  assert trace["steps"] == [13, 14, 15, 16] and len(trace["fast_acc"]) == len(trace["slow_acc"]) == 4
  for fig in ("fig5_image", "fig8_robustness", "fig9_k_alpha", "fig10_trace"):
    with open(os.path.join(out, f"paper_{fig}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", fig
  text = open(os.path.join(out, "paper.md")).read()
  # each of our tables sits next to the paper's numbers, quoted from its text
  for quoted in ("95.27 ± .06", "76.88 ± .39", "78.24 ± .02", "77.72"):
    assert quoted in text, quoted
  assert "## 1. Image" in text and "What matches and what does not" in text


def test_training_lowers_the_loss(tiny_run):
  _, summary = tiny_run
  for opt in ("SGD", "LA(SGD)", "Adam", "LA(Adam)"):
    curve = np.asarray(summary["tasks"]["image"]["main"][opt]["curves"][0])
    assert curve[-3:, 1].mean() < curve[:3, 1].mean(), opt  # 24 steps: the loss falls from about ln(10)


def test_slow_weights_only_move_at_syncs(tiny_run):
  """Fig. 10's trace: the slow-weight accuracy changes only after a sync (every k=5 updates)."""
  _, summary = tiny_run
  trace = summary["tasks"]["image"]["trace"]
  for step, before, after in zip(trace["steps"][1:], trace["slow_acc"], trace["slow_acc"][1:]):
    if step % 5:
      assert after == before, step


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="tasks must be among"):
    paper.run(("vision",))
  with pytest.raises(ValueError, match="seeds must be >= 1, got 0"):
    paper.run(("lm",), seeds=0)
  with pytest.raises(SystemExit):
    paper.main(["--dataset", "cifar10"])  # needs --data-dir


def test_with_lr_and_step_decay_match_optax_sgd():
  """The learning-rate-in-state optimizer follows optax.sgd with the same piecewise schedule."""
  steps, lr, momentum = 20, 0.3, 0.9
  ours = with_lr(optax.inject_hyperparams(optax.trace)(decay=momentum), lr, step_decay(steps))
  boundaries = {6: 0.2, 12: 0.2, 16: 0.2}  # x0.2 at 30/60/80% of 20 steps, compounding
  ref = optax.sgd(optax.piecewise_constant_schedule(lr, boundaries), momentum=momentum)
  grad = lambda p: {"w": p["w"] * jnp.array([1.0, 3.0])}
  p_ours = p_ref = {"w": jnp.array([1.0, -2.0])}
  s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
  for _ in range(steps):
    u, s_ours = ours.update(grad(p_ours), s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = ref.update(grad(p_ref), s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  np.testing.assert_allclose(p_ours["w"], p_ref["w"], rtol=1e-5)


def test_warmup_rsqrt_closed_form():
  w = 10
  t = jnp.arange(40)
  expected = np.minimum((np.arange(40) + 1) / w, np.sqrt(w / (np.arange(40) + 1)))
  np.testing.assert_allclose(warmup_rsqrt(w)(t), expected, rtol=1e-6)
  np.testing.assert_allclose(warmup_rsqrt(w, use_warmup=False)(t), np.minimum(1.0, np.sqrt(w / (np.arange(40) + 1))),
                             rtol=1e-6)


def test_polyak_average_is_the_mean_of_the_tail_iterates():
  tx = harness.polyak_average(optax.sgd(0.1, momentum=0.5), start=3)
  params = {"w": jnp.array([2.0, -1.0])}
  state = tx.init(params)
  iterates = []
  for t in range(8):
    grads = {"w": params["w"] + t}  # any changing gradient
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(np.asarray(params["w"]))
  np.testing.assert_allclose(harness.polyak_params(params, state)["w"], np.mean(iterates[3:], 0), rtol=1e-6)
  with pytest.raises(ValueError, match="start must be >= 0, got -1"):
    harness.polyak_average(optax.sgd(0.1), start=-1)
  with pytest.raises(ValueError, match="expected a PolyakState"):
    harness.polyak_params(params, optax.sgd(0.1).init(params))


def test_sweep_tunes_on_seed_zero_reuses_runs_and_skips_diverged():
  calls = []

  def run_one(opt, lr, seed):
    calls.append((opt, lr, seed))
    return {"acc": float("nan") if lr > 1 else lr + 0.01 * seed}

  sweep = Sweep(run_one)
  tuned = sweep.tune("SGD", [0.1, 0.5, 2.0], "acc", higher_is_better=True)
  assert tuned["best"] == 0.5  # 2.0 diverged (nan) and never wins
  rows = sweep.seeds("SGD", tuned["best"], 3)
  assert [r["acc"] for r in rows] == [0.5, 0.51, 0.52]
  assert calls.count(("SGD", 0.5, 0)) == 1 and len(calls) == 5
  s = summarize(rows, ["acc"])
  assert s["acc"]["mean"] == pytest.approx(0.51) and s["acc"]["std"] == pytest.approx(np.std([0.5, 0.51, 0.52]))
  text = verdict("B", "A", {"A": {"acc": {"mean": 0.5, "std": 0.01}}, "B": {"acc": {"mean": 0.6, "std": 0.01}}},
                 "acc", True, "accuracy")
  assert text.startswith("B beats A on accuracy") and "clearly" in text


def test_detokenize_stops_at_eos_or_padding():
  vocab = ["<pad>", "<bos>", "<eos>", "a", "b"]
  assert nmt.detokenize(np.array([[1, 3, 4, 2, 3], [1, 4, 0, 3, 3]]), vocab) == ["ab", "b"]


def test_lm_windows_cover_the_text_in_order():
  tokens = np.arange(23)
  w = windows(tokens, 5)
  np.testing.assert_array_equal(w.x.ravel(), tokens[:20])
  np.testing.assert_array_equal(w.y.ravel(), tokens[1:21])


def test_padded_chunks_keep_every_row_once():
  split = data.Split(np.arange(10.0).reshape(5, 2), np.arange(5))
  chunks = list(padded_chunks(split, 2))
  assert [n for _, _, n in chunks] == [2, 2, 1] and all(x.shape == (2, 2) for x, _, _ in chunks)
  np.testing.assert_array_equal(np.concatenate([y[:n] for _, y, n in chunks]), split.y)
