"""Translation (paper 5.4: Table 4, Fig. 7b, and the learning-rate robustness of its NMT paragraph).

The encoder-decoder Transformer of ``common.translation`` on English -> German
number words ("twenty one" -> "einundzwanzig"), trained with Vaswani et al.'s
warmup-then-rsqrt-decay learning rate. Adam has beta2 = 0.98; "Adam-" drops
the warmup (the same decay from the first step); Adafactor
(``optax.adafactor``) uses the warmup schedule; LA(X) = ``lookahead(X, k,
alpha)``. Learning rates are the schedules' peaks. The validation numbers are
held out from the training numbers and the test numbers from both; we report
exact match: the share of test numbers that greedy decoding translates exactly
(each German target is one word, so a sentence is right or wrong; the paper
reports BLEU).
"""

from __future__ import annotations

import optax

from benchmarks.common import grid, tuning
from benchmarks.common import translation as tr
from benchmarks.common.tuning import Metric

FULL = dict(
  tr.CONFIG,
  k=5,
  grids={
    "Adam": (2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2),
    "Adam-": (2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2),
    "Adafactor": (1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3),
    "LA(Adam)": (3e-2, 5e-2, 0.1),
    "LA(Adam-)": (2e-2, 3e-2, 5e-2),
  },
  methods=("Adam", "LA(Adam)", "Adam-", "LA(Adam-)", "Adafactor"),
  pairs=(("Adam", "LA(Adam)"), ("Adam-", "LA(Adam-)")),
  sensitivity=("LA(Adam)",),
)
QUICK = tuning.headline_run(FULL, {"Adam": (1e-2, 2e-2), "LA(Adam)": (3e-2,)})

# Table 4 of the paper: BLEU of the Transformer base model after 50k steps on WMT'14 En-De (newstest13, 14); no Adam-.
PAPER_TABLE4 = {
  "Adam": ("24.6", "24.6"),
  "LA(Adam)": ("24.68", "24.70"),
  "LA(Adam-)": ("24.3", "24.4"),
  "Adafactor": ("24.17", "24.51"),
}


def problem(cfg: dict) -> grid.Problem:
  return tr.from_config(cfg).problem(cfg["batch"])


def inner(name: str, hp: dict, cfg: dict) -> optax.GradientTransformation:
  if name == "Adafactor":
    return optax.inject_hyperparams(optax.adafactor, static_args=("min_dim_size_to_factor",))(
      learning_rate=tr.schedule(cfg, hp["lr"]), min_dim_size_to_factor=32
    )
  if name not in ("Adam", "Adam-"):
    raise ValueError(f"translation: inner optimizer must be Adam, Adam- or Adafactor, got {name!r}.")
  schedule = tr.schedule(cfg, hp["lr"], use_warmup=name == "Adam")
  return optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=0.9, b2=0.98, eps=1e-9)


TASK = tuning.Task(
  name="translation",
  title="Translation: Transformer on English -> German number words (paper 5.4, Table 4, Fig. 7b)",
  **tr.METRICS,
  tolerance=(0.02, False),
  sweep=Metric("val_exact_match", "val exact match %", True, 100.0),
  paper={
    "Adam vs LA(Adam)": "Table 4: LA(Adam) 24.68 vs Adam 24.6 BLEU (newstest13)",
    "Adam- vs LA(Adam-)": "Table 4: LA(Adam-) 24.3 BLEU without warmup (Adam- not reported)",
  },
  paper_table=(["paper BLEU newstest13", "paper BLEU newstest14"], PAPER_TABLE4),
  problem=problem,
  optimizer=lambda family, cfg: tuning.optimizer_of(family, inner, cfg),
  finals=tr.finals,
)
