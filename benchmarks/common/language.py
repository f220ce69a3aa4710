"""Character language modelling on Python's own documentation text, as a ``grid.Problem``.

Training draws random windows of ``pydoc_data`` text (``data.char_corpus``)
on the device; the validation curve uses the first windows of the validation
split; final perplexities cover whole splits, a chunk of windows at a time.
Any model mapping ``[batch, time]`` tokens to logits over ``data.CHAR_VOCAB``
fits: a character LSTM (the paper suite), a Transformer (SNOO, DiLoCo).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import data, grid, models, train, tuning
from benchmarks.common.tuning import Metric

EVALUATION_FULL = dict(curve_windows=32, train_eval_chars=16384, eval_chunk=32, max_chars=None)
EVALUATION_QUICK = dict(curve_windows=4, train_eval_chars=1024, eval_chunk=16, max_chars=60_000)
"""What a character-Transformer run evaluates (``arrays``): validation windows per curve point, training characters,
windows per chunk, characters of the corpus (None: all), in a full run and in a smoke run."""
TRANSFORMER_FULL = dict(EVALUATION_FULL, steps=600, weight_decay=0.01, seq_len=64, dim=32, heads=4, layers=2)
"""A full character-Transformer run (SNOO, DiLoCo): 600 AdamW steps (weight decay 0.01) of a two-layer
``transformer`` of width 32 on windows of 64 characters."""
TRANSFORMER_QUICK = dict(EVALUATION_QUICK, seq_len=16, dim=16, heads=2, layers=1, eval_every=10)
"""What a smoke run changes in a ``TRANSFORMER_FULL`` run: a one-layer model of width 16 on 16 characters."""


def transformer(cfg: dict, seed: int) -> models.TransformerLM:
  """A character ``models.TransformerLM`` of ``cfg``'s ``dim``, ``heads``, ``layers`` over windows of ``seq_len``."""
  return models.TransformerLM(
    len(data.CHAR_VOCAB),
    dim=cfg["dim"],
    heads=cfg["heads"],
    layers=cfg["layers"],
    max_len=cfg["seq_len"],
    rngs=nnx.Rngs(seed),
  )


def transformer_apply(cfg: dict):
  """``apply(params, tokens) -> logits``: :func:`transformer` as a pure function of its ``nnx.Param`` leaves."""
  return train.functional_params(transformer(cfg, 0))[0]


def transformer_problem(cfg: dict) -> grid.Problem:
  """The task (:func:`problem`) for :func:`transformer`."""
  return problem(cfg, lambda seed: transformer(cfg, seed))


def chunked(split: data.Split, chunk: int) -> dict:
  """Windows in equal chunks (the last padded), with a mask of the real ones, as device arrays."""
  n = len(split.x)
  pad = -n % chunk
  mask = np.arange(n + pad) < n
  grow = lambda a: np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]).reshape(-1, chunk, *a.shape[1:])
  return {
    "x": jnp.asarray(grow(split.x)),
    "y": jnp.asarray(grow(split.y)),
    "mask": jnp.asarray(mask.reshape(-1, chunk)),
  }


def mean_loss(apply, weights, chunks: dict) -> jax.Array:
  """Mean token cross-entropy over every real window of a :func:`chunked` split, one chunk at a time."""

  def summed(args):
    x, y, mask = args
    losses = optax.softmax_cross_entropy_with_integer_labels(apply(weights, x), y)
    return jnp.sum(losses * mask[:, None])

  total = jax.lax.map(summed, (chunks["x"], chunks["y"], chunks["mask"])).sum()
  return total / (chunks["mask"].sum() * chunks["y"].shape[-1])


def arrays(cfg: dict) -> dict:
  """Device arrays of the task: training tokens, the validation-curve windows, chunked train/val/test windows.

  ``cfg``: ``seq_len``, ``curve_windows``, ``train_eval_chars``, ``eval_chunk``, ``max_chars``.
  """
  corpus = data.char_corpus(max_chars=cfg["max_chars"])
  seq = cfg["seq_len"]
  val = data.windows(corpus.val, seq)
  return {
    "train": jnp.asarray(corpus.train),
    "curve": jax.tree.map(lambda a: jnp.asarray(a[: cfg["curve_windows"]]), val),
    "train_eval": chunked(data.windows(corpus.train[: cfg["train_eval_chars"] + 1], seq), cfg["eval_chunk"]),
    "val": chunked(val, cfg["eval_chunk"]),
    "test": chunked(data.windows(corpus.test, seq), cfg["eval_chunk"]),
  }


def problem(cfg: dict, model: Callable[[int], object]) -> grid.Problem:
  """The task for ``model(seed)`` (an NNX module), ``cfg["batch"]`` windows per step; the curve is ``val_loss``."""
  apply = train.functional_params(model(0))[0]
  loss = lambda p, b: train.cross_entropy(apply(p, b.x), b.y)
  return grid.Problem(
    init=lambda seed: train.functional_params(model(seed))[1],
    loss=loss,
    batch=lambda d, key, step: data.random_windows(
      d["train"], jax.random.fold_in(key, step), cfg["batch"], cfg["seq_len"]
    ),
    evaluate=lambda w, d: {"val_loss": loss(w, d["curve"])},
    data=arrays(cfg),
  )


def split_losses(apply, weights, d: dict) -> dict:
  """``{"train", "val", "test"}``: mean cross-entropy (nats per character) of whole splits (train: its first part)."""
  return {
    name: mean_loss(apply, weights, d[key]) for name, key in (("train", "train_eval"), ("val", "val"), ("test", "test"))
  }


def loss_metric(key: str, label: str) -> Metric:
  return Metric(key, label, False, 1.0, 4)


METRICS = dict(
  select=loss_metric("val_loss", "val loss (nats/char)"),
  headline=loss_metric("test_loss", "test loss (nats/char)"),
  columns=(
    loss_metric("final_train_loss", "final train loss"),
    loss_metric("val_loss", "val loss"),
    loss_metric("test_loss", "test loss"),
  ),
  tolerance=(0.01, True),
)
"""How a character-LM task is tuned and judged (``tuning.Task`` fields): per-character cross-entropy."""


def finals(apply, g: grid.Grid, d: dict, weights=lambda w: w, replicas: int = 1) -> dict:
  """``{name: {train_loss, val_loss, test_loss, final_train_loss}}`` of a grid's final weights of each name.

  ``weights`` picks the weights to evaluate from a run's; ``replicas`` divides the
  training loss when a run sums it over replicas.
  """
  train_loss = tuning.tail_mean(g.losses) / replicas
  evaluate = lambda w, d: split_losses(apply, weights(w), d)
  return {
    name: {f"{k}_loss": v for k, v in grid.map_runs(evaluate, w, d).items()} | {"final_train_loss": train_loss}
    for name, w in g.weights.items()
  }
