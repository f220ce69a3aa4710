"""Orbax checkpoints of a lookahead training state: nothing is lost across a restart.

The state is saved in the middle of a lookahead cycle (counter != 0), restored
in a genuinely separate Python process (this file run as a script), trained on,
and compared bit for bit with the run that was never interrupted. The same
process also restores into a sharded abstract target (``jax.ShapeDtypeStruct``
with a ``NamedSharding`` over two CPU devices): the restored arrays are bitwise
the saved ones, and training on from them agrees up to float rounding (a
sharded program is compiled differently).
"""

from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lookahead_optax import find_lookahead_state, lookahead
from tests.helpers import make_params, quadratic_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

K, SAVE, STEPS = 5, 12, 23  # saved at count 12 % 5 = 2; resumed through two more syncs
# Rich state: adamw moments, the interpolated inner state and the slow weights are all restored.
OPT = lookahead(optax.adamw(0.05, weight_decay=1e-2), k=K, alpha=0.5, inner_state_policy="interpolate")


@jax.jit
def step(params, opt_state, t):
  updates, opt_state = OPT.update(quadratic_grad(params, t), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train(tree, start, stop):
  params, opt_state = tree["params"], tree["opt_state"]
  for t in range(start, stop):
    params, opt_state = step(params, opt_state, t)
  return {"params": params, "opt_state": opt_state}


def initial():
  params = make_params()
  return {"params": params, "opt_state": OPT.init(params)}


def save_leaves(path, tree):
  np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(tree)])


def load_leaves(path):
  with np.load(path) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


def resume(ckpt: str, out: str) -> None:
  """The fresh process: restore two ways, train on, write the results to ``out``."""
  jax.config.update("jax_num_cpu_devices", 2)
  abstract = jax.eval_shape(initial)  # the target knows shapes and dtypes only
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(ckpt, abstract)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))

    def shard(x):
      spec = jax.sharding.PartitionSpec("x") if x.ndim and x.shape[0] % 2 == 0 else jax.sharding.PartitionSpec()
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    sharded_target = jax.tree.map(shard, abstract)
    sharded = ckptr.restore(ckpt, sharded_target)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(sharded_target)):
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
  assert any(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(sharded)), "nothing was sharded"
  np.savez(out + ".meta.npz", count=np.asarray(find_lookahead_state(restored["opt_state"]).count))
  save_leaves(out + ".restored.npz", restored)
  save_leaves(out + ".sharded_restored.npz", sharded)
  save_leaves(out + ".resumed.npz", train(restored, SAVE, STEPS))
  save_leaves(out + ".sharded_resumed.npz", train(sharded, SAVE, STEPS))


def assert_leaves_equal(got, want_tree, what):
  want = jax.tree.leaves(want_tree)
  assert len(got) == len(want), what
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
    np.testing.assert_array_equal(g, np.asarray(w), err_msg=f"{what}: leaf {i} differs")


def test_resume_mid_cycle_in_a_fresh_process_is_bitwise_exact(tmp_path):
  at_save = train(initial(), 0, SAVE)
  assert int(at_save["opt_state"].count) == SAVE % K != 0
  ckpt = str(tmp_path / "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, at_save)
  uninterrupted = train(at_save, SAVE, STEPS)

  out = str(tmp_path / "out")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-m", "tests.test_checkpoint", ckpt, out],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  assert int(np.load(out + ".meta.npz")["count"]) == SAVE % K
  assert_leaves_equal(load_leaves(out + ".restored.npz"), at_save, "restored state")
  assert_leaves_equal(load_leaves(out + ".sharded_restored.npz"), at_save, "restored into a sharded target")
  assert_leaves_equal(load_leaves(out + ".resumed.npz"), uninterrupted, "resumed vs uninterrupted")
  # Sharded, XLA compiles a different program (fusion, FMA contraction): equal up to rounding.
  for got, want in zip(load_leaves(out + ".sharded_resumed.npz"), jax.tree.leaves(uninterrupted)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-7, err_msg="sharded resume")


def test_restored_state_is_a_lookahead_state_with_the_slow_weights(tmp_path):
  """In-process: the restored tree has the same structure, and the slow weights are not the fast ones."""
  at_save = train(initial(), 0, SAVE)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "c"), at_save)
    restored = ckptr.restore(str(tmp_path / "c"), jax.eval_shape(initial))
  assert jax.tree.structure(restored) == jax.tree.structure(at_save)
  slow = find_lookahead_state(restored["opt_state"]).slow
  chex.assert_trees_all_equal(slow, at_save["opt_state"].slow)
  assert not all(jnp.array_equal(s, p) for s, p in zip(jax.tree.leaves(slow), jax.tree.leaves(restored["params"])))


def test_abstract_init_is_a_restore_target(tmp_path):
  """opt.init on jax.ShapeDtypeStruct params gives the target Orbax restores into."""
  at_save = train(initial(), 0, SAVE)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "c"), at_save["opt_state"])
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), at_save["params"])
    restored = ckptr.restore(str(tmp_path / "c"), OPT.init(abstract_params))
  chex.assert_trees_all_equal(restored, at_save["opt_state"])


def test_restoring_into_another_configuration(tmp_path):
  """A smaller k: the restored count is read as k - 1, so the first update syncs. Another policy: Orbax rejects it."""
  params = make_params()
  saved = lookahead(optax.sgd(0.1), k=5)
  state = saved.init(params)
  for t in range(4):
    _, state = saved.update(quadratic_grad(params, t), state, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "k5"), state)
    smaller = lookahead(optax.sgd(0.1), k=3)
    restored = ckptr.restore(str(tmp_path / "k5"), smaller.init(params))
    updates, after = smaller.update(quadratic_grad(params, 4), restored, params)
    assert (int(after.count), int(after.syncs)) == (0, 1)
    chex.assert_trees_all_equal(optax.apply_updates(params, updates), after.slow)  # landed on the new slow weights
    with pytest.raises(Exception, match=r"slow_inner_state"):
      ckptr.restore(str(tmp_path / "k5"), lookahead(optax.sgd(0.1), k=5, inner_state_policy="interpolate").init(params))


def test_nnx_optimizer_round_trip_mid_cycle_resumes_bitwise(tmp_path):
  """``nnx.state((model, optimizer))`` saved mid-cycle, restored into ``nnx.eval_shape``'s abstract pair."""
  from flax import nnx

  def make():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, OPT, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, t):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(jnp.full((2, 4), t / 10.0)) - 1.0) ** 2))(model))

  model, optimizer = make()
  for t in range(SAVE):
    nnx_step(model, optimizer, t)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "nnx"), nnx.state((model, optimizer)))
    restored_model, restored_optimizer = nnx.eval_shape(make)
    nnx.update(
      (restored_model, restored_optimizer),
      ckptr.restore(str(tmp_path / "nnx"), nnx.state((restored_model, restored_optimizer))),
    )
  assert int(find_lookahead_state(restored_optimizer.opt_state).count) == SAVE % K
  for t in range(SAVE, STEPS):
    nnx_step(model, optimizer, t)
    nnx_step(restored_model, restored_optimizer, t)
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state((restored_model, restored_optimizer))), nnx.to_pure_dict(nnx.state((model, optimizer)))
  )


# ------------------------------------------------- NNX with Dropout: the Rngs are saved too


def nnx_make():
  """The docs' recipe: a model with Dropout, its optimizer, and the dropout Rngs kept outside the model."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.drop, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Dropout(0.5), nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x, rngs):
      return self.l2(self.drop(nnx.relu(self.l1(x)), rngs=rngs))

  model = MLP(nnx.Rngs(0))
  return model, nnx.Optimizer(model, lookahead(optax.adam(1e-2), k=K), wrt=nnx.Param), nnx.Rngs(dropout=1)


def nnx_train(model, optimizer, rngs, start, stop):
  from flax import nnx

  @nnx.jit
  def train_step(model, optimizer, rngs, t):
    x = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4) * (1.0 + t / 10.0)
    loss = lambda m, r: jnp.mean((m(x, r) - 1.0) ** 2)
    optimizer.update(model, nnx.grad(loss)(model, rngs))

  for t in range(start, stop):
    train_step(model, optimizer, rngs, t)


def nnx_leaves(trio):
  from flax import nnx

  raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return [np.asarray(raw(x)) for x in jax.tree.leaves(nnx.state(trio))]


def nnx_resume(ckpt: str, out: str) -> None:
  from flax import nnx

  trio = nnx.eval_shape(nnx_make)
  with ocp.StandardCheckpointer() as ckptr:
    nnx.update(trio, ckptr.restore(ckpt, nnx.state(trio)))
  np.savez(out + ".count.npz", count=np.asarray(find_lookahead_state(trio[1].opt_state).count))
  nnx_train(*trio, SAVE, STEPS)
  np.savez(out, *nnx_leaves(trio))


def orbax_restores_typed_keys() -> bool:
  """Whether this Orbax restores typed PRNG keys, as an ``nnx.Rngs`` holds (0.11.20, the floor, does not)."""
  import tempfile

  try:
    with tempfile.TemporaryDirectory() as d, ocp.StandardCheckpointer() as ckptr:
      ckptr.save(d + "/k", {"k": jax.random.key(0)})
      ckptr.restore(d + "/k", {"k": jax.eval_shape(lambda: jax.random.key(0))})
  except Exception:  # noqa: BLE001 -- any failure to round-trip a key means no
    return False
  return True


def test_nnx_dropout_model_resumes_mid_cycle_in_a_fresh_process_bitwise(tmp_path):
  """Model, optimizer and the dropout Rngs saved mid-cycle; a new process restores them and trains on bitwise."""
  from flax import nnx

  if not orbax_restores_typed_keys():  # checked here, not at import: the resume process sets up devices first
    pytest.skip(f"orbax-checkpoint {getattr(ocp, '__version__', '')} cannot restore typed PRNG keys (nnx.Rngs)")

  trio = nnx_make()
  nnx_train(*trio, 0, SAVE)
  ckpt, out = str(tmp_path / "nnx"), str(tmp_path / "nnx_resumed.npz")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, nnx.state(trio))
  nnx_train(*trio, SAVE, STEPS)
  subprocess.run(
    [sys.executable, __file__, "nnx", ckpt, out],
    check=True,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    timeout=900,
  )
  assert int(np.load(out + ".count.npz")["count"]) == SAVE % K != 0
  with np.load(out) as f:
    resumed = [f[f"arr_{i}"] for i in range(len(f.files))]
  want = nnx_leaves(trio)
  assert len(resumed) == len(want) > 10
  for i, (got, expected) in enumerate(zip(resumed, want)):
    np.testing.assert_array_equal(got, expected, err_msg=f"leaf {i} differs after resuming")


# ------------------------------------------------ elastic resume: M replicas saved, M' restored

ELASTIC_K = 3


def elastic_opt():
  from lookahead_optax import replica_mean

  nesterov = optax.sgd(0.7, momentum=0.9, nesterov=True)
  outer = optax.chain(replica_mean("replica", dtype="int8", error_feedback=True), nesterov)
  return lookahead(optax.adam(0.05), ELASTIC_K, outer=outer)


def elastic_steps(tree, start, stop, mapped):
  """``stop - start`` DiLoCo steps of every replica, ``mapped`` = jax.pmap or jax.vmap over the axis "replica"."""
  from tests.helpers import replica_grad

  opt = elastic_opt()

  def one(params, state, t, m):
    updates, state = opt.update(replica_grad(params, t, m), state, params)
    return optax.apply_updates(params, updates), state

  step = mapped(one, axis_name="replica", in_axes=(0, 0, None, 0))
  params, state = tree["params"], tree["opt_state"]
  replicas = jax.tree.leaves(params)[0].shape[0]
  for t in range(start, stop):
    params, state = step(params, state, t, jnp.arange(replicas))
  return {"params": params, "opt_state": state}


def elastic_initial(replicas):
  stacked = jax.tree.map(lambda x: jnp.stack([x] * replicas), make_params())
  return {"params": stacked, "opt_state": jax.vmap(elastic_opt().init)(stacked)}


def elastic_save(replicas: str, ckpt: str, out: str) -> None:
  """The first process: ``replicas`` simulated devices, two DiLoCo cycles under pmap, saved right after a sync."""
  jax.config.update("jax_num_cpu_devices", int(replicas))
  tree = elastic_steps(elastic_initial(int(replicas)), 0, 2 * ELASTIC_K, jax.pmap)
  tree = jax.tree.map(np.asarray, tree)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, tree)
  save_leaves(out, tree)


def elastic_resume(old: str, new: str, ckpt: str, out: str) -> None:
  """The second process: ``new`` simulated devices; restore the ``old``-replica run, resize, one cycle under pmap."""
  from lookahead_optax import resize_replicas

  jax.config.update("jax_num_cpu_devices", int(new))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(ckpt, jax.eval_shape(lambda: elastic_initial(int(old))))
  resized = resize_replicas(restored, int(new))
  save_leaves(out + ".resized.npz", resized)
  save_leaves(out + ".trained.npz", elastic_steps(resized, 2 * ELASTIC_K, 3 * ELASTIC_K, jax.pmap))


def run_script(*args):
  proc = subprocess.run(
    [sys.executable, "-m", "tests.test_checkpoint", *map(str, args)],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 4)])
def test_diloco_saved_with_m_replicas_resumes_with_another_count(tmp_path, old, new):
  """4 -> 2 and 2 -> 4 simulated devices, through Orbax in fresh processes: the slow weights, outer state and
  counters carry over bitwise; replica i resumes replica i mod M's fast weights and Adam moments; the error-feedback
  residuals keep their total contribution (1/M) sum_m e_m; the resumed run trains as the resized state implies."""
  ckpt, saved, out = tmp_path / "ckpt", tmp_path / "saved.npz", tmp_path / "out"
  run_script("elastic-save", old, ckpt, saved)
  run_script("elastic-resume", old, new, ckpt, out)
  template = elastic_initial(old)
  before = jax.tree.unflatten(jax.tree.structure(template), load_leaves(saved))
  after = jax.tree.unflatten(jax.tree.structure(elastic_initial(new)), load_leaves(str(out) + ".resized.npz"))
  state, resized = before["opt_state"], after["opt_state"]
  assert int(state.count[0]) == 0 and int(state.syncs[0]) == 2  # saved right after the second sync
  for i in range(new):
    pick = lambda tree, j: jax.tree.map(lambda x: x[j], tree)
    chex.assert_trees_all_equal(pick(resized.slow, i), pick(state.slow, 0))  # the same on every replica
    chex.assert_trees_all_equal(pick(resized.outer_state[1], i), pick(state.outer_state[1], 0))  # the Nesterov trace
    chex.assert_trees_all_equal(pick(resized.inner_state, i), pick(state.inner_state, i % old))
    chex.assert_trees_all_equal(pick(after["params"], i), pick(before["params"], i % old))
    assert int(resized.syncs[i]) == 2 and int(resized.count[i]) == 0
  residual_old = jax.tree.leaves(state.outer_state[0].residual)
  residual_new = jax.tree.leaves(resized.outer_state[0].residual)
  assert any(np.any(e) for e in residual_old)  # compression lost something: there is a residual to carry
  for e_old, e_new in zip(residual_old, residual_new):
    np.testing.assert_allclose(e_new.sum(axis=0) / new, e_old.sum(axis=0) / old, rtol=1e-5, atol=1e-7)
    if new < old:  # replica i takes (M'/M) * (e_i + e_{i + M'} + ...)
      want = [(e_old[i::new].sum(axis=0)) * new / old for i in range(new)]
    else:  # the first M scaled by M'/M, the new ones zero
      want = [e_old[i] * new / old if i < old else np.zeros_like(e_old[0]) for i in range(new)]
    np.testing.assert_allclose(e_new, np.stack(want), rtol=1e-6, atol=1e-8)
  # the resumed process (pmap on M' devices) trains as the resized state implies (vmap here)
  here = elastic_steps(jax.tree.map(jnp.asarray, after), 2 * ELASTIC_K, 3 * ELASTIC_K, jax.vmap)
  for got, want in zip(load_leaves(str(out) + ".trained.npz"), jax.tree.leaves(here)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  if sys.argv[1] == "elastic-save":
    elastic_save(*sys.argv[2:])
  elif sys.argv[1] == "elastic-resume":
    elastic_resume(*sys.argv[2:])
  else:
    (nnx_resume if sys.argv[1] == "nnx" else resume)(*sys.argv[-2:])
