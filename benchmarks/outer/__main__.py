"""``python -m benchmarks.outer``: SNOO and DiLoCo experiments; prints their verdict tables, writes their reports."""

from __future__ import annotations

import json
import os
import time

from benchmarks import outer
from benchmarks.common import report, tuning, verdicts
from benchmarks.outer import alternatives, diloco, snoo

EXPERIMENTS = {
  "snoo": (
    snoo.TASKS,
    "SNOO and Lookahead against AdamW, tuned alike",
    "SNOO / Lookahead",
  ),
  "diloco": (
    {"diloco": (diloco.TASK, diloco.FULL, diloco.QUICK)},
    "DiLoCo against synchronous data parallelism, tuned alike",
    "DiLoCo",
  ),
  "alternatives": (
    alternatives.TASKS,
    "Lookahead or something else? AdamW, its wrappers and averages of its weights, tuned alike",
    "alternative",
  ),
}
"""Experiment -> ({task name: (Task, full config, quick config)}, title, what is compared with the inner optimizer)."""
EXTRAS = {"diloco": diloco.extras_section, "alternatives": alternatives.extras_section}
MODULES = {"snoo": snoo, "diloco": diloco, "alternatives": alternatives}
"""The module of each experiment: the second paragraph of its docstring opens the report."""
BASELINE = {"alternatives": "baseline"}
"""What the verdict table calls the first method of a pair, where not "inner optimizer"."""
DEFAULT = ("snoo", "diloco")
"""What runs without --experiments (alternatives retrains AdamW, Lookahead and SNOO: run it by name)."""


def run(experiment: str, *, quick: bool = False, seeds: int = 5, out: str | None = None, log=print) -> dict:
  """Runs one experiment's tasks; writes ``<experiment>.json``, ``<experiment>.md`` and figures into ``out``."""
  tasks, title, wrapped = EXPERIMENTS[experiment]
  out = out or report.results_dir("quick_outer" if quick else "outer")
  summary = {"tasks": {}, "quick": quick, "environment": report.environment()}
  for name, (task, full, fast) in tasks.items():
    log(f"{experiment} {name}: {task.title}")
    start = time.perf_counter()
    res = tuning.run_task(task, fast if quick else full, range(seeds), log=log)
    res["seconds"] = time.perf_counter() - start
    summary["tasks"][task.name] = res
  report.write_json(os.path.join(out, f"{experiment}.json"), summary)
  write_report(experiment, summary, out)
  return summary


def write_report(experiment: str, summary: dict, out: str) -> str:
  tasks, title, wrapped = EXPERIMENTS[experiment]
  command = f"python -m benchmarks.outer --experiments {experiment}" + (" --quick" if summary["quick"] else "")
  intro = [
    f"Regenerate with `{command}`; every number below comes from `{experiment}.json` of that run.",
    "",
    " ".join(MODULES[experiment].__doc__.split("\n\n")[1].split()),
  ]
  by_name = {t.name: (t, EXTRAS.get(experiment)) for t, _, _ in tasks.values()}
  return verdicts.write_document(
    os.path.join(out, f"{experiment}.md"),
    title,
    intro,
    by_name,
    summary,
    wrapped,
    BASELINE.get(experiment, "inner optimizer"),
  )


def main(argv=None) -> dict:
  parser = report.parser("python -m benchmarks.outer", outer.__doc__)
  report.add_selection(
    parser, "--experiments", EXPERIMENTS, f"experiments to run (default: {' '.join(DEFAULT)})", default=DEFAULT
  )
  report.add_run_arguments(
    parser, quick="tiny models, a few steps, 2-point grids", seeds=5, unit="setting", folder="outer", reports="reports"
  )
  args = parser.parse_args(argv)
  out = args.out or report.results_dir("quick_outer" if args.quick else "outer")
  start = time.perf_counter()
  summaries = {}
  for experiment in args.experiments:
    if args.report_only:
      with open(os.path.join(out, f"{experiment}.json")) as f:
        summaries[experiment] = json.load(f)
      write_report(experiment, summaries[experiment], out)
    else:
      summaries[experiment] = run(experiment, quick=args.quick, seeds=args.seeds, out=out)
  for experiment, summary in summaries.items():
    tasks, title, wrapped = EXPERIMENTS[experiment]
    print(f"\n{title}: tuned against tuned, mean ± std over seeds; verdict: Welch's t-test at level 0.05.")
    baseline = BASELINE.get(experiment, "inner optimizer")
    print(
      verdicts.verdict_table({t.name: t for t, _, _ in tasks.values()}, summary, wrapped=wrapped, baseline=baseline)
    )
    if experiment == "alternatives":
      print("\n".join(alternatives.summary_lines(summary)))
    for line in verdicts.timing_lines(summary):
      print(line)
  print(
    f"Wall time {time.perf_counter() - start:.0f} s. Reports: "
    + ", ".join(os.path.join(out, f"{e}.md") for e in summaries)
  )
  return summaries


if __name__ == "__main__":
  main()
