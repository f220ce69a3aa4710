"""Streaming DiLoCo: fragments, compressed exchange with error feedback, delayed (overlapping) exchange.

The reference is written here from Douillard et al. (2025) with numpy and
``ml_dtypes`` for the narrow formats: replicas in a Python loop, a fragment's
pseudo-gradients compressed per replica, averaged in float32, one Nesterov
outer state per fragment. The library runs its replicas under ``jax.vmap`` with
an axis name (the multi-device and multi-process versions are in
``tests/distributed``).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import _exchange, _fragments, diloco, find_lookahead_state, force_sync, lookahead
from lookahead_optax._exchange import compress, decompress
from tests.compiled import collective_inputs_depend_on, count_primitive
from tests.helpers import make_params, quadratic_grad, replica_grad, run
from tests.references import reference_compress, reference_mean

LR, MU, INNER_LR = 0.7, 0.9, 0.05


# ----------------------------------------------------------------- fragments


def test_int_fragments_are_contiguous_whole_leaves_of_near_equal_size():
  params = {"a": jnp.ones(100), "b": jnp.ones(3), "c": jnp.ones((50, 50)), "d": jnp.ones(10), "e": jnp.ones(1000)}
  sizes = [x.size for x in jax.tree.leaves(params)]
  for n in range(1, 6):
    ids = _fragments.assign("t", n, params)
    assert ids == sorted(ids) and set(ids) == set(range(n)), ids  # contiguous, every fragment non-empty
    assert ids == _fragments.assign("t", n, params)  # deterministic
  assert _fragments.assign("t", 2, params) == [0, 0, 0, 1, 1]  # 2603 and 1010 of 3613: the 2500 leaf stays whole
  totals = [sum(s for s, i in zip(sizes, _fragments.assign("t", 3, params)) if i == j) for j in range(3)]
  assert totals == [103, 2500, 1010]


def test_fragment_schedule_staggers_the_syncs():
  """Fragment j syncs where (t - j k // F) % k == k - 1: once per cycle each, never two at once."""
  k, n = 8, 3
  schedule = [int(_fragments.syncing(jnp.int32(t % k), k, n)) for t in range(2 * k)]
  for t, j in enumerate(schedule):
    due = [f for f in range(n) if (t - f * k // n) % k == k - 1]
    assert [j] == due or (j == n and not due), (t, j, due)
  assert sorted(j for j in schedule[:k] if j < n) == list(range(n))


@pytest.mark.parametrize(
  "fragments,match",
  [
    (0, r"fragments must be an int >= 1"),
    (9, r"fragments=9 is more than k=8"),
    ({"w": 0.5, "b": 1}, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
  ],
)
def test_bad_fragments(fragments, match):
  with pytest.raises(ValueError, match=rf"lookahead: {match}"):
    lookahead(optax.sgd(0.1), k=8, fragments=fragments)


def test_fragments_must_fit_the_params():
  with pytest.raises(ValueError, match=r"fragments=5 is more than the 4 floating-point leaves"):
    lookahead(optax.sgd(0.1), k=8, fragments=5).init(make_params())
  with pytest.raises(ValueError, match=r"ids \[1\] have no leaf"):
    lookahead(optax.sgd(0.1), k=8, fragments={"a": 0, "b": 2}).init({"a": jnp.ones(2), "b": jnp.ones(2)})


def reference_fragments(k, n, alpha, params, steps):
  """Lookahead(SGD) per fragment, single process: fragment j takes its slow step at its own syncs."""
  ids = _fragments.assign("t", n, params)
  leaves, structure = jax.tree.flatten(params)
  fast, slow = list(leaves), list(leaves)
  out = []
  for t in range(steps):
    grads = jax.tree.leaves(quadratic_grad(jax.tree.unflatten(structure, fast), t))
    fast = [f - INNER_LR * g for f, g in zip(fast, grads)]
    for i, j in enumerate(ids):
      if (t - j * k // n) % k == k - 1:
        slow[i] = slow[i] + alpha * (fast[i] - slow[i])
        fast[i] = slow[i]
    out.append((jax.tree.unflatten(structure, fast), jax.tree.unflatten(structure, slow)))
  return out


@pytest.mark.parametrize("n", [2, 3])
def test_fragments_without_replicas_match_per_fragment_lookahead(n):
  params, k, steps = make_params(), 6, 14
  fasts, states = run(lookahead(optax.sgd(INNER_LR), k, 0.5, fragments=n), params, quadratic_grad, steps)
  for t, (ref_fast, ref_slow) in enumerate(reference_fragments(k, n, 0.5, params, steps)):
    chex.assert_trees_all_close(fasts[t], ref_fast, rtol=2e-5, atol=2e-6, custom_message=f"fast, step {t}")
    chex.assert_trees_all_close(states[t].slow, ref_slow, rtol=2e-5, atol=2e-6, custom_message=f"slow, step {t}")
  ids = _fragments.assign("t", n, params)
  for t in range(steps):  # right after its sync, a fragment's fast weights are its slow weights, bit for bit
    j = int(_fragments.syncing(jnp.int32(t % k), k, n))
    for f, s, i in zip(jax.tree.leaves(fasts[t]), jax.tree.leaves(states[t].slow), ids):
      if i == j:
        np.testing.assert_array_equal(f, s)


# ------------------------------------------------------------ compression


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int8"])
@pytest.mark.parametrize("shape", [(), (7,), (5, 6)])
def test_compression_matches_numpy(dtype, shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 1e-3
  values, scale = compress(jnp.asarray(x), jnp.dtype(dtype))
  assert values.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(decompress(values, scale)), reference_compress(x, dtype), rtol=1e-6, atol=1e-12)
  if dtype == "int8" and len(shape) == 2:
    assert np.abs(np.asarray(values)).max(axis=-1).tolist() == [127] * shape[0]  # one scale per row


EXCHANGE_SHAPES = {"scalar": (), "vector": (7,), "two_rows": (2, 5), "nine_rows": (9, 3), "cube": (8, 4, 2)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "int8"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_exchange_matches_numpy(dtype, replicas):
  """The replica mean and residuals of a compressed exchange, for every leaf shape, against numpy.

  With 4 replicas the 9-row and 32-row leaves go by reduce-scatter (one all-to-all of values, one of scales)
  and travel back compressed; with 2 replicas every leaf is all-gathered.
  """
  rng = np.random.default_rng(1)
  xs = {k: rng.normal(size=(replicas, *s)).astype(np.float32) for k, s in EXCHANGE_SHAPES.items()}
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


# --------------------------------------------- Streaming DiLoCo, replicas


def reference_streaming(n, k, dtype, error_feedback, delay, mixing, params, replicas, steps):
  """Streaming DiLoCo as a Python loop over replicas, leaves and fragments (numpy; narrow formats by ml_dtypes)."""
  ids = _fragments.assign("t", n, params)
  leaves, structure = jax.tree.flatten(params)
  slow = [np.asarray(x, np.float32) for x in leaves]
  fast = [[s.copy() for s in slow] for _ in range(replicas)]
  trace = [np.zeros_like(s) for s in slow]  # Nesterov momentum: per leaf, so per fragment
  residual = [[np.zeros_like(s) for s in slow] for _ in range(replicas)]
  inner = optax.adam(INNER_LR)
  states = [inner.init(params) for _ in range(replicas)]
  out = []
  for t in range(steps):
    received = [[f.copy() for f in fast[m]] for m in range(replicas)]
    for m in range(replicas):
      p = jax.tree.unflatten(structure, [jnp.asarray(f) for f in fast[m]])
      u, states[m] = inner.update(replica_grad(p, t, m), states[m], p)
      fast[m] = [np.asarray(x) for x in jax.tree.leaves(optax.apply_updates(p, u))]
    for i, j in enumerate(ids):
      if (t - j * k // n) % k != k - 1:
        continue
      sent = []
      for m in range(replicas):
        x = slow[i] - (received[m][i] if delay else fast[m][i]) + residual[m][i]
        q = x if dtype is None else reference_compress(x, dtype)
        if error_feedback:
          residual[m][i] = x - q
        sent.append(q)
      delta = reference_mean(sent, dtype)
      trace[i] = MU * trace[i] + delta
      slow[i] = slow[i] - LR * (MU * trace[i] + delta)
      for m in range(replicas):
        fast[m][i] = (1 - mixing) * slow[i] + mixing * fast[m][i] if delay else slow[i].copy()
    out.append(([jax.tree.unflatten(structure, f) for f in fast], jax.tree.unflatten(structure, slow)))
  return out


def train_replicas(opt, params, replicas, steps):
  @jax.jit
  @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0))
  def step(params, state, t, m):
    updates, state = opt.update(replica_grad(params, t, m), state, params)
    return optax.apply_updates(params, updates), state

  stacked = jax.tree.map(lambda x: jnp.stack([x] * replicas), params)
  state = jax.vmap(opt.init)(stacked)
  out = []
  for t in range(steps):
    stacked, state = step(stacked, state, t, jnp.arange(replicas))
    out.append((stacked, state))
  return out


CASES = [  # (fragments, communication_dtype, error_feedback, delay)
  (2, None, False, 0),
  (3, "bfloat16", False, 0),
  (2, "int8", True, 0),
  (2, "float8_e4m3fn", False, 0),
  (1, "float8_e5m2", True, 1),
  (2, None, False, 1),
  (3, "int8", False, 1),
]


@pytest.mark.parametrize("n,dtype,error_feedback,delay", CASES)
def test_streaming_diloco_matches_the_reference(n, dtype, error_feedback, delay):
  params, replicas, k, steps, mixing = make_params(), 3, 4, 11, 0.5
  opt = diloco(
    optax.adam(INNER_LR),
    k,
    LR,
    MU,
    fragments=n,
    communication_dtype=dtype,
    error_feedback=error_feedback,
    delay=delay,
    **({"mixing": mixing} if delay else {}),
  )
  ours = train_replicas(opt, params, replicas, steps)
  ref = reference_streaming(n, k, dtype, error_feedback, delay, mixing, params, replicas, steps)
  for t, ((stacked, state), (ref_fast, ref_slow)) in enumerate(zip(ours, ref)):
    for m in range(replicas):
      chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[m], state.slow),
        ref_slow,
        rtol=1e-4,
        atol=1e-5,
        custom_message=f"slow weights, replica {m}, step {t}",
      )
      chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[m], stacked),
        ref_fast[m],
        rtol=1e-4,
        atol=1e-5,
        custom_message=f"fast weights, replica {m}, step {t}",
      )
  slow = ours[-1][1].slow
  chex.assert_trees_all_equal(slow, jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), slow))  # shared
  if error_feedback:
    assert any(float(jnp.abs(r).max()) > 0 for r in jax.tree.leaves(ours[-1][1].residual))


def test_one_fragment_full_precision_no_delay_is_plain_diloco_bitwise():
  params, replicas, k, steps = make_params(), 3, 4, 9
  plain = train_replicas(diloco(optax.adam(INNER_LR), k, LR, MU), params, replicas, steps)
  for opt in (
    diloco(optax.adam(INNER_LR), k, LR, MU, fragments=1, communication_dtype=None, delay=0),
    diloco(optax.adam(INNER_LR), k, LR, MU, fragments=jax.tree.map(lambda _: 0, params), communication_dtype="float32"),
  ):
    for (a, sa), (b, sb) in zip(plain, train_replicas(opt, params, replicas, steps)):
      chex.assert_trees_all_equal((a, sa.slow, sa.outer_state), (b, sb.slow, sb.outer_state))


def test_each_fragment_has_its_own_outer_state_moving_only_at_its_syncs():
  params, replicas, k, n = make_params(), 2, 4, 2
  opt = diloco(optax.adam(INNER_LR), k, LR, MU, fragments=n)
  ids = _fragments.assign("t", n, params)
  runs = train_replicas(opt, params, replicas, 2 * k)
  for t in range(1, 2 * k):
    before, after = runs[t - 1][1].outer_state, runs[t][1].outer_state
    j = int(_fragments.syncing(jnp.int32(t % k), k, n))
    for f in range(n):
      moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[f]), jax.tree.leaves(after[f]))]
      assert any(moved) == (f == j), (t, f, j)
      assert len(moved) == sum(i == f for i in ids)  # the fragment's own leaves only


def test_delayed_exchange_does_not_depend_on_the_gradient():
  """With delay=1 no collective's input depends on this step's gradient; with delay=0 they do."""
  params = make_params()
  mesh = jax.make_mesh((1,), ("replica",))

  def program(delay, dtype):
    opt = diloco(optax.adam(INNER_LR), 4, LR, MU, fragments=2, delay=delay, communication_dtype=dtype)

    # (check_vma=False: every output replicated; tests/distributed runs the typed version with per-replica specs)
    @functools.partial(
      jax.shard_map,
      mesh=mesh,
      in_specs=jax.sharding.PartitionSpec(),
      out_specs=jax.sharding.PartitionSpec(),
      check_vma=False,
    )
    def step(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return collective_inputs_depend_on(step, (params, opt.init(params), params), argnum=2)

  for dtype in (None, "int8"):
    delayed = program(1, dtype)
    assert delayed and not any(delayed.values()), delayed
    immediate = program(0, dtype)
    assert immediate and all(immediate.values()), immediate


# ------------------------------------------------------- force_sync, errors


def test_force_sync_syncs_every_fragment():
  params, k, n = make_params(), 6, 3
  opt = lookahead(optax.sgd(INNER_LR), k, 0.5, fragments=n)
  fasts, states = run(opt, params, quadratic_grad, 2)
  state, synced = force_sync(states[-1], fasts[-1], opt)
  chex.assert_trees_all_equal(synced, find_lookahead_state(state).slow)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (
      dict(communication_dtype="int8"),
      r"communication_dtype=.* acts on the exchange between replicas, which "
      r"needs axis_name",
    ),
    (dict(delay=1), r"delay=1 acts on the exchange between replicas"),
    (
      dict(axis_name="r", error_feedback=True),
      r"error_feedback=True keeps what compression loses, but "
      r"communication_dtype=None",
    ),
    (
      dict(axis_name="r", mixing=0.3),
      r"mixing=0.3 weighs the inner step taken during a delayed exchange; it "
      r"needs delay=1",
    ),
    (dict(axis_name="r", delay=1, mixing=1.5), r"mixing must be a number in \[0.0, 1.0\], got 1.5"),
    (dict(axis_name="r", delay=2), r"delay must be 0 or 1, got 2"),
    (dict(axis_name="r", delay=1, placement_check="warn"), r"placement_check='warn' compares .* with delay=1"),
    (dict(axis_name="r", communication_dtype="float16"), r"communication_dtype must be one of"),
    (dict(fragments=2, inner_state_policy="reset"), r"fragments=2 syncs the params a fragment at a time"),
    (dict(fragments=2, alpha=lambda n: 0.5), r"fragments=2 needs a constant alpha or an outer optimizer"),
  ],
)
def test_streaming_arguments_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=rf"lookahead: {match}"):
    lookahead(optax.adam(0.1), k=4, **kwargs)
