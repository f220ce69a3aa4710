"""``python -m benchmarks.paper``: run the paper suite, print the verdict table, write the report."""

from __future__ import annotations

import json
import os
import time

from benchmarks import paper
from benchmarks.common import report, verdicts


def main(argv=None) -> dict:
  parser = report.parser("python -m benchmarks.paper", paper.__doc__)
  parser.add_argument(
    "--quick",
    action="store_true",
    help="the headline pair of each task on 2-point grids (a subset of the full grids), 5 seeds",
  )
  report.add_selection(
    parser, "--tasks", paper.TASKS, "tasks to run (default: all); results of other tasks already in --out are kept"
  )
  parser.add_argument("--seeds", type=int, default=paper.SEEDS, help=f"seeds per setting (default {paper.SEEDS})")
  parser.add_argument(
    "--out",
    default=None,
    help="output folder (default benchmarks/results/paper; with --quick "
    "benchmarks/results/quick, so a quick run never overwrites the full results)",
  )
  parser.add_argument(
    "--dataset",
    default="digits",
    choices=["digits", "cifar10"],
    help="image task data: scikit-learn digits (default) or CIFAR-10 binary files",
  )
  parser.add_argument(
    "--data-dir", default=None, help="directory holding cifar-10-batches-bin (with --dataset cifar10)"
  )
  parser.add_argument(
    "--report-only", action="store_true", help="train nothing: rewrite paper.md and the figures from --out/summary.json"
  )
  args = parser.parse_args(argv)
  out = args.out or paper.default_out(args.quick)
  start = time.perf_counter()
  if args.report_only:
    with open(os.path.join(out, "summary.json")) as f:
      summary = json.load(f)
    paper.write_report(summary, out)
  else:
    if args.dataset == "cifar10" and not args.data_dir:
      parser.error("--dataset cifar10 needs --data-dir (the cifar-10-batches-bin directory)")
    summary = paper.run(
      args.tasks,
      quick=args.quick,
      seeds=args.seeds,
      out=out,
      cfgs=paper.configs(args.quick, args.dataset, args.data_dir),
    )
  tasks = {name: paper.TASKS[name].TASK for name in summary["tasks"]}
  print()
  print("Tuned against tuned, mean ± std over seeds; verdict: Welch's t-test at level 0.05, else a tie.")
  print(verdicts.verdict_table(tasks, summary))
  print()
  for line in verdicts.timing_lines(summary):
    print(line)
  print(f"Wall time {time.perf_counter() - start:.0f} s. Full report: {os.path.join(out, 'paper.md')}")
  return summary


if __name__ == "__main__":
  main()
