"""Benchmark smoke tests compile many small programs once each: skip XLA's costlier optimisations while they run."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
