"""The translation task: its metrics, greedy decoding against the one-pass exact match, data parallelism."""

import json

import jax
import numpy as np
import optax
import pytest

from benchmarks.common import translation as tr
from tests.distributed.multidevice_utils import run_processes

TASK = dict(n_train=200, n_val=8, n_test=64, max_number=400, dim=16, heads=2, layers=1)
STEPS = 150


def test_exact_match_counts_whole_sequences_up_to_eos():
  bos, eos = tr.BOS, tr.EOS
  target = np.array([[bos, 5, 6, eos, 0], [bos, 5, 6, eos, 0], [bos, 5, eos, 0, 0], [bos, 7, eos, 0, 0]])
  pred = np.array(
    [
      [bos, 5, 6, eos, 9],  # right, then noise after EOS: counts
      [bos, 5, 7, eos, 0],  # one wrong token
      [bos, 5, 6, 6, eos],  # misses the EOS
      [bos, 7, eos, 0, 0],  # right
    ]
  )
  assert tr.exact_match(pred, target) == 0.5
  with pytest.raises(ValueError, match="pred and target"):
    tr.exact_match(pred[:, :3], target)


def test_warmup_rsqrt_closed_form():
  schedule = tr.warmup_rsqrt(1e-3, 100)
  for count in [0, 9, 49, 99, 100, 399, 9999]:
    t = count + 1
    assert float(schedule(count)) == pytest.approx(1e-3 * min(t / 100, (100 / t) ** 0.5), rel=1e-6)
  assert float(tr.warmup_rsqrt(1e-3, 100, use_warmup=False)(0)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="warmup"):
    tr.warmup_rsqrt(1e-3, 0)


def test_trains_data_parallel_across_2_processes_like_one_device_and_one_pass_exact_match_equals_greedy_decoding():
  # Two JAX processes with one CPU device each, gloo collectives on 127.0.0.1: the gradient all-reduce that
  # jax.jit inserts crosses processes, as on a multi-host slice.
  script = (
    "import json, sys, jax\n"
    "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
    "jax.distributed.initialize(f'127.0.0.1:{sys.argv[2]}', num_processes=2, process_id=int(sys.argv[1]),\n"
    "                           initialization_timeout=300)\n"
    "import numpy as np, optax\n"
    "from benchmarks.common import translation as tr\n"
    f"task = tr.make_task(**{TASK})\n"
    f"params, state, hist = tr.train_data_parallel(task, optax.adam(1e-2), {STEPS}, batch_size=32)\n"
    "decoded = np.asarray(task.decode(params, task.data.test.x))\n"
    "print(json.dumps({'devices': jax.device_count(), 'local': jax.local_device_count(),\n"
    "                  'losses': hist.losses.tolist(),\n"
    "                  'replicated': jax.tree.leaves(params)[0].sharding.is_fully_replicated,\n"
    "                  'exact': np.asarray(task.exact(params, task.data.test)).tolist(),\n"
    "                  'decoded': decoded.tolist()}))\n"
  )
  logs = run_processes(lambda i, port: ["-c", script, str(i), str(port)], timeout=600)
  outs = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  assert outs[0] == outs[1]  # both processes hold the same replicated model
  out = outs[0]
  assert (out["devices"], out["local"]) == (2, 1) and out["replicated"]
  task = tr.make_task(**TASK)
  # The same global batches on one device: the same training up to the all-reduce's summation order.
  _, _, single = tr.train_data_parallel(
    task, optax.adam(1e-2), STEPS, batch_size=32, mesh=tr.data_mesh(jax.devices()[:1])
  )
  np.testing.assert_allclose(out["losses"][:20], single.losses[:20], rtol=1e-4)
  assert np.mean(out["losses"][-10:]) < 0.5 * np.mean(out["losses"][:10])
  exact = np.asarray(out["exact"])
  per_sentence = [tr.exact_match(np.asarray(d)[None], y[None]) == 1.0 for d, y in zip(out["decoded"], task.data.test.y)]
  assert 0 < exact.sum() < len(exact)  # some right, some wrong: the comparison means something
  np.testing.assert_array_equal(exact, per_sentence)
