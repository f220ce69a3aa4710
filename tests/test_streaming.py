"""The Streaming DiLoCo schedule (``schedule=streaming(fragments, delay=..., mixing=...)``): fragments, delayed exchange.

Which fragment each leaf belongs to, which fragment syncs when, fragments against a per-fragment Lookahead
loop, and Streaming DiLoCo over replicas against a reference written here from Douillard et al. (2025) with
numpy and ``ml_dtypes`` for the narrow formats: replicas in a Python loop, a fragment's pseudo-gradients
compressed per replica, averaged in float32, one Nesterov outer state per fragment. The library runs its
replicas under ``jax.vmap`` with an axis name (the multi-device and multi-process versions are in
``tests/distributed``). The exchange itself (:func:`lookahead_optax.replica_mean`) is tested in
``tests/test_exchange.py``.
"""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import (
  LookaheadPlacementWarning,
  _streaming,
  diloco,
  find_lookahead_state,
  force_sync,
  lookahead,
  replica_mean,
  streaming,
)
from tests.compiled import collective_inputs_depend_on
from tests.helpers import make_params, quadratic_grad, replica_grad, replica_step, run, stack_replicas
from tests.references import reference_compress, reference_mean

LR, MU, INNER_LR = 0.7, 0.9, 0.05


def nesterov():
  return optax.sgd(LR, momentum=MU, nesterov=True)


def streaming_diloco(k, n, dtype=None, error_feedback=False, delay=0, mixing=None, axis_name="replica"):
  """Streaming DiLoCo assembled from the pieces: replica_mean in front of the Nesterov outer step, a streaming schedule."""
  outer = optax.chain(replica_mean(axis_name, dtype=dtype, error_feedback=error_feedback), nesterov())
  return lookahead(optax.adam(INNER_LR), k, outer=outer, schedule=streaming(n, delay=delay, mixing=mixing))


def residuals(state, n):
  """The error-feedback residual, shaped like the params: from the ReplicaMeanState of each fragment's outer state.

  ``outer=optax.chain(replica_mean(...), opt)``: ``outer_state[0].residual`` with one fragment; with F > 1 one outer
  state per fragment, ``outer_state[j][0].residual``, whose leaves of other fragments are ``optax.MaskedNode``.
  """
  parts = [state.outer_state[0].residual] if n == 1 else [state.outer_state[j][0].residual for j in range(n)]
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def owner(*xs):
    owners = [x for x in xs if not masked(x)]
    assert len(owners) == 1, xs  # each leaf's residual is kept by its own fragment's outer state only
    return owners[0]

  return jax.tree.map(owner, *parts, is_leaf=masked)


# ----------------------------------------------------------------- fragments


def test_int_fragments_are_contiguous_whole_leaves_of_near_equal_size():
  params = {"a": jnp.ones(100), "b": jnp.ones(3), "c": jnp.ones((50, 50)), "d": jnp.ones(10), "e": jnp.ones(1000)}
  sizes = [x.size for x in jax.tree.leaves(params)]
  for n in range(1, 6):
    ids = _streaming.assign("t", n, params)
    assert ids == sorted(ids) and set(ids) == set(range(n)), ids  # contiguous, every fragment non-empty
    assert ids == _streaming.assign("t", n, params)  # deterministic
  assert _streaming.assign("t", 2, params) == [0, 0, 0, 1, 1]  # 2603 and 1010 of 3613: the 2500 leaf stays whole
  totals = [sum(s for s, i in zip(sizes, _streaming.assign("t", 3, params)) if i == j) for j in range(3)]
  assert totals == [103, 2500, 1010]


@pytest.mark.parametrize("k,n", [(8, 3), (5, 3), (7, 2), (4, 4), (6, 1)])
def test_fragment_schedule_staggers_the_syncs(k, n):
  """Fragment j syncs where (t - (j k) // F) % k == k - 1: once per cycle each, never two at once."""
  schedule = [int(_streaming.syncing(jnp.int32(t % k), k, n)) for t in range(2 * k)]
  for t, j in enumerate(schedule):
    due = [f for f in range(n) if (t - (f * k) // n) % k == k - 1]
    assert [j] == due or (j == n and not due), (t, j, due)
  assert sorted(j for j in schedule[:k] if j < n) == list(range(n))


def test_fragment_offsets_are_floor_of_j_k_over_f_not_j_times_floor_k_over_f():
  """k=5, F=3: the offsets are 0, 1, 3 ((j k) // F), not 0, 1, 2 (j (k // F)): fragment 2 syncs at t = 1, 6, 11."""
  k, n = 5, 3
  first = {}
  for t in range(3 * k):
    j = int(_streaming.syncing(jnp.int32(t % k), k, n))
    if j < n:
      first.setdefault(j, []).append(t)
  assert first == {0: [4, 9, 14], 1: [0, 5, 10], 2: [2, 7, 12]}


@pytest.mark.parametrize(
  "fragments,match",
  [
    (0, r"fragments must be an int >= 1"),
    (-2, r"fragments must be an int >= 1"),
    (True, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
    (2.0, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
    ({}, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
    ({"w": 0.5, "b": 1}, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
    ({"w": -1, "b": 0}, r"fragments must be an int >= 1 or a pytree of non-negative int fragment ids"),
  ],
)
def test_streaming_rejects_bad_fragments(fragments, match):
  with pytest.raises(ValueError, match=rf"^streaming: {match}.*got {fragments!r}"):
    streaming(fragments)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(delay=2), r"delay must be 0 or 1, got 2\."),
    (dict(delay=-1), r"delay must be 0 or 1, got -1\."),
    (dict(delay=True), r"delay must be 0 or 1, got True\."),
    (dict(delay=1.0), r"delay must be 0 or 1, got 1\.0\."),
    (dict(mixing=0.3), r"mixing=0\.3 weighs the inner step taken during a delayed exchange; it needs delay=1"),
    (dict(delay=0, mixing=0.3), r"mixing=0\.3 weighs .* needs delay=1, got delay=0"),
    (dict(delay=1, mixing=1.5), r"mixing must be a number in \[0, 1\], got 1\.5\."),
    (dict(delay=1, mixing=-0.1), r"mixing must be a number in \[0, 1\], got -0\.1\."),
    (dict(delay=1, mixing=True), r"mixing must be a number in \[0, 1\], got True\."),
    (dict(delay=1, mixing="0.3"), r"mixing must be a number in \[0, 1\], got '0\.3'\."),
  ],
)
def test_streaming_arguments_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=rf"^streaming: {match}"):
    streaming(2, **kwargs)


def test_streaming_defaults_and_accepted_values():
  assert streaming() == _streaming.Streaming(1, 0, 0.5)
  assert streaming(3, delay=1) == _streaming.Streaming(3, 1, 0.5)  # mixing defaults to 0.5 with delay=1
  assert streaming(2, delay=1, mixing=0) == _streaming.Streaming(2, 1, 0.0)
  assert streaming(2, delay=1, mixing=1) == _streaming.Streaming(2, 1, 1.0)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(k=8, schedule=streaming(9)), r"fragments=9 makes 9 fragments, more than k=8"),
    (dict(k=jnp.array(8), schedule=streaming(9)), r"fragments=9 makes 9 fragments, more than k=8"),
    (
      dict(k=2, schedule=streaming({"a": 0, "b": 1, "c": 2})),
      r"fragments=\{'a': 0, 'b': 1, 'c': 2\} makes 3 fragments, more than k=2",
    ),
    (
      dict(k=4, schedule=streaming(2), inner_state_policy="reset"),
      r"schedule=Streaming\(fragments=2, delay=0, mixing=0\.5\) syncs the params a fragment at a time, "
      r"while inner_state_policy='reset'",
    ),
    (
      dict(k=4, schedule=streaming(2), alpha=lambda n: 0.5),
      r"schedule=Streaming\(fragments=2, delay=0, mixing=0\.5\) needs a constant alpha or an outer optimizer",
    ),
    (dict(k=4, schedule=(2, 1)), r"schedule must be None or made by streaming\(\.\.\.\), got \(2, 1\)"),
    (
      dict(k=4, schedule=streaming(2, delay=1)),
      r"schedule=Streaming\(fragments=2, delay=1, mixing=0\.5\) delays the exchange over replicas, but outer=None "
      r"has none",
    ),
  ],
)
def test_lookahead_checks_the_schedule_against_its_own_arguments(kwargs, match):
  with pytest.raises(ValueError, match=rf"^lookahead: {match}"):
    lookahead(optax.adam(0.1), **kwargs)


def test_fragments_must_fit_the_params():
  with pytest.raises(ValueError, match=r"fragments=5 is more than the 4 floating-point leaves"):
    lookahead(optax.sgd(0.1), k=8, schedule=streaming(5)).init(make_params())
  with pytest.raises(ValueError, match=r"ids \[1\] have no leaf"):
    lookahead(optax.sgd(0.1), k=8, schedule=streaming({"a": 0, "b": 2})).init({"a": jnp.ones(2), "b": jnp.ones(2)})


@pytest.mark.parametrize("outer", [optax.sgd(0.5), optax.chain(optax.clip(1.0), nesterov())], ids=["sgd", "chain"])
def test_delay_needs_a_replica_mean_in_outer_at_init(outer):
  opt = lookahead(optax.adam(0.1), 4, outer=outer, schedule=streaming(2, delay=1))
  with pytest.raises(
    ValueError, match=r"^lookahead: schedule=.*delays the exchange over replicas, but outer=.* has no "
  ):
    opt.init(make_params())


def test_delay_accepts_a_replica_mean_anywhere_in_the_outer_chain():
  """replica_mean need not come first: the init finds it inside the outer state."""
  params = make_params()
  for outer in (
    optax.chain(replica_mean("replica"), nesterov()),
    optax.chain(optax.clip(1.0), replica_mean("replica", dtype="int8"), nesterov()),
    optax.chain(optax.identity(), optax.chain(replica_mean("replica"), nesterov())),
  ):
    state = lookahead(optax.adam(0.1), 4, outer=outer, schedule=streaming(2, delay=1)).init(params)
    assert len(state.outer_state) == 2  # one outer state per fragment


# ---------------------------------------------- fragments, single process


def reference_fragments(k, n, alpha, params, steps):
  """Lookahead(SGD) per fragment, single process: fragment j takes its slow step at its own syncs."""
  ids = _streaming.assign("t", n, params)
  leaves, structure = jax.tree.flatten(params)
  fast, slow = list(leaves), list(leaves)
  out = []
  for t in range(steps):
    grads = jax.tree.leaves(quadratic_grad(jax.tree.unflatten(structure, fast), t))
    fast = [f - INNER_LR * g for f, g in zip(fast, grads)]
    for i, j in enumerate(ids):
      if (t - (j * k) // n) % k == k - 1:
        slow[i] = slow[i] + alpha * (fast[i] - slow[i])
        fast[i] = slow[i]
    out.append((jax.tree.unflatten(structure, fast), jax.tree.unflatten(structure, slow)))
  return out


@pytest.mark.parametrize("k,n,steps", [(6, 2, 14), (6, 3, 14), (5, 3, 13)])
def test_fragments_without_replicas_match_per_fragment_lookahead(k, n, steps):
  params = make_params()
  if (k, n) == (5, 3):  # a case where the offsets (j k) // F and j (k // F) differ: 0, 1, 3 against 0, 1, 2
    assert [(j * k) // n for j in range(n)] != [j * (k // n) for j in range(n)]
  fasts, states = run(lookahead(optax.sgd(INNER_LR), k, 0.5, schedule=streaming(n)), params, quadratic_grad, steps)
  for t, (ref_fast, ref_slow) in enumerate(reference_fragments(k, n, 0.5, params, steps)):
    chex.assert_trees_all_close(fasts[t], ref_fast, rtol=2e-5, atol=2e-6, custom_message=f"fast, step {t}")
    chex.assert_trees_all_close(states[t].slow, ref_slow, rtol=2e-5, atol=2e-6, custom_message=f"slow, step {t}")
  ids = _streaming.assign("t", n, params)
  synced = set()
  for t in range(steps):  # right after its sync, a fragment's fast weights are its slow weights, bit for bit
    j = int(_streaming.syncing(jnp.int32(t % k), k, n))
    for f, s, i in zip(jax.tree.leaves(fasts[t]), jax.tree.leaves(states[t].slow), ids):
      if i == j:
        np.testing.assert_array_equal(f, s)
        synced.add(i)
  assert synced == set(range(n))


def test_fragments_called_eagerly_follow_the_jitted_trajectory():
  """Outside jit, only the fragment that synced takes its slow weights from the caller's sum; the others keep
  theirs (eager and jitted runs agree to rounding)."""
  params, k, n, steps = make_params(), 6, 2, 14
  opt = lookahead(optax.sgd(INNER_LR), k, 0.5, schedule=streaming(n))
  jitted_fasts, jitted_states = run(opt, params, quadratic_grad, steps)
  eager_fasts, eager_states = run(opt, params, quadratic_grad, steps, jit=False)
  for t in range(steps):
    close = dict(rtol=1e-6, atol=1e-7, custom_message=f"step {t}")
    chex.assert_trees_all_close(eager_fasts[t], jitted_fasts[t], **close)
    chex.assert_trees_all_close(eager_states[t].slow, jitted_states[t].slow, **close)


def test_constant_alpha_with_fragments_moves_each_fragment_at_its_own_syncs():
  """With fragments and a constant alpha the state's alpha records the step size; syncs count every fragment's sync."""
  params, k, n, steps = make_params(), 5, 3, 10
  _, states = run(lookahead(optax.sgd(INNER_LR), k, 0.3, schedule=streaming(n)), params, quadratic_grad, steps)
  syncs = [int(s.syncs) for s in states]
  expected = [sum(int(_streaming.syncing(jnp.int32(u % k), k, n)) < n for u in range(t + 1)) for t in range(steps)]
  assert syncs == expected
  assert float(states[-1].alpha) == pytest.approx(0.3)


# --------------------------------------------- Streaming DiLoCo, replicas


def reference_streaming(n, k, dtype, error_feedback, delay, mixing, params, replicas, steps):
  """Streaming DiLoCo as a Python loop over replicas, leaves and fragments (numpy; narrow formats by ml_dtypes).

  Returns per step ``(fast, slow, residual)``: the M fast weights, the slow weights, and per replica the error
  feedback residual (zeros without error feedback), each shaped like the params.
  """
  ids = _streaming.assign("t", n, params)
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
      if (t - (j * k) // n) % k != k - 1:
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
    out.append(
      (
        [jax.tree.unflatten(structure, f) for f in fast],
        jax.tree.unflatten(structure, slow),
        [jax.tree.unflatten(structure, [r.copy() for r in res]) for res in residual],
      )
    )
  return out


def train_replicas(opt, params, replicas, steps):
  step = replica_step(opt)
  stacked = stack_replicas(params, replicas)
  state = jax.vmap(opt.init)(stacked)
  out = []
  for t in range(steps):
    stacked, state = step(stacked, state, t, jnp.arange(replicas))
    out.append((stacked, state))
  return out


CASES = [  # (fragments, k, communication dtype, error_feedback, delay, mixing)
  (2, 4, None, False, 0, None),
  (3, 4, "bfloat16", False, 0, None),
  (2, 4, "int8", True, 0, None),
  (2, 4, "float8_e4m3fn", False, 0, None),
  (1, 4, "float8_e5m2", True, 1, None),
  (2, 4, None, False, 1, None),
  (3, 4, "int8", False, 1, None),
  (2, 4, "int8", True, 1, 0.3),  # mixing other than the default 0.5
  (3, 5, None, False, 1, 0.3),  # and fragment offsets (j k) // F = 0, 1, 3, not j (k // F) = 0, 1, 2
  (3, 5, "bfloat16", True, 0, None),
]


def case_id(case):
  n, k, dtype, ef, delay, mixing = case
  return f"F{n}-k{k}-{dtype or 'float32'}-{'ef' if ef else 'no_ef'}-delay{delay}" + (f"-mix{mixing}" if mixing else "")


@pytest.mark.parametrize("n,k,dtype,error_feedback,delay,mixing", CASES, ids=[case_id(c) for c in CASES])
def test_streaming_diloco_matches_the_reference(n, k, dtype, error_feedback, delay, mixing):
  params, replicas, steps = make_params(), 3, 11
  opt = streaming_diloco(k, n, dtype, error_feedback, delay, mixing)
  ours = train_replicas(opt, params, replicas, steps)
  weight = 0.5 if mixing is None else mixing
  ref = reference_streaming(n, k, dtype, error_feedback, delay, weight, params, replicas, steps)
  for t, ((stacked, state), (ref_fast, ref_slow, ref_residual)) in enumerate(zip(ours, ref, strict=True)):
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
      if error_feedback:
        chex.assert_trees_all_close(
          jax.tree.map(lambda x: x[m], residuals(state, n)),
          ref_residual[m],
          rtol=1e-4,
          atol=1e-6,
          custom_message=f"error-feedback residual, replica {m}, step {t}",
        )
  final = ours[-1][1]
  slow = final.slow
  chex.assert_trees_all_equal(slow, jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), slow))  # shared
  if error_feedback:
    assert any(float(jnp.abs(r).max()) > 0 for r in jax.tree.leaves(residuals(final, n)))
  else:  # no residual kept: every fragment's ReplicaMeanState holds EmptyState()
    per_fragment = [final.outer_state] if n == 1 else list(final.outer_state)
    assert all(isinstance(s[0].residual, optax.EmptyState) for s in per_fragment)


def test_diloco_is_the_assembled_pieces_bitwise():
  """diloco(..., fragments, communication_dtype, error_feedback, delay, mixing) is replica_mean + Nesterov + streaming."""
  params, replicas, k, steps = make_params(), 3, 5, 8
  ours = diloco(
    optax.adam(INNER_LR), k, LR, MU, fragments=3, communication_dtype="int8", error_feedback=True, delay=1, mixing=0.3
  )
  assembled = streaming_diloco(k, 3, "int8", True, 1, 0.3)
  for (a, sa), (b, sb) in zip(
    train_replicas(ours, params, replicas, steps), train_replicas(assembled, params, replicas, steps)
  ):
    chex.assert_trees_all_equal((a, sa), (b, sb))


def test_one_fragment_full_precision_no_delay_is_plain_diloco_bitwise():
  params, replicas, k, steps = make_params(), 3, 4, 9
  plain = train_replicas(diloco(optax.adam(INNER_LR), k, LR, MU), params, replicas, steps)
  for opt in (
    diloco(optax.adam(INNER_LR), k, LR, MU, fragments=1, communication_dtype=None, delay=0),
    diloco(optax.adam(INNER_LR), k, LR, MU, fragments=jax.tree.map(lambda _: 0, params), communication_dtype="float32"),
    lookahead(optax.adam(INNER_LR), k, outer=optax.chain(replica_mean("replica"), nesterov()), schedule=streaming()),
    lookahead(optax.adam(INNER_LR), k, outer=optax.chain(replica_mean("replica", dtype="float32"), nesterov())),
  ):
    for (a, sa), (b, sb) in zip(plain, train_replicas(opt, params, replicas, steps), strict=True):
      chex.assert_trees_all_equal((a, sa.slow, sa.outer_state), (b, sb.slow, sb.outer_state))


def test_each_fragment_has_its_own_outer_state_moving_only_at_its_syncs():
  params, replicas, k, n = make_params(), 2, 4, 2
  opt = diloco(optax.adam(INNER_LR), k, LR, MU, fragments=n)
  ids = _streaming.assign("t", n, params)
  runs = train_replicas(opt, params, replicas, 2 * k)
  for t in range(1, 2 * k):
    before, after = runs[t - 1][1].outer_state, runs[t][1].outer_state
    j = int(_streaming.syncing(jnp.int32(t % k), k, n))
    for f in range(n):
      moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[f]), jax.tree.leaves(after[f]))]
      assert any(moved) == (f == j), (t, f, j)
      trace = jax.tree.leaves(after[f][1])  # the Nesterov trace: the fragment's own leaves only
      assert len(trace) == sum(i == f for i in ids)


def test_delayed_exchange_does_not_depend_on_the_gradient():
  """With delay=1 no collective's input depends on this step's gradient; with delay=0 they do."""
  params = make_params()
  mesh = jax.make_mesh((1,), ("replica",))

  def program(delay, dtype):
    opt = streaming_diloco(4, 2, dtype, False, delay)

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


def perturbed_after_a_sync(opt, k, n, replicas=3, steps=None):
  """Train over replicas; right after fragment 0's first sync add 0.1 to every param (outside the optimizer).

  Returns the per-leaf misplaced counts of each replica, and the messages of the LookaheadPlacementWarnings
  given when the host reads the state at the end.
  """
  params = make_params()
  sync = next(t for t in range(k) if int(_streaming.syncing(jnp.int32(t), k, n)) == 0)

  step = replica_step(opt)
  stacked = stack_replicas(params, replicas)
  state = jax.vmap(opt.init)(stacked)
  for t in range(steps or 2 * k):
    stacked, state = step(stacked, state, t, jnp.arange(replicas))
    if t == sync:
      stacked = jax.tree.map(lambda x: x + 0.1, stacked)
  counts = np.asarray(state.misplaced)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    find_lookahead_state(state)
  return counts, [str(w.message) for w in caught if issubclass(w.category, LookaheadPlacementWarning)]


@pytest.mark.parametrize("n", [1, 2])
def test_placement_is_checked_with_delay_0_and_not_with_delay_1(n):
  """delay=1 lands the fast weights between the slow weights and this step's own: no check (it would false-alarm).

  The same perturbation of the params right after a sync is reported with delay=0, at the fragment's next update.
  """
  k = 4
  counts, reported = perturbed_after_a_sync(streaming_diloco(k, n, delay=0), k, n)
  ids = np.asarray(_streaming.assign("t", n, make_params()))
  np.testing.assert_array_equal(counts, np.broadcast_to((ids == 0).astype(np.int32), counts.shape))  # fragment 0
  assert (
    len(reported) == 1 and "lookahead: at the start of 1 cycle(s) the params passed to update differed" in (reported[0])
  )
  counts, reported = perturbed_after_a_sync(streaming_diloco(k, n, delay=1, mixing=0.3), k, n)
  assert not counts.any() and reported == []


# ------------------------------------------------------- force_sync


@pytest.mark.parametrize("k,n", [(6, 3), (5, 3)])
def test_force_sync_syncs_every_fragment(k, n):
  params = make_params()
  opt = lookahead(optax.sgd(INNER_LR), k, 0.5, schedule=streaming(n))
  fasts, states = run(opt, params, quadratic_grad, 2)
  state, synced = force_sync(states[-1], fasts[-1], opt)
  chex.assert_trees_all_equal(synced, find_lookahead_state(state).slow)
  # every fragment took its slow step at these params: slow = old slow + 0.5 (fast - old slow)
  expected = jax.tree.map(lambda s, f: s + 0.5 * (f - s), states[-1].slow, fasts[-1])
  chex.assert_trees_all_close(find_lookahead_state(state).slow, expected, rtol=2e-6, atol=1e-7)
