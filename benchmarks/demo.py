"""Main-job demo: an MLP on scikit-learn's digits, Adam vs Lookahead(Adam), in under a minute.

    python -m benchmarks.demo [--steps 400] [--seeds 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx

from benchmarks import data, harness, models
from lookahead_optax import lookahead


def run(steps: int = 400, seeds: int = 3, progress: bool = True) -> dict:
  ds = data.digits()
  results = {}
  optimizers = {
      "Adam(3e-3)": lambda: optax.adam(3e-3),
      "Lookahead(Adam(3e-3), k=5, alpha=0.5)": lambda: lookahead(optax.adam(3e-3), k=5, alpha=0.5),
  }
  for name, make in optimizers.items():
    rows = []
    for seed in range(seeds):
      apply, params = harness.functional(models.MLP((64, 128, 10), rngs=nnx.Rngs(seed)))
      loss_fn = lambda p, b: harness.cross_entropy(apply(p, b.x), b.y)
      eval_fn = lambda p: {"test_acc": harness.accuracy(apply(p, ds.test.x), ds.test.y),
                           "test_loss": harness.cross_entropy(apply(p, ds.test.x), ds.test.y)}
      batches = data.batches(ds.train, 64, np.random.default_rng(seed))
      _, _, hist = harness.train(loss_fn, params, make(), batches, steps, eval_fn=eval_fn, desc=name,
                                 progress=progress)
      rows.append({"train_loss": float(hist.losses[-50:].mean()), **hist.evals[-1][1]})
    results[name] = rows
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
  args = parser.parse_args(argv)
  results = run(args.steps, args.seeds)
  rows = [[name, harness.mean_std([r["train_loss"] for r in rs]), harness.mean_std([r["test_loss"] for r in rs]),
           harness.mean_std([100 * r["test_acc"] for r in rs])] for name, rs in results.items()]
  print(f"digits MLP, {args.steps} steps, {args.seeds} seeds, mean ± std ({jax.default_backend()}):")
  print(harness.markdown_table(["optimizer", "train loss (last 50)", "test loss", "test acc %"], rows))


if __name__ == "__main__":
  main()
