"""DiLoCo (``lookahead(..., outer=optax.chain(replica_mean(...), nesterov))`` / ``diloco``) on 8 simulated CPU devices.

The runs happen once, in a subprocess (``multidevice_checks.py diloco``),
against DiLoCo written independently there: 8 replica copies in a Python loop,
each taking its own Adam steps on its own data, the pseudo-gradients averaged
every k steps, a hand-written Nesterov outer step, all replicas reset.

How strict: the slow weights must be bitwise identical on all replicas at
every step (they are computed from one all-reduced value). The fast weights
after a sync are each replica's ``params + update``, and ``params`` differs per
replica, so they match the slow weights only up to rounding; they are held to
the reference DiLoCo trajectory within 1e-6 like every other weight.
"""

from __future__ import annotations

import pytest

TOL = 1e-6


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_matches_reference_diloco(diloco_results, mode):
  out = diloco_results[f"diloco/{mode}"]
  assert out["max_diff_vs_reference"] <= TOL  # slow and every replica's fast weights, every step


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_slow_weights_identical_on_all_replicas(diloco_results, mode):
  assert diloco_results[f"diloco/{mode}"]["slow_identical_across_replicas"]


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_no_all_reduce_outside_the_sync_branch(diloco_results, mode):
  """The optimized HLO: every all-reduce sits in the sync branch of the one conditional that has any."""
  out = diloco_results[f"diloco/{mode}"]
  assert out["hlo_all_reduce_total"] >= 1
  assert out["hlo_all_reduce_outside_conditionals"] == 0
  assert out["hlo_other_collectives_outside_conditionals"] == 0
  with_collectives = [b for b in out["hlo_all_reduce_per_branch"] if sum(b) > 0]
  # a boolean lax.cond lists the false (no-sync) branch first
  assert with_collectives == [[0, out["hlo_all_reduce_total"]]], out["hlo_all_reduce_per_branch"]


def test_jaxpr_collectives_only_in_sync_branch(diloco_results):
  """Before XLA: the pmean of the pseudo-gradient is the only collective, inside the cond's sync branch."""
  out = diloco_results["diloco/shard_map"]
  assert out["jaxpr_collectives_outside_cond"] == 0
  branches = [b for b in out["jaxpr_collectives_per_cond_branch"] if sum(b) > 0]
  assert len(branches) == 1 and branches[0][0] == 0 and branches[0][1] >= 1, out["jaxpr_collectives_per_cond_branch"]


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_outer_state_sharded_like_params_under_fsdp(diloco_results, axis_type):
  """2 DiLoCo replicas x 4-way FSDP: the slow weights and the Nesterov momentum are sharded like the params."""
  out = diloco_results[f"diloco/outer_state_fsdp_{axis_type}"]
  assert out["steps"] == [], out["steps"][:5]  # after every step, every param-shaped state leaf
  assert out["trace_specs"] == out["param_specs"]
  if axis_type == "explicit":
    assert out["init"] == [], out["init"]
  else:  # Auto mode, jitted init: zero-initialised leaves are left to the compiler; the slow copy follows
    assert not [m for m in out["init"] if m.startswith(".slow")], out["init"]


def test_a_bad_replica_is_left_out_and_resumes(diloco_results):
  """8 simulated devices under pmap: NaN gradients on replica 2 (first cycle) and replica 5 (second cycle); each
  sync averages the others, every replica restarts from the slow weights, against the reference loop."""
  out = diloco_results["diloco/bad_replica_pmap"]
  assert out["slow_diff"] <= TOL and out["fast_diff_at_syncs"] <= TOL
  assert out["excluded_at_syncs"][:2] == [1, 2]  # one exclusion per bad cycle, counted on every replica
  assert out["finite"]
