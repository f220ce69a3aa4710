"""The paper's section-5 experiments at laptop scale, every method tuned alike.

    python -m benchmarks.paper             # full run: 4 tasks, 6-point grids, 5 seeds (about 30-45 min, 2 CPU cores)
    python -m benchmarks.paper --quick     # the headline pair of each task on 2-point grids, 5 seeds (a few minutes)

Tasks, one module each (``image``, ``lm``, ``translation``, ``noise``), each
stating only what is particular to it; the tuning protocol is
``common.tuning``, the tables and figures ``common.verdicts``.
"""

from __future__ import annotations

import json
import os
import time

from benchmarks.common import report, tuning, verdicts
from benchmarks.paper import image, lm, noise, translation

TASKS = {"image": image, "lm": lm, "translation": translation, "noise": noise}
"""Task name -> module (with ``TASK``, ``FULL``, ``QUICK``)."""
SEEDS = 5


def configs(quick: bool = False, dataset: str = "digits", data_dir: str | None = None) -> dict:
  """The per-task settings of the full or quick run (plain dicts; override entries to shrink further)."""
  out = {name: dict(mod.QUICK if quick else mod.FULL) for name, mod in TASKS.items()}
  out["image"].update(dataset=dataset, data_dir=data_dir)
  if dataset == "cifar10":
    # 32x32 colour images: the ResNet, larger shifts, more steps (one epoch of 50k images is ~780 steps of 64).
    out["image"].update(
      model="resnet",
      widths=(32, 64),
      max_shift=4,
      steps=out["image"]["steps"] * 10,
      eval_every=out["image"]["eval_every"] * 10,
    )
  return out


def run(
  tasks=tuple(TASKS),
  *,
  quick: bool = False,
  seeds: int = SEEDS,
  out: str | None = None,
  cfgs: dict | None = None,
  log=print,
) -> dict:
  """Runs ``tasks``, writing ``summary.json``, ``paper.md`` and the figures into ``out`` after each; returns the summary."""
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"tasks must be among {sorted(TASKS)}, got {unknown}.")
  if seeds < 2:
    raise ValueError(f"seeds must be >= 2 (the verdicts test a difference over seeds), got {seeds}.")
  out = out or default_out(quick)
  cfgs = cfgs or configs(quick)
  path = os.path.join(out, "summary.json")
  summary = {}
  for name in tasks:
    log(f"{name}: {TASKS[name].TASK.title}")
    start = time.perf_counter()
    result = tuning.run_task(TASKS[name].TASK, cfgs[name], range(seeds), log=log)
    result["seconds"] = time.perf_counter() - start
    summary = {"tasks": {}}
    if os.path.exists(path):  # re-read: tasks may run in separate processes into one folder
      with open(path) as f:
        earlier = json.load(f)
      if earlier.get("quick") == quick:  # never mix quick and full results in one report
        summary = earlier
    summary.update(environment=report.environment(), quick=quick)
    summary["tasks"][name] = result
    summary["tasks"] = {t: summary["tasks"][t] for t in TASKS if t in summary["tasks"]}
    report.write_json(path, summary)  # after every task, so a long run keeps what it finished
    write_report(summary, out)
  return summary


def default_out(quick: bool) -> str:
  """``benchmarks/results/paper``; a quick run writes to ``benchmarks/results/quick`` (not committed)."""
  return report.results_dir("quick" if quick else "paper")


def write_report(summary: dict, out: str) -> str:
  """``paper.md`` and the figures, from a summary."""
  command = "python -m benchmarks.paper" + (" --quick" if summary["quick"] else "")
  intro = [
    "Zhang et al., *Lookahead Optimizer: k steps forward, 1 step back* (NeurIPS 2019), sections 3.1 and 5, rerun "
    "on data that ships with Python or scikit-learn, on CPU. Regenerate with `" + command + "`. Every number "
    "below comes from `summary.json` of that run. The paper's numbers are quoted from its text; our tasks are "
    "far smaller, so compare directions and gaps, not values."
  ]
  tasks = {name: (TASKS[name].TASK, getattr(TASKS[name], "extras_section", None)) for name in summary["tasks"]}
  return verdicts.write_document(
    os.path.join(out, "paper.md"), "The paper's experiments at laptop scale", intro, tasks, summary
  )
