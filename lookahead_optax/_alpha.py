"""The slow-weight step size alpha: a constant, a schedule, or adaptive.

A constant or a schedule (a callable of the number of completed syncs) is
read once per sync. The adaptive rule of the paper's section 2.1 picks alpha at
each sync from a quadratic model of the loss with a diagonal empirical Fisher.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_FISHER_SOURCES = ("auto", "inner", "ema")


class AdaptiveAlpha(NamedTuple):
  """Configuration of the adaptive slow step size; build it with :func:`adaptive_alpha`."""

  alpha_low: float
  """Lower clip of alpha; the upper clip is 1."""
  fisher: str
  """Where the diagonal Fisher comes from: ``"inner"``, ``"ema"`` or ``"auto"``."""
  b2: float
  """Decay of the squared-gradient average (and bias correction of the inner's)."""
  eps: float
  """Added to the Fisher diagonal so the quadratic model is never flat."""


class AdaptiveAlphaState(NamedTuple):
  """What adaptive alpha keeps between steps."""

  fisher: Any
  """EMA of squared gradients (param-shaped) or ``optax.EmptyState()`` when read from the inner state."""
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax's states
  """Steps folded into the EMA, for bias correction (int32)."""


def adaptive_alpha(
  alpha_low: float = 0.1,
  *,
  fisher: str = "auto",
  b2: float = 0.999,
  eps: float = 1e-8,
) -> AdaptiveAlpha:
  r"""The adaptive slow step size of the paper's section 2.1.

  At each sync, with slow weights :math:`\phi`, fast weights :math:`\theta_k`,
  :math:`d = \phi - \theta_k`, a diagonal empirical Fisher :math:`\hat A` and a
  gradient :math:`g`,

  .. math::

    \hat\alpha = \mathrm{clip}\Big(
      \frac{(\phi - (\theta_k - \hat A^{-1} g))^\top \hat A\, d}{d^\top \hat A\, d},
      \alpha_{low}, 1\Big)
    = \mathrm{clip}\Big(1 + \frac{g^\top d}{d^\top \hat A d}, \alpha_{low}, 1\Big).

  On a quadratic with :math:`\hat A = A` and the exact gradient at
  :math:`\theta_k` this is Proposition 1's optimal step.

  Which gradient stands in for :math:`\nabla L(\theta_k)`: the gradient passed
  to the k-th inner update. It was evaluated at :math:`\theta_{k-1}`, one inner
  step before :math:`\theta_k`; the gradient at :math:`\theta_k` itself only
  exists after the sync, and waiting for it would delay the sync by one step.

  Fisher source: ``"inner"`` reads the inner optimizer's second moment (the
  ``nu`` of Adam-like states), bias-corrected with ``b2`` (set it to the inner's
  ``b2``), at no memory cost; ``"ema"`` keeps its own EMA of squared gradients,
  one extra param-sized copy in the state, updated every step; ``"auto"``
  (default) takes ``"inner"`` when the inner state has a ``nu`` and ``"ema"``
  otherwise. The alpha chosen at the last sync is ``LookaheadState.alpha``
  (0 before the first sync).

  Args:
    alpha_low: lower clip of alpha, in (0, 1]. The paper notes that
      ``alpha_low > 0`` improves stability; 0.1 is our default.
    fisher: ``"auto"``, ``"inner"`` or ``"ema"``.
    b2: EMA decay of squared gradients, in [0, 1).
    eps: added to the Fisher diagonal, >= 0.

  Returns:
    An :class:`AdaptiveAlpha`, to pass as ``lookahead(..., alpha=...)``.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from lookahead_optax import lookahead, adaptive_alpha
    >>> opt = lookahead(optax.adam(1e-2), k=5, alpha=adaptive_alpha(0.2))
    >>> state = opt.init({"w": jnp.ones(3)})
  """
  if not is_real_number(alpha_low) or not 0.0 < alpha_low <= 1.0:
    raise ValueError(f"adaptive_alpha: alpha_low must be a number in (0, 1], got {alpha_low!r}.")
  if fisher not in _FISHER_SOURCES:
    raise ValueError(f"adaptive_alpha: fisher must be one of {_FISHER_SOURCES}, got {fisher!r}.")
  if not is_real_number(b2) or not 0.0 <= b2 < 1.0:
    raise ValueError(f"adaptive_alpha: b2 must be a number in [0, 1), got {b2!r}.")
  if not is_real_number(eps) or not eps >= 0.0:
    raise ValueError(f"adaptive_alpha: eps must be a number >= 0, got {eps!r}.")
  return AdaptiveAlpha(float(alpha_low), fisher, float(b2), float(eps))


def adaptive_alpha_value(slow: Any, fast: Any, grad: Any, fisher: Any, eps: float = 0.0) -> jax.Array:
  r"""Unclipped :math:`\hat\alpha = 1 + g^\top d / (d^\top (\hat A + \epsilon) d)`, :math:`d = \phi - \theta_k`.

  All four arguments are pytrees of the same structure; the sums run over every
  leaf.

  Args:
    slow: the slow weights :math:`\phi`.
    fast: the fast weights :math:`\theta_k` at the end of the inner loop.
    grad: the gradient :math:`g` that stands in for the one at
      :math:`\theta_k`.
    fisher: the diagonal of the empirical Fisher :math:`\hat A`, e.g. Adam's
      second moment.
    eps: added to the Fisher diagonal, >= 0.

  Returns:
    :math:`\hat\alpha`, a scalar, not clipped; 1 when the fast weights did
    not move (:math:`d = 0`).

  Example:
    >>> import jax.numpy as jnp
    >>> from lookahead_optax import theory
    >>> w = lambda *x: {"w": jnp.array(x)}
    >>> float(theory.adaptive_alpha_value(w(1.0, 1.0), w(0.0, 0.0), w(-1.0, -1.0), w(2.0, 2.0)))
    0.5
  """
  delta = jax.tree.map(lambda s, f: s - f.astype(s.dtype), slow, fast)
  return _from_sums(*_quadratic_sums(delta, grad, fisher, eps))


def _quadratic_sums(delta, grad, fisher, eps):
  r""":math:`g^\top d` and :math:`d^\top (\hat A + \epsilon) d`, summed in the pseudo-gradient's precision."""
  dtype = alpha_dtype(delta)
  num = _tree_sum(jax.tree.map(lambda g, d: jnp.real(jnp.conj(g) * d), grad, delta), dtype)
  den = _tree_sum(jax.tree.map(lambda a, d: (a.real + eps) * jnp.abs(d) ** 2, fisher, delta), dtype)
  return num, den


def _from_sums(num, den):
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, 1.0 + num / safe, 1.0)


def _tree_sum(tree, dtype) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(x, dtype=dtype) for x in leaves), jnp.zeros((), dtype))


def alpha_dtype(slow) -> jnp.dtype:
  """The dtype alpha is computed and kept in: float64 when a slow weight is 64-bit, else float32."""
  wide = any(jnp.finfo(x.dtype).bits == 64 for x in jax.tree.leaves(slow) if jnp.issubdtype(x.dtype, jnp.inexact))
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def inner_second_moment(inner_state) -> tuple[Any, jax.Array] | None:
  """The ``(nu, count)`` of an Adam-like inner state, or None if it has none."""
  nus = optax.tree_utils.tree_get_all_with_path(inner_state, "nu")
  counts = optax.tree_utils.tree_get_all_with_path(inner_state, "count")
  if len(nus) != 1 or not counts:
    return None
  return nus[0][1], counts[0][1]


def init_alpha_state(rule, slow, inner_state):
  """The alpha state for ``rule`` (``optax.EmptyState()`` unless it keeps an EMA)."""
  if not keeps_ema(rule, inner_state):
    return optax.EmptyState()
  if rule.fisher == "inner":
    raise ValueError(
      "adaptive_alpha(fisher='inner') needs an inner optimizer state with a second"
      " moment 'nu' (Adam-like); this inner state has none. Use fisher='ema'."
    )
  zeros = jax.tree.map(lambda s: jnp.zeros_like(s, dtype=jnp.real(s).dtype), slow)
  return AdaptiveAlphaState(fisher=zeros, count=jnp.zeros((), jnp.int32))


def keeps_ema(rule, inner_state) -> bool:
  """Does ``rule`` keep its own squared-gradient EMA in the state (:func:`init_alpha_state`)?"""
  return isinstance(rule, AdaptiveAlpha) and not _uses_inner_fisher(rule, inner_state)


def _uses_inner_fisher(rule: AdaptiveAlpha, inner_state) -> bool:
  return rule.fisher != "ema" and inner_second_moment(inner_state) is not None


def observe_gradient(rule, alpha_state, grads):
  """Fold this step's gradient into the EMA (every step; a no-op for other rules)."""
  if not isinstance(alpha_state, AdaptiveAlphaState):
    return alpha_state
  fisher = jax.tree.map(
    lambda f, g: rule.b2 * f + (1.0 - rule.b2) * jnp.abs(g).astype(f.dtype) ** 2,
    alpha_state.fisher,
    grads,
  )
  return AdaptiveAlphaState(fisher=fisher, count=optax.safe_increment(alpha_state.count))


def alpha_at_sync(rule, syncs, alpha_state, inner_state, delta, grads, mask, dtype, caller: str):
  """The alpha used at this sync, a scalar of ``dtype`` (that of the slow weights, :func:`alpha_dtype`).

  ``delta`` is the pseudo-gradient (slow - fast); ``delta`` and ``grads`` hold
  ``MaskedNode()`` where params are not floating point, and ``mask`` does the
  same to a params-shaped tree.
  """
  if isinstance(rule, AdaptiveAlpha):
    if isinstance(alpha_state, AdaptiveAlphaState):
      fisher, count = alpha_state.fisher, alpha_state.count
    else:
      moment = inner_second_moment(inner_state)
      assert moment is not None  # init chose the inner source only when the inner state has one
      fisher, count = mask(moment[0]), moment[1]
    correction = 1.0 - rule.b2 ** jnp.maximum(count, 1).astype(dtype)
    fisher = jax.tree.map(lambda f: f / correction.astype(f.dtype), fisher)
    sums = _quadratic_sums(delta, grads, fisher, rule.eps)
    return jnp.clip(_from_sums(*sums), rule.alpha_low, 1.0).astype(dtype)
  if callable(rule):
    return scheduled(caller, rule, syncs, dtype)
  return jnp.asarray(rule, dtype)


def scheduled(caller: str, schedule, syncs, dtype) -> jax.Array:
  """An alpha schedule's value at ``syncs``: a real scalar, else a ValueError naming ``alpha``, at trace time."""
  value = schedule(syncs)
  try:
    alpha = jnp.asarray(value)
  except TypeError as e:
    raise ValueError(f"{caller}: alpha={schedule!r}, a schedule, must return a number, got {value!r}.") from e
  if alpha.shape or not (jnp.issubdtype(alpha.dtype, jnp.floating) or jnp.issubdtype(alpha.dtype, jnp.integer)):
    raise ValueError(
      f"{caller}: alpha={schedule!r}, a schedule, must return a real scalar, got {alpha.dtype}{list(alpha.shape)}."
    )
  return alpha.astype(dtype)


def initial_alpha(slow) -> jax.Array:
  """``LookaheadState.alpha`` before the first sync: 0, no slow step taken yet."""
  return jnp.zeros((), alpha_dtype(slow))


def check_alpha(caller: str, alpha) -> None:
  """Raise a ValueError naming ``alpha`` unless it is a valid slow step size."""
  if isinstance(alpha, AdaptiveAlpha) or (callable(alpha) and not isinstance(alpha, jax.Array)):
    return
  if isinstance(alpha, bool):
    raise ValueError(f"{caller}: alpha must be a number in [0, 1] or a schedule, got the bool {alpha!r}.")
  if isinstance(alpha, jax.core.Tracer):
    return  # A traced hyperparameter (optax.inject_hyperparams under jit): checked by the caller's values.
  try:
    value = float(jnp.asarray(alpha)) if not is_real_number(alpha) else float(alpha)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{caller}: alpha must be a number in [0, 1], a schedule or adaptive_alpha(), got {alpha!r}."
    ) from e
  if not math.isfinite(value) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{caller}: alpha must be a finite number in [0, 1], got {alpha!r}.")


class AlphaRangeWarning(UserWarning):
  """A scheduled or injected alpha outside [0, 1] was used at a sync (the slow weights extrapolated)."""


def varies(rule) -> bool:
  """Whether alpha is only known when the step runs: a schedule, or a value traced under ``inject_hyperparams``."""
  if isinstance(rule, AdaptiveAlpha):
    return False  # clipped to [alpha_low, 1] by construction
  return isinstance(rule, jax.core.Tracer) or (callable(rule) and not isinstance(rule, jax.Array))


def report_out_of_range(caller: str, alpha) -> jax.Array:
  """An int32 zero; on the host, an :class:`AlphaRangeWarning` naming ``alpha`` when it is outside [0, 1].

  A ``jax.pure_callback`` in a branch taken only for such an alpha: the step
  keeps no side effect, and its caller makes the state depend on the zero.
  """

  def warn(value):
    value = np.asarray(value)
    bad = value[~((value >= 0) & (value <= 1))]
    if bad.size:
      warnings.warn(
        f"{caller}: alpha must be in [0, 1], got alpha={float(bad.ravel()[0])!r} from a schedule or "
        "optax.inject_hyperparams at a sync: the slow weights extrapolated past the fast weights.",
        AlphaRangeWarning,
        stacklevel=2,
      )
    return np.zeros(value.shape, np.int32)

  outside = jnp.logical_not((alpha >= 0) & (alpha <= 1))
  zero = jax.ShapeDtypeStruct((), jnp.int32)
  return jax.lax.cond(
    outside,
    lambda a: jax.pure_callback(warn, zero, a, vmap_method="expand_dims"),
    lambda a: jnp.zeros((), jnp.int32),
    alpha,
  )


def is_real_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)
