"""Run a check script in a fresh Python process with its own simulated CPU devices.

Multi-device checks need ``--xla_force_host_platform_device_count`` set before
jax starts its backend, and pytest workers have usually started it already, so
each check script runs in a subprocess and prints one JSON line of results. A
script's results are computed once per test session, even when pytest-xdist
spreads the tests that read them over several workers (a file lock serialises
the first run; later readers load the cached JSON).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def device_env(devices: int) -> dict:
  """The environment of a child process that sees ``devices`` CPU devices.

  Simulated devices are threads: on a loaded 2-core machine one of them can
  reach a collective long after the others, so XLA's 40-second limit on a
  collective's rendezvous is raised to 5 minutes.
  """
  env = dict(os.environ)
  ours = ("--xla_force_host_platform_device_count", "--xla_cpu_collective_call_terminate_timeout_seconds")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(ours)]
  env["XLA_FLAGS"] = " ".join(
    flags
    + [f"--xla_force_host_platform_device_count={devices}", "--xla_cpu_collective_call_terminate_timeout_seconds=300"]
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def run_script(script: str, *args: str, devices: int = 8, timeout: float = 900) -> dict:
  """Run ``tests/distributed/<script>`` with ``devices`` CPU devices; its last stdout line, parsed as JSON."""
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, script), *args],
    env=device_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@functools.cache
def session_results(script: str, *args: str, devices: int = 8) -> dict:
  """``run_script`` once per test session, shared by all xdist workers through a cache file."""
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if run_id is None:
    return run_script(script, *args, devices=devices)
  name = "_".join([os.path.splitext(script)[0], *args, str(devices)])
  cache = os.path.join(tempfile.gettempdir(), f"lookahead_optax_{run_id}_{name}.json")
  with open(cache + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if os.path.exists(cache):
        with open(cache) as f:
          return json.load(f)
      results = run_script(script, *args, devices=devices)
      with open(cache, "w") as f:
        json.dump(results, f)
      return results
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for ``jax.distributed.initialize``'s coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(
  argv: Callable[[int, int], list[str]],
  processes: int = 2,
  devices: int = 1,
  timeout: float = 600,
  *,
  extra_env: Callable[[int, int], dict] | None = None,
  cwd=ROOT,
) -> list[str]:
  """Start ``python *argv(process_id, port)`` ``processes`` times, each with ``devices`` CPU devices.

  The processes share one coordinator port; ``extra_env(process_id, port)``
  adds to each one's environment. Each one's stdout and stderr come back, in
  process order. All are killed if any runs past ``timeout`` seconds, and a
  process that exits with an error fails with its output.
  """
  port = free_port()
  env = device_env(devices)
  procs = [
    subprocess.Popen(
      [sys.executable, *argv(i, port)],
      env=env | (extra_env(i, port) if extra_env else {}),
      cwd=cwd,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    if p.returncode != 0:
      raise RuntimeError(f"process {i} of {processes} exited with {p.returncode}:\n{logs[i][-3000:]}")
  return logs
