"""Timing: step times for ratios measured in one run, and compile time apart from run time."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


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
    seconds, state = time_block(fn, state, steps)
    times.append(1e3 * seconds)
  return times, state


def time_block(fn: Callable, state, steps: int):
  """``(seconds per call, final state)`` of ``steps`` calls of ``state = fn(*state)``, blocking once at the end.

  Python's garbage collector is off during the block, so that a collection
  triggered by one implementation is not charged to it.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state = fn(*state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps, state
  finally:
    if enabled:
      gc.enable()


def steps_for(fn: Callable, state, block_seconds: float, lo: int, hi: int):
  """``(steps, state)``: how many calls of ``fn`` fill about ``block_seconds``, in ``[lo, hi]``.

  Calibrated on a short block of ``lo`` calls after one warm-up call.
  """
  state = fn(*state)
  seconds, state = time_block(fn, state, max(lo, 1))
  return int(np.clip(round(block_seconds / max(seconds, 1e-9)), lo, hi)), state


def interleaved(
  runs: Sequence[dict], rounds: int, steps: int, *, seed: int = 0, on_round: Callable | None = None
) -> None:
  """Time ``runs`` in ``rounds`` rounds, each run once per round (a block of ``steps`` calls), in a shuffled order.

  Each run is a dict with ``fn`` (``args -> args``, the next call's arguments)
  and ``args``; ``times_ms`` (one ms/step per round) is appended to and
  ``args`` advanced in place. Runs of one round see the same machine load, so
  ratios are taken round by round (:func:`median_ratio`).
  """
  rng = np.random.default_rng(seed)
  for run in runs:
    run.setdefault("times_ms", [])
    run["args"] = run["fn"](*run["args"])  # warm-up: the first call of an executable
  for r in range(rounds):
    gc.collect()
    for i in rng.permutation(len(runs)):
      seconds, runs[i]["args"] = time_block(runs[i]["fn"], runs[i]["args"], steps)
      runs[i]["times_ms"].append(1e3 * seconds)
    if on_round is not None:
      on_round(r)


def median_ratio(times, base_times) -> float:
  """Median over rounds of the per-round ratio ``times[r] / base_times[r]``."""
  return float(np.median(np.asarray(times, dtype=float) / np.asarray(base_times, dtype=float)))


def compile_then_run(jitted, *args):
  """``(outputs, compile_seconds, run_seconds)``: ``jitted(*args)`` with tracing and compilation timed apart."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compiled_at = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, compiled_at - start, time.perf_counter() - compiled_at
