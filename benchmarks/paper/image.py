"""Image classification (paper 5.1 and 5.5: Table 1, Fig. 5, Fig. 8a, Fig. 9 / Table 5, Fig. 10).

An MLP (two hidden layers of 256, GELU) on scikit-learn's 8x8 digits with
random-shift augmentation (or a small pre-activation ResNet, ``models.ResNet``,
on CIFAR-10 from ``cifar-10-batches-bin``: ``model="resnet"``), with the
paper's step-decay schedule shape (x0.2 at 30/60/80 % of training). On a
2-core CPU the MLP trains a grid of 150 runs to about 98 % test accuracy in
minutes; the ResNet costs about five times more per step at this size. SGD is
heavy-ball momentum 0.9; Polyak is the uniform average of the SGD iterates over
the second half of training (``baselines.polyak_average``), evaluated from the
same runs as SGD and tuned on the same grid; LA(X) is ``lookahead(X, k, alpha)``.
The validation split is held out from the training set; accuracy is reported
on the test set.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import data, grid, models, train, tuning
from benchmarks.common.tuning import Metric

FULL = dict(
  dataset="digits",
  data_dir=None,
  model="mlp",
  widths=(256, 256),
  blocks=1,
  steps=1000,
  batch=64,
  max_shift=1,
  n_val=200,
  eval_every=100,
  momentum=0.9,
  k=5,
  grids={
    "SGD": (0.03, 0.05, 0.1, 0.2, 0.3, 0.5),
    "Adam": (2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2),
    "LA(SGD)": (0.3, 0.5, 0.8),
    "LA(Adam)": (2e-2, 3e-2, 5e-2),
  },
  methods=("SGD", "Polyak", "Adam", "LA(SGD)", "LA(Adam)"),
  pairs=(("SGD", "LA(SGD)"), ("Adam", "LA(Adam)")),
  k_alpha_ks=(5, 10),
  trace_start=0.25,
  trace_updates=40,
)
QUICK = tuning.headline_run(FULL, {"SGD": (0.2, 0.3), "LA(SGD)": (0.5,)}, extras=False)

# Table 1 of the paper: CIFAR final validation accuracy (%), ResNet-18, 200 epochs, 3 seeds (no LA(Adam)).
PAPER_TABLE1 = {
  "SGD": ("95.23 ± .19", "78.24 ± .18"),
  "Polyak": ("95.26 ± .04", "77.99 ± .42"),
  "Adam": ("94.84 ± .16", "76.88 ± .39"),
  "LA(SGD)": ("95.27 ± .06", "78.34 ± .05"),
}
# Table 5 of the paper: CIFAR-100 validation accuracy (%) of LA(SGD), rows k, columns alpha; SGD: 77.72.
PAPER_TABLE5 = {(5, 0.5): "78.24 ± .02", (5, 0.8): "78.27 ± .04", (10, 0.5): "78.19 ± .22", (10, 0.8): "77.94 ± .22"}


def splits(cfg: dict) -> dict:
  """``{"train", "val", "test"}``; the validation split is held out from the training set."""
  if cfg["dataset"] == "cifar10":
    if not cfg.get("data_dir"):
      raise ValueError("dataset='cifar10' needs data_dir (the cifar-10-batches-bin directory), got None.")
    ds = data.cifar10(cfg["data_dir"])
  elif cfg["dataset"] == "digits":
    ds = data.digits(image=True)
  else:
    raise ValueError(f"dataset must be 'digits' or 'cifar10', got {cfg['dataset']!r}.")
  train_split, val = data.holdout(ds.train, cfg["n_val"], seed=1)
  return {"train": train_split, "val": val, "test": ds.test}


def model(cfg: dict, channels: int, seed: int):
  if cfg.get("model", "resnet") == "mlp":
    return models.MLP((64 * channels,) + tuple(cfg["widths"]) + (10,), rngs=nnx.Rngs(seed))
  return models.ResNet(channels, 10, tuple(cfg["widths"]), cfg["blocks"], rngs=nnx.Rngs(seed))


def classification_metrics(apply, weights, split: data.Split, prefix: str) -> dict:
  """``{prefix_acc, prefix_loss}`` of ``apply(weights, x)`` on a whole split."""
  logits = apply(weights, split.x)
  return {f"{prefix}_acc": train.accuracy(logits, split.y), f"{prefix}_loss": train.cross_entropy(logits, split.y)}


def problem(cfg: dict) -> grid.Problem:
  arrays = {k: data.Split(jnp.asarray(v.x), jnp.asarray(v.y)) for k, v in splits(cfg).items()}
  channels = arrays["train"].x.shape[-1]
  apply, _ = train.functional(model(cfg, channels, 0))

  def batch(d, key, step):
    order, shift = jax.random.split(key)
    b = data.epoch_batch(d["train"], order, step, cfg["batch"])
    return data.Split(data.shift_images(jax.random.fold_in(shift, step), b.x, cfg["max_shift"]), b.y)

  return grid.Problem(
    init=lambda seed: train.functional(model(cfg, channels, seed))[1],
    loss=lambda p, b: train.cross_entropy(apply(p, b.x), b.y),
    batch=batch,
    evaluate=lambda w, d: classification_metrics(apply, w, d["val"], "val"),
    data=arrays,
  )


def inner(name: str, hp: dict, cfg: dict) -> optax.GradientTransformation:
  """SGD (momentum) or Adam at learning rate ``hp["lr"]`` times the step decay."""
  steps = cfg["steps"]
  decay = optax.piecewise_constant_schedule(1.0, {max(1, int(f * steps)): 0.2 for f in (0.3, 0.6, 0.8)})
  lr = lambda count: hp["lr"] * decay(count)
  if name == "SGD":
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=cfg["momentum"])
  if name == "Adam":
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  raise ValueError(f"image: inner optimizer must be SGD or Adam, got {name!r}.")


def optimizer(family: str, cfg: dict):
  """``hp -> optimizer`` of a family of runs; SGD's runs also keep the Polyak average of their second half."""
  return tuning.optimizer_of(family, inner, cfg, polyak=("SGD",))


def finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  apply = _apply(cfg, prob)
  evaluate = lambda w, d: {
    **classification_metrics(apply, w, d["val"], "val"),
    **classification_metrics(apply, w, d["test"], "test"),
  }
  return tuning.final_metrics(evaluate, prob, g)


def _apply(cfg: dict, prob: grid.Problem):
  return train.functional(model(cfg, prob.data["train"].x.shape[-1], 0))[0]


# ---------------------------------------------------------------- extras


def extras(cfg: dict, prob: grid.Problem, result: dict, seeds) -> dict:
  """Fig. 9 / Table 5 (k x alpha at LA(SGD)'s tuned rate) and Fig. 10 (fast vs slow weights within cycles)."""
  if "LA(SGD)" not in result["methods"]:
    return {}
  lr = tuning.tuned(result, "LA(SGD)")["lr"]
  out = {"k_alpha": {"lr": lr, "rows": []}}
  for k in cfg["k_alpha_ks"]:
    if k == cfg["k"]:  # the tuning runs already hold both alphas at this rate
      rows = [r for r in result["methods"]["LA(SGD)"]["settings"] if np.isclose(r["lr"], lr) and r["eligible"]]
      out["k_alpha"]["rows"] += [
        {"k": k, "alpha": r["alpha"], "metrics": {"test_acc": r["metrics"]["test_acc"]}} for r in rows
      ]
      continue
    sub = dict(cfg, k=k)
    hparams, seed_axis = grid.settings_by_seeds([{"lr": lr, "alpha": a} for a in tuning.ALPHAS], seeds)
    g = grid.train_grid(
      prob, optimizer("LA(SGD)", sub), hparams, seed_axis, cfg["steps"], cfg["eval_every"], chunk=len(seeds)
    )
    acc = finals(sub, prob, g)["main"]["test_acc"]
    for i, a in enumerate(tuning.ALPHAS):
      runs = slice(i * len(seeds), (i + 1) * len(seeds))
      out["k_alpha"]["rows"].append({"k": k, "alpha": a, "metrics": {"test_acc": acc[runs].tolist()}})
  if cfg["trace_updates"]:
    out["trace"] = trace(cfg, prob, tuning.tuned(result, "LA(SGD)"), seeds)
  return out


def trace(cfg: dict, prob: grid.Problem, setting: dict, seeds) -> dict:
  """Test accuracy of the fast and of the slow weights after every update in a window (paper Fig. 10)."""
  start = int(cfg["trace_start"] * cfg["steps"])
  window = int(cfg["trace_updates"])
  apply = _apply(cfg, prob)
  traced = prob._replace(evaluate=lambda w, d: {"test_acc": train.accuracy(apply(w, d["test"].x), d["test"].y)})
  both = lambda params, opt_state: {"fast": params, "slow": train.slow_or_params(params, opt_state)}
  hparams, seed_axis = grid.settings_by_seeds([{"lr": setting["lr"], "alpha": setting["alpha"]}], seeds)
  # The schedule is the full run's, so the window sits at the same point of training.
  g = grid.train_grid(
    traced,
    optimizer("LA(SGD)", cfg),
    hparams,
    seed_axis,
    start + window,
    0,
    weights=both,
    segments=[(start, 1), (1, window)],
    chunk=len(seeds),
  )
  return {
    "lr": setting["lr"],
    "alpha": setting["alpha"],
    "k": cfg["k"],
    "steps": g.eval_steps[1:].tolist(),
    "fast_acc": g.curves["fast"]["test_acc"][:, 1:].tolist(),
    "slow_acc": g.curves["slow"]["test_acc"][:, 1:].tolist(),
  }


TASK = tuning.Task(
  name="image",
  title="Image classification: MLP on shift-augmented digits (paper 5.1, Table 1, Fig. 5)",
  **tuning.polyak_of("SGD"),
  select=Metric("val_acc", "val acc %", True, 100.0),
  headline=Metric("test_acc", "test acc %", True, 100.0),
  columns=(
    Metric("train_loss", "final train loss", False, 1.0, 4),
    Metric("val_acc", "val acc %", True, 100.0),
    Metric("test_acc", "test acc %", True, 100.0),
    Metric("test_loss", "test loss", False, 1.0, 4),
  ),
  tolerance=(0.01, False),
  paper={
    "SGD vs LA(SGD)": "Table 1: LA(SGD) 95.27 vs SGD 95.23 % (CIFAR-10), 78.34 vs 78.24 % (CIFAR-100)",
    "Adam vs LA(Adam)": "Fig. 5: LA(Adam) above Adam in training loss and accuracy (CIFAR)",
  },
  paper_table=(["paper CIFAR-10 %", "paper CIFAR-100 %"], PAPER_TABLE1),
  problem=problem,
  optimizer=optimizer,
  finals=finals,
  extras=extras,
)


def extras_section(res: dict, figdir: str) -> str:
  """Markdown (and figure) of the k x alpha grid and of the fast/slow trace."""
  from benchmarks.common import report
  from benchmarks.common.verdicts import setting_label

  ex = res["extras"]
  acc = Metric("test_acc", "test acc %", True, 100.0)
  sgd = tuning.tuned(res, "SGD")
  lines = [
    f"### k and alpha (paper Fig. 9, Table 5): LA(SGD) test accuracy % at its tuned lr {ex['k_alpha']['lr']:g}",
    "",
  ]
  rows = []
  for r in ex["k_alpha"]["rows"]:
    c = tuning.comparison(r, sgd, acc)
    rows.append(
      [
        f"k={r['k']}, alpha={r['alpha']:g}",
        acc.cell(r["metrics"]["test_acc"]),
        PAPER_TABLE5.get((r["k"], r["alpha"]), "-"),
        f"LA(SGD) {c['verdict']} SGD (p = {c['p']:.3f})",
      ]
    )
  lines += [
    report.markdown_table(["setting", "test acc % (ours)", "paper CIFAR-100 %", "against tuned SGD"], rows),
    "",
    f"Tuned SGD ({setting_label(sgd)}): {acc.cell(sgd['metrics']['test_acc'])} % (paper: 77.72 %).",
    "",
  ]
  if "trace" not in ex:
    return "\n".join(lines)
  tr = ex["trace"]
  fast, slow = 100 * np.asarray(tr["fast_acc"]), 100 * np.asarray(tr["slow_acc"])
  lines += [
    "### Inner loop against outer loop (paper Fig. 10)",
    "",
    f"LA(SGD) at lr {tr['lr']:g}, alpha {tr['alpha']:g}, k={tr['k']}: test accuracy after each of "
    f"{fast.shape[1]} updates from step {tr['steps'][0]}, mean over {fast.shape[0]} seeds: fast weights "
    f"{fast.mean():.2f} % on average (lowest {fast.mean(0).min():.2f} %), slow weights {slow.mean():.2f} %. "
    "The paper sees the fast weights' accuracy fall within each inner loop and the slow step restore it.",
    "",
  ]
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.plot(tr["steps"], fast.mean(0), marker=".", label="fast weights (after each update)")
  ax.plot(tr["steps"], slow.mean(0), label="slow weights")
  ax.set(xlabel="step", ylabel="test accuracy % (mean of seeds)", title=f"Lookahead inner vs outer loop (k={tr['k']})")
  ax.legend()
  report.save_figure(fig, os.path.join(figdir, "image_fast_slow_trace.png"))
  lines.append("![trace](image_fast_slow_trace.png)")
  return "\n".join(lines)
