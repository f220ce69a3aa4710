"""Timing: step times for ratios measured in one run, and compile time apart from run time."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax


def time_steps(fn: Callable, state, *, steps: int = 50, repeats: int = 5, warmup: int = 3):
  """Per-repeat milliseconds per call of ``state = fn(*state)``; ``fn`` returns the next args.

  Each repeat runs ``steps`` calls and blocks once at the end. Returns the list
  of ms/step (take the median) and the final state.
  """
  for _ in range(warmup):
    state = fn(*state)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(*state)
    jax.block_until_ready(state)
    times.append(1e3 * (time.perf_counter() - start) / steps)
  return times, state


def compile_then_run(jitted, *args):
  """``(outputs, compile_seconds, run_seconds)``: ``jitted(*args)`` with tracing and compilation timed apart."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compiled_at = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, compiled_at - start, time.perf_counter() - compiled_at
