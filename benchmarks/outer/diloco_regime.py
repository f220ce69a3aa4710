"""DiLoCo against synchronous data parallelism: where does the gap close?

``python -m benchmarks.outer.diloco_regime`` measures DiLoCo's gap to
synchronous data parallelism (test loss of DiLoCo minus that of DP-AdamW, each
tuned, equal samples) against training length, replica count M and sync period
H, on the DiLoCo experiment's task (``diloco.py``: a character Transformer,
each replica drawing batches from its own shard of the training text, the
replicas simulated with ``jax.vmap``).

Design: one axis at a time around the center M = 4, H = 30: M in 2, 4, 8 at
H = 30 and H in 10, 30, 100 at M = 4, five (M, H) cells, every one trained for
2400 steps and evaluated on the whole validation and test splits after 600,
1200, 1800 and 2400 steps. The learning rates are constant (no schedule), so a
run's first T steps are exactly a run of T steps: every cell gives the gap at
four training lengths, each length tuned on its own (the tuned setting is the
best on the validation loss at that length). A full factorial (3 M x 3 H) would
cost 1.6 times as much, most of it at M = 8; varying one axis at a time keeps
each axis's effect readable against the same center, and every M is run to the
longest length. Data parallelism does not depend on H: its runs at M = 4 serve
the three H cells.

Tuning budget: 4 settings per method and cell, on the validation split. DP-AdamW
tries the learning rates 0.002, 0.005, 0.01, 0.02; DiLoCo tries the inner rates
0.002 and 0.005, each with the outer Nesterov rate 0.4 and 0.7 (momentum 0.9),
a grid placed by a pilot at the center (1200 steps, 2 seeds, validation loss;
inner 0.001 to 0.01 x outer 0.4, 0.7, 1.0), whose three best settings it holds.
Every setting runs every seed (5 by default; a seed fixes the initialisation
and the batch order, the same for both methods); each gap is tested by Welch's
two-sided t-test at level 0.05, with Welch's 95 % interval.

Model: the network of ``diloco.py`` (width 32, 2 layers, 4 heads; 4 windows per
replica and step) on windows of 32 characters instead of 64, which halves the
cost of a step; the 600-step center point is the anchor to ``diloco.md``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import optax

from benchmarks.common import language, report, stats, train, tuning, verdicts
from benchmarks.outer import diloco as dl
from lookahead_optax import diloco

DP = "DP-AdamW"
OUTER_MOMENTUM = 0.9
GRIDS = {"DP": (2e-3, 5e-3, 1e-2, 2e-2), "DiLoCo": (2e-3, 5e-3)}
"""Learning rates: DP-AdamW's, and DiLoCo's inner ones (each with every outer rate)."""
OUTER = {"outer lr 0.4": 0.4, "outer lr 0.7": 0.7}
"""DiLoCo's outer Nesterov rates, a variant (a compiled program) each."""
SELECT, HEADLINE = language.METRICS["select"], language.METRICS["headline"]

FULL = dict(
  dl.FULL,
  seq_len=32,
  steps=2400,
  eval_every=600,
  replica_counts=(2, 4, 8),
  periods=(10, 30, 100),
  center=(4, 30),
  rates=GRIDS,
  outer=OUTER,
)
QUICK = dict(
  FULL,
  **language.TRANSFORMER_QUICK,
  steps=20,
  replica_counts=(2, 4),
  periods=(5, 10),
  center=(2, 5),
  rates={"DP": (5e-3, 1e-2), "DiLoCo": (1e-2,)},
)


def design(cfg: dict) -> dict[int, tuple[int, ...]]:
  """``M -> the H values run with M replicas``: every H at the center M, the center H at every other M.

  The center M comes first. Every H divides ``eval_every``, so each evaluation
  sees the slow weights of a sync that has just happened.
  """
  m0, h0 = cfg["center"]
  if m0 not in cfg["replica_counts"] or h0 not in cfg["periods"]:
    raise ValueError(
      f"design: center {cfg['center']} must be one of the replica counts {cfg['replica_counts']} and one of "
      f"the periods {cfg['periods']}."
    )
  late = [h for h in cfg["periods"] if cfg["eval_every"] % h]
  if late:
    raise ValueError(f"design: every period H must divide eval_every={cfg['eval_every']}, got H={late}.")
  cells = {m0: tuple(cfg["periods"])}
  cells.update({m: (h0,) for m in cfg["replica_counts"] if m != m0})
  return cells


def method(h: int) -> str:
  return f"DiLoCo-H{h}(AdamW)"


def cell_config(cfg: dict, m: int, periods) -> dict:
  """The ``tuning.run_task`` configuration of ``m`` replicas: DP-AdamW and DiLoCo at each of ``periods``."""
  wrapped = tuple(method(h) for h in periods)
  return dict(
    cfg,
    replicas=m,
    methods=(DP,) + wrapped,
    grids={DP: cfg["rates"]["DP"]} | {w: cfg["rates"]["DiLoCo"] for w in wrapped},
    variants={tuning.wrapper_of(w): tuple(cfg["outer"]) for w in wrapped},
    pairs=tuple((DP, w) for w in wrapped),
  )


def per_replica(family: str, lr, cfg: dict) -> optax.GradientTransformation:
  """What one replica runs: ``diloco.py``'s data parallelism, or DiLoCo at the outer rate of ``cfg["variant"]``."""
  h = dl.sync_period(family)
  if h == 1:
    return dl.per_replica(family, lr, cfg)
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=cfg["weight_decay"])
  return diloco(adamw, h, cfg["outer"][cfg["variant"]], OUTER_MOMENTUM, axis_name=dl.AXIS)


def problem(cfg: dict):
  """``diloco.problem``, evaluated on the whole validation and test splits (the shared slow weights)."""
  apply = language.transformer_apply(cfg)

  def evaluate(weights, d):
    w = dl.first_replica(weights)
    return {f"{split}_loss": language.mean_loss(apply, w, d[split]) for split in ("val", "test")}

  return dl.problem(cfg)._replace(evaluate=evaluate)


def finals(cfg: dict, prob, g) -> dict:
  """The last evaluation of each run (already on the whole splits) and its final training loss per replica."""
  last = {k: v[:, -1] for k, v in g.curves["main"].items()}
  return {"main": last | {"final_train_loss": tuning.tail_mean(g.losses) / cfg["replicas"]}}


def task(m: int) -> tuning.Task:
  return tuning.Task(
    name=f"M={m}",
    title=f"DiLoCo against synchronous data parallelism, {m} replicas",
    **language.METRICS,
    paper={},
    problem=problem,
    optimizer=lambda family, cfg: lambda hp: dl.replicated(per_replica(family, hp["lr"], cfg)),
    finals=finals,
  )


def run(cfg: dict, seeds, path: str | None = None, log=print) -> dict:
  """Trains every cell of the design; returns ``{"tasks": {"M=m": run_task result}, ...}``, written to ``path``
  after each replica count (a cut-short run keeps what it finished)."""
  res = {"tasks": {}, "seeds": list(seeds), "design": {str(m): list(h) for m, h in design(cfg).items()}}
  res["params"] = int(sum(x.size for x in jax.tree.leaves(train.functional_params(language.transformer(cfg, 0))[1])))
  res["environment"] = report.environment()
  for m, periods in design(cfg).items():
    log(f"M = {m}: DP-AdamW and DiLoCo at H = {', '.join(map(str, periods))}")
    start = time.perf_counter()
    out = tuning.run_task(task(m), cell_config(cfg, m, periods), seeds, log=log)
    res["tasks"][f"M={m}"] = dict(out, seconds=time.perf_counter() - start)
    if path:
      report.write_json(path, res)
  return res


def at_length(row: dict, i: int) -> dict:
  """A setting's row with its metrics taken from evaluation ``i`` of its curves."""
  return dict(row, metrics={k: [curve[i] for curve in v] for k, v in row["curves"].items()})


def tuned_at(out: dict, name: str, i: int) -> dict:
  """``name``'s tuned setting at evaluation ``i``: the best eligible one on the validation loss there."""
  rows = [at_length(r, i) for r in out["methods"][name]["settings"]]
  return rows[tuning.best_setting(rows, SELECT)]


def gaps(res: dict) -> list[dict]:
  """One row per cell and training length: each method tuned at that length, DiLoCo minus DP on the test loss."""
  out = []
  for cell in res["tasks"].values():
    for wrapped in cell["config"]["methods"][1:]:
      for i, steps in enumerate(cell["eval_steps"]):
        dp, dil = tuned_at(cell, DP, i), tuned_at(cell, wrapped, i)
        out.append(
          {
            "replicas": cell["config"]["replicas"],
            "H": dl.sync_period(wrapped),
            "steps": int(steps),
            "dp_setting": verdicts.setting_label(dp),
            "diloco_setting": verdicts.setting_label(dil),
            "dp_test": dp["metrics"][HEADLINE.key],
            "diloco_test": dil["metrics"][HEADLINE.key],
            **tuning.comparison(dil, dp, HEADLINE),
          }
        )
  return out


def crossing(rows: list[dict]) -> float | None:
  """Steps at which a straight line in log2(steps) through a cell's gaps reaches 0 (an extrapolation);
  None where the fitted gap does not shrink."""
  x = np.log2([r["steps"] for r in rows])
  slope, intercept = np.polyfit(x, [r["diff"] for r in rows], 1)
  return float(2.0 ** (-intercept / slope)) if slope < 0 else None


def cells(table: list[dict]) -> dict[tuple[int, int], list[dict]]:
  """The gap rows grouped by cell (M, H), in order of training length."""
  out: dict = {}
  for r in table:
    out.setdefault((r["replicas"], r["H"]), []).append(r)
  return {k: sorted(v, key=lambda r: r["steps"]) for k, v in out.items()}


def stops_losing(rows: list[dict]) -> int | None:
  """The shortest length from which on DiLoCo never loses (a tie or a win at it and every longer length), or None."""
  since = None
  for r in reversed(rows):
    if r["verdict"] == "loses to":
      break
    since = r["steps"]
  return since


def regime(table: list[dict]) -> str:
  """The finding in words: in which cells, from what length, DiLoCo stops losing; the gaps and their trend."""
  by_cell = cells(table)
  longest = max(r["steps"] for r in table)
  since = {k: stops_losing(rows) for k, rows in by_cell.items()}
  shrinking = all(rows[-1]["diff"] < rows[0]["diff"] for rows in by_cell.values())
  closed = sorted(k for k, t in since.items() if t is not None)
  span = (
    f"up to {longest} steps, M from {min(k[0] for k in by_cell)} to {max(k[0] for k in by_cell)}, "
    f"H from {min(k[1] for k in by_cell)} to {max(k[1] for k in by_cell)}"
  )
  if all(r["verdict"] == "loses to" for r in table):
    head = (
      f"DiLoCo loses to data parallelism in every one of the {len(table)} settings measured ({span}; Welch p < "
      f"{stats.LEVEL}): the gap does not close within these runs"
      + (", though it shrinks with training length in every cell." if shrinking else ".")
    )
  elif not closed:
    head = f"DiLoCo still loses at the longest length in every cell ({span}); it ties only at shorter lengths."
  else:
    where = "; ".join(f"M={m}, H={h} from {since[m, h]} steps on" for m, h in closed)
    rest = [f"M={m}, H={h}" for m, h in sorted(by_cell) if (m, h) not in closed]
    head = f"DiLoCo stops losing (a tie by Welch's test at level {stats.LEVEL}, or a win) at {where}" + (
      f"; it still loses at {longest} steps at {', '.join(rest)}." if rest else "."
    )
  lines = [head, "", "Per cell, from the shortest to the longest run:", ""]
  for (m, h), rows in sorted(by_cell.items()):
    end = rows[-1]
    zero = crossing(rows) if end["diff"] > 0 else None
    lines.append(
      f"- M={m}, H={h}: {rows[0]['diff']:+.3f} at {rows[0]['steps']} steps, {end['diff']:+.3f} "
      f"[{end['interval'][0]:+.3f}, {end['interval'][1]:+.3f}] at {end['steps']} ({end['verdict']})"
      + (
        f"; a straight line in log2(steps) through the {len(rows)} gaps reaches 0 near {zero:,.0f} steps"
        if zero
        else ""
      )
      + "."
    )
  return "\n".join(
    lines
    + [
      "",
      "The zero crossings are extrapolations beyond the runs, not measurements: a gap that levels off between "
      "the last lengths would close later than its line says, or not at all.",
    ]
  )


HEADERS = [
  "M",
  "H",
  "steps",
  "DP-AdamW (tuned)",
  "test loss",
  "DiLoCo (tuned)",
  "test loss",
  "gap [95% CI]",
  "p",
  "verdict",
]


def table_rows(table: list[dict]) -> list[list]:
  return [
    [
      r["replicas"],
      r["H"],
      r["steps"],
      r["dp_setting"],
      report.mean_std(r["dp_test"], digits=4),
      r["diloco_setting"],
      report.mean_std(r["diloco_test"], digits=4),
      verdicts.difference(r, HEADLINE),
      f"{r['p']:.3f}",
      r["verdict"],
    ]
    for r in table
  ]


def figure(table: list[dict], center: tuple, path: str) -> str:
  """Gap against steps with its 95 % interval: one line per M at the center H, one per H at the center M."""
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), sharey=True)
  by_cell = cells(table)
  for ax, axis, fixed in ((axes[0], 0, 1), (axes[1], 1, 0)):
    for key, rows in sorted(by_cell.items()):
      if key[fixed] != center[fixed]:
        continue
      steps = np.asarray([r["steps"] for r in rows], float)
      diff = np.asarray([r["diff"] for r in rows])
      lo, hi = np.asarray([r["interval"] for r in rows]).T
      label = f"M = {key[0]}" if axis == 0 else f"H = {key[1]}"
      ax.errorbar(steps, diff, yerr=[diff - lo, hi - diff], marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="training steps")
    ax.set_xticks(sorted({r["steps"] for r in table}), [str(s) for s in sorted({r["steps"] for r in table})])
    ax.minorticks_off()
    ax.legend(fontsize=8)
  axes[0].set(ylabel="test loss gap, DiLoCo - DP (nats/char)", title=f"H = {center[1]}, replicas M vary")
  axes[1].set(title=f"M = {center[0]}, period H varies")
  return report.save_figure(fig, path)


def anchor() -> str:
  """The 600-step gaps of ``diloco.md`` (the full-size model), when its results are there."""
  path = os.path.join(report.results_dir("outer"), "diloco.json")
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    res = json.load(f)["tasks"]["diloco"]
  found = verdicts.verdicts(dl.TASK, res)
  return "; ".join(f"{v['la']} {v['diff']:+.4f} [{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]" for v in found)


def write_report(res: dict, table: list[dict], out: str, command: str) -> str:
  first = next(iter(res["tasks"].values()))
  cfg = first["config"]
  paragraphs = [" ".join(p.split()) for p in __doc__.split("\n\n")[1:]]
  center = [r for r in table if (r["replicas"], r["H"]) == tuple(cfg["center"]) and r["steps"] == cfg["eval_every"]]
  anchored = anchor()
  lines = [
    "# DiLoCo against synchronous data parallelism: training length, replicas, sync period",
    "",
    f"Regenerate with `{command}`; every number below comes from `diloco_regime.json` of that run.",
    "",
    *[x for p in paragraphs for x in (p, "")],
    f"Setting: {res['params']:,} params, {cfg['replica_batch']} windows of {cfg['seq_len']} characters per "
    f"replica and step (M x {cfg['replica_batch']} per step in all, for both methods), AdamW with weight decay "
    f"{cfg['weight_decay']}, constant learning rates; seeds {res['seeds']}. Losses: mean ± std over seeds on the "
    "whole test split; gap = DiLoCo minus DP (positive: DiLoCo is worse).",
    "",
    "## Where the gap closes",
    "",
    regime(table),
    "",
  ]
  if center and anchored:
    lines += [
      f"Anchor: at the center (M = {cfg['center'][0]}, H = {cfg['center'][1]}) after {cfg['eval_every']} steps "
      f"this model's gap is {verdicts.difference(center[0], HEADLINE)}; `diloco.md` (64-character windows, "
      f"outer rate fixed at 0.7, M = 4, 600 steps) measured {anchored}.",
      "",
    ]
  lines += [
    "## Gaps (tuned against tuned at each length)",
    "",
    report.markdown_table(HEADERS, table_rows(table)),
    "",
    "![gap against steps](diloco_regime.png)",
    "",
    "Figure: gap with Welch's 95 % interval; left, M varies at the center H; right, H varies at the center M. "
    "Data parallelism's runs at one M are shared by every H at that M.",
    "",
    "Compute: " + " ".join(verdicts.timing_lines(res)),
    "",
    f"Environment: {', '.join(f'{k} {v}' for k, v in res['environment'].items())}.",
  ]
  return report.write_text(os.path.join(out, "diloco_regime.md"), "\n".join(lines))


def main(argv=None) -> dict:
  parser = report.parser("python -m benchmarks.outer.diloco_regime", __doc__)
  report.add_run_arguments(
    parser, quick="tiny model, 20 steps, 3 cells", seeds=5, unit="setting", folder="outer", reports="report"
  )
  args = parser.parse_args(argv)
  out = args.out or report.results_dir("quick_outer" if args.quick else "outer")
  path = os.path.join(out, "diloco_regime.json")
  start = time.perf_counter()
  if args.report_only:
    with open(path) as f:
      res = json.load(f)
  else:
    res = run(QUICK if args.quick else FULL, range(args.seeds), path)
  table = gaps(res)
  figure(table, tuple(next(iter(res["tasks"].values()))["config"]["center"]), os.path.join(out, "diloco_regime.png"))
  doc = write_report(res, table, out, "python -m benchmarks.outer.diloco_regime" + " --quick" * args.quick)
  print("\nDiLoCo minus DP-AdamW, test loss (nats/char), each tuned at each length; Welch's t-test at level 0.05.")
  print(report.text_table(HEADERS, table_rows(table)))
  print("\n" + regime(table))
  print(f"Wall time {time.perf_counter() - start:.0f} s. Report: {doc}")
  return res


if __name__ == "__main__":
  main()
