"""Statistics behind every verdict: Welch's test and interval, the verdict rule, the good learning-rate range."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks.common import stats


def test_welch_matches_scipy_and_its_interval_excludes_zero_exactly_when_it_rejects():
  rng = np.random.default_rng(0)
  for _ in range(20):
    a, b = rng.normal(0.0, 1.0, 5), rng.normal(rng.uniform(-2, 2), rng.uniform(0.2, 3.0), 5)
    p, (lo, hi) = stats.welch(a, b)
    assert p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    assert lo < a.mean() - b.mean() < hi
    assert (p < 0.05) == (lo > 0 or hi < 0)


def test_welch_on_constant_samples():
  assert stats.welch([1.0, 1.0], [1.0, 1.0]) == (1.0, (0.0, 0.0))
  p, interval = stats.welch([2.0, 2.0, 2.0], [1.0, 1.0])
  assert p == 0.0 and interval == (1.0, 1.0)
  with pytest.raises(ValueError, match="at least 2"):
    stats.welch([1.0], [1.0, 2.0])


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_verdicts_on_constructed_samples(higher_is_better):
  low = [0.10, 0.11, 0.09, 0.10, 0.10]
  high = [0.50, 0.52, 0.49, 0.51, 0.50]
  assert stats.compare(high, low, higher_is_better).verdict == ("beats" if higher_is_better else "loses to")
  assert stats.compare(low, high, higher_is_better).verdict == ("loses to" if higher_is_better else "beats")
  # Overlapping noisy samples: a mean difference the test cannot tell from noise is a tie.
  a, b = [0.50, 0.70, 0.30, 0.60, 0.40], [0.45, 0.65, 0.35, 0.55, 0.52]
  c = stats.compare(a, b, higher_is_better)
  assert c.verdict == "ties" and c.p > 0.05 and c.diff == pytest.approx(np.mean(a) - np.mean(b))


def test_a_diverged_run_counts_as_the_worst_outcome():
  good = [0.9, 0.91, 0.92, 0.9, 0.91]
  c = stats.compare(good, [0.9, 0.91, float("nan"), 0.9, 0.91], higher_is_better=True)
  assert math.isfinite(c.diff) and c.diff > 0
  with pytest.raises(ValueError, match="no finite value"):
    stats.compare([float("nan")] * 2, [float("inf")] * 2, True)


def test_lr_range_is_the_contiguous_run_around_the_best():
  lrs = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
  acc = [0.90, 0.975, 0.98, 0.972, 0.95, 0.975]  # 3.0 is within tolerance but not contiguous
  r = stats.lr_range(lrs, acc, tolerance=0.01, higher_is_better=True)
  assert (r.best, r.low, r.high) == (0.1, 0.03, 0.3) and r.width == pytest.approx(10.0)
  loss = [2.0, 1.02, 1.0, float("nan"), 1.005, 1.001]  # divergence breaks the range
  r = stats.lr_range(lrs, loss, tolerance=0.03, higher_is_better=False, relative=True)
  assert (r.best, r.low, r.high) == (0.1, 0.03, 0.1)
  r = stats.lr_range(list(reversed(lrs)), list(reversed(acc)), 0.01, True)  # order of the sweep does not matter
  assert (r.low, r.high) == (0.03, 0.3)
