"""Streaming DiLoCo benchmark: the bytes it reports against sizes computed by hand, and its sync counts against a run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.common import grid, jaxpr
from benchmarks.outer import diloco as dl
from benchmarks.outer import streaming
from lookahead_optax import slow_params

M = 4
CFG = dict(streaming.QUICK, replicas=M, steps=40, k=10)
PARAMS = {"a": jnp.zeros((6, 5)), "b": jnp.zeros(7), "c": jnp.zeros((3, 4)), "d": jnp.zeros(9)}
N = 6 * 5 + 7 + 3 * 4 + 9


def test_ring_bytes_of_an_all_reduce_an_all_gather_and_an_all_to_all():
  assert jaxpr.ring_bytes_sent("psum", 400, 4) == 600.0  # 2 (M-1)/M * P
  assert jaxpr.ring_bytes_sent("all_gather", 100, 4) == 300  # (M-1) * c
  assert jaxpr.ring_bytes_sent("all_to_all", 400, 4) == 300.0  # (M-1)/M * P


def test_collectives_are_grouped_by_top_level_cond_and_sized_by_their_operands():
  def program(x, sync):
    x = jax.lax.psum(x, "r")  # every step: 3 float32 = 12 bytes
    x = jax.lax.cond(sync, lambda y: jax.lax.pmean(y, "r"), lambda y: y, x)  # group 0, branch 1 (the true branch)
    x = jax.lax.cond(sync, lambda y: y, lambda y: y * 2, x)  # no collective: not a group
    g = jax.lax.cond(
      sync, lambda y: jax.lax.all_gather(y.astype(jnp.int8), "r").sum(0).astype(y.dtype), lambda y: y, x
    )  # group 1, branch 1: 3 int8
    return g

  found = jaxpr.collectives(jax.make_jaxpr(program, axis_env=[("r", 4)])(jnp.ones(3), True))
  assert [(g, b, nbytes) for g, b, _, nbytes in found] == [(None, None, 12), (0, 1, 12), (1, 1, 3)]


def test_data_parallelism_sends_a_float32_all_reduce_every_step():
  comm = streaming.communication(streaming.Method(0), PARAMS, CFG)
  per_step = 2 * (M - 1) / M * 4 * N
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] * per_step)
  assert comm["peak_sent_bytes"] == pytest.approx(per_step)


BOOKKEEPING = (8, 4)
"""Operand bytes of every round of the exchange besides the values: an all-reduce of 2 float32 (the weight present,
the count of replicas left out) and an all-gather of one float32 (this replica's weight)."""
BOOKKEEPING_SENT = 2 * (M - 1) / M * 8 + (M - 1) * 4  # 12 + 12 bytes per replica per round


@pytest.mark.parametrize("fragments", [1, 2])
def test_full_precision_diloco_sends_each_fragment_once_per_cycle_and_states_its_bookkeeping(fragments):
  comm = streaming.communication(streaming.Method(fragments), PARAMS, CFG)
  values = [4 * N] if fragments == 1 else [4 * 30, 4 * (7 + 12 + 9)]  # float32; fragments: a | b, c, d
  assert comm["every_step_operand_bytes"] == 0
  assert comm["sync_operand_bytes"] == [v + sum(BOOKKEEPING) for v in values]
  per_sync = [2 * (M - 1) / M * v + BOOKKEEPING_SENT for v in values]
  assert BOOKKEEPING_SENT == 24
  assert comm["sync_sent_bytes"] == pytest.approx(per_sync)
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * sum(per_sync))
  assert comm["peak_sent_bytes"] == pytest.approx(max(per_sync))


def test_int8_exchange_sends_one_byte_per_value_and_a_float32_scale_per_row():
  comm = streaming.communication(streaming.Method(1, "int8+EF"), PARAMS, CFG)
  # Over 4 replicas, a (6 rows) and c (3 rows) go by reduce-scatter: an all-to-all of their rows padded to blocks
  # of 2 and 1 rows, then an all-gather of one block, each with one float32 scale per row. b and d (vectors, one
  # scale each) are all-gathered whole.
  a2a = [(8 * 5, 8), (4 * 4, 4)]  # (int8 values, scales) of a, c
  ag = [(2 * 5, 2), (1 * 4, 1), (7, 1), (9, 1)]  # one block of a, of c; b; d
  nbytes = lambda v, r: v + 4 * r
  assert comm["sync_operand_bytes"] == [sum(nbytes(*x) for x in a2a + ag) + sum(BOOKKEEPING)]
  sent = sum((M - 1) / M * nbytes(*x) for x in a2a) + sum((M - 1) * nbytes(*x) for x in ag) + BOOKKEEPING_SENT
  assert sent == 252  # against 348 + 24 for the float32 all-reduce, 2 (M-1)/M * 4 N plus the bookkeeping
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * sent)


@pytest.mark.parametrize("exchange", ["int4", "int4+EF"])
def test_int4_exchange_sends_half_a_byte_per_value_and_a_float32_scale_per_row(exchange):
  comm = streaming.communication(streaming.Method(1, exchange), PARAMS, CFG)
  # As int8, with rows of n values packed into ceil(n / 2) bytes: a's rows of 5 in 3 bytes, c's rows of 4 in 2, the
  # vectors b (7) in 4 bytes and d (9) in 5.
  a2a = [(8 * 3, 8), (4 * 2, 4)]
  ag = [(2 * 3, 2), (1 * 2, 1), (4, 1), (5, 1)]
  nbytes = lambda v, r: v + 4 * r
  assert comm["sync_operand_bytes"] == [sum(nbytes(*x) for x in a2a + ag) + sum(BOOKKEEPING)]
  sent = sum((M - 1) / M * nbytes(*x) for x in a2a) + sum((M - 1) * nbytes(*x) for x in ag) + BOOKKEEPING_SENT
  assert sent == 195
  assert comm["sync_sent_bytes"] == pytest.approx([sent])
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * sent)


@pytest.mark.parametrize(
  "exchange, value_bytes, scale_bytes",
  [
    ("top10%", lambda c: 4 * c, 0),  # float32 values, no scale
    ("top10%+EF", lambda c: 4 * c, 0),
    ("top10% int8", lambda c: c, 4),  # one float32 scale per leaf
    ("top10% int4+EF", lambda c: -(-c // 2), 4),  # two values a byte
  ],
)
def test_top_k_exchange_all_gathers_values_int32_positions_and_a_scale_per_leaf(exchange, value_bytes, scale_bytes):
  comm = streaming.communication(streaming.Method(1, exchange), PARAMS, CFG)
  kept = [3, 1, 2, 1]  # ceil(0.1 * size), at least 1, of a (30), b (7), c (12), d (9)
  operand = sum(value_bytes(c) + 4 * c + scale_bytes for c in kept)
  assert comm["sync_operand_bytes"] == [operand + sum(BOOKKEEPING)]
  sent = (M - 1) * operand + BOOKKEEPING_SENT  # every piece all-gathered
  assert comm["sync_sent_bytes"] == pytest.approx([sent])
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * sent)
  assert comm["peak_sent_bytes"] == pytest.approx(sent)


def test_exchange_names_parse_into_dtype_error_feedback_and_fraction():
  assert streaming.codec("float32") == (None, False, None)
  assert streaming.codec("int8+EF") == ("int8", True, None)
  assert streaming.codec("top2%") == (None, False, 0.02)
  assert streaming.codec("top1%+EF") == (None, True, 0.01)
  assert streaming.codec("top2% int4+EF") == ("int4", True, 0.02)


def test_eager_exchange_sends_what_the_same_exchange_sends_at_once():
  for fragments in (1, 2):
    eager = streaming.communication(streaming.Method(fragments, "int8+EF", eager=True), PARAMS, CFG)
    plain = streaming.communication(streaming.Method(fragments, "int8+EF"), PARAMS, CFG)
    assert eager == plain


def test_sync_steps_are_the_steps_at_which_each_fragments_slow_weights_move():
  """Runs Streaming DiLoCo (F=2) on M simulated replicas and records the steps where each leaf's slow weights change."""
  tx = dl.replicated(streaming.per_replica(streaming.Method(2), 0.1, CFG))
  params = jax.tree.map(lambda x: jnp.broadcast_to(x, (M,) + x.shape), PARAMS)
  state = tx.init(params)
  grads = lambda t: jax.tree.map(
    lambda x: jnp.ones_like(x) * (1.0 + jnp.arange(M).reshape((M,) + (1,) * (x.ndim - 1)) + t), params
  )
  step = jax.jit(lambda p, s, t: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(grads(t), s, p)))
  moved = {name: [] for name in PARAMS}
  before = slow_params(state)
  for t in range(CFG["steps"]):
    params, state = step(params, state, t)
    after = slow_params(state)
    for name in PARAMS:
      if not np.array_equal(before[name], after[name]):
        moved[name].append(t)
    before = after
  ids = {"a": 0, "b": 1, "c": 1, "d": 1}  # whole leaves in order, near-equal sizes: 30 | 28 params
  steps = streaming.sync_steps(2, CFG["k"], CFG["steps"])
  assert steps == [[9, 19, 29, 39], [4, 14, 24, 34]]
  assert moved == {name: steps[j] for name, j in ids.items()}


FAULT_CFG = dict(replicas=M, steps=20, k=5, eval_every=5, fault_step=7, weight_decay=0.0)


def tiny_problem() -> grid.Problem:
  """Every replica fits the same target: one replica's NaN is the only thing that tells them apart."""
  return grid.Problem(
    init=lambda seed: {"w": jnp.full((M, 4), float(seed))},
    loss=lambda p, b: jnp.sum((p["w"] - b[None]) ** 2),
    batch=lambda d, key, t: d["target"],
    evaluate=lambda w, d: {},
    data={"target": jnp.arange(4.0)},
  )


@pytest.mark.parametrize("fault, rounds_left_out", [("resume", 1), ("params", 3), ("pmean", None)])
def test_a_replica_gone_nan_is_left_out_and_resumes_only_with_its_moments_repaired(fault, rounds_left_out):
  """Syncs at steps 4, 9, 14, 19; replica 0's gradient is NaN at step 7. Left out at step 9, it resumes from the
  slow weights; with its AdamW moments still NaN (params only) it goes NaN again and stays out (9, 14, 19). A plain
  pmean averages the NaN in: every slow weight is NaN."""
  g, left_out = streaming.train_with_fault(tiny_problem(), streaming.Method(1, fault=fault), 0.1, FAULT_CFG, [0, 1])
  slow = g.weights["main"]["w"]  # [seeds, replicas, 4]
  assert np.isnan(g.losses[:, 8:10]).all() and np.isfinite(g.losses[:, :8]).all()  # replica 0 NaN from step 8
  if fault == "pmean":
    assert np.isnan(slow).all() and left_out.tolist() == [0, 0]
    return
  assert left_out.tolist() == [rounds_left_out] * 2
  assert np.isfinite(slow).all() and np.all(slow == slow[:, :1])  # the same slow weights on every replica
  assert np.isfinite(g.losses[:, 10:]).all() == (fault == "resume")


def test_fewer_than_two_seeds_is_refused_by_name(capsys):
  with pytest.raises(SystemExit):
    streaming.main(["--seeds", "1", "--report-only"])
  assert "--seeds must be at least 2" in capsys.readouterr().err
