"""Train a whole grid of runs (learning rates, alphas, seeds) as one compiled program.

Every run of a grid has the same model and the same optimizer *structure*; what
differs between runs (learning rate, alpha, momentum, seed) enters the program
as traced values on one ``vmap``-ed axis. So a grid of 6 learning rates x 5
seeds compiles once and trains as one batched computation, with its batches
drawn on the device; evaluation runs inside the same program every
``eval_every`` steps (the anytime curves). With ``chunk``, the runs go through
in vmapped chunks of that size, one chunk after another: a run then does the
same arithmetic, to the bit, in any grid that holds it at the same place in a
chunk, so a smaller grid reproduces part of a larger one exactly.

- ``Problem``: a task as pure functions of params, data and keys.
- ``settings_by_seeds``: the run axis from a list of settings and seeds.
- ``train_grid``: trains every run, returns a ``Grid`` (curves, losses, final
  weights, compile and run time).
- ``map_runs``: evaluates the final weights of every run, batched the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import timing
from benchmarks.common.train import slow_or_params


class Problem(NamedTuple):
  """A task as the grid trainer sees it."""

  init: Callable[[int], Any]
  """``seed -> params``: the initial params of a run (host side, once per distinct seed)."""
  loss: Callable[[Any, Any], jax.Array]
  """``(params, batch) -> loss``, the training objective."""
  batch: Callable[[Any, jax.Array, jax.Array], Any]
  """``(data, key, step) -> batch``: the batch of one step, on device; ``key`` depends only on the seed."""
  evaluate: Callable[[Any, Any], dict]
  """``(weights, data) -> {metric: scalar}``, evaluated every ``eval_every`` steps."""
  data: Any
  """The arrays ``batch`` and ``evaluate`` read: an argument of the program, not a constant in it."""


class Grid(NamedTuple):
  """What :func:`train_grid` returns; arrays have the run axis first."""

  hparams: dict
  """``name -> [runs]``: the traced hyperparameters of every run."""
  seeds: np.ndarray
  """``[runs]``: model-initialisation and batch-order seed."""
  eval_steps: np.ndarray
  """``[evals]``: the steps after which the curves were evaluated."""
  curves: dict
  """``weights name -> metric -> [runs, evals]``."""
  losses: np.ndarray
  """``[runs, steps]``: training loss at every step (on that step's batch, at the fast weights)."""
  weights: dict
  """``weights name -> params`` stacked over runs, after the last step."""
  compile_seconds: float
  """Tracing and compiling the program."""
  run_seconds: float
  """Running it."""


def main_weights(params, opt_state) -> dict:
  """``{"main": weights}``: the slow weights of a Lookahead optimizer, else the params."""
  return {"main": slow_or_params(params, opt_state)}


def settings_by_seeds(settings: Sequence[dict], seeds: Sequence[int]) -> tuple[dict, np.ndarray]:
  """``(hparams, seeds)`` for every setting repeated over every seed (settings outer, seeds inner)."""
  names = sorted(settings[0]) if settings else []
  if any(sorted(s) != names for s in settings):
    raise ValueError(f"settings_by_seeds: every setting needs the same names, got {[sorted(s) for s in settings]}.")
  hparams = {n: np.asarray([float(s[n]) for s in settings for _ in seeds], np.float32) for n in names}
  return hparams, np.asarray([int(seed) for _ in settings for seed in seeds], np.int32)


def train_grid(
  problem: Problem,
  make_optimizer: Callable[[dict], optax.GradientTransformation],
  hparams: dict,
  seeds: Sequence[int],
  steps: int,
  eval_every: int,
  weights: Callable[[Any, Any], dict] = main_weights,
  segments: Sequence[tuple] | None = None,
  chunk: int | None = None,
) -> Grid:
  """Trains one run per entry of ``seeds`` (with ``hparams[name][i]``), all in one compiled program.

  ``make_optimizer(hp)`` builds the optimizer of one run from its
  hyperparameters, traced scalars (e.g. ``optax.inject_hyperparams(optax.sgd)
  (learning_rate=hp["lr"])``). ``weights(params, opt_state)`` names the weights
  to evaluate (default: the slow weights of a Lookahead optimizer, else the
  params). ``segments``, a list of ``(length, count)``, evaluates after every
  ``length`` steps ``count`` times, segment after segment (default: every
  ``eval_every`` steps). ``chunk``: train the runs in vmapped chunks of this
  size (the last one padded), one after another, instead of all at once.
  """
  seeds = np.asarray(seeds, np.int32)
  hparams = {k: np.asarray(v, np.float32) for k, v in hparams.items()}
  if any(v.shape != seeds.shape for v in hparams.values()):
    raise ValueError(
      f"train_grid: every hparam needs one value per seed ({seeds.shape}), got "
      f"{ {k: v.shape for k, v in hparams.items()} }."
    )
  if segments is None:
    if eval_every < 1 or steps % eval_every:
      raise ValueError(f"train_grid: eval_every must divide steps, got steps={steps}, eval_every={eval_every}.")
    segments = [(eval_every, steps // eval_every)]
  if sum(length * count for length, count in segments) != steps:
    raise ValueError(f"train_grid: segments {segments} do not add up to {steps} steps.")
  distinct = sorted(set(seeds.tolist()))
  inits = [problem.init(s) for s in distinct]
  index = np.asarray([distinct.index(s) for s in seeds])
  params = jax.tree.map(lambda *xs: jnp.stack(xs)[index], *inits)

  def run(params, hp, seed, data):
    tx = make_optimizer(hp)
    key = jax.random.key(seed)

    def step(carry, t):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(problem.loss)(params, problem.batch(data, key, t))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    carry, losses, curves, start = (params, tx.init(params)), [], [], 0
    for length, count in segments:

      def steps_then_evaluate(carry, i, start=start, length=length):
        carry, loss = jax.lax.scan(step, carry, start + i * length + jnp.arange(length))
        return carry, (loss, {name: problem.evaluate(w, data) for name, w in weights(*carry).items()})

      carry, (loss, metrics) = jax.lax.scan(steps_then_evaluate, carry, jnp.arange(count))
      losses.append(loss.reshape(-1))
      curves.append(metrics)
      start += length * count
    curves = jax.tree.map(lambda *xs: jnp.concatenate(xs), *curves)
    return weights(*carry), jnp.concatenate(losses), curves

  runs = (params, {k: jnp.asarray(v) for k, v in hparams.items()}, jnp.asarray(seeds))
  if chunk:
    # Chunks of `chunk` runs, vmapped, one after another: a run's arithmetic is then the same in any grid.
    pad = -len(seeds) % chunk
    grow = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]).reshape(-1, chunk, *x.shape[1:])
    batched = jax.vmap(run, in_axes=(0, 0, 0, None))
    program = jax.jit(
      lambda runs, data: jax.tree.map(
        lambda x: x.reshape(-1, *x.shape[2:])[: len(seeds)],
        jax.lax.map(lambda r: batched(*r, data), jax.tree.map(grow, runs)),
      )
    )
  else:
    program = jax.jit(lambda runs, data: jax.vmap(run, in_axes=(0, 0, 0, None))(*runs, data))
  (final, losses, curves), compile_s, run_s = timing.compile_then_run(program, runs, problem.data)
  eval_steps = np.concatenate(
    [
      s0 + length * (1 + np.arange(count))
      for (length, count), s0 in zip(segments, np.cumsum([0] + [l * c for l, c in segments[:-1]]))
    ]
  )
  return Grid(hparams, seeds, eval_steps, jax.tree.map(np.asarray, curves), np.asarray(losses), final, compile_s, run_s)


def map_runs(fn: Callable, stacked, *args):
  """``fn(weights, *args)`` for the weights of every run (stacked on axis 0), batched in one program."""
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(args)))(stacked, *args))


def take_runs(tree, index):
  """The runs ``index`` (an int array or mask) of a tree stacked over runs."""
  return jax.tree.map(lambda x: x[np.asarray(index)], tree)
