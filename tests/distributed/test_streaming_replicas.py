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

import pytest

from tests.distributed.streaming_checks import CASES, FRAGMENT_IDS, SHAPES, case_name
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
  """
  out = []
  for j in range(n):
    shapes = [s for s, i in zip(SHAPES.values(), FRAGMENT_IDS[n]) if i == j]
    if dtype is None:
      out.append(sorted(("all-reduce", math.prod(s), 4 * math.prod(s)) for s in shapes))
      continue
    ops = []
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
  if dtype is None:
    assert all([c["op"] for c in g] == ["all-reduce"] for g in groups.values())  # one per fragment
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
  # int8, values and scales: all-to-all and all-gather for a and c (reduce-scatter), all-gather for b and d
  assert len(depends) == 12
  assert set(depends.values()) == {not delay}


def test_single_process_run_of_the_gloo_case_matches_reference(streaming_results):
  out = streaming_results["gloo_reference"]
  assert max(out["fraction_off"].values()) <= FLIPPED_FRACTION and max(out["max_diff"].values()) <= FLIPPED_MAX
  assert out["slow_identical_across_replicas"] and out["residual_nonzero"]
