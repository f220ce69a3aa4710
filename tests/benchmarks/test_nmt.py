"""benchmarks/nmt.py: data-parallel translation training on 8 simulated devices, and its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import nmt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_runs_data_parallel_on_8_simulated_devices(tmp_path):
  # A fresh process: the device count is fixed when jax starts its backend.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = tmp_path / "nmt"
  args = ["--steps", "6", "--seeds", "1", "--batch-size", "16", "--dim", "16", "--heads", "2", "--layers", "1",
          "--n-train", "64", "--warmup", "2", "--lr", "3e-3", "--eval-n", "0", "--only", "lookahead",
          "--out", str(out), "--no-progress"]
  proc = subprocess.run([sys.executable, "-m", "benchmarks.nmt", *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "nmt.json").read_text())
  assert results["environment"]["devices"] == 8 and results["config"]["devices"] == 8
  (name, (row,)), = results["runs"].items()
  assert name.startswith("Lookahead")
  losses = np.asarray(row["losses"])
  assert row["steps"] == 6 and len(losses) == 6 and np.isfinite(losses).all()
  assert losses[-1] < losses[0], f"loss did not decrease: {losses}"
  assert "Lookahead" in (tmp_path / "nmt.md").read_text()


def test_exact_match_counts_whole_sequences_up_to_eos():
  bos, eos = 1, 2
  target = np.array([[bos, 5, 6, eos, 0], [bos, 5, 6, eos, 0], [bos, 5, eos, 0, 0], [bos, 7, eos, 0, 0]])
  pred = np.array([
      [bos, 5, 6, eos, 9],  # right, then noise after EOS: counts
      [bos, 5, 7, eos, 0],  # one wrong token
      [bos, 5, 6, 6, eos],  # misses the EOS
      [bos, 7, eos, 0, 0],  # right
  ])
  assert nmt.exact_match(pred, target) == 0.5
  with pytest.raises(ValueError, match="pred and target"):
    nmt.exact_match(pred[:, :3], target)


def test_warmup_rsqrt_schedule_closed_form():
  schedule = nmt.warmup_rsqrt_schedule(1e-3, 100)
  for t in [1, 10, 50, 100, 101, 400, 10000]:
    expected = 1e-3 * min(t / 100, (100 / t) ** 0.5)
    assert float(schedule(t)) == pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match="warmup"):
    nmt.warmup_rsqrt_schedule(1e-3, 0)
