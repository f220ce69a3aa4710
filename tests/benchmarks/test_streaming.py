"""Streaming DiLoCo benchmark: the bytes it reports against sizes computed by hand, and its sync counts against a run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.common import jaxpr
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


@pytest.mark.parametrize("fragments", [1, 2])
def test_full_precision_diloco_sends_each_fragment_once_per_cycle(fragments):
  comm = streaming.communication(streaming.Method(fragments), PARAMS, CFG)
  assert comm["every_step_operand_bytes"] == 0
  assert sum(comm["sync_operand_bytes"]) == 4 * N  # every param exactly once, in float32
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * 2 * (M - 1) / M * 4 * N)
  assert comm["peak_sent_bytes"] == pytest.approx(2 * (M - 1) / M * max(comm["sync_operand_bytes"]))


def test_int8_exchange_sends_one_byte_per_value_and_a_float32_scale_per_row():
  comm = streaming.communication(streaming.Method(1, "int8+EF"), PARAMS, CFG)
  # Over 4 replicas, a (6 rows) and c (3 rows) go by reduce-scatter: an all-to-all of their rows padded to blocks
  # of 2 and 1 rows, then an all-gather of one block, each with one float32 scale per row. b and d (vectors, one
  # scale each) are all-gathered whole.
  a2a = [(8 * 5, 8), (4 * 4, 4)]  # (int8 values, scales) of a, c
  ag = [(2 * 5, 2), (1 * 4, 1), (7, 1), (9, 1)]  # one block of a, of c; b; d
  nbytes = lambda v, r: v + 4 * r
  assert comm["sync_operand_bytes"] == [sum(nbytes(*x) for x in a2a + ag)]
  sent = sum((M - 1) / M * nbytes(*x) for x in a2a) + sum((M - 1) * nbytes(*x) for x in ag)
  assert sent == 228  # against 348 for the float32 all-reduce, 2 (M-1)/M * 4 N
  assert comm["total_sent_bytes"] == pytest.approx(CFG["steps"] // CFG["k"] * sent)


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


def test_fewer_than_two_seeds_is_refused_by_name(capsys):
  with pytest.raises(SystemExit):
    streaming.main(["--seeds", "1", "--report-only"])
  assert "--seeds must be at least 2" in capsys.readouterr().err
