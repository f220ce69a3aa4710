"""Language modelling (paper 5.3: Table 3, Fig. 7a).

A character-level LSTM (``models.CharLSTM``) on the English documentation text
of ``pydoc_data.topics`` (ships with CPython), split into train/val/test by
document. As in the paper: SGD without momentum and Adam, each tuned on
validation perplexity over a small grid; LA(X) = ``lookahead(X, k=5,
alpha=0.5)`` at X's tuned learning rate; Polyak = the SGD run's iterates
averaged over the second half of training (ASGD, Merity et al.). Constant
learning rate, gradients clipped to global norm 1 (AWD-LSTM clips too).
Perplexities are per character: exp(mean cross-entropy) on non-overlapping
windows of each split (the training split: its first ``train_eval_chars``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import data, harness, models
from benchmarks.paper_tasks import Sweep, cell, curve, early_sentence, padded_chunks, summarize, tail_mean, verdict, with_lr
from lookahead_optax import lookahead

FULL = dict(steps=400, batch=32, seq_len=48, embed=32, hidden=128, clip=1.0, eval_every=100,
            sgd_grid=(0.5, 1.0, 2.0), adam_grid=(1e-3, 3e-3, 1e-2), train_eval_chars=32768, max_chars=None)
QUICK = dict(FULL, steps=40, eval_every=20, sgd_grid=(1.0,), adam_grid=(3e-3,), train_eval_chars=4096,
             max_chars=20000)

OPTIMIZERS = ("SGD", "LA(SGD)", "Adam", "LA(Adam)", "Polyak")

# Table 3 of the paper: Penn Treebank word-level perplexity (train, val, test), AWD-LSTM, 750 epochs.
PAPER_TABLE3 = {"SGD": ("43.62", "66.0", "63.90"), "LA(SGD)": ("35.02", "65.10", "63.04"),
                "Adam": ("33.54", "61.64", "59.33"), "LA(Adam)": ("31.92", "60.28", "57.72"),
                "Polyak": ("-", "61.18", "58.79")}


def windows(tokens: np.ndarray, seq_len: int) -> data.Split:
  """Non-overlapping (input, next-token) windows covering ``tokens``."""
  n = (len(tokens) - 1) // seq_len
  x = tokens[: n * seq_len].reshape(n, seq_len)
  y = tokens[1 : n * seq_len + 1].reshape(n, seq_len)
  return data.Split(x, y)


def run(cfg: dict, seeds: int = 3, progress: bool = True) -> dict:
  corpus = data.char_corpus(max_chars=cfg["max_chars"])
  steps = cfg["steps"]
  make_model = lambda seed: models.CharLSTM(len(corpus.vocab), cfg["embed"], cfg["hidden"], rngs=nnx.Rngs(seed))
  apply, _ = harness.functional_params(make_model(0))
  loss_fn = lambda p, b: harness.cross_entropy(apply(p, b.x), b.y)
  splits = {"train": windows(corpus.train[: cfg["train_eval_chars"] + 1], cfg["seq_len"]),
            "val": windows(corpus.val, cfg["seq_len"]), "test": windows(corpus.test, cfg["seq_len"])}

  @jax.jit
  def summed_loss(p, x, y, n):
    losses = optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y)
    return jnp.sum(losses * (jnp.arange(len(y)) < n)[:, None])

  def perplexity(p, split, chunk=128):
    total = sum(float(summed_loss(p, x, y, n)) for x, y, n in padded_chunks(split, chunk))
    return float(np.exp(total / split.y.size))

  def optimizer(name, lr):
    clip = optax.clip_by_global_norm(cfg["clip"])
    if name in ("SGD", "LA(SGD)"):
      inner = with_lr(clip, lr)
    elif name in ("Adam", "LA(Adam)"):
      inner = with_lr(optax.chain(clip, optax.scale_by_adam()), lr)
    else:
      raise ValueError(f"optimizer must be one of SGD, Adam, LA(SGD), LA(Adam), got {name!r}.")
    if name.startswith("LA("):
      return lookahead(inner, k=5, alpha=0.5)
    return harness.polyak_average(inner, start=steps // 2) if name == "SGD" else inner

  def run_one(name, lr, seed):
    params = harness.functional_params(make_model(seed))[1]
    polyak = name == "SGD"
    eval_on = (lambda p, s: (p, harness.polyak_params(p, s))) if polyak else "slow"
    eval_fn = lambda w: {"val_ppl": perplexity(w[0] if polyak else w, splits["val"])}
    batches = data.lm_batches(corpus.train, cfg["batch"], cfg["seq_len"], np.random.default_rng(seed))
    final, opt_state, hist = harness.train(loss_fn, params, optimizer(name, lr), batches, steps, eval_fn=eval_fn,
                                           eval_every=cfg["eval_every"], eval_on=eval_on,
                                           desc=f"lm {name} lr={lr:g} s={seed}", progress=progress)
    weights = harness.eval_params(final, opt_state, eval_on)
    fast, avg = weights if polyak else (weights, None)
    row = {"train_loss": tail_mean(hist.losses), "curve": curve(hist.losses), "seconds": hist.seconds,
           "val_curve": [[s, m["val_ppl"]] for s, m in hist.evals]}
    row.update({f"{k}_ppl": perplexity(fast, v) for k, v in splits.items()})
    if avg is not None:
      row.update({f"polyak_{k}_ppl": perplexity(avg, v) for k, v in splits.items()})
    return row

  sweep = Sweep(run_one)
  tuning = {"SGD": sweep.tune("SGD", cfg["sgd_grid"], "val_ppl", False),
            "Adam": sweep.tune("Adam", cfg["adam_grid"], "val_ppl", False)}
  lr = {"SGD": tuning["SGD"]["best"], "Adam": tuning["Adam"]["best"]}
  lr.update({"LA(SGD)": lr["SGD"], "LA(Adam)": lr["Adam"], "Polyak": lr["SGD"]})
  keys = ("train_ppl", "val_ppl", "test_ppl", "train_loss")
  main = {}
  for name in ("SGD", "LA(SGD)", "Adam", "LA(Adam)"):
    rows = sweep.seeds(name, lr[name], seeds)
    main[name] = {"summary": summarize(rows, keys), "curves": [r["curve"] for r in rows]}
    if name == "SGD":
      polyak = [{f"{k}_ppl": r[f"polyak_{k}_ppl"] for k in splits} for r in rows]
      main["Polyak"] = {"summary": summarize(polyak, ("train_ppl", "val_ppl", "test_ppl"))}
  return {"config": dict(cfg), "sizes": {k: int(v.y.size) for k, v in splits.items()} | {
      "train_chars": int(len(corpus.train))}, "tuning": tuning, "lr": lr, "main": main}


def report(res: dict, figdir: str, prefix: str = "paper_") -> str:
  import os

  cfg = res["config"]
  lines = ["## 2. Language modelling: character LSTM on pydoc text (paper 5.3, Table 3, Fig. 7a)", "",
           f"CharLSTM (embed {cfg['embed']}, hidden {cfg['hidden']}), {cfg['steps']} steps of {cfg['batch']} x "
           f"{cfg['seq_len']} characters from {res['sizes']['train_chars']} training characters; perplexity per "
           f"character on {res['sizes']}. Tuned learning rates (validation perplexity, seed 0): "
           + ", ".join(f"{k} {t['best']:g} (grid {', '.join(f'{float(g):g}' for g in t['grid'])})"
                       for k, t in res["tuning"].items()) + ".", ""]
  rows = []
  for opt in OPTIMIZERS:
    s = res["main"][opt]["summary"]
    rows.append([opt, cell(s, "train_ppl"), cell(s, "val_ppl"), cell(s, "test_ppl"), *PAPER_TABLE3[opt]])
  lines.append(harness.markdown_table(["optimizer", "train ppl", "val ppl", "test ppl", "paper train",
                                       "paper val", "paper test"], rows))
  S = {k: v["summary"] for k, v in res["main"].items()}
  lines += ["", "What matches and what does not:", ""]
  for la, base in (("LA(SGD)", "SGD"), ("LA(Adam)", "Adam")):
    lines.append("- " + verdict(la, base, S, "test_ppl", False, "test perplexity") + " "
                 + verdict(la, base, S, "train_ppl", False, "train perplexity") + " " + early_sentence(la, base, res["main"]))
  lines.append("- " + verdict("Polyak", "SGD", S, "test_ppl", False, "test perplexity") + " "
               + verdict("LA(Adam)", "Polyak", S, "test_ppl", False, "test perplexity"))
  lines.append("- Paper (Table 3): LA(Adam) is best on train, validation and test perplexity; LA(SGD) improves on "
               "SGD; Polyak (ASGD) improves on Adam but not on LA(Adam).")
  lines += ["", f"![Fig. 7a]({prefix}fig7a_lm.png)", ""]
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for opt in ("SGD", "LA(SGD)", "Adam", "LA(Adam)"):
    arr = np.asarray(res["main"][opt]["curves"], dtype=float)
    ax.plot(arr[0, :, 0], np.exp(arr[:, :, 1].mean(0)), ls="-" if opt.startswith("LA") else "--", label=opt)
  ax.set(yscale="log", xlabel="step", ylabel="train perplexity (batch, mean of seeds)",
         title="char-LSTM training perplexity")
  ax.legend()
  fig.tight_layout(), fig.savefig(os.path.join(figdir, f"{prefix}fig7a_lm.png"), dpi=110), plt.close(fig)
  return "\n".join(lines)


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
