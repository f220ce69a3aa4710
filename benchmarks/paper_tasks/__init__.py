"""Pieces shared by the paper's experiments (``python -m benchmarks.paper``).

Each task module (``image``, ``lm``, ``nmt``) states only what is particular to
it: its data, model, optimizers, grids and metrics. Here: learning-rate
schedules written so that one compiled step serves every learning rate
(``with_lr``), the tune-then-seeds protocol of the paper (``Sweep``), loss
curves for the figures, and mean/std summaries.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
import optax


def with_lr(direction: optax.GradientTransformation, lr: float,
            schedule: Callable | None = None) -> optax.GradientTransformation:
  """``direction`` (momentum, Adam moments, ...) scaled by ``-lr * schedule(step)``.

  The learning rate lives in the optimizer state (``inject_hyperparams``), not
  in the compiled program, so runs over a learning-rate grid share one
  compilation (with JAX's persistent cache).
  """
  parts = [direction]
  if schedule is not None:
    parts.append(optax.scale_by_schedule(schedule))
  parts.append(optax.inject_hyperparams(optax.scale)(step_size=-float(lr)))
  return optax.chain(*parts)


def step_decay(steps: int, at=(0.3, 0.6, 0.8), factor: float = 0.2) -> Callable:
  """The paper's CIFAR schedule shape: multiply by ``factor`` at these fractions of training."""
  return optax.piecewise_constant_schedule(1.0, {max(1, int(f * steps)): factor for f in at})


def warmup_rsqrt(warmup: int, use_warmup: bool = True) -> Callable:
  """Vaswani et al.'s shape, peak 1 at ``warmup``: ``min(t / w, sqrt(w / t))``; without warmup ``min(1, sqrt(w / t))``."""
  w = float(max(warmup, 1))

  def schedule(count):
    t = jnp.maximum(count.astype(jnp.float32) + 1.0, 1.0)
    decay = jnp.sqrt(w / t)
    return jnp.minimum(t / w, decay) if use_warmup else jnp.minimum(1.0, decay)

  return schedule


def curve(losses: np.ndarray, points: int = 100) -> list:
  """``[[step, mean loss over the bin], ...]``: at most ``points`` bins, for figures and JSON."""
  losses = np.asarray(losses, dtype=float)
  if losses.size == 0:
    return []
  bins = np.array_split(np.arange(losses.size), min(points, losses.size))
  return [[int(b[-1]) + 1, float(losses[b].mean())] for b in bins]


def tail_mean(losses: np.ndarray, fraction: float = 0.1) -> float:
  """Mean training loss over the last ``fraction`` of steps (the 'final train loss')."""
  losses = np.asarray(losses, dtype=float)
  return float(losses[-max(1, int(fraction * losses.size)):].mean())


class Sweep:
  """Runs ``run_one(optimizer, lr, seed, **extra) -> dict`` once per distinct setting (memoised).

  ``tune`` picks the learning rate on seed 0 by ``metric`` (the paper's grid
  search); ``seeds`` then repeats the chosen setting; runs already made while
  tuning are reused, so every number comes from one run.
  """

  def __init__(self, run_one: Callable[..., dict]):
    self.run_one = run_one
    self.cache: dict = {}

  def __call__(self, optimizer: str, lr: float, seed: int = 0, **extra) -> dict:
    key = (optimizer, float(lr), int(seed), tuple(sorted(extra.items())))
    if key not in self.cache:
      self.cache[key] = self.run_one(optimizer, lr, seed, **extra)
    return self.cache[key]

  def tune(self, optimizer: str, grid: Iterable[float], metric: str, higher_is_better: bool) -> dict:
    """``{"grid": {lr: metric}, "best": lr}`` over seed 0; a diverged run (nan) never wins."""
    scores = {float(lr): float(self(optimizer, lr, 0)[metric]) for lr in grid}
    finite = {lr: s for lr, s in scores.items() if np.isfinite(s)} or scores
    pick = max if higher_is_better else min
    return {"grid": scores, "best": pick(finite, key=finite.get), "metric": metric}

  def seeds(self, optimizer: str, lr: float, seeds: int, **extra) -> list[dict]:
    return [self(optimizer, lr, seed, **extra) for seed in range(seeds)]


def summarize(rows: list[dict], keys: Iterable[str]) -> dict:
  """``{key: {"mean", "std", "values"}}`` over seeds (population std, as ``harness.mean_std``)."""
  out = {}
  for key in keys:
    values = np.asarray([r[key] for r in rows], dtype=float)
    out[key] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
  return out


def cell(summary: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
  """``"mean ± std"`` of one summarised metric, for the markdown tables."""
  s = summary[key]
  return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"




def verdict(la: str, base: str, summaries: dict, key: str, higher_is_better: bool, label: str,
            scale: float = 1.0, unit: str = "") -> str:
  """One plain sentence: did ``la`` beat ``base`` on ``key``, by how much, and is it beyond the seed spread?"""
  a, b = summaries[la][key], summaries[base][key]
  diff = scale * (a["mean"] - b["mean"])
  better = diff > 0 if higher_is_better else diff < 0
  spread = scale * (a["std"] + b["std"])
  if len(a.get("values", [0, 0])) < 2:
    size = "one seed, so no spread to judge it by"
  else:
    size = "clearly (more than the two seed std's added)" if abs(diff) > spread else "within the seed spread"
  word = "beats" if better else ("ties" if diff == 0 else "loses to")
  return (f"{la} {word} {base} on {label}: {scale * a['mean']:.4g}{unit} vs {scale * b['mean']:.4g}{unit} "
          f"({diff:+.3g}{unit}), {size}.")


def loss_at(curves: list, fraction: float) -> tuple[float, int]:
  """``(mean over seeds of the binned train loss, step)`` at ``fraction`` of training."""
  arr = np.asarray(curves, dtype=float)
  i = min(arr.shape[1] - 1, max(0, int(round(fraction * arr.shape[1])) - 1))
  return float(arr[:, i, 1].mean()), int(arr[0, i, 0])


def early_sentence(la: str, base: str, main: dict, fraction: float = 0.25) -> str:
  """Train loss of ``la`` vs ``base`` a quarter into training: the paper's 'faster early progress' claim."""
  a, step = loss_at(main[la]["curves"], fraction)
  b, _ = loss_at(main[base]["curves"], fraction)
  word = "lower than" if a < b else ("higher than" if a > b else "equal to")
  return f"At step {step} ({fraction:.0%} of training) {la}'s train loss is {word} {base}'s: {a:.5g} vs {b:.5g}."


def padded_chunks(split, chunk: int):
  """``(x, y, n)`` chunks of ``split``, the last one zero-padded to ``chunk`` rows (``n`` real rows).

  One shape for every chunk and split, so the evaluation compiles once.
  """
  for i in range(0, len(split.x), chunk):
    x, y = split.x[i : i + chunk], split.y[i : i + chunk]
    n = len(x)
    if n < chunk:
      x = np.concatenate([x, np.zeros((chunk - n,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((chunk - n,) + y.shape[1:], y.dtype)])
    yield x, y, n
