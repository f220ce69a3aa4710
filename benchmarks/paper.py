"""The paper's section-5 experiments at laptop scale: image classification, language modelling, translation.

    python -m benchmarks.paper                 # full run (about 35-45 min on 2 CPU cores), 3 seeds
    python -m benchmarks.paper --quick         # smoke run, 1 seed, a few dozen steps per task (< 3 min)
    python -m benchmarks.paper --tasks image --dataset cifar10 --data-dir ~/data/cifar-10-batches-bin

Tasks (each in ``benchmarks/paper_tasks/``, which says what is particular to it):

- ``image``: ResNet on digits (or CIFAR-10) with shift augmentation; SGD, Polyak,
  Adam, LA(SGD), LA(Adam) (Table 1, Fig. 5); robustness to the inner learning
  rate and momentum (Fig. 8); k x alpha grid (Fig. 9, Table 5); inner vs outer
  loop accuracy trace (Fig. 10).
- ``lm``: character LSTM on CPython's pydoc text; SGD, LA(SGD), Adam, LA(Adam),
  Polyak; train/val/test perplexity (Table 3, Fig. 7a).
- ``nmt``: Transformer on English -> German number words; Adam, LA(Adam), Adam
  and LA(Adam) without warmup, Adafactor; exact match and BLEU (Table 4,
  Fig. 7b) and peak-learning-rate robustness.

Every baseline's learning rate is tuned over a small grid on seed 0 (on a
validation split); the chosen setting then runs ``--seeds`` seeds (0, 1, ...),
reported as mean ± std. Lookahead runs at its inner optimizer's tuned learning
rate with k=5, alpha=0.5, untuned.

Writes to ``--out`` (default ``benchmarks/results/``): ``summary.json`` (every
number and curve, with versions and device; tasks run now replace those of an
earlier run, others are kept), ``paper.md`` (our tables next to the paper's)
and ``paper_*.png`` figures. The committed results come from
``python -m benchmarks.paper``. JAX's persistent compilation cache (``--jax-cache``)
lets runs that differ only in learning rate or seed share one compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import harness
from benchmarks.paper_tasks import image, lm, nmt

TASKS = {"image": image, "lm": lm, "nmt": nmt}


def configs(quick: bool, dataset: str = "digits", data_dir: str | None = None) -> dict:
  """The per-task settings of the full or quick run (plain dicts; override entries to shrink further)."""
  out = {name: dict(mod.QUICK if quick else mod.FULL) for name, mod in TASKS.items()}
  out["image"].update(dataset=dataset, data_dir=data_dir)
  if dataset == "cifar10":
    # 32x32 images: wider network, larger shifts, more steps (one epoch of 50k images is ~780 steps of 64).
    out["image"].update(widths=(32, 64), max_shift=4, steps=out["image"]["steps"] * 10,
                        eval_every=out["image"]["eval_every"] * 10)
  return out


def run(tasks=("image", "lm", "nmt"), *, quick: bool = False, seeds: int | None = None,
        out: str = harness.RESULTS, cfgs: dict | None = None, progress: bool = True) -> dict:
  """Runs ``tasks``, then writes ``summary.json``, ``paper.md`` and the figures into ``out``; returns the summary."""
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"tasks must be among {sorted(TASKS)}, got {unknown}.")
  seeds = seeds if seeds is not None else (1 if quick else 3)
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}.")
  cfgs = cfgs or configs(quick)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "summary.json")
  summary = {}
  for task in tasks:
    start = time.perf_counter()
    result = TASKS[task].run(cfgs[task], seeds=seeds, progress=progress)
    result["seconds"] = time.perf_counter() - start
    result["seeds"] = seeds
    # Re-read before writing: tasks may run in separate processes into one directory.
    summary = {"tasks": {}}
    if os.path.exists(path):
      with open(path) as f:
        earlier = json.load(f)
      if earlier.get("quick") == quick:  # never mix quick and full results in one report
        summary = earlier
    summary.update(environment=harness.environment(), quick=quick, seeds=seeds)
    summary["tasks"][task] = result
    harness.write_json(path, summary)  # after every task, so a long run keeps what it finished
    write_report(summary, out)
  return summary


def write_report(summary: dict, out: str) -> str:
  """``paper.md`` and the figures from a summary."""
  env = summary["environment"]
  sections = []
  for task, mod in TASKS.items():
    if task in summary["tasks"]:
      res = summary["tasks"][task]
      sections.append(mod.report(res, out) + f"\n\n(Task wall time {res['seconds'] / 60:.1f} min, {res['seeds']} seed(s).)")
  header = [
      "# The paper's experiments at laptop scale",
      "",
      "Zhang et al., *Lookahead Optimizer: k steps forward, 1 step back* (NeurIPS 2019), section 5, rerun on "
      "data that ships with Python or scikit-learn, on CPU. Regenerate with `python -m benchmarks.paper` "
      "(`--quick` for a smoke run); see `benchmarks/paper.py`. Every number below comes from `summary.json` "
      "of that run. The paper's numbers are quoted from its text; the tasks are far smaller, so compare "
      "directions and gaps, not values.",
      "",
      "Protocol: each baseline's learning rate is tuned over a small grid on seed 0 (validation split); the chosen "
      "setting runs seeds 0.." + str(summary["seeds"] - 1) + ", mean ± std (population std). Lookahead (k=5, "
      "alpha=0.5) runs at its inner optimizer's tuned learning rate, not tuned itself. Every optimizer sees the "
      "same batches for the same seed.",
      "",
      "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ("; **quick mode**" if summary["quick"] else "")
      + ".",
      "",
  ]
  text = "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"
  path = os.path.join(out, "paper.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 seed, one-point grids")
  parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                      help="tasks to run (default: all); results of other tasks already in --out are kept")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; 1 with --quick)")
  parser.add_argument("--out", default=None,
                      help="output directory (default benchmarks/results; with --quick benchmarks/results/quick, "
                           "so that a smoke run never overwrites the committed full results)")
  parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"],
                      help="image task data: scikit-learn digits (default) or CIFAR-10 binary files")
  parser.add_argument("--data-dir", default=None, help="directory holding cifar-10-batches-bin (with --dataset cifar10)")
  parser.add_argument("--jax-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "lookahead_optax_jax"),
                      help="JAX persistent compilation cache directory ('' to disable)")
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
  parser.add_argument("--report-only", action="store_true",
                      help="train nothing: rewrite paper.md and the figures from --out/summary.json")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = os.path.join(harness.RESULTS, "quick") if args.quick else harness.RESULTS
  if args.report_only:
    with open(os.path.join(args.out, "summary.json")) as f:
      print("wrote", write_report(json.load(f), args.out))
    return
  if args.dataset == "cifar10" and not args.data_dir:
    parser.error("--dataset cifar10 needs --data-dir (the cifar-10-batches-bin directory)")
  if args.jax_cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", args.jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  start = time.perf_counter()
  summary = run(args.tasks, quick=args.quick, seeds=args.seeds, out=args.out,
                cfgs=configs(args.quick, args.dataset, args.data_dir), progress=not args.no_progress)
  print(f"wrote {args.out}/paper.md and summary.json ({', '.join(summary['tasks'])}) in "
        f"{(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
  main()
