"""Streaming DiLoCo: validation loss against the bytes the replicas exchange.

``python -m benchmarks.outer.streaming`` trains, on the DiLoCo experiment's
task (a character Transformer, 4 replicas, each on its own shard, equal samples
for every method), synchronous data parallelism (a float32 gradient all-reduce
at every step), DiLoCo (H = 30, one float32 exchange of all params per sync)
and Streaming DiLoCo with F = 2 and 4 fragments (each fragment syncs once per
30 steps, staggered, so at most one fragment is exchanged per step). Each
DiLoCo variant exchanges its pseudo-gradients in float32, bfloat16,
float8_e4m3fn or int8 (per-row scales), the compressed ones with and without
error feedback; one more row adds the overlapped exchange (``delay=1``).

Bytes come from the program each replica runs (its jaxpr with the replica axis
bound): every collective's operand sizes and dtypes, those inside a fragment's
sync branch counted at the steps where that fragment syncs. "Sent" is what one
replica sends under ring algorithms: ``2 (M-1)/M`` times the operand of an
all-reduce (the float32 exchange), ``(M-1)/M`` times that of an all-to-all and
``M-1`` times that of an all-gather (a compressed exchange reduce-scatters a
matrix's compressed rows by an all-to-all, averages its block in float32 and
all-gathers the compressed means; vectors are all-gathered whole). Peak is the
most any single step sends.

Tuning: none per variant. Data parallelism and every DiLoCo variant run at the
learning rate tuned for DP-AdamW and DiLoCo-H30(AdamW) in the DiLoCo experiment
(``diloco.md``); fragments and compression add no hyperparameter, so each
variant inherits DiLoCo's setting, which if anything favours the float32
baseline it was tuned for. 3 seeds; each variant is compared with the float32
exchange at the same F (and DiLoCo with data parallelism) by Welch's two-sided
t-test at level 0.05.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple

import jax
import numpy as np
import optax

from benchmarks.common import grid, jaxpr, report, stats
from benchmarks.outer import diloco as dl
from lookahead_optax import diloco

H = 30
LR = {"DP": 0.01, "DiLoCo": 0.005}
"""Learning rates tuned for DP-AdamW and DiLoCo-H30(AdamW) in ``results/outer/diloco.md``."""
EXCHANGES = ("float32", "bfloat16", "bfloat16+EF", "float8_e4m3fn", "float8_e4m3fn+EF", "int8", "int8+EF")

FULL = dict(dl.FULL, k=H, eval_every=60, fragments=(1, 2, 4), exchanges=EXCHANGES, delayed=True)
QUICK = dict(dl.QUICK, k=5, eval_every=10, fragments=(1, 2), exchanges=("float32", "int8+EF"), delayed=False)


class Method(NamedTuple):
  """One row: data parallelism (``fragments`` 0) or a DiLoCo variant."""

  fragments: int
  exchange: str = "float32"
  delay: int = 0

  @property
  def name(self) -> str:
    if self.fragments == 0:
      return "DP"
    kind = "DiLoCo" if self.fragments == 1 else f"Streaming F={self.fragments}"
    return f"{kind}, {self.exchange}" + (", delay 1" if self.delay else "")


def methods(cfg: dict) -> list[Method]:
  rows = [Method(0)] + [Method(f, e) for f in cfg["fragments"] for e in cfg["exchanges"]]
  if cfg["delayed"]:
    rows.append(Method(max(cfg["fragments"]), cfg["exchanges"][-1], delay=1))
  return rows


def per_replica(method: Method, lr, cfg: dict) -> optax.GradientTransformation:
  """The optimizer one replica runs."""
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=cfg["weight_decay"])
  if method.fragments == 0:
    return optax.chain(dl.all_reduce_gradients(dl.AXIS), adamw)
  dtype, _, ef = method.exchange.partition("+")
  return diloco(
    adamw,
    cfg["k"],
    0.7,
    0.9,
    axis_name=dl.AXIS,
    fragments=method.fragments,
    communication_dtype=None if dtype == "float32" else dtype,
    error_feedback=bool(ef),
    delay=method.delay or None,
  )


def sync_steps(fragments: int, k: int, steps: int) -> list[list[int]]:
  """The steps (from 0) at which each fragment syncs: fragment j where ``(t - j k // F) mod k == k - 1``."""
  t = np.arange(steps)
  return [t[(t - j * k // fragments) % k == k - 1].tolist() for j in range(fragments)]


def communication(method: Method, params, cfg: dict) -> dict:
  """Bytes of one replica's collectives, read from its program: per step, per fragment sync, whole run, peak."""
  m, steps = cfg["replicas"], cfg["steps"]
  tx = per_replica(method, 1e-3, cfg)
  found = jaxpr.collectives(jax.make_jaxpr(tx.update, axis_env=[(dl.AXIS, m)])(params, tx.init(params), params))
  operand, sent = {}, {}
  for group, branch, primitive, nbytes in found:
    key = (group, branch)
    operand[key] = operand.get(key, 0) + nbytes
    sent[key] = sent.get(key, 0.0) + jaxpr.ring_bytes_sent(primitive, nbytes, m)
  # A group is one top-level cond: its cost is its costlier branch (a sync branch against "no sync").
  groups = sorted({g for g, _ in operand if g is not None})
  per_group = lambda table: [max(v for (g, _), v in table.items() if g == group) for group in groups]
  every = lambda table: table.get((None, None), 0)
  if len(groups) != method.fragments:  # data parallelism (0 fragments) exchanges outside any cond
    raise RuntimeError(f"{method.name}: expected one sync branch with collectives per fragment, found {len(groups)}.")
  counts = [len(s) for s in sync_steps(method.fragments, cfg["k"], steps)]
  group_sent = per_group(sent)
  return {
    "collectives": len(found),
    "every_step_operand_bytes": every(operand),
    "sync_operand_bytes": per_group(operand),
    "sync_sent_bytes": group_sent,
    "syncs": counts,
    "total_sent_bytes": every(sent) * steps + sum(c * b for c, b in zip(counts, group_sent)),
    "peak_sent_bytes": every(sent) + max(group_sent, default=0.0),
  }


def run(cfg: dict, seeds, log=print) -> dict:
  """Trains every method over ``seeds``; returns losses, curves and bytes per method."""
  prob = dl.problem(cfg)
  params = jax.tree.map(lambda x: x[0], prob.init(0))
  config = {k: v for k, v in cfg.items() if k not in ("grids", "variants", "methods", "pairs")}
  results = {
    "config": config,
    "seeds": list(seeds),
    "params": int(sum(x.size for x in jax.tree.leaves(params))),
    "methods": {},
  }
  for method in methods(cfg):
    lr = LR["DP" if method.fragments == 0 else "DiLoCo"]
    hparams, run_seeds = grid.settings_by_seeds([{"lr": lr}], seeds)
    g = grid.train_grid(
      prob,
      lambda hp, method=method: dl.replicated(per_replica(method, hp["lr"], cfg)),
      hparams,
      run_seeds,
      cfg["steps"],
      cfg["eval_every"],
    )
    finals = dl.finals(cfg, prob, g)["main"]
    results["methods"][method.name] = dict(
      method._asdict(),
      lr=lr,
      **communication(method, params, cfg),
      val_loss=finals["val_loss"],
      test_loss=finals["test_loss"],
      eval_steps=g.eval_steps,
      curve=g.curves["main"]["val_loss"],
      compile_seconds=g.compile_seconds,
      run_seconds=g.run_seconds,
    )
    row = results["methods"][method.name]
    log(
      f"  {method.name}: val loss {report.mean_std(row['val_loss'])}, sent {row['total_sent_bytes'] / 1e6:.2f} MB "
      f"in all, peak {row['peak_sent_bytes'] / 1e3:.1f} kB/step ({g.compile_seconds:.0f} s compile, "
      f"{g.run_seconds:.0f} s train)"
    )
  results["environment"] = report.environment()
  return results


def reference(method: Method) -> str:
  """What a row is tested against: float32 DiLoCo for a float32 row (data parallelism for DiLoCo itself),
  the float32 exchange at the same F for a compressed or delayed one; nothing for data parallelism."""
  if method.fragments == 0:
    return ""
  if method.exchange == "float32" and not method.delay:
    return "DP" if method.fragments == 1 else Method(1).name
  return Method(method.fragments).name


def in_order(res: dict) -> list[tuple[str, dict]]:
  """The methods of a result as :func:`methods` lists them (the JSON keeps them sorted by name)."""
  key = lambda item: (item[1]["fragments"], EXCHANGES.index(item[1]["exchange"]), item[1]["delay"])
  return sorted(res["methods"].items(), key=key)


def table_rows(res: dict) -> list[list]:
  rows, dp = [], res["methods"]["DP"]
  for name, row in in_order(res):
    ref = reference(Method(row["fragments"], row["exchange"], row["delay"]))
    if ref:
      c = stats.compare(row["val_loss"], res["methods"][ref]["val_loss"], higher_is_better=False)
      verdict = f"{c.verdict} {ref} ({c.diff:+.4f}, p = {c.p:.3f})"
    else:
      verdict = ""
    rows.append(
      [
        name,
        report.mean_std(row["val_loss"], digits=4),
        report.mean_std(row["test_loss"], digits=4),
        f"{row['total_sent_bytes'] / 1e6:.2f}",
        f"{row['total_sent_bytes'] / dp['total_sent_bytes']:.4f}",
        f"{row['peak_sent_bytes'] / 1e3:.1f}",
        f"{row['peak_sent_bytes'] / dp['peak_sent_bytes']:.3f}",
        verdict,
      ]
    )
  return rows


HEADERS = [
  "method",
  "val loss",
  "test loss",
  "sent in all (MB)",
  "vs DP",
  "peak per step (kB)",
  "vs DP",
  "val loss against",
]


def figure(res: dict, path: str) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  markers = {0: "s", 1: "o", 2: "^", 4: "D"}
  colors = {e: plt.get_cmap("tab10")(i) for i, e in enumerate(EXCHANGES)}
  for name, row in in_order(res):
    loss = np.asarray(row["val_loss"])
    filled = "+EF" in row["exchange"] or row["fragments"] == 0
    spread = 1.0 + 0.05 * (EXCHANGES.index(row["exchange"]) - 3) if row["fragments"] else 1.0
    for ax, key in zip(axes, ("total_sent_bytes", "peak_sent_bytes")):
      ax.errorbar(
        row[key] * spread,
        loss.mean(),
        yerr=loss.std(),
        marker=markers.get(row["fragments"], "x"),
        color="black" if row["fragments"] == 0 else colors.get(row["exchange"], "gray"),
        mfc=None if filled else "white",
        ms=7 if row["delay"] == 0 else 11,
        ls="none",
        capsize=2,
        label=name,
      )
  axes[0].set(xscale="log", xlabel="bytes sent per replica, whole run", ylabel="validation loss (nats/char)")
  axes[1].set(xscale="log", xlabel="peak bytes sent per replica in one step", ylabel="validation loss (nats/char)")
  for ax in axes:
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
  axes[1].legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return report.save_figure(fig, path)


def write_report(res: dict, out: str, command: str) -> str:
  cfg = res["config"]
  intro = " ".join(__doc__.split("\n\n")[1].split())
  lines = [
    "# Streaming DiLoCo: validation loss against bytes exchanged",
    "",
    f"Regenerate with `{command}`; every number below comes from `streaming.json` of that run.",
    "",
    intro,
    "",
    " ".join(__doc__.split("\n\n")[2].split()),
    "",
    " ".join(__doc__.split("\n\n")[3].split()),
    "",
    f"Setting: {res['params']:,} params, {cfg['replicas']} replicas x {cfg['replica_batch']} windows of "
    f"{cfg['seq_len']} characters per step, {cfg['steps']} steps, H = {cfg['k']}, outer Nesterov (0.7, 0.9); "
    f"learning rates {LR}; seeds {res['seeds']}. Losses: mean ± std over seeds on the whole validation and "
    "test splits.",
    "",
    report.markdown_table(HEADERS, table_rows(res)),
    "",
    "![loss against bytes](streaming_bytes.png)",
    "",
    "Figure: mean ± std over seeds; exchanges with equal bytes are spread by a few percent along the byte "
    "axis so that they do not hide each other.",
    "",
    f"Environment: {', '.join(f'{k} {v}' for k, v in res['environment'].items())}.",
  ]
  return report.write_text(os.path.join(out, "streaming.md"), "\n".join(lines))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.outer.streaming", description=__doc__.split("\n\n")[0])
  report.add_run_arguments(
    parser, quick="tiny model, a few steps, 5 methods", seeds=3, unit="method", folder="outer", reports="report"
  )
  args = parser.parse_args(argv)
  out = args.out or report.results_dir("quick_outer" if args.quick else "outer")
  command = "python -m benchmarks.outer.streaming" + (" --quick" if args.quick else "")
  start = time.perf_counter()
  if args.report_only:
    with open(os.path.join(out, "streaming.json")) as f:
      res = json.load(f)
  else:
    res = run(QUICK if args.quick else FULL, range(args.seeds))
    res["seconds"] = time.perf_counter() - start
    report.write_json(os.path.join(out, "streaming.json"), res)
  figure(res, os.path.join(out, "streaming_bytes.png"))
  path = write_report(res, out, command)
  print(
    "\nStreaming DiLoCo: validation loss (mean ± std over seeds) against bytes one replica sends; "
    "verdicts: Welch's t-test at level 0.05."
  )
  print(report.text_table(HEADERS, table_rows(res)))
  print(f"Wall time {time.perf_counter() - start:.0f} s. Report: {path}")
  return res


if __name__ == "__main__":
  main()
