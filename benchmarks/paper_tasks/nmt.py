"""Translation (paper 5.4: Table 4, Fig. 7b, and the learning-rate robustness of its NMT paragraph).

The encoder-decoder Transformer (``models.Seq2SeqTransformer``) on the
synthetic English-to-German number-word task (``data.number_words``: "twenty
one" -> "einundzwanzig", which needs reordering), trained with Vaswani et
al.'s warmup-then-rsqrt-decay learning rate. Adam (beta2 = 0.98) is tuned over
a small grid of peak learning rates on a validation split held out from the
training numbers; LA(Adam) = ``lookahead(Adam, k=5, alpha=0.5)`` at the same
peak; "Adam-" drops the warmup (the same decay from the first step); Adafactor
(``optax.adafactor``, its own peak grid) uses the warmup schedule. Test
numbers are disjoint from the training numbers; we report greedy-decoding
exact match and character BLEU (``sacrebleu``, ``tokenize="char"``, since each
German target is one word). The loss, greedy decoding and the data-parallel
batches over a ``jax.devices()`` mesh come from ``benchmarks/nmt.py``.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import data, harness, models
from benchmarks import nmt as translation
from benchmarks.paper_tasks import Sweep, cell, curve, early_sentence, summarize, tail_mean, verdict, warmup_rsqrt, with_lr
from lookahead_optax import lookahead

FULL = dict(steps=600, batch=32, dim=32, heads=4, layers=2, n_train=700, n_val=100, n_test=200,
            max_number=1000, warmup=0.1, eval_every=200, adam_grid=(1e-3, 3e-3, 1e-2),
            adafactor_grid=(3e-2, 1e-1), robust_lrs=(1e-3, 3e-3, 1e-2))
QUICK = dict(FULL, steps=40, eval_every=20, n_train=400, n_val=50, n_test=50, max_number=500,
             adam_grid=(3e-3,), adafactor_grid=(3e-2,), robust_lrs=(1e-2,))

OPTIMIZERS = ("Adam", "LA(Adam)", "Adam-", "LA(Adam-)", "Adafactor")

# Table 4 of the paper: BLEU of the Transformer base model after 50k steps on WMT'14 En-De.
PAPER_TABLE4 = {"Adam": ("24.6", "24.6"), "LA(Adam)": ("24.68", "24.70"), "Adam-": ("-", "-"),
                "LA(Adam-)": ("24.3", "24.4"), "Adafactor": ("24.17", "24.51")}


def detokenize(tokens: np.ndarray, vocab: list[str]) -> list[str]:
  out = []
  for row in np.asarray(tokens):
    chars = []
    for t in row[1:]:
      if t in (data.EOS, data.PAD):
        break
      chars.append(vocab[t] if t > data.EOS else "")
    out.append("".join(chars))
  return out


def run(cfg: dict, seeds: int = 3, progress: bool = True) -> dict:
  import sacrebleu

  ds = data.number_words(n_train=cfg["n_train"] + cfg["n_val"], n_test=cfg["n_test"], max_number=cfg["max_number"])
  n = cfg["n_train"]
  train_split = data.Split(ds.train.x[:n], ds.train.y[:n])
  val_split = data.Split(ds.train.x[n:], ds.train.y[n:])
  refs = [data.german_number(int(k)) for k in ds.test_numbers]
  steps, warm = cfg["steps"], max(1, int(cfg["warmup"] * cfg["steps"]))
  make_model = lambda seed: models.Seq2SeqTransformer(len(ds.src_vocab), len(ds.tgt_vocab), cfg["dim"], cfg["heads"],
                                                      cfg["layers"], rngs=nnx.Rngs(seed))
  graphdef = nnx.split(make_model(0))[0]
  # Loss, greedy decoding and the data-parallel mesh come from benchmarks/nmt.py.
  task = translation.TranslationTask(ds, graphdef, None)
  loss_fn = task.loss
  eval_loss = jax.jit(loss_fn)
  mesh = translation.data_mesh()

  def optimizer(name, lr):
    adam = optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-9)
    if name == "Adafactor":
      # optax.adafactor() ends with a sign flip; undo it so that with_lr takes the descent step.
      direction = optax.chain(optax.adafactor(min_dim_size_to_factor=32), optax.scale(-1.0))
      return with_lr(direction, lr, warmup_rsqrt(warm))
    if name not in ("Adam", "LA(Adam)", "Adam-", "LA(Adam-)"):
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    inner = with_lr(adam, lr, warmup_rsqrt(warm, use_warmup=not name.endswith("-)") and name != "Adam-"))
    return lookahead(inner, k=5, alpha=0.5) if name.startswith("LA(") else inner

  def run_one(name, lr, seed):
    params = jax.device_put(nnx.split(make_model(seed))[1], NamedSharding(mesh, P()))  # replicated
    batches = translation.sharded_batches(train_split, cfg["batch"], np.random.default_rng(seed), mesh)
    eval_fn = lambda p: {"val_loss": eval_loss(p, val_split)}
    final, opt_state, hist = harness.train(loss_fn, params, optimizer(name, lr), batches, steps, eval_fn=eval_fn,
                                           eval_every=cfg["eval_every"], desc=f"nmt {name} lr={lr:g} s={seed}",
                                           progress=progress)
    weights = harness.eval_params(final, opt_state)
    pred = jax.device_get(translation.greedy_decode(task, weights, ds.test.x))
    hyps = detokenize(pred, ds.tgt_vocab)
    return {"train_loss": tail_mean(hist.losses), "curve": curve(hist.losses), "seconds": hist.seconds,
            "val_loss": float(eval_loss(weights, val_split)), "test_loss": float(eval_loss(weights, ds.test)),
            "exact_match": translation.exact_match(pred, ds.test.y),
            "bleu": float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score),
            "examples": [[data.english_number(int(k)), r, h] for k, r, h in zip(ds.test_numbers[:3], refs, hyps)]}

  sweep = Sweep(run_one)
  tuning = {"Adam": sweep.tune("Adam", cfg["adam_grid"], "val_loss", False),
            "Adafactor": sweep.tune("Adafactor", cfg["adafactor_grid"], "val_loss", False)}
  lr = {name: tuning["Adam"]["best"] for name in ("Adam", "LA(Adam)", "Adam-", "LA(Adam-)")}
  lr["Adafactor"] = tuning["Adafactor"]["best"]
  keys = ("train_loss", "val_loss", "test_loss", "exact_match", "bleu")
  main = {}
  for name in OPTIMIZERS:
    rows = sweep.seeds(name, lr[name], seeds)
    main[name] = {"summary": summarize(rows, keys), "curves": [r["curve"] for r in rows],
                  "examples": rows[0]["examples"]}
  robust = {}
  for name in ("Adam", "LA(Adam)"):
    for r_lr in cfg["robust_lrs"]:
      row = sweep(name, r_lr, 0)
      robust[f"{name} lr={r_lr:g}"] = {k: row[k] for k in ("train_loss", "val_loss", "exact_match", "bleu", "curve")}
  return {"config": dict(cfg), "devices": jax.device_count(), "sizes": {"train": n, "val": len(val_split.x),
                                                                       "test": len(ds.test.x)},
          "tuning": tuning, "lr": lr, "main": main, "robust": robust}


def report(res: dict, figdir: str, prefix: str = "paper_") -> str:
  import os

  cfg = res["config"]
  lines = ["## 3. Translation: Transformer on English -> German number words (paper 5.4, Table 4, Fig. 7b)", "",
           f"Seq2SeqTransformer (dim {cfg['dim']}, {cfg['layers']}+{cfg['layers']} layers, {cfg['heads']} heads), "
           f"{cfg['steps']} steps of batch {cfg['batch']}, warmup {cfg['warmup']:.0%} of the steps then rsqrt decay; "
           f"numbers below {cfg['max_number']}, split sizes {res['sizes']}, {res['devices']} device(s). "
           "Tuned peak learning rates (validation loss, seed 0): "
           + ", ".join(f"{k} {t['best']:g} (grid {', '.join(f'{float(g):g}' for g in t['grid'])})"
                       for k, t in res["tuning"].items()) + ".", ""]
  rows = []
  for opt in OPTIMIZERS:
    s = res["main"][opt]["summary"]
    rows.append([opt, cell(s, "train_loss", 1, 4), cell(s, "test_loss", 1, 4), cell(s, "exact_match", 100),
                 cell(s, "bleu"), *PAPER_TABLE4[opt]])
  lines.append(harness.markdown_table(["optimizer", "final train loss", "test loss", "exact match %", "char BLEU",
                                       "paper BLEU newstest13", "paper BLEU newstest14"], rows))
  S = {k: v["summary"] for k, v in res["main"].items()}
  lines += ["", "What matches and what does not:", ""]
  for la, base in (("LA(Adam)", "Adam"), ("LA(Adam-)", "Adam-"), ("LA(Adam)", "Adafactor")):
    lines.append("- " + verdict(la, base, S, "bleu", True, "char BLEU") + " "
                 + verdict(la, base, S, "exact_match", True, "exact match", 100, " %") + " "
                 + early_sentence(la, base, res["main"], 0.1) + " " + early_sentence(la, base, res["main"]))
  robust = res["robust"]
  for name in ("Adam", "LA(Adam)"):
    losses = [v["train_loss"] for k, v in robust.items() if k.startswith(name + " ")]
    lines.append(f"- Across peak learning rates {', '.join(k.split('=')[1] for k in robust if k.startswith(name + ' '))}, "
                 f"{name}'s final train loss spans {min(losses):.4g} to {max(losses):.4g} (ratio {max(losses) / min(losses):.3g}).")
  lines.append("- Paper (Table 4, Fig. 7b): Lookahead speeds up the early stage of training over Adam and Adafactor, "
               "all methods end at similar loss and BLEU; Lookahead converges to similar final losses over a wider "
               "range of learning rates.")
  ex = res["main"]["LA(Adam)"]["examples"]
  lines += ["", "LA(Adam), seed 0, first test numbers (source -> reference / output): "
            + "; ".join(f"\"{s}\" -> {r} / {h}" for s, r, h in ex) + ".", "",
            "### Learning-rate robustness (the paper's NMT paragraph; seed 0)", ""]
  rows = [[key, f"{v['train_loss']:.4f}", f"{v['val_loss']:.4f}", f"{100 * v['exact_match']:.1f}", f"{v['bleu']:.1f}"]
          for key, v in res["robust"].items()]
  lines.append(harness.markdown_table(["setting", "final train loss", "val loss", "exact match %", "char BLEU"], rows))
  lines += ["", f"![Fig. 7b]({prefix}fig7b_nmt.png)", ""]
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  for opt in OPTIMIZERS:
    arr = np.asarray(res["main"][opt]["curves"], dtype=float)
    a.plot(arr[0, :, 0], arr[:, :, 1].mean(0), ls="-" if opt.startswith("LA") else "--", label=opt)
  for key, v in res["robust"].items():
    c = np.asarray(v["curve"])
    b.plot(c[:, 0], c[:, 1], ls="-" if key.startswith("LA") else "--", label=key)
  a.set(yscale="log", xlabel="step", ylabel="train loss (mean of seeds)", title="number-word translation")
  b.set(yscale="log", xlabel="step", ylabel="train loss", title="peak learning rates (seed 0)")
  a.legend(fontsize=8), b.legend(fontsize=7)
  fig.tight_layout(), fig.savefig(os.path.join(figdir, f"{prefix}fig7b_nmt.png"), dpi=110), plt.close(fig)
  return "\n".join(lines)
