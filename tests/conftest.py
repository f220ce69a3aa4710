"""Suite-wide settings and fixtures; shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import jax
import pytest

from tests.helpers import make_params, small_params

jax.config.update("jax_numpy_rank_promotion", "raise")

# Scripts that tests run in subprocesses: not test modules (pytest --doctest-modules would import them).
collect_ignore_glob = ["distributed/*_worker.py", "distributed/*_checks.py"]


@pytest.fixture
def params():
  return make_params()


@pytest.fixture
def small():
  return small_params()


@pytest.fixture
def x64():
  """float64 on for one test (jax_enable_x64 is global: restored after)."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
  # A placement warning where nothing is misplaced is a false alarm: fail the test that sees it.
  config.addinivalue_line("filterwarnings", "error::lookahead_optax.LookaheadPlacementWarning")
