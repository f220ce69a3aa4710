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

from lookahead_optax import ReplicaMeanState, _compression, _exchange, lookahead, replica_mean, resize_replicas
from lookahead_optax._compression import compress, decompress
from tests.compiled import collective_results_reach, count_primitive, input_shapes
from tests.helpers import make_params, replica_grad, replica_step, stack_replicas
from tests.references import (
  reference_block_rows,
  reference_compress,
  reference_diloco,
  reference_eager,
  reference_mean,
  reference_top_k,
  reference_weighted_mean,
)

COMPRESSED = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "int4"]
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


def every_replica_once(axis_name):
  """A round of the exchange in which every replica takes part with weight 1 (inside the mapped function)."""
  w = jnp.float32(1.0)
  return _exchange.Round(w, jax.lax.all_gather(w, axis_name), jax.lax.psum(w, axis_name), axis_name)


def keeps_no_copy(state):
  """The state holds no param-sized field: no residual, no eager mean."""
  assert isinstance(state, ReplicaMeanState)
  return state.residual == state.mean == state.sent == optax.EmptyState()


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
  assert values.dtype == (jnp.uint8 if dtype == "int4" else jnp.dtype(dtype))
  back = np.asarray(decompress(values, scale, shape))
  np.testing.assert_allclose(back, reference_compress(x, dtype), rtol=1e-6, atol=1e-12)
  if dtype == "int8" and len(shape) == 2:
    assert np.abs(np.asarray(values)).max(axis=-1).tolist() == [127] * shape[0]  # one scale per row
  if dtype == "int4":  # two values per byte: a row of n values is ceil(n / 2) bytes
    assert values.shape == (shape[:-1] + (-(-shape[-1] // 2),) if shape else (1,))


def test_int4_packs_every_value_and_its_neighbour_into_one_byte():
  """Every pair of values in [-7, 7], at both positions of a byte, and an odd row length, round-trip exactly."""
  q = np.array([[a, b] for a in range(-7, 8) for b in range(-7, 8)], np.int8).reshape(-1)
  q = np.concatenate([q, [5]]).astype(np.int8)  # odd length: the last byte holds one value
  packed = _compression.pack4(jnp.asarray(q))
  assert packed.dtype == jnp.uint8 and packed.shape == ((q.size + 1) // 2,)
  low = [int(b) & 0xF for b in np.asarray(packed)]
  assert low[:3] == [(-7) & 0xF] * 3  # even positions in the low nibble
  np.testing.assert_array_equal(np.asarray(_compression.unpack4(packed, q.size)), q)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "int8", "int4"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_exchange_matches_numpy(dtype, replicas):
  """The replica mean and residuals of a compressed exchange, for every leaf shape, against numpy.

  With 4 replicas the 9-row and 32-row leaves go by reduce-scatter (one all-to-all of values, one of scales)
  and travel back compressed; with 2 replicas every leaf is all-gathered.
  """
  xs = replicas_of(SHAPES, replicas, seed=1)
  zeros = jax.tree.map(np.zeros_like, xs)
  one = lambda d, e: _exchange.exchange(d, e, every_replica_once("r"), jnp.dtype(dtype))
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
  assert keeps_no_copy(state)  # nothing param-sized without error feedback or eager
  mean, new_state = update(xs, state)
  assert keeps_no_copy(new_state)
  np.testing.assert_array_equal(new_state.present, [replicas] * replicas)  # everyone took part, on every replica
  np.testing.assert_array_equal(new_state.excluded, [0] * replicas)
  same_on_every_replica(mean)
  for k, x in xs.items():
    by_hand = sum(x[m].astype(np.float64) for m in range(replicas)) / replicas
    assert mean[k].dtype == jnp.float32 and mean[k].shape == x.shape
    np.testing.assert_allclose(mean[k][0], by_hand, rtol=1e-6, atol=1e-7, err_msg=k)


def test_full_precision_mean_keeps_the_values_dtype():
  xs = {"w": np.random.default_rng(3).normal(size=(2, 4, 3)).astype(jnp.bfloat16)}
  init, update = mapped(replica_mean("replica"))
  mean, _ = update(xs, init(xs))
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
  assert keeps_no_copy(state)
  same_on_every_replica(mean)
  scattered = [k for k, s in SHAPES.items() if reference_block_rows(s, replicas)]
  assert scattered == ([] if replicas == 2 else ["nine_rows", "cube"])  # both routes are taken
  for k, x in xs.items():
    sent = [reference_compress(x[m], dtype) for m in range(replicas)]
    np.testing.assert_allclose(mean[k][0], reference_mean(sent, dtype), rtol=1e-6, atol=1e-7, err_msg=k)
    if k != "scalar":  # the compression shows (a scalar scaled to the format's top value travels exactly)
      assert not np.allclose(mean[k][0], np.mean(x, axis=0), rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("top_k", [None, 0.25])
def test_compressed_mean_adds_the_replicas_element_wise(top_k):
  """No reduction over the gathered replica axis: it is one element-wise sum (XLA:CPU took seconds on a
  reduction over that major axis of a leaf of a few million values)."""
  replicas = 4
  xs = replicas_of(SHAPES, replicas, seed=4)
  tx = replica_mean("replica", dtype="int8", top_k=top_k)
  jaxpr = jax.make_jaxpr(jax.vmap(lambda u, s: tx.update(u, s), axis_name="replica"))(xs, jax.vmap(tx.init)(xs))
  reduced = input_shapes(jaxpr.jaxpr, "reduce_sum")
  assert not [shape for shape in reduced if shape[:1] == (replicas,) and len(shape) > 1], reduced


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


# ----------------------------------- who takes part: exclusion and weights


def weighted(tx, axis_name="replica"):
  """``tx.update`` on every replica of a leading axis, each with its own ``replica_weight`` (or none)."""
  fn = lambda u, s, w: tx.update(u, s, replica_weight=w)
  return jax.jit(jax.vmap(fn, axis_name=axis_name))


def poisoned(xs, bad: int, leaf="vector"):
  """``xs`` with one non-finite entry in replica ``bad``'s ``leaf`` (its other leaves stay finite)."""
  out = {k: x.copy() for k, x in xs.items()}
  out[leaf][bad].reshape(-1)[0] = np.nan
  return out


def expected_mean(xs, weights, send):
  """The mean by hand: each present replica's ``send(x)``, weighted; a replica with any non-finite leaf is absent."""
  finite = [all(np.all(np.isfinite(x[m])) for x in xs.values()) for m in range(len(weights))]
  w = [wm if ok else 0.0 for wm, ok in zip(weights, finite)]
  return {
    k: reference_weighted_mean([send(x[m]) if w[m] else x[m] * 0 for m in range(len(w))], w) for k, x in xs.items()
  }


@pytest.mark.parametrize("dtype", [None, "int8", "int4"])
def test_a_replica_with_a_non_finite_value_is_left_out(dtype):
  """Replica 2 has one NaN: the mean is the others' mean, on every replica; it is counted in its own state only."""
  xs = poisoned(replicas_of(SHAPES, 4, seed=11), bad=2)
  tx = replica_mean("replica", dtype=dtype, error_feedback=dtype is not None)
  init, update = mapped(tx)
  state = init(xs)
  mean, new = update(xs, state)
  same_on_every_replica(mean)
  send = (lambda x: x) if dtype is None else (lambda x: reference_compress(x, dtype))
  for k, want in expected_mean(xs, [1.0] * 4, send).items():
    if dtype is not None and reference_block_rows(SHAPES[k], 4):  # travels back compressed once more
      want = reference_compress(want, dtype)
    np.testing.assert_allclose(mean[k][0], want, rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(new.excluded, [1] * 4)  # one exclusion, recorded on every replica
  np.testing.assert_array_equal(new.present, [3.0] * 4)
  if dtype is not None:  # excluded after a round that left a residual: it sent nothing, so keeps that residual
    clean = replicas_of(SHAPES, 4, seed=10)
    _, after_one = update(clean, state)
    _, after_two = update(xs, after_one)
    for k in SHAPES:
      np.testing.assert_array_equal(after_two.residual[k][2], after_one.residual[k][2], err_msg=k)
      assert np.all(np.isfinite(after_two.residual[k])), k
    assert any(np.any(after_one.residual[k][2]) for k in SHAPES)


def test_with_no_replica_present_the_mean_is_zero_and_present_says_so():
  xs = replicas_of({"w": (3, 2)}, 2, seed=12)
  xs["w"][:, 0, 0] = np.inf
  init, update = mapped(replica_mean("replica"))
  mean, new = update(xs, init(xs))
  np.testing.assert_array_equal(mean["w"], np.zeros_like(xs["w"]))
  np.testing.assert_array_equal(new.present, [0.0, 0.0])
  np.testing.assert_array_equal(new.excluded, [2, 2])


@pytest.mark.parametrize("dtype", [None, "int8", "top_k"])
@pytest.mark.parametrize("weights", [(1.0, 3.0, 0.0, 2.5), (0.0, 0.0, 4.0, 0.0)], ids=["weighted", "one_present"])
def test_replica_weights_give_the_weighted_mean_over_the_replicas_present(dtype, weights):
  """weight 0 is "absent this round"; all but one absent: the mean is that replica's values (as sent)."""
  xs = replicas_of(SHAPES, 4, seed=13)
  tx = replica_mean("replica", top_k=0.5) if dtype == "top_k" else replica_mean("replica", dtype=dtype)
  mean, new = weighted(tx)(xs, jax.vmap(tx.init)(xs), jnp.asarray(weights, jnp.float32))
  same_on_every_replica(mean)
  send = {
    None: lambda x: x,
    "int8": lambda x: reference_compress(x, "int8"),
    "top_k": lambda x: reference_top_k(x, 0.5),
  }
  for k, want in expected_mean(xs, list(weights), send[dtype]).items():
    if dtype == "int8" and reference_block_rows(SHAPES[k], 4):
      want = reference_compress(want, dtype)
    np.testing.assert_allclose(mean[k][0], want, rtol=1e-6, atol=1e-6, err_msg=k)
  if weights.count(0.0) == 3 and dtype is None:  # one replica present: its own values, exactly
    chex.assert_trees_all_equal({k: m[0] for k, m in mean.items()}, {k: x[2] for k, x in xs.items()})
  np.testing.assert_array_equal(new.present, [sum(weights)] * 4)
  np.testing.assert_array_equal(new.excluded, [0] * 4)  # absent is not excluded


def test_a_weight_with_a_non_finite_replica_counts_only_the_finite_ones():
  xs = poisoned(replicas_of(SHAPES, 4, seed=14), bad=1, leaf="cube")
  tx = replica_mean("replica")
  mean, new = weighted(tx)(xs, jax.vmap(tx.init)(xs), jnp.asarray([2.0, 5.0, 1.0, 1.0]))
  for k, want in expected_mean(xs, [2.0, 5.0, 1.0, 1.0], lambda x: x).items():
    np.testing.assert_allclose(mean[k][0], want, rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(new.present, [4.0] * 4)
  np.testing.assert_array_equal(new.excluded, [1] * 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -3.0])
def test_a_traced_weight_that_is_not_finite_and_non_negative_counts_as_absent(bad):
  """A replica whose weight arrives NaN, infinite or negative is left out; it cannot skew the others' mean."""
  xs = replicas_of(SHAPES, 3, seed=15)
  tx = replica_mean("replica")
  mean, new = weighted(tx)(xs, jax.vmap(tx.init)(xs), jnp.asarray([1.0, bad, 2.0], jnp.float32))
  for k, want in expected_mean(xs, [1.0, 0.0, 2.0], lambda x: x).items():
    np.testing.assert_allclose(mean[k], np.broadcast_to(want, mean[k].shape), rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(new.present, [3.0] * 3)


@pytest.mark.parametrize("value,shown", [(-1.0, r"-1\.0"), (np.nan, "nan"), (np.inf, "inf")])
def test_a_negative_non_finite_or_non_scalar_weight_is_refused(value, shown):
  tx = replica_mean("replica")
  u = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"^replica_mean: replica_weight must be one scalar per replica.*shape \(2,\)"):
    jax.vmap(lambda u, s: tx.update(u, s, replica_weight=jnp.ones(2)), axis_name="replica")(u, jax.vmap(tx.init)(u))
  with pytest.raises(ValueError, match=rf"^replica_mean: replica_weight must be a finite number >= 0.*got {shown}\."):
    jax.vmap(lambda u, s: tx.update(u, s, replica_weight=value), axis_name="replica")(u, jax.vmap(tx.init)(u))


# ------------------------------------------------------------------ top-k


@pytest.mark.parametrize("dtype", [None, "int8", "int4"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_top_k_mean_and_residual_over_two_updates_match_numpy(dtype, replicas):
  """Each replica sends its top 25 % entries (values in dtype, one scale per leaf); e = x - sent carries over."""
  fraction = 0.25
  x1, x2 = replicas_of(SHAPES, replicas, seed=15), replicas_of(SHAPES, replicas, seed=16)
  init, update = mapped(replica_mean("replica", dtype=dtype, top_k=fraction, error_feedback=True))
  state = init(x1)
  mean1, state1 = update(x1, state)
  mean2, state2 = update(x2, state1)
  same_on_every_replica(mean2)
  for k in SHAPES:
    sent1 = [reference_top_k(x1[k][m], fraction, dtype) for m in range(replicas)]
    e1 = [x1[k][m] - sent1[m] for m in range(replicas)]
    sent2 = [reference_top_k(x2[k][m] + e1[m], fraction, dtype) for m in range(replicas)]
    np.testing.assert_allclose(mean1[k][0], np.mean(sent1, axis=0), rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(mean2[k][0], np.mean(sent2, axis=0), rtol=1e-6, atol=1e-6, err_msg=k)
    for m in range(replicas):
      np.testing.assert_allclose(state1.residual[k][m], e1[m], rtol=0, atol=1e-6, err_msg=f"{k}, replica {m}")
    kept = max(1, -(-int(np.prod(SHAPES[k])) // 4))
    assert all(np.count_nonzero(s) <= kept for s in sent1), k  # at most ceil(n / 4) entries travel


def test_top_k_must_be_a_fraction():
  for bad in (0.0, 1.0, 1.5, -0.1, True, "1%"):
    with pytest.raises(ValueError, match=rf"^replica_mean: top_k must be a fraction in \(0, 1\) or None, got {bad!r}"):
      replica_mean("replica", top_k=bad)


def test_top_k_without_a_dtype_may_keep_a_residual():
  """top_k loses what it does not send: error feedback is meaningful with top_k alone."""
  tx = replica_mean("replica", top_k=0.1, error_feedback=True)
  state = tx.init({"w": jnp.ones(4)})
  assert state.residual["w"].dtype == jnp.float32


# ------------------------------------------------------------------ eager


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_eager_returns_the_own_share_now_and_corrects_it_with_the_mean_next_round(dtype):
  """Three rounds against reference_eager: x_t / M + mean_{t-1} - x_{t-1} / M, per replica."""
  replicas = 4
  rounds = [replicas_of(SHAPES, replicas, seed=20 + t) for t in range(3)]
  init, update = mapped(replica_mean("replica", dtype=dtype, eager=True))
  state = init(rounds[0])
  send = (lambda x: x) if dtype is None else (lambda x: reference_compress(x, dtype))
  for k in SHAPES:
    sent_rounds = []
    for xs in rounds:
      per_replica = [send(xs[k][m]) for m in range(replicas)]
      if dtype is not None and reference_block_rows(SHAPES[k], replicas):
        mean = reference_compress(np.mean(per_replica, axis=0, dtype=np.float32), dtype)
        per_replica = [mean] * replicas  # what the reference averages: the mean as it arrives
      sent_rounds.append(per_replica)
    want = reference_eager([[xs[k][m] for m in range(replicas)] for xs in rounds], replicas)
    # reference_eager averages the raw values; with compression the stored mean is the compressed one
    if dtype is not None:
      means = [np.mean(r, axis=0, dtype=np.float32) for r in sent_rounds]
      own = [[xs[k][m] / replicas for m in range(replicas)] for xs in rounds]
      want = [[own[t][m] + ((means[t - 1] - own[t - 1][m]) if t else 0) for m in range(replicas)] for t in range(3)]
    state_k = state
    for t, xs in enumerate(rounds):
      out, state_k = update(xs, state_k)
      for m in range(replicas):
        np.testing.assert_allclose(out[k][m], want[t][m], rtol=1e-5, atol=1e-6, err_msg=f"{k}, round {t}, replica {m}")
  assert isinstance(state.mean, dict) and isinstance(state.sent, dict)  # two param-sized copies kept


def test_eager_output_does_not_wait_for_the_exchange():
  """The returned update depends on no collective of this round: every collective's result reaches only the state."""
  tx = replica_mean("replica", dtype="int8", eager=True)
  u = {"w": jnp.ones((8, 4))}
  state = tx.init(u)
  jaxpr = jax.make_jaxpr(lambda u, s: tx.update(u, s), axis_env=[("replica", 4)])(u, state)
  used = collective_results_reach(jaxpr.jaxpr, outputs=range(len(jax.tree.leaves(u))))
  assert not used, f"the returned update waits for {used}"


def test_eager_with_a_bad_replica_returns_no_nan_to_the_others():
  xs = poisoned(replicas_of(SHAPES, 4, seed=30), bad=3)
  init, update = mapped(replica_mean("replica", eager=True))
  out, state = update(xs, init(xs))
  for m in (0, 1, 2):
    assert all(np.all(np.isfinite(out[k][m])) for k in SHAPES)
  assert all(np.all(np.isfinite(state.mean[k])) for k in SHAPES)
  np.testing.assert_array_equal(state.excluded, [1] * 4)


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


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_error_feedback_must_be_a_bool(value):
  with pytest.raises(ValueError, match=rf"^replica_mean: error_feedback must be True or False, got {value!r}\."):
    replica_mean("replica", dtype="int8", error_feedback=value)


def test_numpy_scalars_are_taken_where_python_ones_are():
  """A numpy bool or float (from a config loaded with numpy) is taken as the Python value: same state."""
  ours = replica_mean("replica", dtype="int8", error_feedback=np.bool_(True), top_k=np.float32(0.25))
  python = replica_mean("replica", dtype="int8", error_feedback=True, top_k=0.25)
  params = {"w": jnp.ones((4, 3))}
  chex.assert_trees_all_equal(ours.init(params), python.init(params))
  assert resize_replicas({"w": jnp.ones((2, 3))}, np.int64(3))["w"].shape == (3, 3)


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


# ------------------------------------- DiLoCo with a bad replica, and weighted rounds


def resumed_from_the_slow_weights(params, state):
  """The recipe of the DiLoCo guide: right after a sync, a replica whose params are not finite takes the slow ones."""
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
  resume = jnp.logical_and(state.count == 0, jnp.logical_not(finite))
  return jax.tree.map(lambda p, s: jnp.where(resume, s.astype(p.dtype), p), params, state.slow)


def robust_step(opt, bad=(), weight=None):
  """One vmapped step per replica: NaN gradients at the ``bad`` (step, replica) pairs, ``weight(t, m)`` passed as
  ``replica_weight``, then the guide's resume recipe."""

  @jax.jit
  @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0, 0))
  def step(params, state, t, m, poisoned):
    g = jax.tree.map(lambda x: jnp.where(poisoned, jnp.nan, x), replica_grad(params, t, m))
    extra = {} if weight is None else {"replica_weight": weight}
    updates, state = opt.update(g, state, params, **{k: v(t, m) for k, v in extra.items()})
    return resumed_from_the_slow_weights(optax.apply_updates(params, updates), state), state

  return lambda params, state, t, replicas: step(
    params, state, t, jnp.arange(replicas), jnp.asarray([(t, m) in bad for m in range(replicas)])
  )


def run_against_reference(opt, replicas, k, steps, bad=(), weight=None, ref_weight=None):
  params = make_params()
  fasts, slows = reference_diloco(optax.sgd(0.05), k, 0.7, 0.9, params, replicas, steps, bad, ref_weight)
  step = robust_step(opt, bad, weight)
  stacked, state = stack_replicas(params, replicas), jax.vmap(opt.init)(stack_replicas(params, replicas))
  states = []
  for t in range(steps):
    stacked, state = step(stacked, state, t, replicas)
    states.append(state)
    for m in range(replicas):
      at = lambda tree, m=m: jax.tree.map(lambda x: x[m], tree)
      chex.assert_trees_all_close(at(state.slow), slows[t], rtol=2e-5, atol=2e-6, custom_message=f"slow {m}, step {t}")
      if (t + 1) % k == 0:  # after a sync every replica, the bad one included, holds the slow weights
        chex.assert_trees_all_close(at(stacked), fasts[t][m], rtol=2e-5, atol=2e-6, custom_message=f"fast {m}, {t}")
  return states


def nesterov_diloco(k, **exchange):
  return lookahead(
    optax.sgd(0.05),
    k,
    outer=optax.chain(replica_mean("replica", **exchange), optax.sgd(0.7, momentum=0.9, nesterov=True)),
  )


def test_one_bad_replica_does_not_poison_the_others():
  """Replica 1's gradient is NaN at one step of the first cycle: the sync averages the other three; replica 1
  resumes from the new slow weights and takes part again at the next sync; every replica stays finite."""
  replicas, k, steps = 4, 3, 9
  states = run_against_reference(nesterov_diloco(k), replicas, k, steps, bad={(1, 1)})
  exchange = lambda s: s.outer_state[0]
  np.testing.assert_array_equal(exchange(states[2]).excluded, [1] * replicas)
  np.testing.assert_array_equal(exchange(states[2]).present, [3.0] * replicas)
  np.testing.assert_array_equal(exchange(states[5]).present, [4.0] * replicas)  # back at the next sync
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(states[-1].slow))


def test_with_every_replica_bad_the_slow_weights_and_outer_state_stay():
  replicas, k, steps = 2, 3, 9
  states = run_against_reference(nesterov_diloco(k), replicas, k, steps, bad={(4, 0), (3, 1)})
  before, after = states[2], states[5]  # the second sync had no replica
  chex.assert_trees_all_equal(after.slow, before.slow)
  chex.assert_trees_all_equal(after.outer_state[1], before.outer_state[1])  # the Nesterov trace did not move
  np.testing.assert_array_equal(after.outer_state[0].present, [0.0] * replicas)
  np.testing.assert_array_equal(after.outer_state[0].excluded, [2] * replicas)
  assert not np.array_equal(jax.tree.leaves(states[8].slow)[0], jax.tree.leaves(after.slow)[0])  # the third sync steps


def test_replica_weights_reach_the_mean_through_lookahead():
  """replica_weight passed to lookahead's update weighs each replica at a sync; weight 0 is absent."""
  replicas, k, steps = 3, 3, 9
  table = np.array([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0]], np.float32)  # per sync, per replica
  weight = lambda t, m: jnp.asarray(table)[t // k, m]
  run_against_reference(nesterov_diloco(k), replicas, k, steps, weight=weight, ref_weight=lambda t, m: table[t // k, m])


def test_replica_weight_without_a_replica_mean_is_refused():
  opt = lookahead(optax.sgd(0.1), 3, outer=optax.sgd(0.5))
  params = make_params()
  with pytest.raises(ValueError, match=r"^lookahead: replica_weight=2\.0 weighs this replica.*no replica_mean"):
    opt.update(params, opt.init(params), params, replica_weight=2.0)
