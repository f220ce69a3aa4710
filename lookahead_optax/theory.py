r"""The paper's analyses as functions: noisy quadratic model, quadratic rates, Proposition 1.

Everything is closed-form NumPy in float64 (no sampling, no plotting); array
arguments broadcast against each other.

**Noisy quadratic model** (section 3.1, eq. 4-7). Per coordinate the loss is
:math:`\hat L(x) = \tfrac12 a (x - c)^2` with :math:`c \sim N(0, \sigma^2)`
drawn afresh at every step, so the stochastic gradient is
:math:`a x - a c`. **Convention**: ``sigma2`` is the variance :math:`\sigma^2`
of :math:`c`, so the gradient-noise variance is :math:`a^2 \sigma^2` (the
paper's eq. 6 writes :math:`A^2\Sigma^2` for this product). With
:math:`r = 1 - \gamma a`, one SGD step is :math:`x' = r x + \gamma a c`, so the
mean :math:`m` and variance :math:`V` of an iterate follow the linear recursions

.. math::

  m' = r\, m, \qquad V' = r^2 V + \gamma^2 a^2 \sigma^2 ,

with fixed point :math:`V^*_{SGD} = \gamma^2 a^2 \sigma^2 / (1 - r^2)` (eq. 6).
Lookahead(SGD) restarts the fast weights at the slow weights :math:`\phi`;
after :math:`i` inner steps :math:`\theta_i = r^i \phi + \xi_i` with
:math:`\xi_i` independent of :math:`\phi`, mean 0 and variance
:math:`V^*_{SGD}(1 - r^{2i})`. The sync
:math:`\phi' = (1-\alpha)\phi + \alpha\theta_k` gives, with
:math:`\rho = 1 - \alpha + \alpha r^k`,

.. math::

  m_\phi' = \rho\, m_\phi, \qquad
  V_\phi' = \rho^2 V_\phi + \alpha^2 (1 - r^{2k}) V^*_{SGD},

whose fixed point is eq. 7,
:math:`V^*_{LA} = \alpha^2 (1 - r^{2k}) V^*_{SGD} / (1 - \rho^2)` (expand
:math:`1 - \rho^2` to get the paper's denominator). The expected loss is eq. 5,
:math:`\tfrac12 \sum_i a_i (m_i^2 + V_i + \sigma_i^2)`.

**Deterministic quadratic** (section 3.2). Classical momentum as optax writes it
(:math:`\mu' = g + \beta \mu`, :math:`x' = x - \gamma \mu'`, :math:`g = a x`)
is the linear map :math:`(x, \mu) \mapsto M (x, \mu)` with
:math:`M = \begin{pmatrix} 1 - \gamma a & -\gamma\beta \\ a & \beta \end{pmatrix}`;
its rate per step is the spectral radius :math:`\rho(M)`. Lookahead wrapping it
runs :math:`M^k = \begin{pmatrix} p & q \\ s & u \end{pmatrix}` from
:math:`(\phi, \mu)`, then :math:`\phi' = (1 - \alpha)\phi + \alpha\theta_k`;
maintaining the momentum gives the per-sync map
:math:`B = \begin{pmatrix} 1 - \alpha + \alpha p & \alpha q \\ s & u \end{pmatrix}`
(resetting it gives the scalar :math:`1 - \alpha + \alpha p`), and the rate per
inner step is :math:`\rho(B)^{1/k}`. On a diagonal quadratic the rate is the
largest rate over its curvatures.

**Proposition 1** (section 2.1): :func:`optimal_alpha_quadratic`, and
:func:`adaptive_alpha_value`, the estimate that :func:`lookahead_optax.adaptive_alpha`
clips at each sync.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from lookahead_optax._alpha import adaptive_alpha_value

__all__ = [
  "Moments",
  "OptimalRate",
  "adaptive_alpha_value",
  "cm_rate",
  "lookahead_cm_rate",
  "nqm_expected_loss",
  "nqm_lookahead_moments",
  "nqm_lookahead_variance",
  "nqm_sgd_moments",
  "nqm_sgd_variance",
  "optimal_alpha_quadratic",
  "optimal_rate",
]

_INNER_STATES = ("maintain", "reset")


# ----------------------------------------------------------------------------
# Argument checks.


def _array(name: str, x, fn: str) -> np.ndarray:
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {name} must be a real number or array, got {x!r}.") from e
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{fn}: {name} must be finite, got {x!r}.")
  return arr


def _positive(name: str, x, fn: str) -> np.ndarray:
  arr = _array(name, x, fn)
  if not np.all(arr > 0):
    raise ValueError(f"{fn}: {name} must be > 0, got {x!r}.")
  return arr


def _nonnegative(name: str, x, fn: str) -> np.ndarray:
  arr = _array(name, x, fn)
  if not np.all(arr >= 0):
    raise ValueError(f"{fn}: {name} must be >= 0, got {x!r}.")
  return arr


def _k(k, fn: str) -> int:
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}.")
  return int(k)


def _steps(steps, fn: str) -> int:
  if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}.")
  return int(steps)


def _alpha(alpha, fn: str, low_open: bool) -> np.ndarray:
  arr = _array("alpha", alpha, fn)
  ok = (arr > 0) if low_open else (arr >= 0)
  if not np.all(ok & (arr <= 1)):
    interval = "(0, 1]" if low_open else "[0, 1]"
    raise ValueError(f"{fn}: alpha must be in {interval}, got {alpha!r}.")
  return arr


def _momentum(momentum, fn: str) -> np.ndarray:
  arr = _array("momentum", momentum, fn)
  if not np.all((arr >= 0) & (arr < 1)):
    raise ValueError(f"{fn}: momentum must be in [0, 1), got {momentum!r}.")
  return arr


def _stable_nqm(a, lr, fn: str) -> np.ndarray:
  """r = 1 - lr * a, checked to lie in (-1, 1) (Proposition 2's 0 < lr < 2 / max a)."""
  r = 1.0 - lr * a
  if not np.all(np.abs(r) < 1):
    raise ValueError(
      f"{fn}: lr must satisfy 0 < lr < 2 / max(a) (Proposition 2), got lr={_show(lr)} "
      f"with max(a)={float(np.max(a)):.6g}."
    )
  return r


def _show(x) -> str:
  x = np.asarray(x)
  return f"{float(x):.6g}" if x.ndim == 0 else f"array of shape {x.shape}"


def _geometric(x, n: int):
  """sum_{j<n} x^j, also where x == 1."""
  x = np.asarray(x, np.float64)
  same = np.isclose(x, 1.0, rtol=0.0, atol=1e-15)
  return np.where(same, float(n), (1.0 - x**n) / np.where(same, 0.5, 1.0 - x))


# ----------------------------------------------------------------------------
# Noisy quadratic model (section 3.1).


def nqm_sgd_variance(a: ArrayLike, sigma2: ArrayLike, lr: ArrayLike) -> np.ndarray:
  r"""Steady-state variance of SGD's iterates on the noisy quadratic model (eq. 6).

  .. math::

    V^*_{SGD} = \frac{\gamma^2 a^2 \sigma^2}{1 - (1 - \gamma a)^2},

  per coordinate, with ``sigma2`` the variance of the centre :math:`c` (module
  docstring); the gradient-noise variance is :math:`a^2\sigma^2`.

  Args:
    a: curvatures :math:`a_i > 0`.
    sigma2: variances :math:`\sigma_i^2 \ge 0` of :math:`c`.
    lr: learning rate :math:`\gamma`, with :math:`0 < \gamma < 2/\max_i a_i`.

  Returns:
    The per-coordinate variance fixed point, broadcast over the arguments.

  Example:
    >>> from lookahead_optax import theory
    >>> float(theory.nqm_sgd_variance(a=1.0, sigma2=1.0, lr=0.5))  # 0.25 / 0.75
    0.3333333333333333
  """
  fn = "nqm_sgd_variance"
  a, sigma2, lr = _positive("a", a, fn), _nonnegative("sigma2", sigma2, fn), _positive("lr", lr, fn)
  r = _stable_nqm(a, lr, fn)
  return lr**2 * a**2 * sigma2 / (1.0 - r**2)


def nqm_lookahead_variance(a: ArrayLike, sigma2: ArrayLike, lr: ArrayLike, k: int, alpha: ArrayLike) -> np.ndarray:
  r"""Steady-state variance of Lookahead(SGD)'s slow weights on the noisy quadratic model (eq. 7).

  .. math::

    V^*_{LA} = \frac{\alpha^2 (1 - (1 - \gamma a)^{2k})}
      {\alpha^2 (1 - (1 - \gamma a)^{2k}) + 2\alpha(1-\alpha)(1 - (1 - \gamma a)^k)}\, V^*_{SGD}.

  This is the variance of the slow weights (equal to the params right after a
  sync). For :math:`\alpha \in (0, 1)` it is strictly below :math:`V^*_{SGD}`;
  :math:`\alpha = 1` gives :math:`V^*_{SGD}`.

  Args:
    a: curvatures :math:`a_i > 0`.
    sigma2: variances of :math:`c` (module docstring).
    lr: inner learning rate, :math:`0 < \gamma < 2/\max_i a_i`.
    k: sync period, an int >= 1.
    alpha: slow step size in (0, 1].

  Returns:
    The per-coordinate variance fixed point of the slow weights.

  Example:
    >>> from lookahead_optax import theory
    >>> v = theory.nqm_lookahead_variance(a=1.0, sigma2=1.0, lr=0.5, k=5, alpha=0.5)
    >>> round(float(v / theory.nqm_sgd_variance(1.0, 1.0, 0.5)), 4)  # well below 1: less variance than SGD
    0.3402
  """
  fn = "nqm_lookahead_variance"
  a, sigma2, lr = _positive("a", a, fn), _nonnegative("sigma2", sigma2, fn), _positive("lr", lr, fn)
  k, alpha = _k(k, fn), _alpha(alpha, fn, low_open=True)
  r = _stable_nqm(a, lr, fn)
  v_sgd = lr**2 * a**2 * sigma2 / (1.0 - r**2)
  num = alpha**2 * (1.0 - r ** (2 * k))
  return num / (num + 2.0 * alpha * (1.0 - alpha) * (1.0 - r**k)) * v_sgd


class Moments(NamedTuple):
  """Per-coordinate mean and variance of an iterate of the noisy quadratic model."""

  mean: np.ndarray
  """:math:`\\mathbb{E}[x_i]`."""
  var: np.ndarray
  """:math:`\\mathbb{V}[x_i]`."""


def nqm_sgd_moments(
  a: ArrayLike, sigma2: ArrayLike, lr: ArrayLike, steps: int, mean0: ArrayLike, var0: ArrayLike = 0.0
) -> Moments:
  r"""Mean and variance of SGD's iterate after ``steps`` updates on the noisy quadratic model.

  Solves the recursions :math:`m' = r m`, :math:`V' = r^2 V + \gamma^2 a^2\sigma^2`
  (:math:`r = 1 - \gamma a`) in closed form:
  :math:`m_T = r^T m_0`, :math:`V_T = r^{2T} V_0 + \gamma^2 a^2 \sigma^2 \sum_{j<T} r^{2j}`.

  Args:
    a, sigma2, lr: as in :func:`nqm_sgd_variance` (any lr > 0: the dynamics
      are exact even where they diverge).
    steps: number of updates T >= 0.
    mean0, var0: mean and variance of the starting point.

  Returns:
    :class:`Moments` after ``steps`` updates.

  Example:
    >>> from lookahead_optax import theory
    >>> m = theory.nqm_sgd_moments(a=1.0, sigma2=1.0, lr=0.5, steps=2, mean0=1.0)
    >>> float(m.mean), float(m.var)  # 0.5**2, 0.25 * (1 + 0.25)
    (0.25, 0.3125)
  """
  fn = "nqm_sgd_moments"
  a, sigma2, lr = _positive("a", a, fn), _nonnegative("sigma2", sigma2, fn), _positive("lr", lr, fn)
  steps = _steps(steps, fn)
  mean0, var0 = _array("mean0", mean0, fn), _nonnegative("var0", var0, fn)
  r = 1.0 - lr * a
  mean = r**steps * mean0
  var = r ** (2 * steps) * var0 + lr**2 * a**2 * sigma2 * _geometric(r**2, steps)
  return Moments(*np.broadcast_arrays(mean, var))


def nqm_lookahead_moments(
  a: ArrayLike,
  sigma2: ArrayLike,
  lr: ArrayLike,
  k: int,
  alpha: ArrayLike,
  steps: int,
  mean0: ArrayLike,
  var0: ArrayLike = 0.0,
) -> Moments:
  r"""Mean and variance of Lookahead(SGD)'s params after ``steps`` inner updates on the NQM.

  With :math:`n = \lfloor T/k \rfloor` syncs done and :math:`i = T - nk` inner
  steps since, the slow weights follow :math:`m_\phi' = \rho m_\phi`,
  :math:`V_\phi' = \rho^2 V_\phi + \alpha^2(1-r^{2k}) V^*_{SGD}`
  (:math:`\rho = 1-\alpha+\alpha r^k`, module docstring), and the params (fast
  weights) are :math:`r^i \phi` plus independent noise of variance
  :math:`V^*_{SGD}(1 - r^{2i})`:

  .. math::

    m_T = r^i \rho^n m_0, \qquad
    V_T = r^{2i}\Big(\rho^{2n} V_0 + \alpha^2 (1 - r^{2k}) V^*_{SGD} \sum_{j<n}\rho^{2j}\Big)
      + V^*_{SGD}(1 - r^{2i}),

  where :math:`V^*_{SGD}(1 - r^{2i}) = \gamma^2 a^2\sigma^2 \sum_{j<i} r^{2j}`
  (so any lr > 0 is allowed). At multiples of ``k`` these are the slow weights'.

  Args:
    a, sigma2, lr: as in :func:`nqm_sgd_moments`.
    k: sync period, an int >= 1.
    alpha: slow step size in [0, 1].
    steps: number of inner updates T >= 0.
    mean0, var0: mean and variance of the starting point (slow = fast).

  Returns:
    :class:`Moments` of the params after ``steps`` updates.

  Example:
    >>> from lookahead_optax import theory
    >>> m = theory.nqm_lookahead_moments(1.0, 1.0, 0.5, k=2, alpha=0.5, steps=2, mean0=1.0)
    >>> float(m.mean), float(m.var)  # (1 - 0.5 + 0.5 * 0.25), 0.25 * 0.3125
    (0.625, 0.078125)
  """
  fn = "nqm_lookahead_moments"
  a, sigma2, lr = _positive("a", a, fn), _nonnegative("sigma2", sigma2, fn), _positive("lr", lr, fn)
  k, alpha, steps = _k(k, fn), _alpha(alpha, fn, low_open=False), _steps(steps, fn)
  mean0, var0 = _array("mean0", mean0, fn), _nonnegative("var0", var0, fn)
  r = 1.0 - lr * a
  noise = lr**2 * a**2 * sigma2  # gradient-noise variance times lr^2
  n, i = divmod(steps, k)
  rho = 1.0 - alpha + alpha * r**k
  inner_k = noise * _geometric(r**2, k)  # V*_SGD (1 - r^{2k}), the noise of k fast steps
  slow_mean = rho**n * mean0
  slow_var = rho ** (2 * n) * var0 + alpha**2 * inner_k * _geometric(rho**2, n)
  mean = r**i * slow_mean
  var = r ** (2 * i) * slow_var + noise * _geometric(r**2, i)
  return Moments(*np.broadcast_arrays(mean, var))


def nqm_expected_loss(a: ArrayLike, sigma2: ArrayLike, moments: Moments) -> np.ndarray:
  r"""Expected loss (eq. 5), summed over the last axis (the coordinates).

  .. math::

    \mathcal L = \tfrac12 \sum_i a_i\big(\mathbb E[x_i]^2 + \mathbb V[x_i] + \sigma_i^2\big).

  The last term, :math:`\tfrac12\sum_i a_i\sigma_i^2`, is the irreducible loss
  of the minimiser :math:`x = 0`.

  Args:
    a: the curvatures :math:`a_i` > 0, one per coordinate (last axis).
    sigma2: the noise variances :math:`\sigma_i^2` >= 0, broadcast with ``a``.
    moments: the iterate's per-coordinate :class:`Moments` (mean and
      variance >= 0), e.g. from :func:`nqm_sgd_moments`.

  Returns:
    The expected loss, summed over the last axis.

  Example:
    >>> from lookahead_optax import theory
    >>> float(theory.nqm_expected_loss([1.0, 2.0], [1.0, 0.5], theory.Moments([1.0, 0.0], [0.0, 1.0])))
    2.5
  """
  fn = "nqm_expected_loss"
  a, sigma2 = _positive("a", a, fn), _nonnegative("sigma2", sigma2, fn)
  if not isinstance(moments, Moments):
    raise ValueError(f"{fn}: moments must be a theory.Moments(mean, var), got {type(moments).__name__}.")
  mean, var = _array("moments.mean", moments.mean, fn), _nonnegative("moments.var", moments.var, fn)
  per_coordinate = a * (mean**2 + var + sigma2)
  return 0.5 * np.sum(per_coordinate, axis=-1)


# ----------------------------------------------------------------------------
# Deterministic quadratic rates (section 3.2, Fig. 4).


def _cm_matrix(a, lr, momentum) -> np.ndarray:
  a, lr, momentum = np.broadcast_arrays(a, lr, momentum)
  row0 = np.stack([1.0 - lr * a, -lr * momentum], axis=-1)
  row1 = np.stack([a, momentum], axis=-1)
  return np.stack([row0, row1], axis=-2)


def _matmul_2x2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Batched 2x2 product written out: much faster than np.matmul on tiny matrices."""
  x00, x01, x10, x11 = x[..., 0, 0], x[..., 0, 1], x[..., 1, 0], x[..., 1, 1]
  y00, y01, y10, y11 = y[..., 0, 0], y[..., 0, 1], y[..., 1, 0], y[..., 1, 1]
  row0 = np.stack([x00 * y00 + x01 * y10, x00 * y01 + x01 * y11], axis=-1)
  row1 = np.stack([x10 * y00 + x11 * y10, x10 * y01 + x11 * y11], axis=-1)
  return np.stack([row0, row1], axis=-2)


def _power_2x2(m: np.ndarray, k: int) -> np.ndarray:
  """m**k by repeated squaring (k >= 1)."""
  result: np.ndarray | None = None
  while k:
    if k & 1:
      result = m if result is None else _matmul_2x2(result, m)
    k >>= 1
    if k:
      m = _matmul_2x2(m, m)
  assert result is not None
  return result


def _spectral_radius_2x2(m: np.ndarray) -> np.ndarray:
  half_trace = 0.5 * (m[..., 0, 0] + m[..., 1, 1])
  det = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
  root = np.sqrt((half_trace**2 - det).astype(np.complex128))
  return np.maximum(np.abs(half_trace + root), np.abs(half_trace - root))


def cm_rate(a: ArrayLike, lr: ArrayLike, momentum: ArrayLike) -> np.ndarray:
  r"""Exact convergence rate of classical momentum on :math:`\tfrac12 a x^2`: :math:`\rho(M)` per step.

  :math:`M = \begin{pmatrix} 1 - \gamma a & -\gamma\beta \\ a & \beta\end{pmatrix}`
  acts on (params, momentum buffer) as ``optax.sgd(lr, momentum=beta)`` does;
  its eigenvalues solve :math:`\lambda^2 - (1 + \beta - \gamma a)\lambda + \beta = 0`.
  :math:`\|x_t\| \le C \rho^t` and no smaller :math:`\rho` works.

  Args:
    a: curvatures > 0.
    lr: learning rate > 0.
    momentum: :math:`\beta \in [0, 1)`.

  Returns:
    The spectral radius per step, broadcast over the arguments.

  Example:
    >>> from lookahead_optax import theory
    >>> float(theory.cm_rate(a=1.0, lr=0.5, momentum=0.0))  # |1 - lr a|
    0.5
    >>> round(float(theory.cm_rate(a=1.0, lr=1.0, momentum=0.81)), 6)  # complex pair: sqrt(beta)
    0.9
  """
  fn = "cm_rate"
  a, lr, momentum = _positive("a", a, fn), _positive("lr", lr, fn), _momentum(momentum, fn)
  return _spectral_radius_2x2(_cm_matrix(a, lr, momentum))


def lookahead_cm_rate(
  a: ArrayLike, lr: ArrayLike, momentum: ArrayLike, k: int, alpha: ArrayLike, inner_state_policy: str = "maintain"
) -> np.ndarray:
  r"""Exact convergence rate per inner step of Lookahead wrapping classical momentum on :math:`\tfrac12 a x^2`.

  With :math:`M^k = \begin{pmatrix} p & q \\ s & u\end{pmatrix}` (see
  :func:`cm_rate`), one sync maps (slow weights, momentum) by

  .. math::

    B = \begin{pmatrix} 1 - \alpha + \alpha p & \alpha q \\ s & u \end{pmatrix}
    \quad (\text{``maintain''}), \qquad
    B = 1 - \alpha + \alpha p \quad (\text{``reset''}),

  and the rate per inner step is :math:`\rho(B)^{1/k}`, as for
  ``lookahead(optax.sgd(lr, momentum=beta), k, alpha, inner_state_policy=...)``.

  Args:
    a: curvatures > 0.
    lr: inner learning rate > 0.
    momentum: :math:`\beta \in [0, 1)`.
    k: sync period, an int >= 1.
    alpha: slow step size in [0, 1].
    inner_state_policy: ``"maintain"`` (the paper's default) or ``"reset"``.

  Returns:
    The rate per inner step, broadcast over ``a``, ``lr``, ``momentum``, ``alpha``.

  Example:
    >>> from lookahead_optax import theory
    >>> round(float(theory.lookahead_cm_rate(1.0, 0.5, 0.0, k=2, alpha=0.5)), 6)  # sqrt(0.5 + 0.5 * 0.25)
    0.790569
  """
  fn = "lookahead_cm_rate"
  a, lr, momentum = _positive("a", a, fn), _positive("lr", lr, fn), _momentum(momentum, fn)
  k, alpha = _k(k, fn), _alpha(alpha, fn, low_open=False)
  if inner_state_policy not in _INNER_STATES:
    raise ValueError(f"{fn}: inner_state_policy must be one of {_INNER_STATES}, got {inner_state_policy!r}.")
  mk = _power_2x2(_cm_matrix(a, lr, momentum), k)
  p, q, s, u = mk[..., 0, 0], mk[..., 0, 1], mk[..., 1, 0], mk[..., 1, 1]
  p, q, s, u, alpha = np.broadcast_arrays(p, q, s, u, alpha)
  head = 1.0 - alpha + alpha * p
  if inner_state_policy == "reset":
    per_sync = np.abs(head)
  else:
    b = np.stack([np.stack([head, alpha * q], -1), np.stack([s, u], -1)], -2)
    per_sync = _spectral_radius_2x2(b)
  return per_sync ** (1.0 / k)


class OptimalRate(NamedTuple):
  """The best worst-case rate over a range of curvatures and the learning rate reaching it."""

  lr: np.ndarray
  """The learning rate minimising the worst-case rate."""
  rate: np.ndarray
  """The worst-case rate per (inner) step at that learning rate."""


def optimal_rate(
  condition_number: ArrayLike,
  momentum: float,
  *,
  k: int | None = None,
  alpha: float = 0.5,
  inner_state_policy: str = "maintain",
  num_curvatures: int = 1000,
  num_lr: int = 200,
) -> OptimalRate:
  r"""Fig. 4: the rate of CM (``k=None``) or Lookahead(CM) at the optimal learning rate.

  For each condition number :math:`\kappa` the curvatures are
  ``num_curvatures`` log-spaced points of :math:`[1, \kappa]` (both ends
  included), the worst-case rate at a learning rate is the largest rate over
  them, and

  .. math::

    \rho^*(\kappa) = \min_{\gamma} \max_{a \in [1, \kappa]} \rho(a, \gamma)

  is found on ``num_lr`` log-spaced learning rates of
  :math:`[10^{-6}, 1]\cdot 2(1+\beta)/\kappa` (CM's stability limit at the
  largest curvature), refined by golden-section search between the best grid
  point's neighbours. The momentum :math:`\beta` is fixed, as in the paper.

  Args:
    condition_number: :math:`\kappa \ge 1`, a scalar or 1-D array.
    momentum: :math:`\beta \in [0, 1)`.
    k: ``None`` for classical momentum, or Lookahead's sync period.
    alpha: Lookahead's slow step size in [0, 1].
    inner_state_policy: ``"maintain"`` or ``"reset"`` (see :func:`lookahead_cm_rate`).
    num_curvatures: curvature grid size, >= 2.
    num_lr: learning-rate grid size, >= 3.

  Returns:
    :class:`OptimalRate` with arrays shaped like ``condition_number``.

  Example:
    >>> from lookahead_optax import theory
    >>> best = theory.optimal_rate(100.0, momentum=0.0, num_curvatures=2)
    >>> round(float(best.lr), 4), round(float(best.rate), 4)  # gradient descent: 2/(1+k), (k-1)/(k+1)
    (0.0198, 0.9802)
  """
  fn = "optimal_rate"
  kappa = _array("condition_number", condition_number, fn)
  if kappa.ndim > 1 or not np.all(kappa >= 1):
    raise ValueError(f"{fn}: condition_number must be a scalar or 1-D array of values >= 1, got {condition_number!r}.")
  beta = float(_momentum(momentum, fn))
  if k is not None:
    k = _k(k, fn)
    alpha = float(_alpha(alpha, fn, low_open=False))
    if inner_state_policy not in _INNER_STATES:
      raise ValueError(f"{fn}: inner_state_policy must be one of {_INNER_STATES}, got {inner_state_policy!r}.")
  for name, value, low in (("num_curvatures", num_curvatures, 2), ("num_lr", num_lr, 3)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}.")

  kappas = np.atleast_1d(kappa)  # every condition number at once: rows below
  curvatures = np.exp(np.log(kappas)[:, None, None] * np.linspace(0.0, 1.0, num_curvatures))  # (K, 1, C)

  def worst(log_lr):  # (K, L) log learning rates -> (K, L) worst rate over the curvatures
    lr = np.exp(log_lr)[..., None]
    if k is None:
      return np.max(cm_rate(curvatures, lr, beta), axis=-1)
    return np.max(lookahead_cm_rate(curvatures, lr, beta, k, alpha, inner_state_policy), axis=-1)

  log_grid = np.log(2.0 * (1.0 + beta) / kappas)[:, None] + np.linspace(math.log(1e-6), 0.0, num_lr)
  values = worst(log_grid)
  j = np.argmin(values, axis=1)
  rows = np.arange(len(kappas))
  best_log, best_value = log_grid[rows, j], values[rows, j]
  lo, hi = log_grid[rows, np.maximum(j - 1, 0)], log_grid[rows, np.minimum(j + 1, num_lr - 1)]
  golden = (math.sqrt(5.0) - 1.0) / 2.0
  x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
  f1, f2 = worst(x1[:, None])[:, 0], worst(x2[:, None])[:, 0]
  for _ in range(30):  # golden-section search; the bracket shrinks by 0.618 per step
    for x, f in ((x1, f1), (x2, f2)):
      better = f < best_value
      best_log, best_value = np.where(better, x, best_log), np.where(better, f, best_value)
    left = f1 <= f2  # the minimum lies in [lo, x2]
    lo, hi = np.where(left, lo, x1), np.where(left, x2, hi)
    new_x = np.where(left, hi - golden * (hi - lo), lo + golden * (hi - lo))
    new_f = worst(new_x[:, None])[:, 0]
    x1, f1, x2, f2 = (
      np.where(left, new_x, x2),
      np.where(left, new_f, f2),
      np.where(left, x1, new_x),
      np.where(left, f1, new_f),
    )
  for x, f in ((x1, f1), (x2, f2)):
    better = f < best_value
    best_log, best_value = np.where(better, x, best_log), np.where(better, f, best_value)
  shape = kappa.shape
  return OptimalRate(np.exp(best_log).reshape(shape), best_value.reshape(shape))


# ----------------------------------------------------------------------------
# Proposition 1 (section 2.1).


def optimal_alpha_quadratic(A: ArrayLike, b: ArrayLike, slow: ArrayLike, fast: ArrayLike) -> float:
  r"""Proposition 1: the slow step minimising :math:`L(x) = \tfrac12 x^\top A x - b^\top x` along the slow step.

  .. math::

    \alpha^* = \arg\min_\alpha L(\theta_{t,0} + \alpha(\theta_{t,k} - \theta_{t,0}))
      = \frac{(\theta_{t,0} - \theta^*)^\top A (\theta_{t,0} - \theta_{t,k})}
             {(\theta_{t,0} - \theta_{t,k})^\top A (\theta_{t,0} - \theta_{t,k})},
    \qquad \theta^* = A^{-1} b .

  Not clipped: it may lie outside [0, 1]. :func:`lookahead_optax.adaptive_alpha`
  estimates it with a diagonal Fisher in place of :math:`A`.

  Args:
    A: a symmetric positive-definite matrix (n, n), or its diagonal (n,).
    b: the linear term (n,).
    slow: the slow weights :math:`\theta_{t,0} = \phi` (n,).
    fast: the fast weights after k steps :math:`\theta_{t,k}` (n,), not equal to ``slow``.

  Returns:
    :math:`\alpha^*` as a float.

  Example:
    >>> from lookahead_optax import theory
    >>> theory.optimal_alpha_quadratic([2.0], [2.0], slow=[3.0], fast=[2.0])  # optimum x=1: go twice as far
    2.0
  """
  fn = "optimal_alpha_quadratic"
  A = _array("A", A, fn)
  b, slow, fast = _array("b", b, fn), _array("slow", slow, fn), _array("fast", fast, fn)
  if b.ndim != 1 or slow.shape != b.shape or fast.shape != b.shape:
    raise ValueError(
      f"{fn}: b, slow and fast must be 1-D of the same shape, got {b.shape}, {slow.shape}, {fast.shape}."
    )
  n = b.shape[0]
  if A.shape == (n,):
    if not np.all(A > 0):
      raise ValueError(f"{fn}: A's diagonal must be > 0 (positive definite), got {A!r}.")
    A = np.diag(A)
  elif A.shape != (n, n):
    raise ValueError(f"{fn}: A must have shape ({n}, {n}) or ({n},), got {A.shape}.")
  elif not np.allclose(A, A.T) or np.min(np.linalg.eigvalsh(A)) <= 0:
    raise ValueError(f"{fn}: A must be symmetric positive definite.")
  d = slow - fast
  den = d @ A @ d
  if not den > 0:
    raise ValueError(f"{fn}: fast must differ from slow (the slow step has no direction).")
  optimum = np.linalg.solve(A, b)
  return float((slow - optimum) @ A @ d / den)
