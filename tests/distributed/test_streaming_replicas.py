"""Streaming DiLoCo (``diloco(..., fragments, communication_dtype, error_feedback, delay)``) on 8 simulated devices.

The runs happen once, in a subprocess (``streaming_checks.py``), under ``jax.shard_map`` (typed, per-replica
specs) and ``jax.pmap``, against Streaming DiLoCo written independently there: 8 replica copies in a numpy
loop, the narrow formats by ``ml_dtypes``. The compiled shard_map steps are read there too.

How strict: with a float32 exchange every weight of every replica, every step, is within 1e-6 of the
reference (float32 rounding). A compressed exchange rounds each replica's pseudo-gradient to a narrow format,
and the mean of a reduce-scattered matrix once more: where XLA and numpy round a float32 operation
differently (XLA contracts multiply-adds, sums in another order), a value next to a rounding boundary of the
narrow format rounds the other way, by one quantum, and that element stays apart.
So at most 0.1% of the elements may be more than 1e-6 off, and none more than 1e-2. Each of the bugs planted
in the reference while writing these checks (no error feedback, a per-tensor scale, mixing 0.5 for 0.25,
fragments swapped, delay 0, no bfloat16 cast) put 28% to 90% of the elements off; moving one leaf to the
other fragment put 0.3% off, by up to 0.1.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tests.distributed.streaming_checks import (
  CASES,
  EAGER_CASES,
  EXCHANGE_REPLICAS,
  EXCHANGE_SHAPES,
  EXCHANGES,
  FRAGMENT_IDS,
  SHAPES,
  case_name,
)
from tests.references import reference_block_rows

EXACT = 1e-6
FLIPPED_FRACTION, FLIPPED_MAX = 1e-3, 1e-2  # a compressed exchange: elements rounded the other way, and by how much
NARROW = ("float8_e4m3fn", "float8_e5m2", "int8")  # scaled per row: the float32 scales travel with the values
ITEMSIZE = {None: 4, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
SHARD_MAP = [c for c in CASES if c[0] == "shard_map"]
REPLICAS = 8  # the simulated devices of streaming_checks.py


def ids(cases):
  return [case_name(*c) for c in cases]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(streaming_results, case):
  """Every replica's fast and slow weights (and error-feedback residual), every step, vs the reference loop."""
  out = streaming_results[case_name(*case)]
  diff, off = out["max_diff"], out["fraction_off"]
  if case[2] is None:
    assert max(diff.values()) <= EXACT, diff
  else:
    assert max(off.values()) <= FLIPPED_FRACTION, off
    assert max(diff.values()) <= FLIPPED_MAX, diff
  assert out["residual_nonzero"] == case[3]  # error feedback kept something, and only with error feedback


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_slow_weights_identical_across_replicas(streaming_results, case):
  out = streaming_results[case_name(*case)]
  assert out["slow_identical_across_replicas"]  # bitwise, every step
  assert out["replicas_differ"]  # while each replica's fast weights are its own


def test_one_fragment_full_precision_no_delay_is_plain_diloco_bitwise(streaming_results):
  out = streaming_results[case_name("shard_map", 1, None, False, 0)]
  assert out["bitwise_equal_to_plain_diloco"]  # every replica's fast and slow weights, every step


def expected_exchange(n, dtype):
  """Per fragment, sorted: ``(op, elements, bytes)`` of each collective its exchange runs.

  float32: one all-reduce, its operands the fragment's leaves. Compressed, per leaf: a matrix that goes by reduce-scatter
  (blocks of rows, one per replica, the last padded with zero rows) has an all-to-all of its padded values and
  an all-gather of one block, each with the blocks' per-row scales for float8 and int8; any other leaf has an
  all-gather of its values (and scales). With 8 replicas, a (200 rows) and c (30 rows) go by reduce-scatter.
  Before the values, who takes part: one all-reduce of two float32 (the weight present, the replicas left out)
  and, compressed, an all-gather of each replica's weight.
  """
  out = []
  for j in range(n):
    shapes = [s for s, i in zip(SHAPES.values(), FRAGMENT_IDS[n]) if i == j]
    if dtype is None:
      out.append(sorted([("all-reduce", 2, 8)] + [("all-reduce", math.prod(s), 4 * math.prod(s)) for s in shapes]))
      continue
    ops = [("all-reduce", 2, 8), ("all-gather", 1, 4)]
    for shape in shapes:
      rows, cols = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (1, math.prod(shape))
      block = reference_block_rows(shape, REPLICAS)
      # XLA's all-to-all takes one operand per destination replica: a block each
      moves = [("all-to-all", block)] * REPLICAS + [("all-gather", block)] if block else [("all-gather", rows)]
      for op, r in moves:
        ops.append((op, r * cols, ITEMSIZE[dtype] * r * cols))
        if dtype in NARROW:
          ops.append((op, r, 4 * r))
    out.append(sorted(ops))
  return out


def exchanges(out):
  """The collectives of the compiled step, grouped by the conditional branch they run in (the innermost)."""
  groups = {}
  for c in out["collectives"]:
    groups.setdefault(tuple(c["branches"][-1]) if c["branches"] else None, []).append(c)
  return groups


@pytest.mark.parametrize("case", SHARD_MAP, ids=ids(SHARD_MAP))
def test_each_fragment_exchanged_once_inside_its_own_branch(streaming_results, case):
  """The compiled step: each fragment's collectives sit in a sync branch of their own, none elsewhere.

  Each branch runs exactly the collectives of ``expected_exchange`` (op and element count of each operand).
  """
  _, n, dtype, _, _ = case
  out = streaming_results[case_name(*case)]
  groups = exchanges(out)
  assert None not in groups, groups[None]  # no collective on the path of every step
  assert len(groups) == n
  carried = sorted(
    sorted((c["op"], math.prod(shape)) for c in g for _, shape in c["operands"]) for g in groups.values()
  )
  assert carried == sorted([(op, elements) for op, elements, _ in e] for e in expected_exchange(n, dtype))
  if dtype is None:  # per fragment: all-reduces only (who takes part, then the values)
    assert all({c["op"] for c in g} == {"all-reduce"} for g in groups.values())
  # each fragment's exchange in a conditional of its own, whose other branch (no sync) runs no collective
  outers = {c["branches"][0][0] for c in out["collectives"]}
  assert len(outers) == n
  for o in outers:
    assert len({c["branches"][0][1] for c in out["collectives"] if c["branches"][0][0] == o}) < out["branch_counts"][o]


@pytest.mark.parametrize("case", SHARD_MAP, ids=ids(SHARD_MAP))
def test_bytes_on_the_wire_are_the_communication_dtype(streaming_results, case):
  """Per fragment, the collective operands' bytes: its values in the chosen dtype, its scales in float32."""
  _, n, dtype, _, _ = case
  out = streaming_results[case_name(*case)]
  carried = sorted(sum(c["wire_bytes"] for c in g) for g in exchanges(out).values())
  assert carried == sorted(sum(b for _, _, b in e) for e in expected_exchange(n, dtype))


@pytest.mark.parametrize("case", SHARD_MAP, ids=ids(SHARD_MAP))
def test_non_sync_step_no_costlier_than_plain_diloco(streaming_results, case):
  """Outside the sync branches, the step moves no more param-sized bytes and copies no more than plain DiLoCo's."""
  out, plain = streaming_results[case_name(*case)], streaming_results["shard_map/plain_diloco"]
  assert out["entry_param_sized_copies"] <= plain["entry_param_sized_copies"]
  assert out["entry_param_sized_bytes"] <= plain["entry_param_sized_bytes"]


@pytest.mark.parametrize("delay", [0, 1])
def test_delayed_exchange_does_not_wait_for_the_gradient(streaming_results, delay):
  """Typed shard_map, per-replica specs: with delay=1 no collective's input depends on the gradient."""
  depends = streaming_results[f"delay_dependency/delay{delay}"]["depends_on_gradient"]
  # int8, values and scales: all-to-all and all-gather for a and c (reduce-scatter), all-gather for b and d;
  # and per fragment (2) who takes part: an all-reduce (psum) and an all-gather of the weights
  assert len(depends) == 16
  assert set(depends.values()) == {not delay}


def test_single_process_run_of_the_gloo_case_matches_reference(streaming_results):
  out = streaming_results["gloo_reference"]
  assert max(out["fraction_off"].values()) <= FLIPPED_FRACTION and max(out["max_diff"].values()) <= FLIPPED_MAX
  assert out["slow_identical_across_replicas"] and out["residual_nonzero"]


# ------------------------------------------- the exchange's paths on 4 replicas (streaming_checks.py "exchange")
# DiLoCo (F=1, delay 0) whose outer is chain(replica_mean(dtype, error_feedback, top_k), Nesterov); the bytes are
# those of the collective operands in the compiled step, as in test_bytes_on_the_wire_are_the_communication_dtype.

BOOKKEEPING = [("all-reduce", 8), ("all-gather", 4)]  # who takes part: (weight present, left out); each weight


def dense_operands(dtype):
  """``(op, bytes)`` of each collective operand of a full-precision or compressed dense exchange, counted by hand.

  float32: one all-reduce of the leaves (and of the bookkeeping pair; the weights' all-gather is not needed).
  Compressed, per leaf, each row's values (int8: a byte each; int4: two to a byte) and its float32 scale: a
  matrix of more than 2 blocks of ceil(R / 4) rows sends all 4 blocks (all-to-all: an operand each, the last
  padded) then gathers one; a vector (one row) or scalar (one row of one value) is all-gathered whole.
  """
  if dtype is None:
    return [("all-reduce", 8)] + [("all-reduce", 4 * math.prod(s)) for s in EXCHANGE_SHAPES.values()]
  out = list(BOOKKEEPING)
  for shape in EXCHANGE_SHAPES.values():
    rows, cols = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (1, math.prod(shape))
    row_bytes = -(-cols // 2) if dtype == "int4" else cols
    block = -(-rows // EXCHANGE_REPLICAS)
    if 2 * block < rows:  # reduce-scatter, then all-gather
      out += [("all-to-all", block * row_bytes), ("all-to-all", 4 * block)] * EXCHANGE_REPLICAS
      out += [("all-gather", block * row_bytes), ("all-gather", 4 * block)]
    else:
      out += [("all-gather", rows * row_bytes), ("all-gather", 4 * rows)]
  return out


def top_k_operands(dtype, fraction):
  """``(op, bytes)`` per operand of a top-k exchange, by hand: per leaf ceil(fraction * n) values (float32, int8, or
  int4 two to a byte) and as many int32 positions, and with a dtype one float32 scale, all all-gathered."""
  out = list(BOOKKEEPING)
  for shape in EXCHANGE_SHAPES.values():
    kept = max(1, math.ceil(Fraction(str(fraction)) * math.prod(shape)))  # exact: no float rounding up
    values = {None: 4 * kept, "int8": kept, "int4": -(-kept // 2)}[dtype]
    out += [("all-gather", values), ("all-gather", 4 * kept)] + ([("all-gather", 4)] if dtype else [])
  return out


def wire(exchange_results, name):
  """Per collective operand, ``(op, bytes)``, sorted; every collective in a sync branch, none on every step."""
  collectives = exchange_results[f"exchange/{name}"]["collectives"]
  assert collectives and all(c["branches"] for c in collectives), [c for c in collectives if not c["branches"]]
  size = {"f32": 4, "s32": 4, "s8": 1, "u8": 1}
  return sorted((c["op"], size[t] * math.prod(shape)) for c in collectives for t, shape in c["operands"])


def ratio(exchange_results, name):
  total = lambda n: sum(b for _, b in wire(exchange_results, n))
  return total(name) / total("float32")


@pytest.mark.parametrize("name", [n for n, (_, top_k) in EXCHANGES.items() if top_k is None])
def test_dense_exchange_bytes_are_counted_by_hand(exchange_results, name):
  """float32, int8 and int4 with error feedback: each collective operand's bytes, as dense_operands counts them."""
  assert wire(exchange_results, name) == sorted(dense_operands(EXCHANGES[name][0]))


def test_int4_exchange_moves_at_most_a_fifth_of_float32(exchange_results):
  # by hand (dense_operands): 20651 / 119740 bytes, 0.172; int8 39361 / 119740, 0.329
  assert ratio(exchange_results, "int4") <= 1 / 5
  assert ratio(exchange_results, "int4") < ratio(exchange_results, "int8") < 1 / 3


@pytest.mark.parametrize("name", [n for n, (_, top_k) in EXCHANGES.items() if top_k is not None])
def test_top_k_exchange_bytes_are_counted_by_hand(exchange_results, name):
  """top_k=0.02 (float32, int8 and int4 values): each leaf's kept values and positions (and scale), all-gathered.

  By hand: float32 4820 bytes (0.040 of the float32 exchange), int8 3037 (0.025), int4 2737 (0.023): the int32
  positions are 2404 of them.
  """
  assert wire(exchange_results, name) == sorted(top_k_operands(*EXCHANGES[name]))
  assert {op for op, _ in wire(exchange_results, name)} == {"all-reduce", "all-gather"}


@pytest.mark.parametrize("name", sorted(EAGER_CASES))
def test_eager_updates_do_not_wait_for_the_exchange(exchange_results, name):
  """eager=True: the returned updates depend on no collective's result of the step; with delay=1 no collective's
  input depends on the gradient either, so the whole exchange may overlap the step.

  The controls: eager under delay=0 (every collective waits for the gradient) and delay=1 without eager (the
  updates wait for every collective) show that each walk finds what it looks for.
  """
  dtype, top_k, eager, delay = EAGER_CASES[name]
  out = exchange_results[name]
  # int4, values and scales: 4 per reduce-scattered matrix (a, b, c), 2 for v and s; top-k int8: 3 per leaf;
  # and who takes part: a psum and an all-gather of the weights
  assert len(out["depends_on_gradient"]) == 2 + (3 * 5 if top_k else 4 * 3 + 2 * 2)
  assert set(out["depends_on_gradient"].values()) == {not delay}
  if eager:
    assert out["updates_wait_for"] == []
  else:
    assert sorted(out["updates_wait_for"]) == sorted(out["depends_on_gradient"])
