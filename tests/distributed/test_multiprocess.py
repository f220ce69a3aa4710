"""Two JAX processes on 127.0.0.1 (2 CPU devices each, gloo collectives) vs one process.

``multiprocess_worker.py`` trains Lookahead(Adam) data-parallel, DiLoCo and
Streaming DiLoCo across the 4 global devices; here both processes are started on
a free port (with a timeout; both are killed if either fails) and their final
weights are compared with each other (bitwise) and with single-process
references: the same Lookahead training on one device with the full batch and
DiLoCo as a Python loop over 4 replica copies, both computed in this process;
Streaming DiLoCo run by ``streaming_checks.py`` in one process on 4 simulated
devices (itself checked against its Python loop over replicas there).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

from lookahead_optax import lookahead
from tests.distributed import multidevice_checks as md
from tests.distributed.multidevice_utils import HERE, run_processes

TIMEOUT = 600  # seconds: generous, for a loaded CI machine
TOL = 1e-6


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  """The two processes' final weights: a list of two dicts of numpy arrays."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  run_processes(
    lambda i, port: [os.path.join(HERE, "multiprocess_worker.py"), str(i), str(port), str(tmp / f"out{i}.npz")],
    devices=2,
    timeout=TIMEOUT,
  )
  return [dict(np.load(tmp / f"out{i}.npz")) for i in range(2)]


def test_processes_end_bitwise_identical(outputs):
  a, b = outputs
  assert sorted(a) == sorted(b)
  assert {k.split("/")[0] for k in a} == {"lookahead", "diloco", "diloco_bad", "streaming"}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_lookahead_equals_single_process_run(outputs):
  params, x, y = md.make_problem(batch=32)
  opt = lookahead(optax.adam(0.02, eps=1e-3), 3, 0.5)
  state = opt.init(params)
  step = jax.jit(
    lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(jax.grad(md.mlp_loss)(p, x, y), s, p))
  )
  for _ in range(13):  # 4 syncs, then one step into the next cycle
    params, state = step(params, state)
  for out in outputs:
    for name in params:
      np.testing.assert_allclose(out[f"lookahead/fast/{name}"], params[name], rtol=0, atol=TOL, err_msg=name)
      np.testing.assert_allclose(out[f"lookahead/slow/{name}"], state.slow[name], rtol=0, atol=TOL, err_msg=name)


def test_diloco_equals_reference_loop(outputs):
  params, x, y = md.make_problem(batch=8 * 4, seed=1)
  slows, fasts = md.reference_diloco(
    optax.adam(0.02), params, x.reshape(4, -1, 16), y.reshape(4, -1, 4), steps=7, k=3, lr=0.7, mu=0.9
  )
  for out in outputs:
    for name in params:
      slow = out[f"diloco/slow/{name}"]
      assert (slow == slow[:1]).all(), f"slow {name} differs across replicas"
      np.testing.assert_allclose(slow[0], slows[-1][name], rtol=0, atol=TOL, err_msg=name)
      for m in range(4):
        np.testing.assert_allclose(out[f"diloco/fast/{name}"][m], fasts[-1][m][name], rtol=0, atol=TOL, err_msg=name)


def test_diloco_with_a_bad_replica_equals_reference_loop(outputs):
  params, x, y = md.make_problem(batch=8 * 4, seed=1)
  slows, fasts = md.reference_diloco(
    optax.sgd(0.05), params, x.reshape(4, -1, 16), y.reshape(4, -1, 4), steps=7, k=3, lr=0.7, mu=0.9, bad={(1, 2)}
  )
  for out in outputs:
    for name in params:
      slow = out[f"diloco_bad/slow/{name}"]
      assert np.isfinite(slow).all() and (slow == slow[:1]).all(), name
      np.testing.assert_allclose(slow[0], slows[-1][name], rtol=0, atol=TOL, err_msg=name)
      for m in range(4):
        fast = out[f"diloco_bad/fast/{name}"][m]
        np.testing.assert_allclose(fast, fasts[-1][m][name], rtol=0, atol=TOL, err_msg=f"{name}, replica {m}")


def test_streaming_diloco_equals_single_process_run(outputs, streaming_results):
  """2 fragments, int8 exchange with error feedback, delay 1: gloo across processes = one process, 4 devices."""
  single = streaming_results["gloo_reference"]
  for out in outputs:
    for name, slow in single["slow"].items():
      ours = out[f"streaming/slow/{name}"]
      assert (ours == ours[:1]).all(), f"slow {name} differs across replicas"
      np.testing.assert_allclose(ours, np.asarray(slow, np.float32), rtol=0, atol=TOL, err_msg=name)
      np.testing.assert_allclose(
        out[f"streaming/fast/{name}"], np.asarray(single["fast"][name], np.float32), rtol=0, atol=TOL, err_msg=name
      )
