"""SNOO and DiLoCo experiments: communication counted from the program, tiny runs through the shared protocol."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import grid, jaxpr, tuning, verdicts
from benchmarks.outer import diloco, snoo
from tests.benchmarks.problems import softmax_regression


def test_count_all_reduces_separates_every_step_from_a_conditional_branch():
  def program(x, sync):
    x = jax.lax.psum(x, "r")  # every step
    x = jax.jit(lambda y: jax.lax.pmean(y, "r"))(x)  # nested, still every step
    return jax.lax.cond(sync, lambda y: jax.lax.pmean(y, "r"), lambda y: 2.0 * y, x)

  closed = jax.make_jaxpr(program, axis_env=[("r", 4)])(jnp.ones(3), True)
  assert jaxpr.count_all_reduces(closed) == {"every_step": 2, "conditional": 1}


def test_diloco_communicates_once_per_sync_and_data_parallelism_every_step():
  cfg = diloco.QUICK
  comm = diloco.communication(cfg, diloco.problem(cfg))
  dp, h10 = comm["DP-AdamW"], comm["DiLoCo-H10(AdamW)"]
  assert dp["all_reduces"]["every_step"] > 0 and dp["all_reduces"]["conditional"] == 0
  assert dp["rounds_total"] == cfg["steps"]
  assert h10["all_reduces"]["every_step"] == 0 and h10["all_reduces"]["conditional"] > 0
  assert h10["rounds_per_period"] == 1
  assert h10["rounds_total"] == cfg["steps"] / 10 and comm["DiLoCo-H30(AdamW)"]["rounds_total"] == cfg["steps"] / 30


def test_diloco_replicas_diverge_between_syncs_and_agree_after_one():
  cfg = dict(diloco.QUICK, seq_len=8, dim=8, layers=1, curve_windows=2, replica_batch=2)
  prob = diloco.problem(cfg)
  spread = lambda w, d: {"spread": jnp.max(jnp.stack([jnp.abs(x[0] - x[1]).max() for x in jax.tree.leaves(w)]))}
  fast = lambda params, state: {"fast": params}
  hparams, seeds = grid.settings_by_seeds([{"lr": 1e-2}], [0])
  g = grid.train_grid(
    prob._replace(evaluate=spread), diloco.optimizer("DiLoCo-H10(AdamW)", cfg), hparams, seeds, 10, 5, weights=fast
  )
  after_5, after_sync = g.curves["fast"]["spread"][0]
  assert after_5 > 1e-4  # each replica on its own data since the start
  assert after_sync < 1e-6  # step 10 is a sync: every replica lands on the shared slow weights
  assert np.isfinite(g.losses).all()


def test_snoo_tunes_over_its_outer_variants_one_program_each(tmp_path):
  """SNOO's variants (k, outer rate, momentum) are fixed at compile time: one program per variant, rows in order."""
  prob = softmax_regression()
  acc = tuning.Metric("val_acc", "val acc %", True, 100.0)
  task = snoo.TRANSLATION._replace(
    name="toy",
    problem=lambda cfg: prob,
    select=acc,
    headline=acc,
    columns=(acc,),
    finals=lambda cfg, p, g: {
      "main": {"val_acc": g.curves["main"]["val_acc"][:, -1], "test_loss": g.curves["main"]["val_loss"][:, -1]}
    },
    optimizer=lambda family, cfg: (
      lambda hp: snoo.wrap(family, optax.inject_hyperparams(optax.adamw)(learning_rate=hp["lr"]), hp, cfg)
    ),
  )
  cfg = dict(
    snoo.TRANSLATION_QUICK,
    steps=20,
    eval_every=10,
    k=5,
    grids={"AdamW": (0.01, 0.1, 0.3, 1.0), "SNOO(AdamW)": (0.1, 0.3)},
    methods=("AdamW", "SNOO(AdamW)"),
    pairs=(("AdamW", "SNOO(AdamW)"),),
  )
  res = tuning.run_task(task, cfg, [0, 1], log=lambda _: None)
  rows = res["methods"]["SNOO(AdamW)"]["settings"]
  assert [(r["lr"], r["variant"]) for r in rows] == [(lr, v) for v in snoo.VARIANTS for lr in (0.1, 0.3)]
  assert [p["family"] for p in res["programs"]] == ["AdamW"] + [f"SNOO(AdamW) [{v}]" for v in snoo.VARIANTS]
  assert all(0.0 <= np.mean(r["metrics"]["val_acc"]) <= 1.0 for r in rows)
  summary = {"tasks": {"toy": dict(res, seconds=1.0)}, "quick": True, "environment": {"jax": "x"}}
  text = verdicts.verdict_table({"toy": task}, summary, wrapped="SNOO")
  assert "SNOO (tuned)" in text and "SNOO(AdamW)" in text
