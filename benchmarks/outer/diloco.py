"""DiLoCo against synchronous data parallelism, equal samples, tuned alike.

``M`` replicas each draw batches from their own shard of the training text.
Synchronous data parallelism (DP-AdamW) all-reduces (averages) the gradients at
every step and takes one AdamW step; DiLoCo (``lookahead_optax.diloco``) runs
AdamW on each replica's own gradients and averages only the pseudo-gradients
every ``H`` steps, before a Nesterov outer step (rate 0.7, momentum 0.9). The
replicas are simulated on one device (``jax.vmap`` with the axis name the
optimizer reduces over), a grid of learning rates and seeds around them.

Communication rounds are counted from the program each replica runs (its
jaxpr, with the replica axis bound): all-reduces outside any ``cond`` run every
step, those inside Lookahead's conditional commit once per sync. Under ``vmap`` a ``lax.cond`` on a
replica's counter becomes a ``select`` that evaluates both branches, so the
simulation's wall time says nothing about real communication cost: only
losses and round counts are reported.

Tuning budget: 4 inner learning rates per method (the outer step is DiLoCo's default).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import data, grid, jaxpr, language, report, train, tuning
from lookahead_optax import diloco

AXIS = "replica"
METHODS = ("DP-AdamW", "DiLoCo-H10(AdamW)", "DiLoCo-H30(AdamW)")
OUTER = "outer lr 0.7, momentum 0.9"
PAPER = "DiLoCo paper: matches synchronous training with H x fewer rounds"

FULL = dict(
  language.TRANSFORMER_FULL,
  replicas=4,
  replica_batch=4,
  eval_every=30,
  grids={m: (2e-3, 5e-3, 1e-2, 2e-2) for m in METHODS},
  variants={"DiLoCo-H10": (OUTER,), "DiLoCo-H30": (OUTER,)},
  methods=METHODS,
  pairs=(("DP-AdamW", "DiLoCo-H10(AdamW)"), ("DP-AdamW", "DiLoCo-H30(AdamW)")),
)
QUICK = dict(FULL, **language.TRANSFORMER_QUICK, steps=30, grids={m: (5e-3, 1e-2) for m in METHODS})


def sync_period(family: str) -> int:
  """H of a DiLoCo method (1 for synchronous data parallelism)."""
  wrapper = tuning.wrapper_of(family)
  return int(wrapper.split("-H")[1]) if wrapper else 1


def all_reduce_gradients(axis_name: str) -> optax.GradientTransformation:
  """Average the gradients over ``axis_name`` (the all-reduce of synchronous data parallelism)."""
  return optax.stateless(lambda updates, params=None: jax.lax.pmean(updates, axis_name))


def replicated(tx: optax.GradientTransformation, axis_name: str = AXIS) -> optax.GradientTransformation:
  """``tx`` run independently on each slice of a leading replica axis, with ``axis_name`` bound.

  Params, gradients and state carry a leading axis of size M; collectives over
  ``axis_name`` inside ``tx`` reduce across it (what ``shard_map`` or ``pmap``
  do across devices).
  """
  return optax.GradientTransformation(
    jax.vmap(tx.init), jax.vmap(lambda u, s, p: tx.update(u, s, p), axis_name=axis_name)
  )


def per_replica(family: str, lr, cfg: dict) -> optax.GradientTransformation:
  """The optimizer one replica runs."""
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=cfg["weight_decay"])
  h = sync_period(family)
  if h == 1:
    return optax.chain(all_reduce_gradients(AXIS), adamw)
  return diloco(adamw, h, 0.7, 0.9, axis_name=AXIS)


def problem(cfg: dict) -> grid.Problem:
  """A run: M replicas of one model, each on batches from its own shard of the training text."""
  m = cfg["replicas"]
  base = language.transformer_problem(cfg)
  apply = language.transformer_apply(cfg)
  arrays = dict(base.data)
  tokens = np.asarray(arrays.pop("train"))
  arrays["shards"] = jnp.asarray(np.stack([s[: len(tokens) // m] for s in np.array_split(tokens, m)]))

  def batch(d, key, step):
    keys = jax.random.split(jax.random.fold_in(key, step), m)
    draw = lambda shard, k: data.random_windows(shard, k, cfg["replica_batch"], cfg["seq_len"])
    return jax.vmap(draw)(d["shards"], keys)

  # Sum over replicas: each replica's slice of the gradient is then exactly its own gradient.
  loss = lambda p, b: jnp.sum(jax.vmap(lambda q, x, y: train.cross_entropy(apply(q, x), y))(p, b.x, b.y))
  return grid.Problem(
    init=lambda seed: jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), base.init(seed)),
    loss=loss,
    batch=batch,
    evaluate=lambda w, d: base.evaluate(first_replica(w), d),
    data=arrays,
  )


def first_replica(weights):
  """Replica 0's weights: the slow weights are the same on every replica (they change only in a shared sync)."""
  return jax.tree.map(lambda x: x[0], weights)


def optimizer(family: str, cfg: dict):
  return lambda hp: replicated(per_replica(family, hp["lr"], cfg))


def finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  apply = language.transformer_apply(cfg)
  return language.finals(apply, g, prob.data, weights=first_replica, replicas=cfg["replicas"])


def communication(cfg: dict, prob: grid.Problem) -> dict:
  """Per method: the all-reduces in the per-replica program and the communication rounds of a run."""
  params = jax.tree.map(lambda x: x[0], prob.init(0))
  out = {}
  for family in cfg["methods"]:
    tx, h = per_replica(family, 1e-3, cfg), sync_period(family)
    counts = jaxpr.count_all_reduces(
      jax.make_jaxpr(tx.update, axis_env=[(AXIS, cfg["replicas"])])(params, tx.init(params), params)
    )
    # A round: one step's all-reduces (XLA combines the per-leaf ones into one collective); those inside
    # Lookahead's conditional commit run once per sync.
    per_period = h if counts["every_step"] else int(counts["conditional"] > 0)
    out[family] = {
      "period": h,
      "all_reduces": counts,
      "rounds_per_period": int(per_period),
      "rounds_total": cfg["steps"] * per_period / h,
    }
  return out


def extras(cfg: dict, prob: grid.Problem, result: dict, seeds) -> dict:
  return {"communication": communication(cfg, prob)}


def extras_section(res: dict, figdir: str) -> str:
  """Rounds of communication per method, and validation loss against rounds and samples."""
  from benchmarks.common.verdicts import setting_label

  comm = res["extras"]["communication"]
  cfg = res["config"]
  samples = cfg["replicas"] * cfg["replica_batch"]
  lines = [
    f"### Communication ({cfg['replicas']} replicas, {samples} sequences per step in all, every method)",
    "",
    "All-reduces in the per-replica program: at every step / inside the commit that runs only at a sync.",
    "",
  ]
  rows = [
    [
      m,
      f"{c['all_reduces']['every_step']} / {c['all_reduces']['conditional']}",
      f"{c['rounds_per_period']} per {c['period']} step(s)",
      f"{c['rounds_total']:g}",
    ]
    for m, c in comm.items()
  ]
  lines += [report.markdown_table(["method", "all-reduces in program", "rounds", "rounds in the run"], rows), ""]
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
  steps = np.asarray(res["eval_steps"])
  for method in cfg["methods"]:
    row = tuning.tuned(res, method)
    mean, std = report.mean_curve(row["curves"]["val_loss"])
    c = comm[method]
    for ax, x in zip(axes, (steps * c["rounds_per_period"] / c["period"], steps * samples)):
      (line,) = ax.plot(x, mean, marker=".", label=f"{method} ({setting_label(row)})")
      ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
  axes[0].set(xscale="log", xlabel="communication rounds (all-reduces)", ylabel="validation loss (nats/char)")
  axes[1].set(xlabel="training sequences (all replicas)", ylabel="validation loss (nats/char)")
  axes[0].legend(fontsize=7)
  report.save_figure(fig, os.path.join(figdir, "diloco_rounds.png"))
  return "\n".join(lines + ["![rounds](diloco_rounds.png)"])


TASK = tuning.Task(
  name="diloco",
  title="DiLoCo against synchronous data parallelism: character Transformer, equal samples",
  **language.METRICS,
  paper={f"{a} vs {b}": PAPER for a, b in FULL["pairs"]},
  problem=problem,
  optimizer=optimizer,
  finals=finals,
  extras=extras,
)
