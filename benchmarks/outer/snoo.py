"""SNOO and Lookahead against AdamW at equal steps, tuned alike.

SNOO (``lookahead_optax.snoo``) replaces Lookahead's interpolation by a
Nesterov SGD step on the pseudo-gradient (slow minus fast weights) every k
inner steps. Two tasks:

- ``lm``: a character Transformer (``models.TransformerLM``) on Python's
  documentation text (``common.language``); per-character cross-entropy.
- ``translation``: the number-word Transformer of ``common.translation``, the
  inner AdamW on its warmup-then-rsqrt schedule (beta2 = 0.98).

Tuning budget per method (4 settings): AdamW 4 learning rates; LA(AdamW) 2
rates x alpha 0.5, 0.8; SNOO(AdamW) 2 rates x 2 outer settings (k=20 with
outer rate 0.7 and momentum 0.9, the SNOO/DiLoCo default; k=5 with 0.5 and 0.5).
"""

from __future__ import annotations

import optax

from benchmarks.common import grid, language, tuning
from benchmarks.common import translation as tr
from lookahead_optax import lookahead, snoo

VARIANTS = {"k=20, outer lr 0.7, momentum 0.9": (20, 0.7, 0.9), "k=5, outer lr 0.5, momentum 0.5": (5, 0.5, 0.5)}
"""SNOO's outer settings (sync period, outer learning rate, outer momentum), part of its tuning budget."""
METHODS = ("AdamW", "LA(AdamW)", "SNOO(AdamW)")
PAIRS = (("AdamW", "LA(AdamW)"), ("AdamW", "SNOO(AdamW)"))
PLAN = dict(k=5, variants={"SNOO": tuple(VARIANTS)}, methods=METHODS, pairs=PAIRS)
"""What both tasks compare: Lookahead's k, SNOO's outer settings, the methods and the verdicts' pairs."""

LM_FULL = dict(
  language.TRANSFORMER_FULL,
  **PLAN,
  batch=16,
  eval_every=50,
  grids={"AdamW": (2e-3, 5e-3, 1e-2, 2e-2), "LA(AdamW)": (1e-2, 2e-2), "SNOO(AdamW)": (5e-3, 1e-2)},
)
TRANSLATION_FULL = dict(
  tr.CONFIG,
  **PLAN,
  weight_decay=0.01,
  grids={"AdamW": (5e-3, 1e-2, 2e-2, 3e-2), "LA(AdamW)": (2e-2, 3e-2), "SNOO(AdamW)": (1e-2, 2e-2)},
)
# Smoke runs: every code path, tiny models, a few steps.
LM_QUICK = dict(LM_FULL, **language.TRANSFORMER_QUICK, steps=20)
TRANSLATION_QUICK = dict(
  TRANSLATION_FULL, steps=20, dim=16, heads=2, n_train=200, n_val=50, n_test=50, max_number=400, eval_every=10
)


def wrap(family: str, inner: optax.GradientTransformation, hp: dict, cfg: dict) -> optax.GradientTransformation:
  """``inner`` as the family says: bare, in Lookahead (alpha ``hp["alpha"]``), or in SNOO (``cfg["variant"]``)."""
  wrapper = tuning.wrapper_of(family)
  if wrapper == "LA":
    return lookahead(inner, cfg["k"], hp["alpha"])
  if wrapper == "SNOO":
    k, outer_lr, outer_momentum = VARIANTS[cfg["variant"]]
    return snoo(inner, k, outer_lr, outer_momentum)
  return inner


def lm_optimizer(family: str, cfg: dict):
  return lambda hp: wrap(
    family, optax.inject_hyperparams(optax.adamw)(learning_rate=hp["lr"], weight_decay=cfg["weight_decay"]), hp, cfg
  )


def lm_finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  return language.finals(language.transformer_apply(cfg), g, prob.data)


def translation_optimizer(family: str, cfg: dict):
  return lambda hp: wrap(
    family,
    optax.inject_hyperparams(optax.adamw)(
      learning_rate=tr.schedule(cfg, hp["lr"]), b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg["weight_decay"]
    ),
    hp,
    cfg,
  )


LM = tuning.Task(
  name="snoo-lm",
  title="Character Transformer on pydoc text: AdamW, Lookahead(AdamW), SNOO(AdamW) at equal steps",
  **language.METRICS,
  paper={
    "AdamW vs SNOO(AdamW)": "SNOO paper: SNOO ahead of AdamW on LLM pre-training at equal steps",
    "AdamW vs LA(AdamW)": "Lookahead paper (5.3): LA(Adam) ahead of Adam on language modelling",
  },
  problem=language.transformer_problem,
  optimizer=lm_optimizer,
  finals=lm_finals,
)

TRANSLATION = tuning.Task(
  name="snoo-translation",
  title="Number-word translation: AdamW, Lookahead(AdamW), SNOO(AdamW) at equal steps",
  **tr.METRICS,
  tolerance=(0.1, True),
  paper={
    "AdamW vs SNOO(AdamW)": "SNOO paper: SNOO ahead of AdamW at equal steps",
    "AdamW vs LA(AdamW)": "Lookahead paper (Table 4): LA(Adam) level with Adam in BLEU",
  },
  problem=lambda cfg: tr.from_config(cfg).problem(cfg["batch"]),
  optimizer=translation_optimizer,
  finals=tr.finals,
)

TASKS = {"lm": (LM, LM_FULL, LM_QUICK), "translation": (TRANSLATION, TRANSLATION_FULL, TRANSLATION_QUICK)}
"""Task name -> (task, full config, quick config)."""
