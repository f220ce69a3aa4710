"""Baselines that are not in optax: averages of an optimizer's iterates, kept in its state.

- ``polyak_average``: Polyak-Ruppert (tail) averaging, the uniform mean after a start step.
- ``ema_average``: an exponential moving average (bias-corrected), the same state.
- ``lawa_average``: LAWA, the mean of the last ``k`` iterates taken every ``every`` steps.

Training follows the inner optimizer unchanged; ``polyak_params`` (Polyak and
EMA) and ``lawa_params`` give the averaged weights to evaluate, inside a
compiled program as outside.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _averaging(inner, state, init_average, update_average) -> optax.GradientTransformation:
  """``inner`` unchanged, keeping ``state(count, *average, inner_state)``: the average's fields are
  ``init_average(params)`` at the start and ``update_average(fields, new params, count)`` after every update."""

  def init_fn(params):
    return state(jnp.zeros((), jnp.int32), *init_average(params), inner.init(params))

  def update_fn(updates, old, params=None):
    updates, inner_state = inner.update(updates, old.inner_state, params)
    count = old.count + 1
    average = update_average(tuple(old[1:-1]), optax.apply_updates(params, updates), count)
    return updates, state(count, *average, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _checked(opt_state, state_type, name: str):
  """``opt_state`` when it is a ``state_type``, else a ValueError naming ``name``."""
  if not isinstance(opt_state, state_type):
    raise ValueError(f"{name}: expected a {state_type.__name__}, got {type(opt_state).__name__}.")
  return opt_state


def _copy(params) -> tuple:
  return (jax.tree.map(jnp.array, params),)


class PolyakState(NamedTuple):
  """State of :func:`polyak_average` and :func:`ema_average` (Polyak averaging, uniform or exponential)."""

  count: jax.Array
  """Updates taken so far (int32)."""
  average: Any
  """The average of the iterates (the params before any is averaged)."""
  inner_state: Any
  """State of the optimizer whose iterates are averaged."""


def polyak_average(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  r"""Polyak-Ruppert (tail) averaging of ``inner``'s iterates; training follows ``inner`` unchanged.

  :math:`\bar\theta = \frac{1}{t - s} \sum_{i=s+1}^{t} \theta_i` for ``t > start = s``;
  evaluate ``polyak_params(params, opt_state)`` (ASGD, Polyak & Juditsky 1992).
  """
  if int(start) < 0:
    raise ValueError(f"polyak_average: start must be >= 0, got {start!r}.")

  def update(fields, new_params, count):
    n = jnp.maximum(count - start, 1).astype(jnp.float32)  # iterates averaged so far
    return (
      jax.tree.map(lambda a, p: jnp.where(count <= start, p, a + (p - a) / n).astype(p.dtype), *fields, new_params),
    )

  return _averaging(inner, PolyakState, _copy, update)


def ema_average(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  r"""An exponential moving average of ``inner``'s iterates, bias-corrected; training follows ``inner`` unchanged.

  :math:`\bar\theta_t = \frac{1 - \beta}{1 - \beta^t} \sum_{i=1}^{t} \beta^{t-i} \theta_i` for decay
  :math:`\beta`: the initial weights carry no weight. Kept as :math:`\bar\theta_t = \bar\theta_{t-1} + w_t
  (\theta_t - \bar\theta_{t-1})`, :math:`w_t = (1 - \beta) / (1 - \beta^t)`; evaluate ``polyak_params(params,
  opt_state)``.
  """
  if not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"ema_average: decay must be in [0, 1), got {decay!r}.")

  def update(fields, new_params, count):
    weight = (1.0 - decay) / (1.0 - decay ** count.astype(jnp.float32))
    return (jax.tree.map(lambda a, p: (a + weight * (p - a)).astype(p.dtype), *fields, new_params),)

  return _averaging(inner, PolyakState, _copy, update)


def polyak_params(params, opt_state):
  """The averaged weights of a :func:`polyak_average` or :func:`ema_average` state (fits ``train(eval_on=...)``)."""
  return _checked(opt_state, PolyakState, "polyak_params").average


class LawaState(NamedTuple):
  """State of :func:`lawa_average`."""

  count: jax.Array
  """Updates taken so far (int32)."""
  taken: jax.Array
  """Snapshots taken so far (int32); the last ``min(taken, k)`` are in ``snapshots``."""
  snapshots: Any
  """Every leaf ``[k, *shape]``: the iterates after the last ``k`` multiples of ``every`` updates, a ring buffer."""
  inner_state: Any
  """State of the optimizer whose iterates are averaged."""


def lawa_average(inner: optax.GradientTransformation, k: int, every: int) -> optax.GradientTransformation:
  r"""LAWA: the mean of the latest ``k`` iterates of ``inner`` taken every ``every`` updates; training is unchanged.

  :math:`\bar\theta_t = \frac{1}{n} \sum_{j=0}^{n-1} \theta_{(m - j) e}`, :math:`m = \lfloor t / e \rfloor`,
  :math:`n = \min(k, m)`; the params themselves before the first snapshot. Evaluate ``lawa_params(params,
  opt_state)``. Memory: ``k`` copies of the params (Kaddour 2022, "Stop wasting my time! Saving days of
  ImageNet and BERT training with latest weight averaging").
  """
  if int(k) < 1 or int(every) < 1:
    raise ValueError(f"lawa_average: k and every must be >= 1, got k={k!r}, every={every!r}.")

  def init(params):
    return jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), jnp.asarray(p).dtype), params)

  def update(fields, new_params, count):
    taken, snapshots = fields
    take, slot = count % every == 0, taken % k
    # Only the slot changes: an in-place update of one snapshot, not a select over all k.
    snapshots = jax.tree.map(
      lambda s, p: s.at[slot].set(jnp.where(take, p, s[slot]).astype(s.dtype)), snapshots, new_params
    )
    return taken + take.astype(jnp.int32), snapshots

  return _averaging(inner, LawaState, init, update)


def lawa_params(params, opt_state):
  """The averaged weights of a :func:`lawa_average` state: the mean of its snapshots, or ``params`` before any."""
  state = _checked(opt_state, LawaState, "lawa_params")

  def mean(p, s):
    n = jnp.minimum(state.taken, s.shape[0])
    kept = (jnp.arange(s.shape[0]) < n).reshape(-1, *(1,) * p.ndim)
    average = jnp.where(kept, s.astype(jnp.float32), 0.0).sum(0) / jnp.maximum(n, 1).astype(jnp.float32)
    return jnp.where(n > 0, average, p).astype(p.dtype)

  return jax.tree.map(mean, params, state.snapshots)
