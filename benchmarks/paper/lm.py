"""Language modelling (paper 5.3: Table 3, Fig. 7a).

A character-level LSTM (``models.CharLSTM``) on the English documentation text
of ``pydoc_data.topics`` (ships with CPython), split into train/val/test by
document. As in the paper: SGD without momentum and Adam; Polyak = the SGD
runs' iterates averaged over the second half of training (ASGD, Merity et al.);
LA(X) = ``lookahead(X, k, alpha)``. Constant learning rate, gradients clipped
to global norm 1 (AWD-LSTM clips too). Perplexities are per character:
exp(mean cross-entropy) on non-overlapping windows of each split (of the
training split, its first ``train_eval_chars``).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import data, grid, language, models, train, tuning
from benchmarks.common.tuning import Metric

FULL = dict(
  steps=500,
  batch=16,
  seq_len=48,
  embed=32,
  hidden=64,
  clip=1.0,
  k=5,
  eval_every=50,
  curve_windows=64,
  train_eval_chars=32768,
  eval_chunk=64,
  max_chars=None,
  grids={
    "SGD": (1.0, 2.0, 3.0, 5.0, 10.0, 20.0),
    "Adam": (3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2),
    "LA(SGD)": (5.0, 10.0, 20.0),
    "LA(Adam)": (3e-2, 5e-2, 0.1),
  },
  methods=("SGD", "LA(SGD)", "Adam", "LA(Adam)", "Polyak"),
  pairs=(("SGD", "LA(SGD)"), ("Adam", "LA(Adam)")),
)
QUICK = tuning.headline_run(FULL, {"Adam": (2e-2, 3e-2), "LA(Adam)": (5e-2,)})

# Table 3 of the paper: Penn Treebank word-level perplexity (train, val, test), AWD-LSTM, 750 epochs.
PAPER_TABLE3 = {
  "SGD": ("43.62", "66.0", "63.90"),
  "LA(SGD)": ("35.02", "65.10", "63.04"),
  "Adam": ("33.54", "61.64", "59.33"),
  "LA(Adam)": ("31.92", "60.28", "57.72"),
  "Polyak": ("-", "61.18", "58.79"),
}


def model(cfg: dict, seed: int) -> models.CharLSTM:
  return models.CharLSTM(len(data.CHAR_VOCAB), cfg["embed"], cfg["hidden"], rngs=nnx.Rngs(seed))


def problem(cfg: dict) -> grid.Problem:
  prob = language.problem(cfg, lambda seed: model(cfg, seed))
  # The curve in perplexity, like the tables.
  return prob._replace(evaluate=lambda w, d: {"val_ppl": jnp.exp(prob.evaluate(w, d)["val_loss"])})


def inner(name: str, hp: dict, cfg: dict) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(cfg["clip"])
  if name == "SGD":
    return optax.chain(clip, optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"]))
  if name == "Adam":
    return optax.chain(clip, optax.inject_hyperparams(optax.adam)(learning_rate=hp["lr"]))
  raise ValueError(f"lm: inner optimizer must be SGD or Adam, got {name!r}.")


def finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  apply = train.functional_params(model(cfg, 0))[0]
  evaluate = lambda w, d: {f"{k}_ppl": jnp.exp(v) for k, v in language.split_losses(apply, w, d).items()}
  return tuning.final_metrics(evaluate, prob, g)


TASK = tuning.Task(
  name="lm",
  title="Language modelling: character LSTM on pydoc text (paper 5.3, Table 3, Fig. 7a)",
  **tuning.polyak_of("SGD"),
  select=Metric("val_ppl", "val ppl", False),
  headline=Metric("test_ppl", "test ppl", False),
  columns=(
    Metric("train_ppl", "train ppl", False),
    Metric("val_ppl", "val ppl", False),
    Metric("test_ppl", "test ppl", False),
  ),
  tolerance=(0.02, True),
  paper={
    "SGD vs LA(SGD)": "Table 3: LA(SGD) 63.04 vs SGD 63.90 test ppl (PTB)",
    "Adam vs LA(Adam)": "Table 3: LA(Adam) 57.72 vs Adam 59.33 test ppl (PTB)",
  },
  paper_table=(["paper train", "paper val", "paper test"], PAPER_TABLE3),
  problem=problem,
  optimizer=lambda family, cfg: tuning.optimizer_of(family, inner, cfg, polyak=("SGD",)),
  finals=finals,
)
