"""Reporting a tuned comparison (``tuning.run_task``): the verdict table, a markdown section per task, the figures."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import report, stats, tuning
from benchmarks.common.tuning import Metric, Task


def setting_label(row: dict) -> str:
  """``"lr 0.01, alpha 0.5"``: a row's rate, alpha and variant (SNOO's outer setting, an averaging method's)."""
  alpha = f", alpha {row['alpha']:g}" if row.get("alpha") is not None else ""
  return f"lr {row['lr']:g}" + alpha + (f", {row['variant']}" if row.get("variant") else "")


def grid_text(method: str, cfg: dict) -> str:
  """``"LA(SGD) 0.2, 0.3 x alpha 0.5, 0.8 (k=5)"``: a method's tuning grid in words."""
  lrs = ", ".join(f"{lr:g}" for lr in cfg["grids"][method])
  wrapper = tuning.wrapper_of(method)
  if wrapper == "LA":
    return f"{method} {lrs} x alpha {', '.join(map(str, tuning.ALPHAS))} (k={cfg['k']})"
  if wrapper is not None:
    return f"{method} {lrs} x {' / '.join(cfg['variants'][wrapper])}"
  return f"{method} {lrs}"


def verdicts(task: Task, res: dict) -> list[dict]:
  """One row per (X, LA(X)) pair: tuned against tuned on the headline metric, with the test behind the verdict."""
  out = []
  for base, la in res["config"]["pairs"]:
    a, b = tuning.tuned(res, la), tuning.tuned(res, base)
    out.append(
      {
        "task": task.name,
        "pair": f"{base} vs {la}",
        "base": base,
        "la": la,
        "metric": task.headline.label,
        "base_setting": setting_label(b),
        "la_setting": setting_label(a),
        "base_values": b["metrics"][task.headline.key],
        "la_values": a["metrics"][task.headline.key],
        **tuning.comparison(a, b, task.headline),
        "paper": task.paper.get(f"{base} vs {la}", ""),
      }
    )
  return out


def difference(row: dict, metric: Metric) -> str:
  lo, hi = (metric.scale * v for v in row["interval"])
  return f"{metric.scale * row['diff']:+.{metric.digits}f} [{lo:+.{metric.digits}f}, {hi:+.{metric.digits}f}]"


def verdict_table(
  tasks: dict, summary: dict, markdown: bool = False, wrapped: str = "Lookahead", baseline: str = "inner optimizer"
) -> str:
  """Per task and pair: ``baseline`` vs ``wrapped``, each tuned, mean ± std over seeds, the verdict, the paper."""
  headers = [
    "task",
    "metric",
    f"{baseline} (tuned)",
    f"{wrapped} (tuned)",
    "difference [95% CI]",
    "Welch p",
    "verdict",
    "paper",
  ]
  rows = []
  for name, res in summary["tasks"].items():
    task = tasks[name]
    for v in verdicts(task, res):
      m = task.headline
      rows.append(
        [
          name,
          m.label,
          f"{v['base']} {m.cell(v['base_values'])}",
          f"{v['la']} {m.cell(v['la_values'])}",
          difference(v, m),
          f"{v['p']:.3f}",
          f"{v['la']} {v['verdict']} {v['base']}",
          v["paper"],
        ]
      )
  return (report.markdown_table if markdown else report.text_table)(headers, rows)


def timing_lines(summary: dict) -> list[str]:
  """Compile time against run time, per task and in all."""
  lines, compile_s, run_s = [], 0.0, 0.0
  for name, res in summary["tasks"].items():
    c = sum(p["compile_s"] for p in res["programs"])
    r = sum(p["run_s"] + p["final_eval_s"] for p in res["programs"])
    compile_s, run_s = compile_s + c, run_s + r
    runs = sum(p["runs"] for p in res["programs"])
    lines.append(
      f"{name}: {runs} runs in {len(res['programs'])} compiled programs; compile {c:.0f} s, "
      f"train and evaluate {r:.0f} s (task wall time {res['seconds']:.0f} s)."
    )
  lines.append(f"All tasks: compile {compile_s:.0f} s, train and evaluate {run_s:.0f} s.")
  return lines


# ------------------------------------------------------------------ paper.md


def task_section(task: Task, res: dict, figdir: str, number: int, extra_section=None) -> str:
  cfg = res["config"]
  seeds = len(res["seeds"])
  lines = [f"## {number}. {task.title}", ""]
  lines += [
    f"Tuning budget: {res['budget']} settings per method on the validation split ({task.select.label}); "
    f"{seeds} seeds per setting. Learning rates: "
    + "; ".join(grid_text(m, cfg) for m in cfg["methods"] if m in cfg["grids"])
    + ".",
    "",
  ]
  lines += [f"### Tuned against tuned (mean ± std over {seeds} seeds)", ""]
  headers, paper_cells = task.paper_table
  first = tuning.tuned(res, cfg["methods"][0])["metrics"]
  columns = [m for m in task.columns if m.key in first]  # a quick run computes fewer
  rows = []
  for method in cfg["methods"]:
    row = tuning.tuned(res, method)
    rows.append(
      [method, setting_label(row)]
      + [m.cell(row["metrics"][m.key]) for m in columns]
      + list(paper_cells.get(method, ("-",) * len(headers)))
    )
  lines.append(report.markdown_table(["method", "tuned setting"] + [m.label for m in columns] + headers, rows))
  lines += [
    "",
    f"Verdicts on {task.headline.label} (Welch's two-sided t-test at level {stats.LEVEL}; a tie unless "
    "it rejects equal means; Welch's 95 % confidence interval of the difference):",
    "",
  ]
  for v in verdicts(task, res):
    lines.append(
      f"- {v['la']} ({v['la_setting']}) {v['verdict']} {v['base']} ({v['base_setting']}): "
      f"{difference(v, task.headline)}, p = {v['p']:.3f}. Paper: {v['paper']}."
    )
  lines.append("")
  robust = robustness(task, res)
  if robust:
    lines += [
      "### Robustness: Lookahead at its inner optimizer's tuned rate (alpha 0.5, untuned)",
      "",
      report.markdown_table(
        [
          "comparison",
          f"inner {task.headline.label}",
          f"Lookahead {task.headline.label}",
          "difference [95% CI]",
          "Welch p",
          "verdict",
        ],
        robust,
      ),
      "",
    ]
  sweep = task.sweep or task.select
  if lookahead_pairs(res, swept=True):
    lines += sensitivity_section(task, res, sweep, figdir)
  lines += [
    f"### Anytime: {task.select.label} against step, tuned settings",
    "",
    f"![anytime]({anytime_figure(task, res, figdir)})",
    "",
  ]
  if extra_section is not None and res.get("extras"):
    lines += [extra_section(res, figdir), ""]
  programs = res["programs"]
  lines.append(
    f"Compute: {sum(p['runs'] for p in programs)} runs in {len(programs)} compiled programs, compile "
    f"{sum(p['compile_s'] for p in programs):.0f} s, train {sum(p['run_s'] for p in programs):.0f} s, "
    f"final evaluation {sum(p['final_eval_s'] for p in programs):.0f} s; task wall time "
    f"{res['seconds']:.0f} s."
  )
  return "\n".join(lines)


def robustness(task: Task, res: dict) -> list[list]:
  rows = []
  for base, la in lookahead_pairs(res):
    row = tuning.at_inner_rate(res, base, la)
    if row is None:
      continue
    b = tuning.tuned(res, base)
    c = tuning.comparison(row, b, task.headline)
    rows.append(
      [
        f"{la} at {base}'s {setting_label(b)}, alpha 0.5 vs {base}",
        task.headline.cell(b["metrics"][task.headline.key]),
        task.headline.cell(row["metrics"][task.headline.key]),
        difference(c, task.headline),
        f"{c['p']:.3f}",
        f"{la} {c['verdict']} {base}",
      ]
    )
  return rows


def lookahead_pairs(res: dict, swept: bool = False) -> list:
  """The (X, LA(X)) pairs of a result (with ``swept``: those whose LA ran the sensitivity sweep)."""
  sensitivity = res["config"].get("sensitivity", True)
  return [
    (base, la)
    for base, la in res["config"]["pairs"]
    if tuning.is_lookahead(la) and (not swept or sensitivity is True or la in (sensitivity or ()))
  ]


def sensitivity_section(task: Task, res: dict, metric: Metric, figdir: str) -> list[str]:
  tol, relative = task.tolerance
  tol_text = f"{100 * tol:g} % of the best" if relative else f"{metric.scale * tol:g} ({metric.label}) of the best"
  lines = [
    f"### Learning-rate sensitivity: {metric.label}, mean over seeds (Lookahead at alpha 0.5)",
    "",
    f"Good range: the contiguous learning rates around each method's best whose mean is within {tol_text}; "
    "width = highest / lowest good rate.",
    "",
  ]
  rows, curves = [], {}
  for base, la in lookahead_pairs(res, swept=True):
    for method in (base, la):
      s = tuning.sensitivity(res, method, metric, task.tolerance)
      curves[method] = s
      r = s["range"]
      cells = " ".join(
        f"{lr:g}: {metric.scale * v:.{metric.digits}f}" if np.isfinite(v) else f"{lr:g}: diverged"
        for lr, v in zip(s["lrs"], s["mean"])
      )
      rows.append([method, cells, f"{r['low']:g} - {r['high']:g}", f"{r['width']:.3g}x"])
  lines += [report.markdown_table(["method", "lr: mean", "good range", "width"], rows), ""]
  lines += [f"![sensitivity]({sensitivity_figure(task, res, curves, metric, figdir)})", ""]
  return lines


def sensitivity_figure(task: Task, res: dict, curves: dict, metric: Metric, figdir: str) -> str:
  plt = report.pyplot()
  pairs = lookahead_pairs(res, swept=True)
  fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.8), squeeze=False)
  for ax, (base, la) in zip(axes[0], pairs):
    for method, style in ((base, "--"), (la, "-")):
      s = curves[method]
      mean, std = metric.scale * np.asarray(s["mean"]), metric.scale * np.asarray(s["std"])
      ax.errorbar(s["lrs"], mean, yerr=std, ls=style, marker="o", capsize=3, label=method)
      ax.axvspan(s["range"]["low"], s["range"]["high"], alpha=0.08, color=ax.lines[-1].get_color())
    ax.set(xscale="log", xlabel="learning rate", ylabel=metric.label, title=f"{task.name}: {base} vs {la}")
    ax.legend()
  name = f"{task.name}_sensitivity.png"
  report.save_figure(fig, os.path.join(figdir, name))
  return name


def anytime_figure(task: Task, res: dict, figdir: str) -> str:
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.9))
  steps = np.asarray(res["eval_steps"])
  m = task.select
  for method in res["config"]["methods"]:
    row = tuning.tuned(res, method)
    mean, std = report.mean_curve(np.asarray(row["curves"][m.key]) * m.scale)
    (line,) = ax.plot(
      steps, mean, ls="-" if tuning.is_lookahead(method) else "--", label=f"{method} ({setting_label(row)})"
    )
    ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color=line.get_color())
  ax.set(xlabel="step", ylabel=m.label, title=f"{task.name}: tuned settings, mean ± std over seeds")
  if not m.higher_is_better:
    ax.set_yscale("log")
  ax.legend(fontsize=7)
  name = f"{task.name}_anytime.png"
  report.save_figure(fig, os.path.join(figdir, name))
  return name


PROTOCOL = [
  "- Every method gets the same tuning budget on the validation split: the same number of settings. An inner "
  "optimizer tries that many learning rates; its Lookahead tries half as many learning rates, each with alpha "
  "0.5 and 0.8 (the alphas count inside the budget), placed in the upper part of the inner optimizer's grid, "
  "since Lookahead tolerates larger inner rates; another wrapper (SNOO) likewise tries half as many rates with "
  "each of two outer settings. The tuned setting has the best validation score averaged over the seeds; a "
  "setting in which a seed diverged is never chosen.",
  "- Every setting runs every seed; a seed fixes the initialisation and the batch order, the same for every "
  "method. Tables give mean ± std (population) over seeds, on the test split.",
  "- Headline: tuned against tuned. Each verdict is Welch's two-sided t-test of equal means at level 0.05 "
  '("ties" unless it rejects), with Welch\'s 95 % confidence interval of the difference (wrapped minus inner).',
  "- Robustness: Lookahead (alpha 0.5) at its inner optimizer's tuned rate, untuned, against the tuned inner "
  "optimizer. Lookahead's runs at alpha 0.5 on the rest of the inner optimizer's grid are never eligible for "
  "tuning; they give the learning-rate sensitivity curves.",
]
"""The protocol paragraph of every report."""


def write_document(
  path: str,
  title: str,
  intro: list[str],
  tasks: dict,
  summary: dict,
  wrapped: str = "Lookahead",
  baseline: str = "inner optimizer",
) -> str:
  """A markdown report: intro, protocol, verdict table, timing, environment, then one section per task.

  ``tasks``: name -> ``(Task, extras_section or None)`` for every task in ``summary["tasks"]``.
  """
  env = summary["environment"]
  figdir = os.path.dirname(path)
  sections = [
    task_section(tasks[name][0], res, figdir, i + 1, tasks[name][1])
    for i, (name, res) in enumerate(summary["tasks"].items())
  ]
  lines = [
    f"# {title}",
    "",
    *intro,
    "",
    "## Protocol",
    "",
    *PROTOCOL,
    "",
    "## Verdicts",
    "",
    verdict_table({n: t for n, (t, _) in tasks.items()}, summary, markdown=True, wrapped=wrapped, baseline=baseline),
    "",
    *timing_lines(summary),
    "",
    "Environment: "
    + ", ".join(f"{k} {v}" for k, v in env.items())
    + ("; **quick mode**" if summary.get("quick") else "")
    + ".",
    "",
  ]
  return report.write_text(path, "\n".join(lines) + "\n" + "\n\n".join(sections))
