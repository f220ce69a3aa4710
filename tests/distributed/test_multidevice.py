"""Lookahead on 8 simulated CPU devices: pmap, shard_map, sharded jit, explicit sharding.

The runs happen once, in a subprocess (``multidevice_checks.py lookahead``);
each test asserts on what it measured against a single-device run of the same
training. Variants: the three inner-state policies and a Nesterov outer step.
"""

from __future__ import annotations

import pytest

VARIANTS = ("maintain", "reset", "interpolate", "outer")
TOL = 1e-6  # reduction order differs between 1 and 8 devices; nothing else may


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "jit_fsdp", "explicit"])
def test_matches_single_device_run(lookahead_results, mode):
  diffs = lookahead_results[mode]["max_diff_vs_single_device"]
  assert set(diffs) == set(VARIANTS)
  for variant, diff in diffs.items():
    assert diff <= TOL, f"{mode}/{variant}: fast or slow weights differ from the single-device run by {diff:.3g}"


def test_pmap_replicas_bitwise_identical(lookahead_results):
  # params and every state leaf, on all 8 replicas, after every step
  assert lookahead_results["pmap"]["replica_spread"] == 0.0


def test_fsdp_slow_weights_follow_params(lookahead_results):
  out = lookahead_results["jit_fsdp"]
  for variant in VARIANTS:
    # eager init: every param-shaped state leaf (slow, inner, outer) is sharded like its param
    assert out["init"][variant] == [], out["init"][variant]
    # jitted init: the slow copy follows the params (zero-initialised moments are up to the compiler in Auto mode)
    assert out["jit_init_slow"][variant] == [], out["jit_init_slow"][variant]
    # after every jitted step: params keep their sharding, and every param-shaped state leaf matches them
    assert out["steps"][variant] == [], out["steps"][variant][:5]


def test_fsdp_slow_weights_are_sharded_not_gathered(lookahead_results):
  out = lookahead_results["explicit"]
  assert out["slow_types"] == {
    "b1": "float32[8@model]",
    "b2": "float32[4@data]",
    "w1": "float32[16@data,8@model]",
    "w2": "float32[8@model,4@data]",
  }


@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_sharding_types(lookahead_results, variant):
  """The checks optax runs on its own optimizers (sharding in types), on lookahead's state."""
  out = lookahead_results["explicit"]
  assert out["slow_type_is_param_type"][variant]
  assert out["init_vs_jit_init"][variant], "init and jit(init) give different state types"
  assert out["update_vs_init"][variant], "jit(update) changes the state types"
  assert out["every_step_slow_type_is_param_type"]
  if variant == "outer":
    assert out["outer_type_is_param_type"]


@pytest.mark.parametrize("variant", ["maintain", "outer"])
def test_explicit_sharding_eager_update(lookahead_results, variant):
  out = lookahead_results["explicit"]
  assert variant not in out["eager_update_error"], out["eager_update_error"].get(variant)
  assert out["jit_update_vs_update"][variant], "update and jit(update) give different state types"
