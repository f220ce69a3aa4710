"""Streaming DiLoCo: validation loss against the bytes the replicas exchange.

``python -m benchmarks.outer.streaming`` trains, on the DiLoCo experiment's
task (a character Transformer, 4 replicas, each on its own shard, equal samples
for every method), synchronous data parallelism (a float32 gradient all-reduce
at every step), DiLoCo (H = 30, one float32 exchange of all params per sync)
and Streaming DiLoCo with F = 2 and 4 fragments (each fragment syncs once per
30 steps, staggered, so at most one fragment is exchanged per step). Each
DiLoCo variant exchanges its pseudo-gradients in float32, bfloat16,
float8_e4m3fn or int8 (per-row scales), the compressed ones with and without
error feedback (EF); one more row adds the overlapped exchange (``delay=1``).
Going further down, DiLoCo (F = 1, every codec) and F = 4 (a selection) also
exchange in int4 (per-row scales, two values a byte) and sparsified: each
replica sends only the top 2 % or 1 % of each leaf's entries by magnitude
(``top2%``), as float32, int8 or int4 values (one scale per leaf) with their
int32 positions, with and without EF. Eager rows (``eager=True``, Kale et al.
2025) apply this replica's own pseudo-gradient at once and the exchanged mean
one round late, so the exchange can overlap a whole cycle; their slow weights
then differ between replicas by each one's own share (replica 0's are
evaluated).

Bytes come from the program each replica runs (its jaxpr with the replica axis
bound): every collective's operand sizes and dtypes, those inside a fragment's
sync branch counted at the steps where that fragment syncs. "Sent" is what one
replica sends under ring algorithms: ``2 (M-1)/M`` times the operand of an
all-reduce (the float32 exchange), ``(M-1)/M`` times that of an all-to-all and
``M-1`` times that of an all-gather (a compressed exchange reduce-scatters a
matrix's compressed rows by an all-to-all, averages its block in float32 and
all-gathers the compressed means; vectors, and every top-k exchange, are
all-gathered whole). Every round of the exchange also all-reduces two float32
(the weight present, the count of replicas left out) and all-gathers one
float32 weight per replica: 24 bytes sent per replica per sync, counted. Peak
is the most any single step sends.

Tuning: none per variant. Data parallelism and every DiLoCo variant run at the
learning rate tuned for DP-AdamW and DiLoCo-H30(AdamW) in the DiLoCo experiment
(``diloco.md``); fragments and compression add no hyperparameter, so each
variant inherits DiLoCo's setting, which if anything favours the float32
baseline it was tuned for. 3 seeds; each variant is compared with the float32
exchange at the same F (and DiLoCo with data parallelism) by Welch's two-sided
t-test at level 0.05.

Three more DiLoCo runs (float32 exchange) lose a replica for a while: replica
0's gradient is NaN at one step in mid-cycle (step 310), so its params and AdamW
moments turn NaN. The library leaves a replica with a non-finite
pseudo-gradient out of the mean; right after each sync a replica whose params
are not all finite restarts from the slow weights (the resume recipe), either
with its non-finite inner-optimizer moments zeroed ("resumed") or with its
params only ("params reset only"). The third run exchanges by a plain
``jax.lax.pmean``, as an exchange that averages every replica would, with the
same recipe. Final losses are those of the slow weights (replica 0's); the
training loss is the mean over replicas of the last steps' losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import grid, jaxpr, report, stats, timing
from benchmarks.outer import diloco as dl
from lookahead_optax import ReplicaMeanState, lookahead, replica_mean, streaming

H = 30
LR = {"DP": 0.01, "DiLoCo": 0.005}
"""Learning rates tuned for DP-AdamW and DiLoCo-H30(AdamW) in ``results/outer/diloco.md``."""
EXCHANGES = ("float32", "bfloat16", "bfloat16+EF", "float8_e4m3fn", "float8_e4m3fn+EF", "int8", "int8+EF")
LOW_BITS = (
  "int4",
  "int4+EF",
  "top2%",
  "top2%+EF",
  "top2% int8+EF",
  "top2% int4",
  "top2% int4+EF",
  "top1%+EF",
  "top1% int4+EF",
)
"""Exchanges below 8 bits a value: ``topP% [dtype]`` sends the top P % of each leaf's entries (float32 by default)."""
ORDER = EXCHANGES + LOW_BITS
FAULTS = ("resume", "params", "pmean")
"""A replica's gradient NaN at one step: left out and resumed (params and moments), left out and resumed (params
only), or averaged in by a plain ``pmean``."""
FAULTY_REPLICA = 0

FULL = dict(
  dl.FULL,
  k=H,
  eval_every=60,
  fragments=(1, 2, 4),
  exchanges=EXCHANGES,
  low_bits={1: LOW_BITS, 4: ("int4+EF", "top2%+EF", "top2% int4+EF", "top1% int4+EF")},
  eager=(1, 4),
  delayed=True,
  fault_step=310,
)
QUICK = dict(
  dl.QUICK,
  k=5,
  eval_every=10,
  fragments=(1, 2),
  exchanges=("float32", "int8+EF"),
  low_bits={1: ("int4+EF", "top2% int4+EF")},
  eager=(2,),
  delayed=False,
  fault_step=16,
)


class Method(NamedTuple):
  """One row: data parallelism (``fragments`` 0) or a DiLoCo variant, optionally with a replica gone bad."""

  fragments: int
  exchange: str = "float32"
  delay: int = 0
  eager: bool = False
  fault: str = ""

  @property
  def name(self) -> str:
    if self.fragments == 0:
      return "DP"
    kind = "DiLoCo" if self.fragments == 1 else f"Streaming F={self.fragments}"
    fault = {
      "resume": ", NaN replica excluded + resumed",
      "params": ", NaN replica excluded, params reset only",
      "pmean": ", NaN replica in a plain pmean",
    }
    return (
      f"{kind}, {self.exchange}"
      + (", delay 1" if self.delay else "")
      + (", eager" if self.eager else "")
      + (fault[self.fault] if self.fault else "")
    )


def codec(exchange: str) -> tuple[str | None, bool, float | None]:
  """``(dtype, error_feedback, top_k)`` of an exchange name such as ``"int8+EF"`` or ``"top2% int4+EF"``."""
  spec, _, ef = exchange.partition("+")
  fraction = None
  if spec.startswith("top"):
    head, _, spec = spec.partition(" ")
    fraction = float(head[3:-1]) / 100
  return (None if spec in ("", "float32") else spec), bool(ef), fraction


def methods(cfg: dict) -> list[Method]:
  rows = [Method(0)] + [Method(f, e) for f in cfg["fragments"] for e in cfg["exchanges"]]
  rows += [Method(int(f), e) for f, ex in cfg["low_bits"].items() for e in ex]
  if cfg["delayed"]:
    rows.append(Method(max(cfg["fragments"]), cfg["exchanges"][-1], delay=1))
  rows += [Method(f, "int8+EF", eager=True) for f in cfg["eager"]]
  return rows + [Method(1, fault=fault) for fault in FAULTS]


def per_replica(method: Method, lr, cfg: dict) -> optax.GradientTransformation:
  """The optimizer one replica runs."""
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=cfg["weight_decay"])
  if method.fragments == 0:
    return optax.chain(dl.all_reduce_gradients(dl.AXIS), adamw)
  dtype, ef, fraction = codec(method.exchange)
  if method.fault == "pmean":
    exchange = dl.all_reduce_gradients(dl.AXIS)  # every replica averaged in, whatever it holds
  else:
    exchange = replica_mean(dl.AXIS, dtype=dtype, error_feedback=ef, top_k=fraction, eager=method.eager)
  outer = optax.chain(exchange, optax.sgd(0.7, momentum=0.9, nesterov=True))
  return lookahead(adamw, cfg["k"], outer=outer, schedule=streaming(method.fragments, delay=method.delay))


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


def resumed(params, state, moments: bool):
  """The resume recipe on every replica (leading axis): right after a sync, a replica whose params are not all
  finite takes the slow weights as params; with ``moments``, its inner optimizer's non-finite entries become 0."""
  finite = jax.vmap(lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))(params)
  bad = (state.count == 0) & ~finite
  pick = lambda new, old: jnp.where(bad.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  params = jax.tree.map(lambda s, p: pick(s.astype(p.dtype), p), state.slow, params)
  if moments:
    zeroed = lambda x: pick(jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), x)
    inner = jax.tree.map(lambda x: zeroed(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, state.inner_state)
    state = state._replace(inner_state=inner)
  return params, state


def excluded(state) -> jax.Array:
  """How many rounds left a replica out (summed over replicas and fragments); 0 without a replica mean."""
  is_mean = lambda x: isinstance(x, ReplicaMeanState)
  counts = [x.excluded[0] for x in jax.tree.leaves(state, is_leaf=is_mean) if is_mean(x)]
  return sum(counts, jnp.zeros((), jnp.int32))


def train_with_fault(prob: grid.Problem, method: Method, lr: float, cfg: dict, seeds) -> tuple[grid.Grid, np.ndarray]:
  """Trains ``method`` over ``seeds`` with replica ``FAULTY_REPLICA``'s gradient NaN at step ``cfg["fault_step"]``
  and the resume recipe after every step; returns the grid (curves: training loss per ``eval_every`` steps) and
  the rounds that left a replica out, per seed."""
  tx = dl.replicated(per_replica(method, lr, cfg))
  steps, every, t_bad = cfg["steps"], cfg["eval_every"], cfg["fault_step"]
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *[prob.init(s) for s in seeds])

  def run(params, seed, data):
    key = jax.random.key(seed)

    def step(carry, t):
      params, state = carry
      loss, grads = jax.value_and_grad(prob.loss)(params, prob.batch(data, key, t))
      nan = lambda g: g.at[FAULTY_REPLICA].set(jnp.where(t == t_bad, jnp.nan, g[FAULTY_REPLICA]))
      updates, state = tx.update(jax.tree.map(nan, grads), state, params)
      return resumed(optax.apply_updates(params, updates), state, moments=method.fault != "params"), loss

    (params, state), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return grid.main_weights(params, state), losses, excluded(state)

  program = jax.jit(jax.vmap(run, in_axes=(0, 0, None)))
  (weights, losses, left_out), compile_s, run_s = timing.compile_then_run(
    program, params, jnp.asarray(seeds, jnp.int32), prob.data
  )
  losses = np.asarray(losses)
  curve = losses.reshape(len(seeds), steps // every, every).mean(-1) / cfg["replicas"]
  g = grid.Grid(
    {"lr": np.full(len(seeds), lr, np.float32)},
    np.asarray(seeds),
    every * (1 + np.arange(steps // every)),
    {"main": {"train_loss": curve}},
    losses,
    weights,
    compile_s,
    run_s,
  )
  return g, np.asarray(left_out)


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
    extra = {}
    if method.fault:
      g, left_out = train_with_fault(prob, method, lr, cfg, list(seeds))
      extra = {"excluded_rounds": left_out, "curve_metric": "train_loss"}
    else:
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
      final_train_loss=finals["final_train_loss"],
      eval_steps=g.eval_steps,
      curve=g.curves["main"]["train_loss" if method.fault else "val_loss"],
      compile_seconds=g.compile_seconds,
      run_seconds=g.run_seconds,
      **extra,
    )
    row = results["methods"][method.name]
    log(
      f"  {method.name}: val loss {report.mean_std(row['val_loss'])}, sent {row['total_sent_bytes'] / 1e6:.2f} MB "
      f"in all, peak {row['peak_sent_bytes'] / 1e3:.1f} kB/step ({g.compile_seconds:.0f} s compile, "
      f"{g.run_seconds:.0f} s train)"
    )
  results["environment"] = report.environment()
  return results


def method_of(row: dict) -> Method:
  """The method of a result row (rows written before eager and faults existed lack those fields)."""
  return Method(row["fragments"], row["exchange"], row["delay"], row.get("eager", False), row.get("fault", ""))


def reference(method: Method) -> str:
  """What a row is tested against: float32 DiLoCo for a float32 row (data parallelism for DiLoCo itself),
  the float32 exchange at the same F for a compressed, delayed, eager or faulty one; nothing for data parallelism."""
  if method.fragments == 0:
    return ""
  if method == Method(method.fragments):
    return "DP" if method.fragments == 1 else Method(1).name
  return Method(method.fragments).name


def in_order(res: dict) -> list[tuple[str, dict]]:
  """The methods of a result as :func:`methods` lists them (the JSON keeps them sorted by name)."""

  def key(item):
    m = method_of(item[1])
    return (m.fault != "", m.fragments, ORDER.index(m.exchange), m.delay, m.eager, (("",) + FAULTS).index(m.fault))

  return sorted(res["methods"].items(), key=key)


def verdict(res: dict, row: dict) -> str:
  """Welch's test of the row's validation loss against its reference; a run with NaN losses is said diverged."""
  ref = reference(method_of(row))
  if not ref:
    return ""
  bad = int(np.sum(~np.isfinite(row["val_loss"])))
  if bad:
    return f"diverged: NaN in {bad} of {len(row['val_loss'])} seeds"
  c = stats.compare(row["val_loss"], res["methods"][ref]["val_loss"], higher_is_better=False)
  return f"{c.verdict} {ref} ({c.diff:+.4f}, p = {c.p:.3f})"


def table_rows(res: dict) -> list[list]:
  rows, dp = [], res["methods"]["DP"]
  for name, row in in_order(res):
    if row.get("fault"):
      continue
    rows.append(
      [
        name,
        report.mean_std(row["val_loss"], digits=4),
        report.mean_std(row["test_loss"], digits=4),
        f"{row['total_sent_bytes'] / 1e6:.3f}",
        f"{row['total_sent_bytes'] / dp['total_sent_bytes']:.4f}",
        f"{row['peak_sent_bytes'] / 1e3:.1f}",
        f"{row['peak_sent_bytes'] / dp['peak_sent_bytes']:.3f}",
        verdict(res, row),
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
FAULT_HEADERS = [
  "method",
  "val loss",
  "test loss",
  "final train loss",
  "rounds a replica was left out",
  "val loss against",
]


def fault_rows(res: dict) -> list[list]:
  faulty = [(name, row) for name, row in in_order(res) if row.get("fault")]
  mean_std = lambda v: report.mean_std(v, digits=4) if np.all(np.isfinite(v)) else "NaN"
  return [
    [
      name,
      mean_std(row["val_loss"]),
      mean_std(row["test_loss"]),
      mean_std(row["final_train_loss"]),
      "n/a (no exclusion)" if row["fault"] == "pmean" else ", ".join(str(int(x)) for x in row["excluded_rounds"]),
      verdict(res, row),
    ]
    for name, row in faulty
  ]


def knee(res: dict) -> list[str]:
  """Per F: the codecs (no delay, not eager) that lose to float32 at the same F, and the cheapest that do not."""
  lines = []
  for f in sorted({row["fragments"] for row in res["methods"].values()} - {0}):
    rows = [
      (r["exchange"], r["total_sent_bytes"], verdict(res, r))
      for n, r in in_order(res)
      if method_of(r)._replace(exchange="float32") == Method(f) and r["exchange"] != "float32"
    ]
    losing = [e for e, _, v in rows if v.startswith(("loses", "diverged"))]
    holding = [(b, e) for e, b, v in rows if v.startswith(("ties", "beats"))]
    least = min(holding, default=(0.0, ""))[0]
    cheapest = [e for b, e in holding if b <= 1.01 * least]
    kind = "DiLoCo" if f == 1 else f"Streaming F={f}"
    lines.append(
      f"- {kind}: losing to float32 at the same F: {'; '.join(losing) or 'none'}. Cheapest that do not lose: "
      + (f"{'; '.join(cheapest)} ({least / 1e6:.3f} MB in all)." if cheapest else "none.")
    )
  return lines


def figure(res: dict, path: str) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  markers = {0: "s", 1: "o", 2: "^", 4: "D"}
  codecs = list(dict.fromkeys(e.partition("+")[0] for e in ORDER))  # one color a codec, filled with EF
  colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(codecs)}
  shown = [(n, r) for n, r in in_order(res) if not r.get("fault") and np.all(np.isfinite(r["val_loss"]))]
  for ax, key in zip(axes, ("total_sent_bytes", "peak_sent_bytes")):
    # Rows with the same bytes are spread by a few percent along the byte axis, in table order.
    same, near = {}, lambda v: float(f"{v:.2g}")
    for name, row in shown:
      same.setdefault(near(row[key]), []).append(name)
    for name, row in shown:
      group = same[near(row[key])]
      spread = 1.0 + 0.025 * (group.index(name) - (len(group) - 1) / 2)
      loss = np.asarray(row["val_loss"])
      m = method_of(row)
      ax.errorbar(
        row[key] * spread,
        loss.mean(),
        yerr=loss.std(),
        marker=markers.get(m.fragments, "x"),
        color="black" if m.fragments == 0 else colors.get(m.exchange.partition("+")[0], "gray"),
        mfc=None if "+EF" in m.exchange or m.fragments == 0 else "white",
        mec="black" if m.eager else None,
        ms=11 if m.delay or m.eager else 7,
        ls="none",
        capsize=2,
        label=name,
      )
  axes[0].set(xscale="log", xlabel="bytes sent per replica, whole run", ylabel="validation loss (nats/char)")
  axes[1].set(xscale="log", xlabel="peak bytes sent per replica in one step", ylabel="validation loss (nats/char)")
  for ax in axes:
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
  axes[1].legend(fontsize=5.5, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return report.save_figure(fig, path)


def write_report(res: dict, out: str, command: str) -> str:
  cfg = res["config"]
  paragraphs = [" ".join(p.split()) for p in __doc__.split("\n\n")[1:]]
  lines = [
    "# Streaming DiLoCo: validation loss against bytes exchanged",
    "",
    f"Regenerate with `{command}`; every number below comes from `streaming.json` of that run.",
    "",
    "\n\n".join(paragraphs[:-1]),
    "",
    f"Setting: {res['params']:,} params, {cfg['replicas']} replicas x {cfg['replica_batch']} windows of "
    f"{cfg['seq_len']} characters per step, {cfg['steps']} steps, H = {cfg['k']}, outer Nesterov (0.7, 0.9); "
    f"learning rates {LR}; seeds {res['seeds']}. Losses: mean ± std over seeds on the whole validation and "
    "test splits.",
    "",
    report.markdown_table(HEADERS, table_rows(res)),
    "",
    "Where compression starts to cost loss (codecs alone: no delay, not eager; Welch's test against float32 at the "
    "same F, level 0.05):",
    "",
    *knee(res),
    "",
    "![loss against bytes](streaming_bytes.png)",
    "",
    "Figure: mean ± std over seeds; open markers: no error feedback; large markers: delay 1 (plain edge) or eager "
    "(black edge); rows with equal bytes are spread by a few percent along the byte axis so that they do not hide "
    "each other. The runs with a replica gone bad are not drawn.",
    "",
    "## A replica gone bad",
    "",
    paragraphs[-1].replace("step 310", f"step {cfg['fault_step']}"),
    "",
    report.markdown_table(FAULT_HEADERS, fault_rows(res)),
    "",
    f"Environment: {', '.join(f'{k} {v}' for k, v in res['environment'].items())}.",
  ]
  return report.write_text(os.path.join(out, "streaming.md"), "\n".join(lines))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.outer.streaming", description=__doc__.split("\n\n")[0])
  report.add_run_arguments(
    parser, quick="tiny model, a few steps, 11 methods", seeds=3, unit="method", folder="outer", reports="report"
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
  print("\n".join(["", *knee(res), "", "A replica's gradient NaN at one step:"]))
  print(report.text_table(FAULT_HEADERS, fault_rows(res)))
  print(f"Wall time {time.perf_counter() - start:.0f} s. Report: {path}")
  return res


if __name__ == "__main__":
  main()
