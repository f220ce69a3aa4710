"""The replica exchange, :func:`lookahead_optax.replica_mean`, as an optax transformation on its own.

Under ``jax.vmap`` with an axis name (2 and 4 replicas), against numpy: the plain mean taken by hand, each
compressed dtype against ``tests.references.reference_compress`` / ``reference_mean`` (per-row scales, and the
reduce-scattered matrices compressed once more on their way back), the error-feedback residual across two
consecutive updates; the constructor's errors; the error outside a mapped axis. Then plain Lookahead over
replicas with ``replica_mean`` chained in front of ``optax.sgd(alpha)``, against a loop over replicas written
here.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import ReplicaMeanState, _exchange, lookahead, replica_mean
from lookahead_optax._exchange import compress, decompress
from tests.compiled import count_primitive
from tests.helpers import make_params, replica_grad, replica_step, stack_replicas
from tests.references import reference_block_rows, reference_compress, reference_mean

COMPRESSED = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"]
# With 4 replicas nine_rows and cube (8 x 4 = 32 rows) go by reduce-scatter; with 2 every leaf is all-gathered.
SHAPES = {"scalar": (), "vector": (7,), "two_rows": (2, 5), "nine_rows": (9, 3), "cube": (8, 4, 2)}


def replicas_of(shapes, replicas, seed):
  """Per leaf, ``replicas`` different float32 values (leading axis: the replica)."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(replicas, *s)).astype(np.float32) for k, s in shapes.items()}


def mapped(tx, axis_name="replica"):
  """``tx``'s init and update run on every replica of a leading axis, under ``jax.vmap`` with ``axis_name``."""
  init = jax.jit(jax.vmap(tx.init))
  update = jax.jit(jax.vmap(lambda u, s: tx.update(u, s), axis_name=axis_name))
  return init, update


def same_on_every_replica(tree):
  for k, x in tree.items():
    for m in range(x.shape[0]):
      np.testing.assert_array_equal(x[m], x[0], err_msg=f"{k}: replica {m} holds another mean than replica 0")


# ------------------------------------------------------------ compression


@pytest.mark.parametrize("dtype", COMPRESSED)
@pytest.mark.parametrize("shape", [(), (7,), (5, 6)])
def test_compression_matches_numpy(dtype, shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 1e-3
  values, scale = compress(jnp.asarray(x), jnp.dtype(dtype))
  assert values.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(decompress(values, scale)), reference_compress(x, dtype), rtol=1e-6, atol=1e-12)
  if dtype == "int8" and len(shape) == 2:
    assert np.abs(np.asarray(values)).max(axis=-1).tolist() == [127] * shape[0]  # one scale per row


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "int8"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_exchange_matches_numpy(dtype, replicas):
  """The replica mean and residuals of a compressed exchange, for every leaf shape, against numpy.

  With 4 replicas the 9-row and 32-row leaves go by reduce-scatter (one all-to-all of values, one of scales)
  and travel back compressed; with 2 replicas every leaf is all-gathered.
  """
  xs = replicas_of(SHAPES, replicas, seed=1)
  zeros = jax.tree.map(np.zeros_like, xs)
  one = lambda d, e: _exchange.exchange(d, e, jnp.dtype(dtype), "r")
  mean, residual = jax.jit(jax.vmap(one, axis_name="r"))(xs, zeros)
  for k, x in xs.items():
    sent = [reference_compress(x[m], dtype) for m in range(replicas)]
    for m in range(replicas):
      np.testing.assert_array_equal(mean[k][m], mean[k][0], err_msg=k)  # every replica holds the same mean
      np.testing.assert_allclose(residual[k][m], x[m] - sent[m], rtol=0, atol=1e-6, err_msg=k)  # x - (x / s) * s
    np.testing.assert_allclose(mean[k][0], reference_mean(sent, dtype), rtol=1e-6, atol=1e-7, err_msg=k)
  scattered = 2 if replicas == 4 else 0  # nine_rows and cube
  per_leaf = 1 if dtype == "bfloat16" else 2  # values, and the float32 scales
  program = jax.make_jaxpr(one, axis_env=[("r", replicas)])(*jax.tree.map(lambda x: x[0], (xs, zeros)))
  assert count_primitive(program.jaxpr, "all_to_all") == scattered * per_leaf


# ------------------------------------------------- replica_mean: the mean


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_full_precision_mean_is_the_mean_by_hand(replicas, dtype):
  """dtype None (or "float32", the same): the mean over replicas in the values' own dtype, on every replica."""
  xs = replicas_of(SHAPES, replicas, seed=2)
  init, update = mapped(replica_mean("replica", dtype=dtype))
  state = init(xs)
  assert state == ReplicaMeanState(optax.EmptyState())  # nothing kept without error feedback
  mean, new_state = update(xs, state)
  assert new_state == ReplicaMeanState(optax.EmptyState())
  same_on_every_replica(mean)
  for k, x in xs.items():
    by_hand = sum(x[m].astype(np.float64) for m in range(replicas)) / replicas
    assert mean[k].dtype == jnp.float32 and mean[k].shape == x.shape
    np.testing.assert_allclose(mean[k][0], by_hand, rtol=1e-6, atol=1e-7, err_msg=k)


def test_full_precision_mean_keeps_the_values_dtype():
  xs = {"w": np.random.default_rng(3).normal(size=(2, 4, 3)).astype(jnp.bfloat16)}
  _, update = mapped(replica_mean("replica"))
  mean, _ = update(xs, ReplicaMeanState(optax.EmptyState()))
  assert mean["w"].dtype == jnp.bfloat16
  by_hand = (xs["w"][0].astype(np.float32) + xs["w"][1].astype(np.float32)) / 2
  np.testing.assert_allclose(np.asarray(mean["w"][0], np.float32), by_hand, rtol=1e-2)


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("dtype", COMPRESSED)
def test_compressed_mean_matches_numpy(replicas, dtype):
  """Each replica sends its values compressed (reference_compress); the mean is reference_mean of what was sent."""
  xs = replicas_of(SHAPES, replicas, seed=4)
  init, update = mapped(replica_mean("replica", dtype=dtype))
  mean, state = update(xs, init(xs))
  assert state == ReplicaMeanState(optax.EmptyState())
  same_on_every_replica(mean)
  scattered = [k for k, s in SHAPES.items() if reference_block_rows(s, replicas)]
  assert scattered == ([] if replicas == 2 else ["nine_rows", "cube"])  # both routes are taken
  for k, x in xs.items():
    sent = [reference_compress(x[m], dtype) for m in range(replicas)]
    np.testing.assert_allclose(mean[k][0], reference_mean(sent, dtype), rtol=1e-6, atol=1e-7, err_msg=k)
    if k != "scalar":  # the compression shows (a scalar scaled to the format's top value travels exactly)
      assert not np.allclose(mean[k][0], np.mean(x, axis=0), rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("dtype", COMPRESSED)
def test_error_feedback_residual_over_two_updates_matches_numpy(replicas, dtype):
  """Update 1 sends q(x1) and keeps e1 = x1 - q(x1); update 2 sends q(x2 + e1) and keeps e2 = x2 + e1 - q(x2 + e1)."""
  x1, x2 = replicas_of(SHAPES, replicas, seed=5), replicas_of(SHAPES, replicas, seed=6)
  init, update = mapped(replica_mean("replica", dtype=dtype, error_feedback=True))
  state = init(x1)
  assert isinstance(state, ReplicaMeanState)
  for k, s in SHAPES.items():  # a float32 zero residual per leaf, per replica
    assert state.residual[k].dtype == jnp.float32 and state.residual[k].shape == (replicas, *s)
    assert not np.any(state.residual[k])
  mean1, state = update(x1, state)
  mean2, state2 = update(x2, state)
  for k in SHAPES:
    sent1 = [reference_compress(x1[k][m], dtype) for m in range(replicas)]
    e1 = [x1[k][m] - sent1[m] for m in range(replicas)]
    sent2 = [reference_compress(x2[k][m] + e1[m], dtype) for m in range(replicas)]
    e2 = [x2[k][m] + e1[m] - sent2[m] for m in range(replicas)]
    np.testing.assert_allclose(mean1[k][0], reference_mean(sent1, dtype), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(mean2[k][0], reference_mean(sent2, dtype), rtol=1e-6, atol=1e-7, err_msg=k)
    for m in range(replicas):
      np.testing.assert_allclose(state.residual[k][m], e1[m], rtol=0, atol=1e-6, err_msg=f"{k}, replica {m}")
      np.testing.assert_allclose(state2.residual[k][m], e2[m], rtol=0, atol=1e-6, err_msg=f"{k}, replica {m}")
    if k != "scalar":  # compression lost something each time (a scaled scalar travels exactly)
      assert any(np.any(e) for e in e1) and any(np.any(e) for e in e2), k
  same_on_every_replica(mean1)
  same_on_every_replica(mean2)


def test_error_feedback_changes_the_second_mean_only():
  """The first exchange is the same with or without error feedback (the residual starts at zero); the second is not."""
  x1, x2 = replicas_of(SHAPES, 4, seed=7), replicas_of(SHAPES, 4, seed=8)
  with_ef, without = (mapped(replica_mean("replica", dtype="int8", error_feedback=ef)) for ef in (True, False))
  a1, sa = with_ef[1](x1, with_ef[0](x1))
  b1, sb = without[1](x1, without[0](x1))
  chex.assert_trees_all_equal(a1, b1)
  a2, _ = with_ef[1](x2, sa)
  b2, _ = without[1](x2, sb)
  assert all(not np.array_equal(a2[k], b2[k]) for k in SHAPES if k != "scalar")  # a scaled scalar travels exactly


def test_replica_mean_in_a_chain_averages_before_the_next_transformation():
  """optax.chain(replica_mean, sgd(lr)): the update is -lr times the mean, on every replica."""
  xs = replicas_of({"w": (3, 2), "b": (2,)}, 3, seed=9)
  tx = optax.chain(replica_mean("r"), optax.sgd(0.25))
  state = jax.vmap(tx.init)(xs)
  updates, _ = jax.jit(jax.vmap(lambda u, s: tx.update(u, s), axis_name="r"))(xs, state)
  for k, x in xs.items():
    for m in range(3):
      np.testing.assert_allclose(updates[k][m], -0.25 * np.mean(x, axis=0), rtol=1e-6, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", ["float16", "float64", "bf16", "uint8", 3])
def test_bad_dtype_is_named_with_its_value(dtype):
  with pytest.raises(
    ValueError, match=rf"^replica_mean: .*dtype must be one of .*float32.*int8.* or None, got {dtype!r}\."
  ):
    replica_mean("replica", dtype=dtype)


def test_bad_dtype_error_names_the_argument_dtype():
  with pytest.raises(ValueError, match=r"^replica_mean: dtype must be one of .* got 'float16'\."):
    replica_mean("replica", dtype="float16")


def test_diloco_names_itself_and_its_own_arguments():
  from lookahead_optax import diloco

  with pytest.raises(ValueError, match=r"^diloco: communication_dtype must be one of .* got 'float16'\."):
    diloco(optax.adam(0.1), communication_dtype="float16")
  with pytest.raises(ValueError, match=r"^diloco: error_feedback=True .* but communication_dtype=None"):
    diloco(optax.adam(0.1), error_feedback=True)
  with pytest.raises(ValueError, match=r"^diloco: delay must be 0 or 1, got 2\."):
    diloco(optax.adam(0.1), delay=2)
  with pytest.raises(ValueError, match=r"^diloco: mixing=0.3 weighs the inner step .* needs delay=1"):
    diloco(optax.adam(0.1), mixing=0.3)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_error_feedback_needs_a_compressed_dtype(dtype):
  with pytest.raises(
    ValueError, match=rf"^replica_mean: error_feedback=True keeps what compression loses, but dtype={dtype!r}"
  ):
    replica_mean("replica", dtype=dtype, error_feedback=True)


@pytest.mark.parametrize("value", [1, 0, "yes", None, np.bool_(True)])
def test_error_feedback_must_be_a_bool(value):
  with pytest.raises(ValueError, match=rf"^replica_mean: error_feedback must be True or False, got {value!r}\."):
    replica_mean("replica", dtype="int8", error_feedback=value)


def test_axis_name_none_is_refused():
  with pytest.raises(ValueError, match=r"^replica_mean: axis_name must name the mapped replica axis, got None\."):
    replica_mean(None)


def test_unhashable_axis_name_is_refused():
  with pytest.raises(ValueError, match=r"^replica_mean: axis_name must be a mapped axis name .*, got \['replica'\]\."):
    replica_mean(["replica"])


NOT_MAPPED = r"^replica_mean: axis_name='replica' is not a mapped axis here\. Call update inside jax\.shard_map"


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_update_outside_a_mapped_axis_is_refused(dtype):
  tx = replica_mean("replica", dtype=dtype)
  u = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=NOT_MAPPED):
    tx.update(u, tx.init(u))  # eager
  with pytest.raises(ValueError, match=NOT_MAPPED):
    jax.jit(tx.update)(u, tx.init(u))
  stacked = {"w": jnp.ones((2, 2, 3))}
  with pytest.raises(ValueError, match=NOT_MAPPED):  # mapped, but over another axis
    jax.vmap(tx.update, axis_name="data")(stacked, jax.vmap(tx.init)(stacked))


def test_lookahead_with_replica_mean_outside_a_mapped_axis_is_refused():
  """The sync branch is traced at every update: the error comes at the first one, not at the first sync."""
  opt = lookahead(optax.sgd(0.1), 3, outer=optax.chain(replica_mean("replica"), optax.sgd(0.5)))
  params = make_params()
  state = opt.init(params)  # init needs no mapped axis
  with pytest.raises(ValueError, match=NOT_MAPPED):
    opt.update(params, state, params)


# ------------------------------------------- Lookahead over replicas


def reference_lookahead_over_replicas(inner, k, alpha, params, replicas, steps):
  """Constant-alpha Lookahead over M replicas, by hand: per replica k inner steps on its own gradients, then
  slow += alpha * mean_m(fast_m - slow), and every replica's fast weights restart at slow.

  Returns per step the M fast weights and the slow weights.
  """
  slow = params
  fast = [params] * replicas
  states = [inner.init(params) for _ in range(replicas)]
  out = []
  for t in range(steps):
    for m in range(replicas):
      updates, states[m] = inner.update(replica_grad(fast[m], t, m), states[m], fast[m])
      fast[m] = optax.apply_updates(fast[m], updates)
    if (t + 1) % k == 0:
      slow = jax.tree.map(lambda s, *fs: s + alpha * sum(f - s for f in fs) / replicas, slow, *fast)
      fast = [slow] * replicas
    out.append((list(fast), slow))
  return out


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_constant_alpha_lookahead_over_replicas_matches_the_loop(inner):
  alpha, k, replicas, steps = 0.3, 4, 3, 11  # ends mid-cycle, after two syncs
  inner_tx = {"sgd": optax.sgd(0.05), "adam": optax.adam(0.05)}[inner]
  opt = lookahead(inner_tx, k, outer=optax.chain(replica_mean("replica"), optax.sgd(alpha)))
  params = make_params()

  step = replica_step(opt)
  stacked = stack_replicas(params, replicas)
  state = jax.vmap(opt.init)(stacked)
  ref = reference_lookahead_over_replicas(inner_tx, k, alpha, params, replicas, steps)
  for t, (ref_fast, ref_slow) in enumerate(ref):
    stacked, state = step(stacked, state, t, jnp.arange(replicas))
    for m in range(replicas):
      at = lambda tree, m=m: jax.tree.map(lambda x: x[m], tree)
      chex.assert_trees_all_close(at(stacked), ref_fast[m], rtol=2e-5, atol=2e-6, custom_message=f"fast {m}, step {t}")
      chex.assert_trees_all_close(at(state.slow), ref_slow, rtol=2e-5, atol=2e-6, custom_message=f"slow {m}, step {t}")
    if t == k - 2:  # before the first sync the replicas have drifted apart (different gradients)
      assert any(not np.array_equal(x[0], x[1]) for x in jax.tree.leaves(stacked))
  chex.assert_trees_all_equal(state.slow, jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), state.slow))
  assert isinstance(state.alpha, optax.EmptyState)  # the outer optimizer takes the slow step: no alpha


def test_one_replica_mean_lookahead_is_plain_lookahead_bitwise():
  """With one replica the mean is the value itself: outer=chain(replica_mean, sgd(alpha)) is outer=sgd(alpha)."""
  params, k, steps = make_params(), 3, 7
  plain = lookahead(optax.adam(0.05), k, outer=optax.sgd(0.3))
  averaged = lookahead(optax.adam(0.05), k, outer=optax.chain(replica_mean("replica"), optax.sgd(0.3)))

  def trajectory(opt):
    @jax.jit
    @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None))
    def step(params, state, t):
      updates, state = opt.update(replica_grad(params, t, 0), state, params)
      return optax.apply_updates(params, updates), state

    p = jax.tree.map(lambda x: x[None], params)
    state = jax.vmap(opt.init)(p)
    out = []
    for t in range(steps):
      p, state = step(p, state, t)
      out.append((p, state.slow))
    return out

  for (a, sa), (b, sb) in zip(trajectory(plain), trajectory(averaged), strict=True):
    chex.assert_trees_all_close((a, sa), (b, sb), rtol=0, atol=0)
