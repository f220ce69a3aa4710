"""One small harness for every benchmark, experiment and notebook.

- ``functional(model)``: an NNX model as a pure ``apply(params, *inputs)`` and its params.
- ``make_step`` / ``train``: the one jitted training loop (loss, grads, update, apply).
- ``time_steps``: median-of-repeats step timing, for ratios measured in one run.
- ``environment`` / ``write_json`` / ``markdown_table``: results files.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lookahead_optax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def functional(model: nnx.Module):
  """``(apply, params)``: ``apply(params, *inputs)`` is the model as a pure function."""
  graphdef, params = nnx.split(model)

  def apply(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

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


class History(NamedTuple):
  """What one training run recorded."""

  losses: np.ndarray
  """Training loss at every step (on the batch of that step, at the fast weights)."""
  evals: list
  """``(step, metrics)`` pairs from ``eval_fn``."""
  seconds: float
  """Wall time of the loop, compilation included."""


def has_lookahead(opt_state) -> bool:
  try:
    lookahead_optax.find_lookahead_state(opt_state)
    return True
  except ValueError:
    return False


def eval_params(params, opt_state, on: str | Callable = "slow"):
  """The weights to evaluate: the slow weights when there are any and ``on='slow'``.

  ``on`` may also be a callable ``(params, opt_state) -> weights`` (e.g. a Polyak average).
  """
  if callable(on):
    return on(params, opt_state)
  if on == "slow" and has_lookahead(opt_state):
    return lookahead_optax.slow_params(opt_state, params)
  return params


def train(
    loss_fn: Callable,
    params: Any,
    tx: optax.GradientTransformation,
    batches: Iterator,
    steps: int,
    *,
    eval_fn: Optional[Callable[[Any], dict]] = None,
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


def time_steps(fn: Callable, state, *, steps: int = 50, repeats: int = 5, warmup: int = 3):
  """Per-repeat milliseconds per call of ``state = fn(*state)``; ``fn`` returns the next args.

  Each repeat runs ``steps`` calls and blocks once at the end. Returns the list
  of ms/step (take the median) and the final state.
  """
  for _ in range(warmup):
    state = fn(*state)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(*state)
    jax.block_until_ready(state)
    times.append(1e3 * (time.perf_counter() - start) / steps)
  return times, state


def environment() -> dict:
  """Versions and device, recorded with every result."""
  import flax

  return {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "lookahead_optax": lookahead_optax.__version__,
      "python": platform.python_version(),
      "device": str(jax.devices()[0].device_kind),
      "devices": jax.device_count(),
      "platform": jax.default_backend(),
      "cpus": os.cpu_count(),
  }


def write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
    f.write("\n")
  return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
  """A GitHub markdown table; floats get 4 significant digits."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def mean_std(values) -> str:
  values = np.asarray(values, dtype=float)
  return f"{values.mean():.4g} ± {values.std():.2g}"


def functional_params(model: nnx.Module):
  """Like :func:`functional`, but only ``nnx.Param`` leaves are params; other state (an RNN's rngs) is closed over."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, *inputs):
    return nnx.merge(graphdef, params, rest, copy=True)(*inputs)

  return apply, params


class PolyakState(NamedTuple):
  """State of :func:`polyak_average`."""

  count: jax.Array
  """Updates taken so far (int32)."""
  average: Any
  """Uniform average of the iterates after update ``start`` (the params until then)."""
  inner_state: Any
  """State of the optimizer whose iterates are averaged."""


def polyak_average(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  r"""Polyak-Ruppert (tail) averaging of ``inner``'s iterates; training follows ``inner`` unchanged.

  :math:`\bar\theta = \frac{1}{t - s} \sum_{i=s+1}^{t} \theta_i` for ``t > start = s``;
  evaluate ``polyak_params(opt_state)`` (ASGD, Polyak & Juditsky 1992).
  """
  if int(start) < 0:
    raise ValueError(f"polyak_average: start must be >= 0, got {start!r}.")

  def init_fn(params):
    return PolyakState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params), inner.init(params))

  def update_fn(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner_state, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    n = jnp.maximum(count - start, 1).astype(jnp.float32)  # iterates averaged so far
    average = jax.tree.map(
        lambda a, p: jnp.where(count <= start, p, a + (p - a) / n).astype(p.dtype), state.average, new_params)
    return updates, PolyakState(count, average, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def polyak_params(params, opt_state):
  """The averaged weights of a :func:`polyak_average` state (signature fits ``train(eval_on=...)``)."""
  if not isinstance(opt_state, PolyakState):
    raise ValueError(f"polyak_params: expected a PolyakState, got {type(opt_state).__name__}.")
  return opt_state.average
