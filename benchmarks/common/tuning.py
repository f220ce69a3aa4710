"""Equal tuning, then tuned against tuned: the protocol of every optimizer comparison.

- Every method gets the same number of *tuning settings*, chosen on the
  validation split: an inner optimizer X tries the learning rates
  ``grids["X"]``; a wrapper around it, W(X), tries ``grids["W(X)"]`` times its
  second axis, the same number of points in all. For Lookahead, LA(X), the
  second axis is alpha in ``ALPHAS`` (a traced value); for another wrapper
  (SNOO) it is ``cfg["variants"]["W"]``, settings fixed at compile time, one
  program each. Wrapped rates may sit higher, as the Lookahead paper
  recommends. A method's tuned setting has the best mean validation score
  over the seeds; a setting in which any seed diverged never wins.
- Every setting runs every seed (the same seeds, so the same initialisations
  and batch orders, for every method), a method's settings in one compiled
  program (``grid.train_grid``), one vmapped chunk of seeds per setting, so a
  run gives the same numbers, to the bit, whatever else its grid holds.
- LA(X) also runs at alpha 0.5 on every rate of X's grid (``cfg["sensitivity"]``:
  True, False or the LA families that do). Those extra runs are never eligible
  for tuning; they give the learning-rate sensitivity curve and "Lookahead at
  the inner optimizer's tuned rate", the robustness result.

A task (``paper.image``, ``outer.snoo``, ...) states what is particular to it
in a ``Task``; ``run_task`` trains it, ``verdicts`` reports it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import optax

from benchmarks.common import baselines, grid, stats
from lookahead_optax import lookahead

ALPHAS = (0.5, 0.8)
"""Lookahead's slow step sizes, tried inside its tuning budget."""
ROBUST_ALPHA = 0.5
"""The alpha of the sensitivity sweep and of the robustness comparison (the paper's default)."""


class Metric(NamedTuple):
  """A number a task reports: its key in the results, how to print it, which way is better."""

  key: str
  label: str
  higher_is_better: bool
  scale: float = 1.0
  digits: int = 2

  def cell(self, values) -> str:
    v = self.scale * np.asarray(values, dtype=float)
    return f"{v.mean():.{self.digits}f} ± {v.std():.{self.digits}f}"


class Task(NamedTuple):
  """What a task module defines, gathered: see ``image.TASK`` for an example."""

  name: str
  title: str
  select: Metric
  """Validation metric that picks each method's tuned setting (and the sensitivity curve)."""
  headline: Metric
  """Test metric of the verdicts."""
  columns: tuple
  """Metrics of the main table."""
  tolerance: tuple
  """``(tolerance, relative)`` of the learning-rate range (``stats.lr_range``) on ``select``."""
  paper: dict
  """``"X vs LA(X)" -> what the paper reports`` for each verdict."""
  problem: Callable
  """``cfg -> grid.Problem``."""
  optimizer: Callable
  """``(family, cfg) -> (hp -> GradientTransformation)``."""
  finals: Callable
  """``(cfg, problem, Grid) -> {weights name: {metric: [runs]}}``: metrics of the final weights."""
  methods: dict | None = None
  """``method -> (family, weights)`` for the methods that are not a family of their own (Polyak: ``polyak_of``): the
  program that trains it and which of its weights to evaluate; any other method is its own family, on ``"main"``.
  ``weights`` may be a tuple of names: then each name is a setting of the method (``"variant"``), on each of its rates
  ``cfg["grids"][method]`` (a subset of the family's; default all), the budget their product (``method_settings``)."""
  paper_table: tuple = ([], {})
  """``(column headers, {method: cells})``: the paper's numbers, printed beside the main table ("-" for a method
  the paper does not report)."""
  weights: Callable | None = None
  """``(family, cfg) -> weights(params, opt_state) -> {name: weights}``; default ``grid.main_weights``."""
  extras: Callable | None = None
  """``(cfg, problem, result, seeds) -> dict`` of extra sections (full run only), or None."""
  sweep: Metric | None = None
  """Metric of the learning-rate sensitivity view, if not ``select``."""


def family_of(task: Task, method: str) -> tuple[str, str | tuple]:
  """``(family, weights name or names)`` of a method of ``task``."""
  return (task.methods or {}).get(method, (method, "main"))


def wrapper_of(method: str) -> str | None:
  """``"LA(SGD)" -> "LA"``, ``"SNOO(AdamW)" -> "SNOO"``; None for an unwrapped optimizer."""
  match = re.fullmatch(r"([\w-]+)\((.*)\)", method)
  return match.group(1) if match else None


def is_lookahead(method: str) -> bool:
  return wrapper_of(method) == "LA"


def inner_of(method: str) -> str:
  """``"LA(SGD)" -> "SGD"``; an unwrapped optimizer is its own inner optimizer."""
  match = re.fullmatch(r"([\w-]+)\((.*)\)", method)
  return match.group(2) if match else method


def optimizer_of(
  family: str, inner: Callable[[str, dict, dict], optax.GradientTransformation], cfg: dict, polyak: tuple = ()
) -> Callable[[dict], optax.GradientTransformation]:
  """``hp -> optimizer`` of a family: ``inner(name, hp, cfg)`` bare, in Lookahead (``cfg["k"]``, ``hp["alpha"]``),
  or, for the families in ``polyak``, keeping the Polyak average of its iterates over the second half of training.
  """

  def make(hp):
    tx = inner(inner_of(family), hp, cfg)
    if is_lookahead(family):
      return lookahead(tx, cfg["k"], hp["alpha"])
    return baselines.polyak_average(tx, start=cfg["steps"] // 2) if family in polyak else tx

  return make


def weights_of(family: str, polyak: tuple = ()) -> Callable:
  """What a family's runs evaluate: the main weights, and for the families in ``polyak`` their Polyak average."""
  if family in polyak:
    return lambda params, opt_state: {"main": params, "polyak": baselines.polyak_params(params, opt_state)}
  return grid.main_weights


def polyak_of(inner: str) -> dict:
  """``Task`` fields of a method "Polyak": the Polyak average of ``inner``'s runs, evaluated from the same runs.

  The task's optimizer keeps the average: ``optimizer_of(..., polyak=(inner,))``.
  """
  return dict(methods={"Polyak": (inner, "polyak")}, weights=lambda family, cfg: weights_of(family, polyak=(inner,)))


def headline_run(full: dict, grids: dict, **overrides) -> dict:
  """The quick run of a task: only the pair X, LA(X) of ``grids`` (its two keys, in that order) on those rates,
  without the learning-rate sensitivity sweep; ``overrides`` change other entries of ``full``."""
  pair = tuple(grids)
  if len(pair) != 2 or pair[1] != f"LA({pair[0]})":
    raise ValueError(f"headline_run: grids must hold X and LA(X), in that order, got {list(grids)}.")
  return dict(full, grids=grids, methods=pair, pairs=(pair,), sensitivity=False, **overrides)


def settings(family: str, cfg: dict) -> list[dict]:
  """The settings a family trains, each ``{"lr", ["alpha" | "variant"], "eligible"}``.

  The eligible ones are the family's tuning budget.
  """
  wrapper, lrs = wrapper_of(family), [float(lr) for lr in cfg["grids"][family]]
  if wrapper is None:
    return [{"lr": lr, "eligible": True} for lr in lrs]
  if wrapper != "LA":
    return [{"lr": lr, "variant": v, "eligible": True} for v in cfg["variants"][wrapper] for lr in lrs]
  out = [{"lr": lr, "alpha": a, "eligible": True} for lr in lrs for a in ALPHAS]
  sensitivity = cfg.get("sensitivity", True)
  if sensitivity is True or family in (sensitivity or ()):
    out += [
      {"lr": float(lr), "alpha": ROBUST_ALPHA, "eligible": False}
      for lr in cfg["grids"][inner_of(family)]
      if not any(np.isclose(lr, s["lr"]) and s["alpha"] == ROBUST_ALPHA for s in out)
    ]
  return out


def method_settings(task: Task, method: str, cfg: dict) -> list[dict]:
  """The settings of ``method``: its family's, or for a method with several weights names (``Task.methods``) each
  name (``"variant"``) on each of the family's settings at the method's own rates."""
  family, names = family_of(task, method)
  if isinstance(names, str):
    return settings(family, cfg)
  return [dict(s, variant=name) for name in names for s in settings(family, cfg) if _on_grid(s, method, cfg)]


def _on_grid(setting: dict, method: str, cfg: dict) -> bool:
  lrs = cfg["grids"].get(method)
  return lrs is None or any(np.isclose(setting["lr"], lr) for lr in lrs)


def check_budget(task: Task, cfg: dict) -> int:
  """The tuning budget (settings per method), the same for every method of ``cfg["methods"]``, or a ValueError."""
  budgets = {m: sum(s["eligible"] for s in method_settings(task, m, cfg)) for m in cfg["methods"]}
  if len(set(budgets.values())) != 1:
    raise ValueError(f"{task.name}: every method needs the same number of tuning settings, got {budgets}.")
  return next(iter(budgets.values()))


def run_task(task: Task, cfg: dict, seeds: Sequence[int], log: Callable[[str], None] = print) -> dict:
  """Trains every method of ``cfg["methods"]`` on every setting and seed; returns the task's results (JSON-ready)."""
  budget = check_budget(task, cfg)
  seeds = [int(s) for s in seeds]
  problem = task.problem(cfg)
  families = list(dict.fromkeys(family_of(task, m)[0] for m in cfg["methods"]))
  result: dict[str, Any] = {
    "task": task.name,
    "config": dict(cfg),
    "seeds": seeds,
    "budget": budget,
    "methods": {},
    "programs": [],
  }
  trained = {}  # (family, variant) -> (grid, finals): methods sharing a family (SGD and Polyak) share its runs
  for family in families:
    rows = {m: [] for m in cfg["methods"] if family_of(task, m)[0] == family}
    for variant in dict.fromkeys(s.get("variant") for s in settings(family, cfg)):
      sets = [s for s in settings(family, cfg) if s.get("variant") == variant]
      if (family, variant) not in trained:
        trained[family, variant] = _train_program(
          task, problem, family, dict(cfg, variant=variant), sets, seeds, result, log
        )
      for method, method_rows in rows.items():
        names = family_of(task, method)[1]
        if isinstance(names, str):
          method_rows += _rows(sets, len(seeds), *trained[family, variant], names)
          continue
        for name in names:  # the method's settings: each of its weights names on its own rates
          found = zip(sets, _rows(sets, len(seeds), *trained[family, variant], name))
          method_rows += [dict(row, variant=name) for s, row in found if _on_grid(s, method, cfg)]
    for method, method_rows in rows.items():
      result["methods"][method] = {
        "family": family,
        "settings": method_rows,
        "best": best_setting(method_rows, task.select),
      }
  if task.extras is not None and cfg.get("extras", True):
    result["extras"] = task.extras(cfg, problem, result, seeds)
  return result


def _train_program(task, problem, family, cfg, sets, seeds, result, log):
  """``(Grid, finals)`` of ``sets`` x ``seeds`` trained in one program; logs and records its compile and run time."""
  hparams, seed_axis = grid.settings_by_seeds([{k: s[k] for k in ("lr", "alpha") if k in s} for s in sets], seeds)
  # One chunk per setting: a setting's runs are then the same, to the bit, in a quick run as in the full run.
  g = grid.train_grid(
    problem,
    task.optimizer(family, cfg),
    hparams,
    seed_axis,
    cfg["steps"],
    cfg["eval_every"],
    weights=task.weights(family, cfg) if task.weights else grid.main_weights,
    chunk=len(seeds),
  )
  start = time.perf_counter()
  finals = task.finals(cfg, problem, g)
  eval_s = time.perf_counter() - start
  result["eval_steps"] = g.eval_steps.tolist()
  what = family + (f" [{cfg['variant']}]" if cfg["variant"] else "")
  result["programs"].append(
    {
      "family": what,
      "runs": len(seed_axis),
      "settings": len(sets),
      "compile_s": g.compile_seconds,
      "run_s": g.run_seconds,
      "final_eval_s": eval_s,
    }
  )
  log(
    f"  {task.name} {what}: {len(sets)} settings x {len(seeds)} seeds in one program, compiled in "
    f"{g.compile_seconds:.1f} s, trained in {g.run_seconds:.1f} s, final evaluation {eval_s:.1f} s"
  )
  return g, finals


def _rows(sets, n_seeds, g, finals, weights_name) -> list[dict]:
  """One row per setting: its metrics and curves over the seeds (of the weights named ``weights_name``)."""
  rows = []
  for i, s in enumerate(sets):
    runs = slice(i * n_seeds, (i + 1) * n_seeds)
    rows.append(
      {
        **s,
        "metrics": {k: v[runs].tolist() for k, v in finals[weights_name].items()},
        "curves": {k: v[runs].tolist() for k, v in g.curves[weights_name].items()},
        "loss_curve": binned(g.losses[runs].mean(0)),
      }
    )
  return rows


def best_setting(rows: list[dict], metric: Metric) -> int:
  """Index of the eligible setting with the best mean ``metric`` over seeds; a diverged seed disqualifies."""
  sign = 1.0 if metric.higher_is_better else -1.0
  scores = [
    sign * np.mean(r["metrics"][metric.key])
    if r["eligible"] and np.isfinite(r["metrics"][metric.key]).all()
    else -np.inf
    for r in rows
  ]
  if not np.isfinite(scores).any():
    return int(next(i for i, r in enumerate(rows) if r["eligible"]))  # all diverged: report the first
  return int(np.argmax(scores))


def tuned(result: dict, method: str) -> dict:
  """The tuned setting of ``method`` (its row: lr, alpha, metrics over seeds, curves)."""
  m = result["methods"][method]
  return m["settings"][m["best"]]


def at_inner_rate(result: dict, base: str, la: str) -> dict | None:
  """LA's row at alpha 0.5 and ``base``'s tuned rate (the robustness setting), if it was run."""
  lr = tuned(result, base)["lr"]
  for row in result["methods"][la]["settings"]:
    if np.isclose(row["lr"], lr) and row.get("alpha") == ROBUST_ALPHA:
      return row
  return None


def comparison(a: dict, b: dict, metric: Metric) -> dict:
  """Row ``a`` against row ``b`` on ``metric`` over seeds (``stats.compare``), JSON-ready."""
  c = stats.compare(a["metrics"][metric.key], b["metrics"][metric.key], metric.higher_is_better)
  return {"diff": c.diff, "interval": list(c.interval), "p": c.p, "verdict": c.verdict}


def sensitivity(result: dict, method: str, metric: Metric, tolerance: tuple) -> dict:
  """Mean and std over seeds of ``metric`` against the learning rate, and the good range (``stats.lr_range``).

  For LA(X): its alpha-0.5 runs (on X's grid and its own rates).
  """
  rows = [r for r in result["methods"][method]["settings"] if r.get("alpha", ROBUST_ALPHA) == ROBUST_ALPHA]
  rows.sort(key=lambda r: r["lr"])
  values = np.asarray([r["metrics"][metric.key] for r in rows], dtype=float)
  mean = np.where(np.isfinite(values).all(1), values.mean(1), np.nan)
  span = stats.lr_range([r["lr"] for r in rows], mean, tolerance[0], metric.higher_is_better, relative=tolerance[1])
  return {"lrs": [r["lr"] for r in rows], "mean": mean.tolist(), "std": values.std(1).tolist(), "range": span._asdict()}


def binned(x: np.ndarray, points: int = 100) -> list:
  """``[[step, mean over the bin], ...]``: at most ``points`` bins of a per-step curve."""
  x = np.asarray(x, dtype=float)
  bins = np.array_split(np.arange(x.size), min(points, x.size))
  return [[int(b[-1]) + 1, float(x[b].mean())] for b in bins]


def final_metrics(evaluate: Callable, prob: grid.Problem, g: grid.Grid) -> dict:
  """``Task.finals`` from ``evaluate(weights, data) -> {metric: value}``: its metrics of every run's final weights of
  each name, and the final training loss (``tail_mean``) as ``train_loss``."""
  train_loss = tail_mean(g.losses)
  return {name: {**grid.map_runs(evaluate, w, prob.data), "train_loss": train_loss} for name, w in g.weights.items()}


def tail_mean(losses: np.ndarray, fraction: float = 0.1) -> np.ndarray:
  """Mean training loss over the last ``fraction`` of steps, per run (the 'final train loss')."""
  losses = np.asarray(losses, dtype=float)
  return losses[:, -max(1, int(fraction * losses.shape[1])) :].mean(1)
