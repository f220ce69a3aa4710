"""The model as a pure function, the losses, and the plain training loop (one run at a time).

- ``functional(model)`` / ``functional_params(model)``: an NNX model as ``apply(params, *inputs)``.
- ``cross_entropy``, ``accuracy``: the losses and metrics every task uses.
- ``make_step`` / ``train``: one jitted step and the host loop around it, for
  experiments that need Python between steps (replicas, timing). A grid of
  runs trains in one compiled program with ``grid.train_grid`` instead.
- ``eval_params``: the weights to evaluate, the slow ones of a Lookahead state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lookahead_optax


def functional(model: nnx.Module):
  """``(apply, params)``: ``apply(params, *inputs)`` is the model as a pure function."""
  graphdef, params = nnx.split(model)

  def apply(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

  return apply, params


def functional_params(model: nnx.Module):
  """Like :func:`functional`, but only ``nnx.Param`` leaves are params; other state (an RNN's rngs) is closed over."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, *inputs):
    return nnx.merge(graphdef, params, rest, copy=True)(*inputs)

  return apply, params


def cross_entropy(logits, labels, mask=None):
  """Mean token/example cross-entropy; ``mask`` (same shape as labels) weights the mean."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def accuracy(logits, labels) -> jax.Array:
  return (logits.argmax(-1) == labels).mean()


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, donate: bool = True):
  """The jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def slow_or_params(params, opt_state, keep_dtype: bool = False):
  """The slow weights when ``opt_state`` holds a Lookahead state, else ``params``.

  The slow weights come in the params' dtypes, or with ``keep_dtype`` in the
  dtype they are stored in (float32 slow weights of bfloat16 params).
  """
  try:
    return lookahead_optax.slow_params(opt_state) if keep_dtype else lookahead_optax.slow_params(opt_state, params)
  except ValueError:
    return params


def eval_params(params, opt_state, on: str | Callable = "slow"):
  """The weights to evaluate: the slow weights when there are any and ``on='slow'``.

  ``on`` may also be a callable ``(params, opt_state) -> weights`` (e.g. a Polyak average).
  """
  if callable(on):
    return on(params, opt_state)
  return slow_or_params(params, opt_state) if on == "slow" else params


class History(NamedTuple):
  """What one training run recorded."""

  losses: np.ndarray
  """Training loss at every step (on the batch of that step, at the fast weights)."""
  evals: list
  """``(step, metrics)`` pairs from ``eval_fn``."""
  seconds: float
  """Wall time of the loop, compilation included."""


def train(
  loss_fn: Callable,
  params: Any,
  tx: optax.GradientTransformation,
  batches: Iterator,
  steps: int,
  *,
  eval_fn: Callable[[Any], dict] | None = None,
  eval_every: int = 0,
  eval_on: str | Callable = "slow",
  desc: str = "",
  progress: bool = True,
):
  """Train for ``steps`` steps; returns ``(params, opt_state, History)``.

  ``eval_fn(params) -> dict`` runs every ``eval_every`` steps and at the end, on
  the slow weights of a lookahead optimizer (``eval_on='slow'``) or on the
  fast weights (``'fast'``).
  """
  from tqdm.auto import tqdm

  params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
  opt_state = tx.init(params)
  leaves = jax.tree.leaves(params)
  if leaves and all(getattr(x, "sharding", None) is not None and x.sharding.is_fully_replicated for x in leaves):
    # Scalars created by init (step counters) go where the params are, so the step compiles once.
    opt_state = jax.device_put(opt_state, leaves[0].sharding)
  step = make_step(loss_fn, tx)
  losses, evals = [], []
  start = time.perf_counter()
  for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0):
    params, opt_state, loss = step(params, opt_state, next(batches))
    losses.append(loss)
    if eval_fn is not None and eval_every and (t + 1) % eval_every == 0 and t + 1 < steps:
      evals.append((t + 1, _floats(eval_fn(eval_params(params, opt_state, eval_on)))))
  if eval_fn is not None:
    evals.append((steps, _floats(eval_fn(eval_params(params, opt_state, eval_on)))))
  losses = np.asarray(jax.device_get(jnp.stack(losses))) if losses else np.zeros(0)
  return params, opt_state, History(losses, evals, time.perf_counter() - start)


def _floats(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items()}
