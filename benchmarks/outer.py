"""Beyond Lookahead: SNOO and DiLoCo on a small Transformer language model.

Two experiments on character-level ``pydoc_data`` text (ships with Python),
with ``models.TransformerLM``:

1. **Single process, equal steps**: AdamW, Lookahead(AdamW) and SNOO(AdamW)
   (Nesterov outer step on the pseudo-gradient), several seeds; validation loss
   of the weights one would deploy (the slow weights for Lookahead and SNOO).
2. **DiLoCo vs synchronous data parallel, equal total samples**: ``M`` replicas,
   each drawing from its own shard of the training text. Synchronous DP
   all-reduces (averages) the gradients at every step, then takes one AdamW
   step (global batch ``M x b``); DiLoCo (``lookahead_optax.diloco``) runs AdamW
   on each replica's own gradients and averages only the pseudo-gradients
   every ``H`` steps before a Nesterov outer step. The replicas are simulated on
   one device with ``jax.vmap(..., axis_name="replica")``. Communication rounds
   are counted from the per-replica program (the jaxpr each replica runs under
   ``shard_map``/``pmap``): all-reduces outside any ``cond`` run every step,
   those inside the sync branch of the ``cond`` run once per sync.

Under ``vmap`` a ``lax.cond`` on a per-replica counter becomes a ``select``
that evaluates both branches, so the wall time of the simulation says nothing
about real communication cost; only losses and round counts are reported.

3. **Translation, equal steps** (``--task translation``): experiment 1's four
   optimizers on the number-word translation Transformer of ``benchmarks/nmt.py``
   (``make_translation_task``, ``train_translation``, ``greedy_decode``,
   ``exact_match``), with the inner AdamW on nmt's warmup-then-rsqrt schedule
   (``warmup_rsqrt_schedule``, beta2 = 0.98); test loss and greedy exact match
   of the slow weights, several seeds.

Regenerate ``benchmarks/results/outer.{md,json}`` and ``outer_*.png`` with::

    python -m benchmarks.outer            # full run: ~21 CPU-minutes (43 min wall on a loaded 2-core box)
    python -m benchmarks.outer --quick    # smoke test (seconds), writes to --out

and ``benchmarks/results/outer_translation.{md,json,png}`` with::

    python -m benchmarks.outer --task translation           # full run: ~6 min wall on a loaded 2-core box
    python -m benchmarks.outer --task translation --quick   # smoke test (seconds), writes to --out
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import data, harness, models, nmt
from lookahead_optax import diloco, lookahead, snoo

AXIS = "replica"
TRANSLATION_STEPS = 400

FULL = dict(steps=600, seeds=3, batch=16, seq_len=64, dim=64, layers=2, heads=4, lr=2e-3, eval_every=50,
            eval_batches=8, replicas=4, replica_batch=8, dp_steps=600, sync_periods=(10, 30), max_chars=None,
            single=("AdamW", "Lookahead", "SNOO"))
# The smoke test: every code path once (compilation dominates its cost, so few configurations).
QUICK = dict(steps=10, seeds=1, batch=4, seq_len=16, dim=16, layers=1, heads=2, lr=3e-3, eval_every=10,
             eval_batches=1, replicas=4, replica_batch=1, dp_steps=10, sync_periods=(5,), max_chars=60_000,
             single=("AdamW", "SNOO(AdamW), k=5"))


# ------------------------------------------------------------------ optimizers


def single_process_optimizers(lr: float, only=None, adamw=None) -> dict:
  """Name -> factory of the optimizers of experiments 1 and 3 (equal inner AdamW); ``only``: name prefixes to keep.

  ``adamw``: factory of the inner AdamW (default ``optax.adamw(lr, weight_decay=0.01)``).
  """
  adamw = adamw or (lambda: optax.adamw(lr, weight_decay=0.01))
  opts = {
      "AdamW": adamw,
      "Lookahead(AdamW), k=5, alpha=0.5": lambda: lookahead(adamw(), k=5, alpha=0.5),
      "SNOO(AdamW), k=20, lr=0.7, mu=0.9": lambda: snoo(adamw(), k=20, learning_rate=0.7, momentum=0.9),
      "SNOO(AdamW), k=5, lr=0.5, mu=0.5": lambda: snoo(adamw(), k=5, learning_rate=0.5, momentum=0.5),
  }
  return {n: f for n, f in opts.items() if only is None or any(n.startswith(o) for o in only)}


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
      jax.vmap(tx.init), jax.vmap(lambda u, s, p: tx.update(u, s, p), axis_name=axis_name))


def count_all_reduces(closed_jaxpr) -> dict:
  """All-reduces in a per-replica program: ``{"every_step": n, "sync_branch": n, "other_branch": n}``.

  One ``psum`` equation reduces a whole pytree in one collective: one round.
  Collectives inside a ``cond`` count only for the branch they sit in
  (``branches[1]``, taken when the predicate is true, is the sync branch).
  """
  counts = {"every_step": 0, "sync_branch": 0, "other_branch": 0}

  def subjaxprs(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subjaxprs(v)

  def walk(jx, where):
    for eqn in jx.eqns:
      if "psum" in eqn.primitive.name or eqn.primitive.name.startswith("all_"):
        counts[where] += 1
      if eqn.primitive.name == "cond" and where == "every_step":
        for i, branch in enumerate(eqn.params["branches"]):
          walk(branch.jaxpr, "sync_branch" if i == 1 else "other_branch")
        continue
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub, where)

  walk(closed_jaxpr.jaxpr, "every_step")
  return counts


# ----------------------------------------------------------------------- data


def sharded_batches(shards: list, batch: int, seq_len: int, rng: np.random.Generator) -> Iterator[data.Split]:
  """One batch per replica, each from its own shard, stacked on a leading replica axis."""
  streams = [data.lm_batches(s, batch, seq_len, rng) for s in shards]
  while True:
    parts = [next(s) for s in streams]
    yield data.Split(np.stack([p.x for p in parts]), np.stack([p.y for p in parts]))


def fixed_batches(tokens: np.ndarray, n: int, batch: int, seq_len: int, seed: int = 1234) -> list:
  stream = data.lm_batches(tokens, batch, seq_len, np.random.default_rng(seed))
  return [next(stream) for _ in range(n)]


# ----------------------------------------------------------------- experiments


def make_model(cfg: dict, vocab: int, seed: int):
  """``(apply, params)``; ``apply`` is the same for every seed (same architecture)."""
  return harness.functional(models.TransformerLM(vocab, dim=cfg["dim"], heads=cfg["heads"], layers=cfg["layers"],
                                                 max_len=cfg["seq_len"], rngs=nnx.Rngs(seed)))


def make_eval(apply, val_batches):
  @jax.jit
  def val_loss(params):
    return jnp.mean(jnp.stack([harness.cross_entropy(apply(params, b.x), b.y) for b in val_batches]))

  return lambda params: {"val_loss": val_loss(params)}


def single_process(cfg: dict, corpus: data.CharCorpus, apply, inits: list, evaluate, progress: bool) -> dict:
  """Experiment 1: name -> list over seeds of {"curve": [(step, val_loss)], "final_val_loss", "train_loss"}."""
  out = {}
  loss_fn = lambda p, b: harness.cross_entropy(apply(p, b.x), b.y)
  for name, make in single_process_optimizers(cfg["lr"], cfg["single"]).items():
    runs = []
    for seed, params in enumerate(inits):
      batches = data.lm_batches(corpus.train, cfg["batch"], cfg["seq_len"], np.random.default_rng(seed))
      _, _, hist = harness.train(loss_fn, params, make(), batches, cfg["steps"], eval_fn=evaluate,
                                 eval_every=cfg["eval_every"], desc=f"{name} seed {seed}", progress=progress)
      curve = [(s, m["val_loss"]) for s, m in hist.evals]
      runs.append({"curve": curve, "final_val_loss": curve[-1][1],
                   "train_loss": float(hist.losses[-cfg["eval_every"]:].mean()), "seconds": hist.seconds})
    out[name] = runs
  return out


def data_parallel_optimizers(cfg: dict) -> dict:
  """Name -> (per-replica optimizer, sync period or None) for experiment 2."""
  adamw = lambda: optax.adamw(cfg["lr"], weight_decay=0.01)
  opts = {"Synchronous DP AdamW": (lambda: optax.chain(all_reduce_gradients(AXIS), adamw()), 1)}
  for h in cfg["sync_periods"]:
    opts[f"DiLoCo(AdamW), H={h}, lr=0.7, mu=0.9"] = (
        lambda h=h: diloco(adamw(), k=h, outer_learning_rate=0.7, outer_momentum=0.9, axis_name=AXIS), h)
  return opts


def distributed(cfg: dict, corpus: data.CharCorpus, apply, inits: list, evaluate, progress: bool) -> dict:
  """Experiment 2: name -> {"period", "rounds", "runs": [{"curve": [(step, rounds, samples, val_loss)]}]}."""
  m = cfg["replicas"]
  shards = np.array_split(corpus.train, m)
  eval_fn = lambda p: evaluate(jax.tree.map(lambda x: x[0], p))  # replicas agree after each sync
  # Sum (not mean) over replicas: each replica's slice of the gradient is its own gradient exactly.
  loss_fn = lambda p, b: jnp.sum(jax.vmap(lambda q, x, y: harness.cross_entropy(apply(q, x), y))(p, b.x, b.y))
  out = {}
  for name, (make, period) in data_parallel_optimizers(cfg).items():
    # DiLoCo: evaluate at every sync (fast == slow there); DP as often as the most frequent sync.
    eval_every = period if period > 1 else min(cfg["sync_periods"])
    probe = inits[0]
    counts = count_all_reduces(jax.make_jaxpr(
        lambda g, s, p: make().update(g, s, p), axis_env=[(AXIS, m)])(probe, make().init(probe), probe))
    # A round: one step's all-reduces (XLA combines the per-leaf ones into one collective).
    per_period = period * (counts["every_step"] > 0) + (counts["every_step"] == 0) * (
        (counts["sync_branch"] > 0) + (period - 1) * (counts["other_branch"] > 0))
    rounds_per_step = per_period / period
    runs = []
    for seed, params in enumerate(inits):
      stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), params)
      batches = sharded_batches(shards, cfg["replica_batch"], cfg["seq_len"], np.random.default_rng(seed))
      _, _, hist = harness.train(loss_fn, stacked, replicated(make()), batches, cfg["dp_steps"], eval_fn=eval_fn,
                                 eval_every=eval_every, desc=f"{name} seed {seed}", progress=progress)
      samples_per_step = m * cfg["replica_batch"]
      curve = [(s, s * rounds_per_step, s * samples_per_step, mt["val_loss"]) for s, mt in hist.evals]
      runs.append({"curve": curve, "final_val_loss": curve[-1][3],
                   "train_loss": float(hist.losses[-eval_every:].mean() / m), "seconds": hist.seconds})
    out[name] = {"period": period, "all_reduces_in_program": counts, "rounds_per_period": per_period,
                 "rounds_total": cfg["dp_steps"] * rounds_per_step, "runs": runs}
  return out


# --------------------------------------------------------------------- outputs


def _mean_curve(curves, col):
  arr = np.asarray([[row[col] for row in c] for c in curves], dtype=float)
  return arr.mean(0), arr.std(0)


def plot(results: dict, out_dir: str) -> list:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, runs in results["single_process"].items():
    steps = [s for s, _ in runs[0]["curve"]]
    mean, std = _mean_curve([r["curve"] for r in runs], 1)
    ax.plot(steps, mean, label=name)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
  ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="Transformer LM: equal steps")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "outer_lm.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  for col, xlabel, fname, logx in ((1, "cross-replica communication rounds (all-reduces)", "outer_diloco_rounds.png", True),
                                   (2, "training samples (sequences, all replicas)", "outer_diloco_samples.png", False)):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results["distributed"].items():
      x = np.asarray([row[col] for row in res["runs"][0]["curve"]], dtype=float)
      mean, std = _mean_curve([r["curve"] for r in res["runs"]], 3)
      ax.plot(x, mean, marker=".", label=name)
      ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if logx:
      ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="validation loss (nats/char)",
           title=f"{results['config']['replicas']} replicas: DiLoCo vs synchronous DP")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, fname))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def markdown(results: dict) -> str:
  cfg = results["config"]
  lines = ["# Beyond Lookahead: SNOO and DiLoCo", "",
           f"Generated by `python -m benchmarks.outer{' --quick' if results['quick'] else ''}` "
           f"in {results['seconds']:.0f} s on {results['environment']['platform']} "
           f"({results['environment']['cpus']} CPUs); jax {results['environment']['jax']}, "
           f"optax {results['environment']['optax']}.", "",
           f"Character-level `TransformerLM` (dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads) on "
           f"`pydoc_data` text, sequences of {cfg['seq_len']} characters, inner AdamW(lr={cfg['lr']}, wd=0.01), "
           f"{cfg['seeds']} seeds, mean ± std. Validation loss of the slow weights for Lookahead/SNOO.", "",
           f"## 1. Single process, {cfg['steps']} steps, batch {cfg['batch']}", ""]
  base = np.mean([r["final_val_loss"] for r in results["single_process"].get("AdamW", [{"final_val_loss": np.nan}])])
  rows = []
  for name, runs in results["single_process"].items():
    finals = [r["final_val_loss"] for r in runs]
    rows.append([name, harness.mean_std(finals), f"{np.mean(finals) - base:+.4f}",
                 harness.mean_std([r["train_loss"] for r in runs])])
  lines += [harness.markdown_table(["optimizer", "val loss (final)", "Δ vs AdamW", "train loss (last evals window)"],
                                   rows), "", "![](outer_lm.png)", ""]
  m = cfg["replicas"]
  lines += [f"## 2. DiLoCo vs synchronous data parallel, {m} replicas, equal samples", "",
            f"{cfg['dp_steps']} steps, each replica {cfg['replica_batch']} sequences per step from its own shard "
            f"({m * cfg['replica_batch']} sequences per step in all, for every method). Rounds are counted from the "
            "per-replica program (`jax.make_jaxpr` with the replica axis bound): all-reduces outside any `cond` run "
            "every step, those in the sync branch once per sync.", ""]
  rows = []
  dp = results["distributed"].get("Synchronous DP AdamW")
  for name, res in results["distributed"].items():
    finals = [r["final_val_loss"] for r in res["runs"]]
    c = res["all_reduces_in_program"]
    rows.append([name, f"{c['every_step']} / {c['sync_branch']} / {c['other_branch']}",
                 f"{res['rounds_per_period']:g} per {res['period']} step{'s' if res['period'] > 1 else ''}",
                 f"{res['rounds_total']:g}", harness.mean_std(finals),
                 f"{np.mean(finals) - np.mean([r['final_val_loss'] for r in dp['runs']]):+.4f}" if dp else ""])
  lines += [harness.markdown_table(["method", "all-reduces in program (every step / sync branch / non-sync branch)",
                                    "rounds", "rounds in run", "val loss (final)", "Δ vs sync DP"], rows), "",
            "![](outer_diloco_rounds.png)", "", "![](outer_diloco_samples.png)", ""]
  lines += ["## Reading", ""] + results.get("reading", []) + [""]
  return "\n".join(lines)


def reading(results: dict) -> list:
  """Plain statements of who wins and who loses, computed from the numbers."""
  out = []
  sp = {n: np.mean([r["final_val_loss"] for r in runs]) for n, runs in results["single_process"].items()}
  sd = {n: np.std([r["final_val_loss"] for r in runs]) for n, runs in results["single_process"].items()}
  best = min(sp, key=sp.get) if sp else None
  if best:
    out.append(f"- Equal steps, single process: lowest final validation loss is {best} ({sp[best]:.4f}).")
  for name, v in sp.items():
    if name != "AdamW" and "AdamW" in sp:
      verdict = "better than" if v < sp["AdamW"] - sd["AdamW"] else ("worse than" if v > sp["AdamW"] + sd["AdamW"]
                                                                      else "within one std of")
      out.append(f"- {name}: {v:.4f}, {verdict} AdamW.")
  dist = results["distributed"]
  dp_name = "Synchronous DP AdamW"
  if dp_name in dist:
    dp_final = np.mean([r["final_val_loss"] for r in dist[dp_name]["runs"]])
    for name, res in dist.items():
      if name == dp_name:
        continue
      final = np.mean([r["final_val_loss"] for r in res["runs"]])
      out.append(f"- {name}: final val loss {final:.4f} vs {dp_final:.4f} for synchronous DP at equal samples "
                 f"({'lower' if final < dp_final else 'higher'}), with {res['rounds_total']:g} communication "
                 f"rounds instead of {dist[dp_name]['rounds_total']:g}.")
      # DP loss after the same number of rounds DiLoCo used in the whole run.
      curve = dist[dp_name]["runs"][0]["curve"]
      mean, _ = _mean_curve([r["curve"] for r in dist[dp_name]["runs"]], 3)
      reached = [mean[i] for i, row in enumerate(curve) if row[1] <= res["rounds_total"]]
      if reached:
        out.append(f"  At most {res['rounds_total']:g} rounds, synchronous DP reaches {min(reached):.4f}.")
  return out


def run(quick: bool = False, out_dir: str = harness.RESULTS, progress: bool = True, **overrides) -> dict:
  cfg = dict(QUICK if quick else FULL)
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  start = time.perf_counter()
  corpus = data.char_corpus(max_chars=cfg["max_chars"])
  results: dict[str, Any] = {"config": cfg, "quick": quick, "environment": harness.environment()}
  models_ = [make_model(cfg, len(corpus.vocab), seed) for seed in range(cfg["seeds"])]
  apply, inits = models_[0][0], [p for _, p in models_]
  evaluate = make_eval(apply, fixed_batches(corpus.val, cfg["eval_batches"], cfg["batch"], cfg["seq_len"]))
  results["single_process"] = single_process(cfg, corpus, apply, inits, evaluate, progress)
  results["distributed"] = distributed(cfg, corpus, apply, inits, evaluate, progress)
  results["seconds"] = time.perf_counter() - start
  results["reading"] = reading(results)
  os.makedirs(out_dir, exist_ok=True)
  results["figures"] = [os.path.basename(p) for p in plot(results, out_dir)]
  harness.write_json(os.path.join(out_dir, "outer.json"), results)
  with open(os.path.join(out_dir, "outer.md"), "w") as f:
    f.write(markdown(results))
  return results


# ----------------------------------------------------------------- translation

TRANSLATION_FULL = dict(steps=TRANSLATION_STEPS, seeds=3, batch=32, dim=32, heads=4, layers=2, lr=2e-3, warmup=100,
                        n_train=4000, eval_every=200, eval_n=200, single=("AdamW", "Lookahead", "SNOO"))
TRANSLATION_QUICK = dict(steps=10, seeds=1, batch=8, dim=8, heads=2, layers=1, lr=1e-2, warmup=2, n_train=200,
                         eval_every=0, eval_n=16, single=("SNOO(AdamW), k=5",))


def translation_adamw(lr: float, warmup: int):
  """Factory of nmt's Adam (warmup then rsqrt decay, beta2 = 0.98) with decoupled weight decay 0.01."""
  return lambda: optax.adamw(nmt.warmup_rsqrt_schedule(lr, warmup), b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01)


def committed_init(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` whose ``init`` places the state like the (replicated) params, as ``nmt.train_translation`` holds them.

  An eager ``init`` leaves scalars such as AdamW's count uncommitted, so the
  training step compiles twice (first call, then with the committed state it
  returns); a committed state makes it compile once.
  """
  def init(params):
    return jax.device_put(tx.init(params), jax.tree.leaves(params)[0].sharding)

  return optax.GradientTransformation(init, tx.update)


def translation(cfg: dict, progress: bool) -> dict:
  """Experiment 3: name -> list over seeds of {"first_loss", "losses", "evals", "test_loss", "exact_match", ...}."""
  tasks = [nmt.make_translation_task(seed=seed, n_train=cfg["n_train"], dim=cfg["dim"], heads=cfg["heads"],
                                     layers=cfg["layers"]) for seed in range(cfg["seeds"])]
  opts = single_process_optimizers(cfg["lr"], cfg["single"], translation_adamw(cfg["lr"], cfg["warmup"]))
  every = max(1, cfg["steps"] // 100)
  tail = max(1, cfg["steps"] // 10)
  out = {}
  for name, make in opts.items():
    runs = []
    for seed, task in enumerate(tasks):
      _, _, hist = nmt.train_translation(task, committed_init(make()), cfg["steps"], batch_size=cfg["batch"], seed=seed,
                                         eval_every=cfg["eval_every"], eval_n=cfg["eval_n"],
                                         desc=f"{name} seed {seed}", progress=progress)
      runs.append({"first_loss": float(hist.losses[0]), "train_loss": float(hist.losses[-tail:].mean()),
                   "loss_steps": list(range(1, cfg["steps"] + 1, every)),
                   "losses": hist.losses[::every].tolist(), "evals": hist.evals, "seconds": hist.seconds,
                   **hist.evals[-1][1]})
    out[name] = runs
  return out


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
  width = max(1, min(width, len(x)))
  return np.convolve(x, np.ones(width) / width, mode="valid")


def plot_translation(results: dict, out_dir: str) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(10, 4))
  for name, runs in results["runs"].items():
    losses = np.asarray([r["losses"] for r in runs])
    steps = np.asarray(runs[0]["loss_steps"], dtype=float)
    width = max(1, len(steps) // 20)
    mean = _smooth(losses.mean(0), width)
    line, = ax_train.plot(_smooth(steps, width), mean, label=name)
    evals = [[(s, m["test_loss"]) for s, m in r["evals"]] for r in runs]
    x = [s for s, _ in evals[0]]
    mean, std = _mean_curve(evals, 1)
    ax_test.plot(x, mean, marker=".", color=line.get_color(), label=name)
    ax_test.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  ax_train.set(xlabel="step", ylabel="training loss (fast weights, smoothed)", yscale="log",
               title="Number-word translation: training")
  ax_test.set(xlabel="step", ylabel="test loss (slow weights)", yscale="log", title="test (mean ± std over seeds)")
  ax_test.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, "outer_translation.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def reading_translation(results: dict) -> list:
  """Who wins and who loses on translation, computed from the numbers (one std of AdamW as the band)."""
  runs = results["runs"]
  out = []
  for key, label, sign in (("exact_match", "exact match", -1.0), ("test_loss", "test loss", 1.0)):
    mean = {n: np.mean([r[key] for r in rs]) for n, rs in runs.items()}
    if "AdamW" not in mean:
      continue
    band = np.std([r[key] for r in runs["AdamW"]])
    for name, v in mean.items():
      if name == "AdamW":
        continue
      d = sign * (v - mean["AdamW"])
      verdict = "worse than" if d > band else ("better than" if d < -band else "within one std of")
      scale = 100.0 if key == "exact_match" else 1.0
      out.append(f"- {name}: {label} {scale * v:.4g} vs {scale * mean['AdamW']:.4g}: {verdict} AdamW.")
  return out


def markdown_translation(results: dict) -> str:
  cfg, env = results["config"], results["environment"]
  lines = ["# Beyond Lookahead: SNOO on number-word translation", "",
           f"Generated by `python -m benchmarks.outer --task translation{' --quick' if results['quick'] else ''}` "
           f"in {results['seconds']:.0f} s on {env['platform']} ({env['cpus']} CPUs); jax {env['jax']}, "
           f"optax {env['optax']}.", "",
           f"`Seq2SeqTransformer` (dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads) from "
           f"`benchmarks/nmt.py`, English -> German number words ({cfg['n_train']} training pairs, test numbers "
           f"disjoint), {cfg['steps']} steps, batch {cfg['batch']}, inner AdamW(peak lr={cfg['lr']}, linear warmup "
           f"{cfg['warmup']} steps then 1/sqrt decay, beta2=0.98, wd=0.01), {cfg['seeds']} seeds (model init and "
           f"batch order), mean ± std. Test loss (teacher forced) and greedy exact match on the first "
           f"{cfg['eval_n']} test sentences, of the slow weights for Lookahead/SNOO.", ""]
  runs = results["runs"]
  base = np.mean([r["test_loss"] for r in runs["AdamW"]]) if "AdamW" in runs else np.nan
  rows = [[name, harness.mean_std([100.0 * r["exact_match"] for r in rs]),
           harness.mean_std([r["test_loss"] for r in rs]), f"{np.mean([r['test_loss'] for r in rs]) - base:+.4f}",
           harness.mean_std([r["train_loss"] for r in rs])]
          for name, rs in runs.items()]
  lines += [harness.markdown_table(["optimizer", "test exact match %", "test loss", "Δ test loss vs AdamW",
                                    "train loss (last 10% of steps)"], rows), "",
            "![](outer_translation.png)", "", "## Reading", ""] + results.get("reading", []) + [""]
  return "\n".join(lines)


def run_translation(quick: bool = False, out_dir: str = harness.RESULTS, progress: bool = True, **overrides) -> dict:
  """Experiment 3; writes ``outer_translation.{json,md,png}`` under ``out_dir``."""
  cfg = dict(TRANSLATION_QUICK if quick else TRANSLATION_FULL)
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  start = time.perf_counter()
  results: dict[str, Any] = {"task": "translation", "config": cfg, "quick": quick,
                             "environment": harness.environment()}
  results["runs"] = translation(cfg, progress)
  results["seconds"] = time.perf_counter() - start
  results["reading"] = reading_translation(results)
  os.makedirs(out_dir, exist_ok=True)
  results["figures"] = [os.path.basename(plot_translation(results, out_dir))]
  harness.write_json(os.path.join(out_dir, "outer_translation.json"), results)
  with open(os.path.join(out_dir, "outer_translation.md"), "w") as f:
    f.write(markdown_translation(results))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", choices=("lm", "translation"), default="lm",
                      help="lm: experiments 1 and 2 (outer.{md,json}); translation: experiment 3 "
                           "(outer_translation.{md,json,png}) (default lm)")
  parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one seed (smoke test)")
  parser.add_argument("--out", default=harness.RESULTS, help="output folder (default benchmarks/results)")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; quick 1)")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"steps of the single-process runs (default 600; translation {TRANSLATION_STEPS})")
  parser.add_argument("--dp-steps", type=int, default=None, help="steps of the replica runs (default 600)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  if args.task == "translation":
    results = run_translation(args.quick, args.out, not args.no_progress, seeds=args.seeds, steps=args.steps)
    print(markdown_translation(results))
    return
  results = run(args.quick, args.out, not args.no_progress, seeds=args.seeds, steps=args.steps,
                dp_steps=args.dp_steps)
  print(markdown(results))


if __name__ == "__main__":
  main()
