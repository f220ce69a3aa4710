"""bfloat16 params, float32 slow weights: progress below bfloat16 resolution.

A noisy quadratic, :math:`L(w) = \\tfrac12 \\operatorname{mean}_i (w_i - t_i)^2`,
with targets :math:`t_i \\in [1, 2)` where bfloat16 has a spacing of
:math:`2^{-7} \\approx 0.0078`, and gradients :math:`w - t + \\sigma\\xi`. The
params are bfloat16; no bfloat16 vector gets below the *grid floor*
:math:`\\tfrac12\\operatorname{mean}_i(\\operatorname{bf16}(t_i) - t_i)^2` (closed form).

The slow weights average the fast ones: ``alpha`` is the schedule
:math:`1/(n+1)` of the number of completed syncs :math:`n`, so after :math:`N`
syncs the slow weights are the running mean of the :math:`N` fast snapshots
(Polyak averaging, every k steps). Each slow step adds :math:`(\\theta - \\phi)/(n+1)`,
which soon falls below half a bfloat16 spacing: slow weights kept in bfloat16
stall there, while ``slow_dtype=jnp.float32`` keeps averaging and goes below the
grid floor. Compared: SGD in bfloat16 and float32, Lookahead averaging with
bfloat16 slow weights, and with float32 slow weights (loss at the slow weights).

Regenerate ``benchmarks/results/mixed_precision/mixed_precision.{json,png}``:

    python -m benchmarks.mixed_precision [--steps 10000] [--dim 4096]

k=20 with SGD(0.2) lets the fast weights forget where each cycle started
((1 - 0.2)^20 ~ 0.01), so the snapshots are samples of the noisy iterates
rather than of the rounded slow weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import report
from benchmarks.common import train as training
from lookahead_optax import lookahead


class Problem(NamedTuple):
  """The noisy quadratic: targets (float32) and the gradient noise scale."""

  target: jax.Array
  sigma: float


def make_problem(dim: int = 4096, sigma: float = 0.1, seed: int = 0) -> Problem:
  rng = np.random.default_rng(seed)
  return Problem(jnp.asarray(rng.uniform(1.0, 2.0, dim), jnp.float32), sigma)


def loss(problem: Problem, w) -> jax.Array:
  """The loss in float32 at ``w`` (any float dtype)."""
  return 0.5 * jnp.mean((w.astype(jnp.float32) - problem.target) ** 2)


def grid_floor(problem: Problem, dtype=jnp.bfloat16) -> float:
  """The smallest loss any ``dtype`` vector reaches: each coordinate at the target rounded to ``dtype``."""
  return float(loss(problem, problem.target.astype(dtype)))


def averaging_alpha(burn: int):
  """``alpha(n)``: 0.5 for the first ``burn`` syncs, then ``1 / (n - burn + 1)`` (a running mean)."""
  return lambda n: jnp.where(n < burn, 0.5, 1.0 / (n - burn + 1.0))


def averaging(k: int = 20, slow_dtype=None, lr: float = 0.2, burn: int = 20) -> optax.GradientTransformation:
  """Lookahead(SGD) whose slow weights become the running mean of the fast snapshots after ``burn`` syncs."""
  return lookahead(optax.sgd(lr), k, alpha=averaging_alpha(burn), slow_dtype=slow_dtype)


def optimizers(k: int = 20, lr: float = 0.2, burn: int = 20) -> dict:
  """``name -> (optimizer, params dtype)``."""
  return {
    "SGD, float32 params": (optax.sgd(lr), jnp.float32),
    "SGD, bfloat16 params": (optax.sgd(lr), jnp.bfloat16),
    "Lookahead averaging, bfloat16 params and slow weights": (averaging(k, None, lr, burn), jnp.bfloat16),
    "Lookahead averaging, bfloat16 params, float32 slow weights": (averaging(k, jnp.float32, lr, burn), jnp.bfloat16),
  }


def train(problem: Problem, opt: optax.GradientTransformation, dtype, steps: int, seed: int = 0):
  """``(losses, params, state)``: the loss after every step, at the slow weights when there are any."""
  params = jnp.ones_like(problem.target, dtype)
  state = opt.init(params)

  def step(carry, t):
    params, state = carry
    noise = problem.sigma * jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), params.shape)
    grads = (params.astype(jnp.float32) - problem.target + noise).astype(dtype)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    at = training.slow_or_params(params, state, keep_dtype=True)
    return (params, state), loss(problem, at)

  (params, state), losses = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((params, state))
  return np.asarray(losses), params, state


def run(
  steps: int = 10000, dim: int = 4096, k: int = 20, lr: float = 0.2, sigma: float = 0.1, burn: int = 20, seed: int = 0
) -> dict:
  problem = make_problem(dim, sigma, seed)
  curves = {name: train(problem, opt, dtype, steps, seed)[0] for name, (opt, dtype) in optimizers(k, lr, burn).items()}
  return {
    "config": dict(steps=steps, dim=dim, k=k, lr=lr, sigma=sigma, burn=burn, seed=seed),
    "bf16_grid_floor": grid_floor(problem),
    "curves": curves,
  }


def plot(results: dict, path: str) -> str:
  fig, ax = report.pyplot().subplots(figsize=(7, 4.2))
  for name, losses in results["curves"].items():
    ax.plot(np.arange(1, len(losses) + 1), losses, label=name, lw=1.2)
  ax.axhline(
    results["bf16_grid_floor"], color="k", ls="--", lw=1, label="bfloat16 grid floor (best any bf16 vector can do)"
  )
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="step",
    ylabel="loss (float32, at the slow weights for Lookahead)",
    title="bfloat16 params: float32 slow weights keep averaging below bf16 resolution",
  )
  ax.title.set_fontsize(10)
  ax.legend(fontsize=7, loc="lower left")
  return report.save_figure(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10000, help="steps per run (default 10000)")
  parser.add_argument("--dim", type=int, default=4096, help="number of coordinates (default 4096)")
  parser.add_argument("--k", type=int, default=20, help="Lookahead sync period (default 20)")
  parser.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (default 0.2)")
  parser.add_argument("--sigma", type=float, default=0.1, help="gradient noise scale (default 0.1)")
  parser.add_argument("--burn", type=int, default=20, help="syncs at alpha=0.5 before averaging (default 20)")
  parser.add_argument(
    "--out",
    default=os.path.join(report.results_dir("mixed_precision"), "mixed_precision"),
    help="results path without extension: writes .json and .png",
  )
  args = parser.parse_args(argv)
  results = run(args.steps, args.dim, args.k, args.lr, args.sigma, args.burn)
  plot(results, args.out + ".png")
  checkpoints = sorted({s for s in (100, 1000, args.steps // 2, args.steps) if s <= args.steps})
  summary = {name: {str(s): float(c[s - 1]) for s in checkpoints} for name, c in results["curves"].items()}
  report.write_json(
    args.out + ".json",
    {
      "command": " ".join(["python -m benchmarks.mixed_precision", *(sys.argv[1:] if argv is None else argv)]),
      "config": results["config"],
      "bf16_grid_floor": results["bf16_grid_floor"],
      "loss_at_step": summary,
      "environment": report.environment(),
    },
  )
  rows = [[name] + [summary[name][str(s)] for s in checkpoints] for name in summary]
  print(f"bfloat16 grid floor: {results['bf16_grid_floor']:.3g}")
  print(report.markdown_table(["optimizer"] + [f"loss @ {s}" for s in checkpoints], rows))


if __name__ == "__main__":
  main()
