"""Statistics for comparing two methods over seeds, and the width of a good learning-rate range.

Every "beats" / "loses" in the reports comes from :func:`compare`: Welch's
two-sided t-test on the per-seed values at level 0.05, otherwise the verdict is
"ties"; alongside, Welch's 95 % confidence interval of the difference of means
(it excludes 0 exactly when the test rejects).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

LEVEL = 0.05
"""Significance level of the Welch test behind every verdict."""


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, tuple[float, float]]:
  """``(p, (low, high))``: Welch's two-sided t-test of mean(a) == mean(b) and its ``1 - level`` interval of the difference.

  Unequal variances; Welch-Satterthwaite degrees of freedom. Two constant
  samples give ``p = 1`` when equal and ``p = 0`` when not.
  """
  from scipy import stats

  a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"welch: need at least 2 values on each side, got {len(a)} and {len(b)}.")
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  diff = float(a.mean() - b.mean())
  if va + vb == 0.0:
    return (1.0 if diff == 0.0 else 0.0), (diff, diff)
  se = math.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  p = float(2.0 * stats.t.sf(abs(diff) / se, dof))
  half = float(stats.t.ppf(1.0 - level / 2.0, dof) * se)
  return p, (diff - half, diff + half)


class Comparison(NamedTuple):
  """Method ``a`` against method ``b`` on one metric over seeds."""

  diff: float
  """mean(a) - mean(b)."""
  interval: tuple[float, float]
  """Welch's 95 % confidence interval of ``diff``."""
  p: float
  """Welch's two-sided p-value."""
  verdict: str
  """``"beats"``, ``"loses to"`` or ``"ties"``: ``a`` relative to ``b``."""


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool, level: float = LEVEL) -> Comparison:
  """Does ``a`` beat ``b``? A verdict only where Welch's test rejects equal means at ``level``; else a tie.

  A non-finite value (a diverged run) counts as the worst possible outcome of its side.
  """
  a, b = _finite_or_worst(a, b, higher_is_better)
  diff = float(np.mean(a) - np.mean(b))
  p, interval = welch(a, b, level)
  if p < level and diff != 0.0:
    verdict = "beats" if (diff > 0) == higher_is_better else "loses to"
  else:
    verdict = "ties"
  return Comparison(diff, interval, p, verdict)


def _finite_or_worst(a, b, higher_is_better):
  a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
  both = np.concatenate([a, b])
  finite = both[np.isfinite(both)]
  if finite.size == 0:
    raise ValueError("compare: no finite value on either side.")
  worst = finite.min() if higher_is_better else finite.max()
  return np.where(np.isfinite(a), a, worst), np.where(np.isfinite(b), b, worst)


class LrRange(NamedTuple):
  """The contiguous learning rates, around the best, whose mean score is within a tolerance of the best."""

  best: float
  """The learning rate with the best mean score."""
  low: float
  high: float
  width: float
  """``high / low``: how many-fold the learning rate may change and still be within tolerance."""


def lr_range(
  lrs: Sequence[float], scores: Sequence[float], tolerance: float, higher_is_better: bool, relative: bool = False
) -> LrRange:
  """The good range of a learning-rate sweep (paper Fig. 8 and its NMT paragraph).

  ``scores[i]`` is the mean over seeds at ``lrs[i]``. A rate is good when its
  score is within ``tolerance`` of the best: an absolute difference, or with
  ``relative`` a fraction of the best. Non-finite scores (divergence) are never good.
  """
  order = np.argsort(lrs)
  lrs = np.asarray(lrs, dtype=float)[order]
  scores = np.asarray(scores, dtype=float)[order]
  if not np.isfinite(scores).any():
    raise ValueError("lr_range: every score is non-finite.")
  signed = np.where(np.isfinite(scores), scores if higher_is_better else -scores, -np.inf)
  i = int(np.argmax(signed))
  slack = tolerance * abs(scores[i]) if relative else tolerance
  good = signed >= signed[i] - slack
  lo = hi = i
  while lo > 0 and good[lo - 1]:
    lo -= 1
  while hi < len(lrs) - 1 and good[hi + 1]:
    hi += 1
  return LrRange(float(lrs[i]), float(lrs[lo]), float(lrs[hi]), float(lrs[hi] / lrs[lo]))
