"""The noise-dominated regime of the paper's analysis (section 3.1, Proposition 2).

On the noisy quadratic model, Lookahead's steady-state variance is strictly
below its inner SGD's at the same learning rate, so where gradient noise (not
curvature) limits progress, Lookahead should reach a lower expected loss. This
task builds such a regime from data that ships with scikit-learn: softmax
regression (a convex problem, too small to memorise) on the 8x8 digits, 30 %
of the *training* labels flipped to a random other class (validation and test
labels stay clean), minibatches of 8, plain SGD (no momentum) at a constant
learning rate, so the iterates keep bouncing around the optimum. Reported: the
full-batch training loss (the objective the optimizer minimises, noisy labels
included; its learning-rate sweep is the sensitivity view), and loss and
accuracy on the clean test set.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import data, grid, models, train, tuning
from benchmarks.common.tuning import Metric

FULL = dict(
  steps=3000,
  batch=8,
  hidden=(),
  flip=0.3,
  n_val=200,
  k=5,
  eval_every=100,
  grids={"SGD": (0.03, 0.05, 0.1, 0.2, 0.5, 1.0), "LA(SGD)": (0.2, 0.5, 1.0)},
  methods=("SGD", "LA(SGD)"),
  pairs=(("SGD", "LA(SGD)"),),
)
QUICK = tuning.headline_run(FULL, {"SGD": (0.1, 0.2), "LA(SGD)": (1.0,)})


def splits(cfg: dict) -> dict:
  """Digits with ``flip`` of the training labels replaced by another class; validation and test stay clean."""
  ds = data.digits()
  rest, val = data.holdout(ds.train, cfg["n_val"], seed=1)
  noisy = data.Split(rest.x, data.flip_labels(rest.y, cfg["flip"], 10, seed=2))
  return {"train": noisy, "val": val, "test": ds.test}


def model(cfg: dict, seed: int) -> models.MLP:
  return models.MLP((64,) + tuple(cfg["hidden"]) + (10,), rngs=nnx.Rngs(seed))


def problem(cfg: dict) -> grid.Problem:
  arrays = {k: data.Split(jnp.asarray(v.x), jnp.asarray(v.y)) for k, v in splits(cfg).items()}
  apply = train.functional(model(cfg, 0))[0]
  loss = lambda p, b: train.cross_entropy(apply(p, b.x), b.y)
  return grid.Problem(
    init=lambda seed: train.functional(model(cfg, seed))[1],
    loss=loss,
    batch=lambda d, key, step: data.epoch_batch(d["train"], key, step, cfg["batch"]),
    evaluate=lambda w, d: {"train_objective": loss(w, d["train"]), "val_loss": loss(w, d["val"])},
    data=arrays,
  )


def optimizer(family: str, cfg: dict):
  sgd = lambda name, hp, cfg: optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"])
  return tuning.optimizer_of(family, sgd, cfg)


def equal_rates(res: dict) -> list[dict]:
  """LA(SGD) at alpha 0.5 against SGD at each learning rate both ran: the comparison Proposition 2 makes."""
  sweep = TASK.sweep
  sgd = {r["lr"]: r for r in res["methods"]["SGD"]["settings"]}
  out = []
  for r in res["methods"]["LA(SGD)"]["settings"]:
    if r["alpha"] == tuning.ROBUST_ALPHA and r["lr"] in sgd:
      out.append(
        {
          "lr": r["lr"],
          "sgd": sgd[r["lr"]]["metrics"][sweep.key],
          "la": r["metrics"][sweep.key],
          **tuning.comparison(r, sgd[r["lr"]], sweep),
        }
      )
  return sorted(out, key=lambda row: row["lr"])


def extras_section(res: dict, figdir: str) -> str:
  """The steady-state objective of SGD and LA(SGD) at the same learning rates, each with its test."""
  from benchmarks.common import report

  rows = res["extras"]["equal_rates"]
  if not rows:  # a quick run has no rate in common
    return ""
  m = TASK.sweep
  table = [
    [
      f"{r['lr']:g}",
      m.cell(r["sgd"]),
      m.cell(r["la"]),
      f"{r['diff']:+.4f}",
      f"{r['p']:.3f}",
      f"LA(SGD) {r['verdict']} SGD",
    ]
    for r in rows
  ]
  return "\n".join(
    [
      f"### At the same learning rate (Proposition 2's comparison): {m.label}, alpha 0.5",
      "",
      report.markdown_table(["lr", "SGD", "LA(SGD)", "difference", "Welch p", "verdict"], table),
    ]
  )


def finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  apply = train.functional(model(cfg, 0))[0]

  def evaluate(w, d):
    out = {"train_objective": train.cross_entropy(apply(w, d["train"].x), d["train"].y)}
    for split in ("val", "test"):
      logits = apply(w, d[split].x)
      out[f"{split}_loss"] = train.cross_entropy(logits, d[split].y)
      out[f"{split}_acc"] = train.accuracy(logits, d[split].y)
    return out

  out = grid.map_runs(evaluate, g.weights["main"], prob.data)
  # The expected loss around which the iterates bounce: the objective averaged over the last quarter of training.
  curve = g.curves["main"]["train_objective"]
  out["steady_objective"] = curve[:, -max(1, curve.shape[1] // 4) :].mean(1)
  return {"main": out}


TASK = tuning.Task(
  name="noise",
  title="Noise-dominated regime: digits with flipped labels, batch 8, constant-rate SGD (paper 3.1, Prop. 2)",
  select=Metric("val_loss", "val loss", False, 1.0, 4),
  headline=Metric("test_loss", "test loss", False, 1.0, 4),
  columns=(
    Metric("steady_objective", "full-batch train loss (last quarter)", False, 1.0, 4),
    Metric("val_loss", "val loss", False, 1.0, 4),
    Metric("test_loss", "test loss", False, 1.0, 4),
    Metric("test_acc", "test acc %", True, 100.0),
  ),
  tolerance=(0.02, True),
  sweep=Metric("steady_objective", "full-batch train loss (last quarter)", False, 1.0, 4),
  paper={"SGD vs LA(SGD)": "Prop. 2: LA(SGD)'s steady-state variance below SGD's at the same rate (NQM)"},
  problem=problem,
  optimizer=optimizer,
  finals=finals,
  extras=lambda cfg, prob, res, seeds: {"equal_rates": equal_rates(res)},
)
