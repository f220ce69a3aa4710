"""Baselines that are not in optax: Polyak-Ruppert (tail) averaging of an optimizer's iterates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


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
  evaluate ``polyak_params(params, opt_state)`` (ASGD, Polyak & Juditsky 1992).
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
      lambda a, p: jnp.where(count <= start, p, a + (p - a) / n).astype(p.dtype), state.average, new_params
    )
    return updates, PolyakState(count, average, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def polyak_params(params, opt_state):
  """The averaged weights of a :func:`polyak_average` state (signature fits ``train(eval_on=...)``)."""
  if not isinstance(opt_state, PolyakState):
    raise ValueError(f"polyak_params: expected a PolyakState, got {type(opt_state).__name__}.")
  return opt_state.average
