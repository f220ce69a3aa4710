"""Three edge cases of the core under SPMD (each failed before the fix that came with it).

1. DiLoCo (``replica_mean`` chained in front of the outer step, ``diloco``) under
   ``jax.shard_map`` with the default ``check_vma=True``: a value that is a
   constant in the sync branch is per-replica in the stored state (the fix was
   made for the 0.1 alpha), so ``lax.cond`` rejects the branches unless they are
   typed alike.
2. ``inner_state_policy="reset"`` called eagerly under an explicit-sharding mesh: the
   fresh ``inner.init(params)`` inside the cond loses the params' sharding type.
3. DiLoCo fast weights after a sync: documented as the slow weights "up to one
   rounding"; the old formula was off by up to 7 ulps.
"""


def test_diloco_under_shard_map_with_check_vma(diloco_results):
  out = diloco_results["diloco/shard_map_check_vma"]
  assert out["slow_identical_across_replicas"] and out["max_diff_vs_reference"] <= 1e-6


def test_reset_policy_eager_update_under_explicit_sharding(lookahead_results):
  out = lookahead_results["explicit"]
  assert "reset" not in out["eager_update_error"], out["eager_update_error"].get("reset")
  assert out["jit_update_vs_update"]["reset"]


def test_diloco_fast_weights_within_one_rounding_after_sync(diloco_results):
  for mode in ("pmap", "shard_map"):
    out = diloco_results[f"diloco/{mode}"]
    assert out["fast_vs_slow_max_ulps_after_sync"] <= 1.0, out["fast_vs_slow_max_ulps_after_sync"]
