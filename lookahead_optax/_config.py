"""The configuration of a lookahead optimizer, checked once at construction.

Every error names the function the user called (``lookahead``, ``snoo``,
``diloco``, ``ranger``), the argument and the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _alpha, _streaming
from lookahead_optax._policy import POLICIES

AlphaLike = float | jax.Array | Callable[[jax.Array], jax.Array] | _alpha.AdaptiveAlpha


class Config(NamedTuple):
  """A checked lookahead configuration (static: never part of the optimizer state)."""

  caller: str
  inner: optax.GradientTransformationExtraArgs
  k: Any
  alpha: AlphaLike | None
  policy: str
  outer: optax.GradientTransformationExtraArgs | None
  slow_dtype: jnp.dtype | None
  schedule: _streaming.Streaming

  @property
  def adaptive(self) -> bool:
    return isinstance(self.alpha, _alpha.AdaptiveAlpha)

  @property
  def n_fragments(self) -> int:
    return self.schedule.n_fragments


def make_config(caller, inner, k, alpha, policy, outer, slow_dtype, schedule) -> Config:
  """Check every argument and return the configuration; ``alpha=None`` means 0.5 without ``outer``."""
  check_transformation(caller, "inner", inner)
  if outer is not None:
    check_transformation(caller, "outer", outer)
  if isinstance(inner, optax.MultiSteps):
    raise ValueError(
      f"{caller}: inner is an optax.MultiSteps: lookahead would count micro-steps and sync in the middle "
      f"of gradient accumulation. Put the accumulation outside: optax.MultiSteps({caller}(...), "
      "every_k_schedule=...)."
    )
  check_k(caller, k)
  if alpha is not None and outer is not None:
    raise ValueError(
      f"{caller}: alpha={alpha!r} has no meaning together with outer={outer!r}: the outer optimizer takes "
      "the slow step (outer=optax.sgd(alpha) is plain Lookahead). Pass alpha or outer, not both."
    )
  if alpha is None and outer is None:
    alpha = 0.5
  if alpha is not None:
    _alpha.check_alpha(caller, alpha)
  if policy not in POLICIES:
    raise ValueError(f"{caller}: inner_state_policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}.")
  if policy == "interpolate" and outer is not None:
    raise ValueError(
      f"{caller}: inner_state_policy='interpolate' moves the inner state with the slow step size alpha, "
      f"which an outer optimizer does not have (outer={outer!r}). Use 'maintain' or 'reset'."
    )
  if slow_dtype is not None:
    slow_dtype = check_slow_dtype(caller, slow_dtype)
  schedule = check_schedule(caller, schedule, k, alpha, policy, outer)
  return Config(
    caller,
    optax.with_extra_args_support(inner),
    k,
    alpha,
    policy,
    None if outer is None else optax.with_extra_args_support(outer),
    slow_dtype,
    schedule,
  )


def check_schedule(caller, schedule, k, alpha, policy, outer) -> _streaming.Streaming:
  """The sync schedule (every param at the end of each cycle when None); errors name what it rules out."""
  if schedule is None:
    return _streaming.EVERY_STEP
  if not isinstance(schedule, _streaming.Streaming):
    raise ValueError(f"{caller}: schedule must be None or made by streaming(...), got {schedule!r}.")
  if isinstance(k, jax.core.Tracer) and schedule != _streaming.EVERY_STEP:
    raise ValueError(
      f"{caller}: schedule={schedule!r} needs a static k, got a traced k; under optax.inject_hyperparams "
      "pass static_args=('k',)."
    )
  _streaming.check_fragments(caller, schedule.fragments, k)
  if schedule.n_fragments > 1:
    if policy != "maintain":
      raise ValueError(
        f"{caller}: schedule={schedule!r} syncs the params a fragment at a time, while "
        f"inner_state_policy={policy!r} acts on the whole inner state at once. Use 'maintain' with "
        "fragments."
      )
    if isinstance(alpha, _alpha.AdaptiveAlpha) or (callable(alpha) and not isinstance(alpha, jax.Array)):
      raise ValueError(
        f"{caller}: schedule={schedule!r} needs a constant alpha or an outer optimizer; an alpha "
        f"schedule or adaptive alpha is defined per whole sync, got alpha={alpha!r}."
      )
  if schedule.delay and outer is None:
    raise ValueError(
      f"{caller}: schedule={schedule!r} delays the exchange over replicas, but outer=None has none. "
      "Put replica_mean(...) in outer, or use delay=0."
    )
  return schedule


def check_transformation(caller: str, name: str, tx: Any) -> None:
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(
      f"{caller}: {name} must be an optax GradientTransformation (with init and update), "
      f"got {tx!r} of type {type(tx).__name__}."
    )


def check_slow_dtype(caller: str, slow_dtype: Any) -> jnp.dtype:
  try:
    dtype = jnp.dtype(slow_dtype)
  except TypeError as e:
    raise ValueError(f"{caller}: slow_dtype must be a floating dtype, got {slow_dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"{caller}: slow_dtype must be a floating dtype, got {slow_dtype!r}.")
  if dtype.itemsize > jnp.dtype(jnp.result_type(dtype.type(0))).itemsize:
    raise ValueError(
      f"{caller}: slow_dtype={dtype.name} needs 64-bit JAX, which is off here (JAX would store "
      f"{jnp.result_type(dtype.type(0))}). Enable it first: jax.config.update('jax_enable_x64', True)."
    )
  return dtype


def check_k(caller: str, k: Any) -> None:
  if isinstance(k, jax.core.Tracer):
    if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim:
      raise ValueError(f"{caller}: k must be an integer scalar >= 1, got a traced {k.dtype}{list(k.shape)}.")
    return  # a traced hyperparameter under optax.inject_hyperparams
  bad = f"{caller}: k must be an int >= 1, got {k!r} ({type(k).__name__})."
  if isinstance(k, (bool, np.bool_)):
    raise ValueError(bad)
  if isinstance(k, (jax.Array, np.ndarray)):
    if k.ndim or not jnp.issubdtype(k.dtype, jnp.integer):
      raise ValueError(bad)
    k = int(k)
  if not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(bad)


def check_number(
  caller: str,
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
  schedule: bool = False,
) -> None:
  """``value`` is a real number in the interval (or a schedule, when allowed); else a ValueError naming it."""
  if schedule and callable(value):
    return
  if isinstance(value, jax.core.Tracer):
    return  # a traced hyperparameter under optax.inject_hyperparams
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  what = f"a number in {interval}" + (" or a schedule" if schedule else "")
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, (numbers.Real, jax.Array, np.ndarray))
    or (
      not isinstance(value, numbers.Real)
      and (value.ndim or not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(value.dtype, jnp.integer))
    )
  ):
    raise ValueError(f"{caller}: {name} must be {what}, got {value!r}.")
  x = float(value)
  ok = math.isfinite(x) or (math.isinf(high) and x == high and not high_open)
  ok = ok and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
  if not ok:
    raise ValueError(f"{caller}: {name} must be {what}, got {value!r}.")
