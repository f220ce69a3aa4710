"""The configuration of a lookahead optimizer, checked once at construction.

Every error names the function the user called (``lookahead``, ``snoo``,
``diloco``, ``ranger``), the argument and the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _alpha, _exchange, _fragments
from lookahead_optax._policy import POLICIES

PLACEMENT_CHECKS = ("warn", "raise", "off")

AlphaLike = float | jax.Array | Callable[[jax.Array], jax.Array] | _alpha.AdaptiveAlpha


class Config(NamedTuple):
  """A checked lookahead configuration (static: never part of the optimizer state)."""

  caller: str
  inner: optax.GradientTransformationExtraArgs
  k: Any
  alpha: AlphaLike | None
  policy: str
  outer: optax.GradientTransformation | None
  slow_dtype: jnp.dtype | None
  axis_name: Hashable | None
  placement_check: str
  fragments: Any = 1
  communication_dtype: jnp.dtype | None = None
  error_feedback: bool = False
  delay: int = 0
  mixing: float = 0.5

  @property
  def adaptive(self) -> bool:
    return isinstance(self.alpha, _alpha.AdaptiveAlpha)

  @property
  def n_fragments(self) -> int:
    return _fragments.count(self.fragments)


def make_config(
  caller,
  inner,
  k,
  alpha,
  policy,
  outer,
  slow_dtype,
  axis_name,
  placement_check,
  *,
  fragments=None,
  communication_dtype=None,
  error_feedback=False,
  delay=None,
  mixing=None,
) -> Config:
  """Check every argument and return the configuration; ``alpha=None`` means 0.5 without ``outer``.

  ``placement_check=None`` means ``"warn"``, or ``"off"`` with ``delay=1`` (whose fast weights are a mix, not
  the slow weights); ``mixing=None`` means 0.5 with ``delay=1``; ``fragments=None`` means 1 and ``delay=None``
  means 0 (None, not a number, so that ``optax.inject_hyperparams`` does not trace them).
  """
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
  fragments = 1 if fragments is None else static_int(caller, "fragments", fragments)
  delay = 0 if delay is None else static_int(caller, "delay", delay)
  _fragments.check_fragments(caller, fragments, k)
  communication_dtype = _exchange.check_communication_dtype(caller, communication_dtype)
  check_streaming(
    caller, alpha, policy, axis_name, fragments, communication_dtype, error_feedback, delay, mixing, placement_check
  )
  if placement_check is None:
    placement_check = "off" if delay else "warn"
  if mixing is None:
    mixing = 0.5
  if placement_check not in PLACEMENT_CHECKS:
    raise ValueError(
      f"{caller}: placement_check must be one of {', '.join(map(repr, PLACEMENT_CHECKS))}, got {placement_check!r}."
    )
  try:
    hash(axis_name)
  except TypeError as e:
    raise ValueError(f"{caller}: axis_name must be a mapped axis name (a string), got {axis_name!r}.") from e
  return Config(
    caller,
    optax.with_extra_args_support(inner),
    k,
    alpha,
    policy,
    outer,
    slow_dtype,
    axis_name,
    placement_check,
    fragments,
    communication_dtype,
    bool(error_feedback),
    delay,
    mixing,
  )


def static_int(caller: str, name: str, value: Any) -> Any:
  """A concrete integer array becomes an int; a traced one is an error (it shapes the program)."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{caller}: {name} shapes the compiled program and cannot be traced; under "
      f"optax.inject_hyperparams pass static_args=({name!r},)."
    )
  if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
    return int(value)
  return value


def check_streaming(
  caller, alpha, policy, axis_name, fragments, communication_dtype, error_feedback, delay, mixing, placement_check
) -> None:
  """The Streaming DiLoCo arguments: each needs the others it acts with, and nothing they rule out."""
  if isinstance(delay, bool) or not isinstance(delay, numbers.Integral) or delay not in (0, 1):
    raise ValueError(f"{caller}: delay must be 0 or 1, got {delay!r}.")
  if not isinstance(error_feedback, bool):
    raise ValueError(f"{caller}: error_feedback must be True or False, got {error_feedback!r}.")
  for name, value, default in (
    ("communication_dtype", communication_dtype, None),
    ("error_feedback", error_feedback, False),
    ("delay", delay, 0),
  ):
    if value != default and axis_name is None:
      raise ValueError(
        f"{caller}: {name}={value!r} acts on the exchange between replicas, which needs axis_name; got axis_name=None."
      )
  if error_feedback and communication_dtype is None:
    raise ValueError(
      f"{caller}: error_feedback=True keeps what compression loses, but communication_dtype=None "
      "(float32) loses nothing. Pass a communication_dtype, or error_feedback=False."
    )
  if mixing is not None:
    if not delay:
      raise ValueError(
        f"{caller}: mixing={mixing!r} weighs the inner step taken during a delayed exchange; it needs "
        "delay=1, got delay=0."
      )
    check_number(caller, "mixing", mixing, 0.0, 1.0)
  if delay and placement_check not in (None, "off"):
    raise ValueError(
      f"{caller}: placement_check={placement_check!r} compares the params with the slow weights at "
      "the start of a cycle, but with delay=1 the fast weights land on a mix of the slow weights and "
      "the last inner step. Leave placement_check out (or 'off') with delay=1."
    )
  if _fragments.count(fragments) > 1:
    if policy != "maintain":
      raise ValueError(
        f"{caller}: fragments={fragments!r} syncs the params a fragment at a time, while "
        f"inner_state_policy={policy!r} acts on the whole inner state at once. Use 'maintain' with "
        "fragments."
      )
    if isinstance(alpha, _alpha.AdaptiveAlpha) or (callable(alpha) and not isinstance(alpha, jax.Array)):
      raise ValueError(
        f"{caller}: fragments={fragments!r} needs a constant alpha or an outer optimizer; an alpha "
        f"schedule or adaptive alpha is defined per whole sync, got alpha={alpha!r}."
      )


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
