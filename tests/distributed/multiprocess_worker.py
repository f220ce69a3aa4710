"""One of two JAX processes (2 CPU devices each) training data-parallel over gloo on 127.0.0.1.

    python multiprocess_worker.py PROCESS_ID PORT OUT.npz

Run by ``test_multiprocess.py``, which starts both processes, then checks that
they end with identical weights, equal to a single-process run. Two runs over
the 4 global devices:

- Lookahead(Adam), data parallel with ``jax.jit``: params replicated, the
  global batch sharded over the devices, each process feeding its own half;
- DiLoCo (``diloco``), one replica per device under ``jax.shard_map``, each
  replica on its own data, pseudo-gradients averaged across processes;
- Streaming DiLoCo (``streaming_checks.GLOO_CASE``: 2 fragments, int8 exchange
  with error feedback, delay 1), the training of ``streaming_checks.py``, whose
  single-process run of it on 4 devices the test compares with.
"""

from __future__ import annotations

import sys

import jax

PROCESS_ID, PORT, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=2, process_id=PROCESS_ID, initialization_timeout=300)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import streaming_checks  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from multidevice_checks import make_problem, mlp_loss  # noqa: E402

from lookahead_optax import diloco, lookahead  # noqa: E402

K, LOOKAHEAD_STEPS, DILOCO_STEPS = 3, 13, 7
BAD = ((1, 2),)  # (step, replica): a NaN gradient on replica 2 (on the second process) in the first cycle


def host(x):
  """A replicated global array as a numpy array on this process."""
  return np.asarray(x.addressable_data(0))


def lookahead_run(mesh):
  params, x, y = make_problem(batch=32)
  opt = lookahead(optax.adam(0.02, eps=1e-3), K, 0.5)
  batch = NamedSharding(mesh, P("data"))
  half = slice(16 * PROCESS_ID, 16 * (PROCESS_ID + 1))  # this process's share of the global batch
  x_g = jax.make_array_from_process_local_data(batch, np.asarray(x)[half], x.shape)
  y_g = jax.make_array_from_process_local_data(batch, np.asarray(y)[half], y.shape)
  p = jax.device_put(params, NamedSharding(mesh, P()))
  state = opt.init(p)

  @jax.jit
  def step(params, state, x, y):
    updates, state = opt.update(jax.grad(mlp_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(LOOKAHEAD_STEPS):
    p, state = step(p, state, x_g, y_g)
  return {f"lookahead/fast/{k}": host(v) for k, v in p.items()} | {
    f"lookahead/slow/{k}": host(v) for k, v in state.slow.items()
  }


def diloco_run(mesh, inner=None, bad=(), name="diloco"):
  """DiLoCo on the blocks of each replica. ``bad``: (step, replica) pairs with a NaN gradient; right after a sync
  a replica whose params are not finite takes the slow weights (the guide's recipe)."""
  n = jax.device_count()
  params, x, y = make_problem(batch=8 * n, seed=1)
  inner = optax.adam(0.02) if inner is None else inner
  opt = diloco(inner, k=K, outer_learning_rate=0.7, outer_momentum=0.9, axis_name="data")
  spec = NamedSharding(mesh, P("data"))
  # The optimizer runs on each replica's blocks (leading axis of size 1), params and state alike; only the
  # model sees the block's one slice. Slicing the donated state instead makes XLA copy it at every step.
  local = lambda tree: jax.tree.map(lambda a: a[0], tree)

  def body(params, state, x, y, t):
    grads = jax.grad(lambda q: mlp_loss(local(q), x[0], y[0]))(params)
    poisoned = jnp.any(jnp.asarray([(t == s) & (jax.lax.axis_index("data") == m) for s, m in bad] or [False]))
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(params)]))
    resume = (state.count == 0) & ~finite
    return jax.tree.map(lambda a, s: jnp.where(resume, s, a), params, state.slow), state

  global_array = lambda a: jax.make_array_from_callback(a.shape, spec, lambda idx: np.asarray(a)[idx])
  p = jax.tree.map(lambda a: global_array(np.stack([np.asarray(a)] * n)), params)
  xs, ys = global_array(np.asarray(x).reshape(n, -1, 16)), global_array(np.asarray(y).reshape(n, -1, 4))
  specs = jax.tree.map(lambda a: P("data") if a.ndim else P(), jax.eval_shape(opt.init, p))  # scalars: shared
  state = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P("data"), out_specs=specs))(p)
  step = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P("data"), specs, P("data"), P("data"), P()), out_specs=(P("data"), specs))
  )
  for t in range(DILOCO_STEPS):
    p, state = step(p, state, xs, ys, jnp.int32(t))
  gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return {f"{name}/fast/{k}": gather(v) for k, v in p.items()} | {
    f"{name}/slow/{k}": gather(v) for k, v in state.slow.items()
  }


def streaming_run(mesh):
  sc = streaming_checks
  problem = sc.make_problem(sc.GLOO_SHAPES, jax.device_count(), sc.STEPS, seed=3)
  hist, _, _ = sc.train_shard_map(sc.make_opt(*sc.GLOO_CASE, axis_name="data"), mesh, problem, sc.STEPS)
  fast, slow, _ = hist[-1]  # gathered from both processes
  return {f"streaming/fast/{k}": v for k, v in fast.items()} | {f"streaming/slow/{k}": v for k, v in slow.items()}


def main():
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  bad = diloco_run(mesh, optax.sgd(0.05), BAD, "diloco_bad")
  np.savez(OUT, **lookahead_run(mesh), **diloco_run(mesh), **bad, **streaming_run(mesh))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
