"""Lookahead or something else? AdamW, its wrappers and averages of its weights, tuned alike at equal steps.

Six ways to train the same model for the same steps, each tuned over 4 settings on the validation split, 5 seeds:
AdamW; Lookahead(AdamW) (2 rates x alpha 0.5, 0.8, k=5); SNOO(AdamW) (2 rates x 2 outer settings); Schedule-Free
AdamW (``optax.contrib.schedule_free_adamw``, 4 rates, evaluated at ``schedule_free_eval_params``); AdamW with an
exponential moving average of its weights (EMA, bias-corrected; 2 rates x decay 0.99, 0.995); and AdamW with LAWA,
the mean of its latest K weights taken every few steps (2 rates x last 4 every 25 steps, last 6 every 50 steps).
Every method is evaluated, in its anytime curve as at the end, on the weights it would hand a user: the averages
for EMA and LAWA, the slow weights for Lookahead and SNOO, Schedule-Free's averaged sequence. EMA and LAWA do not
change training, so AdamW's own runs keep every average in their optimizer state, inside the compiled program, and
each is tuned over 2 of AdamW's rates (``tuning.Task.methods`` with several weights names). Two tasks of
``outer.snoo``: the character Transformer on pydoc text and number-word translation. Each verdict compares an
alternative with a baseline (AdamW, then Lookahead); its difference is the alternative's mean minus the baseline's.

Also measured, in the same run: each method's cost (optimizer-state bytes, the averaged copies included, and the
median step time of one run, both as ratios to AdamW) and its compute factor, the steps tuned AdamW needs to reach
the method's final validation loss over the method's steps, read off AdamW's anytime curve continued to
``factor_steps`` times the run, with a bootstrap interval over seeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import baselines, grid, language, report, timing, tuning
from benchmarks.outer import snoo

EMA = {"decay 0.99": 0.99, "decay 0.995": 0.995}
"""EMA's decays (about 100 and 200 steps of memory), part of its tuning budget."""
LAWA = {"last 4, every 25 steps": (4, 25), "last 6, every 50 steps": (6, 50)}
"""LAWA's (K, interval): the mean of the last 100 or 300 steps' snapshots, part of its tuning budget."""
METHODS = ("AdamW", "LA(AdamW)", "SNOO(AdamW)", "SF-AdamW", "EMA(AdamW)", "LAWA(AdamW)")
PAIRS = tuple(("AdamW", m) for m in METHODS[1:]) + tuple(("LA(AdamW)", m) for m in METHODS[2:])
"""Every alternative against AdamW, and every other alternative against Lookahead."""
AVERAGES = {"EMA(AdamW)": ("AdamW", tuple(EMA)), "LAWA(AdamW)": ("AdamW", tuple(LAWA))}
"""``tuning.Task.methods``: EMA and LAWA are weights of AdamW's runs, one per averaging setting."""
PLAN = dict(
  snoo.PLAN,
  variants={**snoo.PLAN["variants"], "EMA": tuple(EMA), "LAWA": tuple(LAWA)},
  methods=METHODS,
  pairs=PAIRS,
  sensitivity=False,
  factor_steps=3,
  timing=dict(rounds=11, steps=30),
)
"""What both tasks compare; ``factor_steps``: AdamW's continued run, in multiples of the steps; ``timing``: rounds
of interleaved step-time blocks and steps per block."""

LM_FULL = dict(
  snoo.LM_FULL,
  **PLAN,
  grids=dict(snoo.LM_FULL["grids"], **{"SF-AdamW": (5e-3, 1e-2, 2e-2, 4e-2)}, **dict.fromkeys(AVERAGES, (1e-2, 2e-2))),
)
TRANSLATION_FULL = dict(
  snoo.TRANSLATION_FULL,
  **PLAN,
  grids=dict(
    snoo.TRANSLATION_FULL["grids"], **{"SF-AdamW": (1e-2, 2e-2, 3e-2, 5e-2)}, **dict.fromkeys(AVERAGES, (2e-2, 3e-2))
  ),
)
# Smoke runs: every code path (LAWA takes snapshots), tiny models, a few steps.
QUICK = dict(steps=50, eval_every=10, factor_steps=2, timing=dict(rounds=2, steps=2))
LM_QUICK = dict(LM_FULL, **language.TRANSFORMER_QUICK | QUICK)
TRANSLATION_QUICK = dict(TRANSLATION_FULL, **QUICK, dim=16, heads=2, n_train=200, n_val=50, n_test=50, max_number=400)


# --------------------------------------------------------------- optimizers


def kept(cfg: dict) -> tuple:
  """The averages AdamW's runs keep: ``cfg["keep"]``, by default every EMA and LAWA setting of the plan."""
  return tuple(cfg.get("keep", cfg["variants"]["EMA"] + cfg["variants"]["LAWA"]))


def averaged(tx: optax.GradientTransformation, names) -> optax.GradientTransformation:
  """``tx`` keeping the averages ``names`` (labels of ``EMA`` and ``LAWA``) of its iterates, the last outermost."""
  for name in names:
    tx = baselines.ema_average(tx, EMA[name]) if name in EMA else baselines.lawa_average(tx, *LAWA[name])
  return tx


def averaged_weights(names) -> Callable:
  """``weights(params, opt_state) -> {"main": params, name: average}`` of an :func:`averaged` optimizer's state."""

  def weights(params, opt_state):
    out = {}
    for name in reversed(names):
      out[name] = (baselines.polyak_params if name in EMA else baselines.lawa_params)(params, opt_state)
      opt_state = opt_state.inner_state
    return {"main": params, **out}

  return weights


def optimizer(base: Callable, schedule_free: Callable) -> Callable:
  """``Task.optimizer``: ``base(family, cfg)`` (``snoo``'s AdamW, LA, SNOO) and ``schedule_free(hp, cfg)``; AdamW's
  runs keep the averages of :func:`kept`."""

  def of_family(family: str, cfg: dict):
    if family == "SF-AdamW":
      return lambda hp: schedule_free(hp, cfg)
    if family == "AdamW":
      return lambda hp: averaged(base(family, cfg)(hp), kept(cfg))
    return base(family, cfg)

  return of_family


def weights(family: str, cfg: dict) -> Callable:
  """``Task.weights``: Schedule-Free's evaluation sequence, AdamW's raw weights and averages, else ``main_weights``."""
  if family == "SF-AdamW":
    return lambda params, opt_state: {"main": optax.contrib.schedule_free_eval_params(opt_state, params)}
  if family == "AdamW":
    return averaged_weights(kept(cfg))
  return grid.main_weights


def lm_schedule_free(hp: dict, cfg: dict) -> optax.GradientTransformation:
  """Schedule-Free AdamW as the LM's AdamW: constant rate, no warmup, the same weight decay."""
  return optax.contrib.schedule_free_adamw(hp["lr"], weight_decay=cfg["weight_decay"])


def translation_schedule_free(hp: dict, cfg: dict) -> optax.GradientTransformation:
  """Schedule-Free AdamW as the translation AdamW: the same warmup steps, betas, eps and weight decay, no decay."""
  warmup = max(1, int(cfg["warmup"] * cfg["steps"]))
  return optax.contrib.schedule_free_adamw(
    hp["lr"], warmup, b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg["weight_decay"]
  )


# ------------------------------------------------------- cost, compute factor


def standalone(task: tuning.Task, method: str, cfg: dict, row: dict) -> optax.GradientTransformation:
  """The optimizer of one run of ``method`` at setting ``row``, alone: AdamW keeps no average, EMA and LAWA their
  own only."""
  family = tuning.family_of(task, method)[0]
  own = (row["variant"],) if family != method else ()
  hp = {k: jnp.asarray(row[k], jnp.float32) for k in ("lr", "alpha") if k in row}
  return task.optimizer(family, dict(cfg, variant=row.get("variant"), keep=own))(hp)


def cost(task: tuning.Task, cfg: dict, problem: grid.Problem, result: dict) -> dict:
  """Per method at its tuned setting: optimizer-state bytes and step time of one run, with ratios to AdamW.

  Step time: every method's jitted step (loss, gradient, update) timed in interleaved rounds (``timing.interleaved``),
  the ratio to AdamW the median of the per-round ratios.
  """
  params = problem.init(0)
  nbytes = lambda tree: int(sum(jnp.asarray(x).nbytes for x in jax.tree.leaves(tree)))
  key = jax.random.key(0)
  runs, out = [], {}
  for method in cfg["methods"]:
    tx = standalone(task, method, cfg, tuning.tuned(result, method))

    def step(params, opt_state, t, data, tx=tx):
      loss, grads = jax.value_and_grad(problem.loss)(params, problem.batch(data, key, t))
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, t + 1

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = jax.tree.map(jnp.copy, tx.init(params))  # distinct buffers: the step donates them
    out[method] = {"state_bytes": nbytes(state), "params_bytes": nbytes(params)}
    runs.append(
      {
        "fn": lambda p, s, t, f=jitted: f(p, s, t, problem.data),
        "args": (jax.tree.map(jnp.copy, params), state, jnp.zeros((), jnp.int32)),
      }
    )
  timing.interleaved(runs, cfg["timing"]["rounds"], cfg["timing"]["steps"])
  base = runs[list(cfg["methods"]).index("AdamW")]["times_ms"]
  for method, run in zip(cfg["methods"], runs):
    c = out[method]
    c["step_ms"] = float(np.median(run["times_ms"]))
    c["step_ratio"] = timing.median_ratio(run["times_ms"], base)
    c["state_ratio"] = c["state_bytes"] / out["AdamW"]["state_bytes"]
    c["extra_bytes"] = c["state_bytes"] - out["AdamW"]["state_bytes"]
  return out


def steps_to_reach(steps, curve, target: float) -> float:
  """The first step at which ``curve`` (its values at ``steps``) is at or below ``target``, linear between
  evaluations (the first evaluation when it is already there); ``inf`` when it never gets there."""
  steps, curve = np.asarray(steps, dtype=float), np.asarray(curve, dtype=float)
  below = np.flatnonzero(curve <= target)
  if below.size == 0:
    return float("inf")
  i = int(below[0])
  if i == 0:
    return float(steps[0])
  return float(steps[i - 1] + (steps[i] - steps[i - 1]) * (curve[i - 1] - target) / (curve[i - 1] - curve[i]))


def compute_factor(steps, base_curves, method_curves, horizon: int, boots: int = 2000, seed: int = 0) -> dict:
  """Steps the base needs to reach the method's final loss, over the method's ``horizon`` steps.

  ``base_curves`` ``[seeds, evals]`` at ``steps`` (the base run continued past ``horizon``), ``method_curves``
  ``[seeds, evals]`` ending at ``horizon``; the target is the method's mean over seeds at its last evaluation, the
  base's the first crossing of its mean curve (:func:`steps_to_reach`). Interval: percentile bootstrap over seeds,
  the same seeds drawn for both (a seed fixes the initialisation and batch order of both); ``inf`` where the base
  never gets there within its run.
  """
  base, method = np.asarray(base_curves, dtype=float), np.asarray(method_curves, dtype=float)
  factor = lambda i: steps_to_reach(steps, base[i].mean(0), method[i, -1].mean()) / horizon
  draws = np.random.default_rng(seed).integers(0, len(base), (boots, len(base)))
  samples = np.asarray([factor(i) for i in draws])
  low, high = np.quantile(samples, [0.025, 0.975], method="inverted_cdf")
  return {
    "factor": factor(np.arange(len(base))),
    "interval": [float(low), float(high)],
    "target": float(method[:, -1].mean()),
    "horizon": int(horizon),
    "reach": float(steps[-1]) / horizon,
  }


def extras(task_of: Callable[[], tuning.Task]) -> Callable:
  """``Task.extras``: the cost of every method and its compute factor against AdamW."""

  def run(cfg: dict, problem: grid.Problem, result: dict, seeds) -> dict:
    task = task_of()
    adamw = tuning.tuned(result, "AdamW")
    hparams, seed_axis = grid.settings_by_seeds([{"lr": adamw["lr"]}], seeds)
    g = grid.train_grid(
      problem,
      lambda hp: standalone(task, "AdamW", cfg, dict(adamw, lr=hp["lr"])),
      hparams,
      seed_axis,
      cfg["factor_steps"] * cfg["steps"],
      cfg["eval_every"],
      chunk=len(seeds),
    )
    steps, longer = np.asarray(g.eval_steps), g.curves["main"]["val_loss"]
    own = np.asarray(adamw["curves"]["val_loss"])
    factors = {
      m: compute_factor(steps, longer, tuning.tuned(result, m)["curves"]["val_loss"], cfg["steps"])
      for m in cfg["methods"]
      if m != "AdamW"
    }
    return {
      "cost": cost(task, cfg, problem, result),
      "compute_factor": factors,
      "adamw_continued": {
        "lr": adamw["lr"],
        "steps": steps.tolist(),
        "val_loss": longer.tolist(),
        "seconds": g.compile_seconds + g.run_seconds,
        "max_gap_to_tuned_run": float(np.abs(longer[:, : own.shape[1]] - own).max()),
      },
    }

  return run


# --------------------------------------------------------------------- report


def factor_text(f: dict) -> str:
  """``"1.62x [1.31, 2.05]"``; ``">3"`` for a bound AdamW did not reach within its continued run (``f["reach"]``)."""
  value = lambda x: f"{x:.2f}" if np.isfinite(x) else f">{f['reach']:g}"
  if not np.isfinite(f["factor"]):
    return value(f["factor"]) + "x"
  return f"{value(f['factor'])}x [{value(f['interval'][0])}, {value(f['interval'][1])}]"


def extras_section(res: dict, figdir: str) -> str:
  """The cost table and the compute-factor table and figure of one task."""
  from benchmarks.common.verdicts import setting_label

  ext, cfg = res["extras"], res["config"]
  methods = [m for m in cfg["methods"] if m in ext["cost"]]  # the JSON keeps them sorted by name
  cost_rows = [
    [
      m,
      setting_label(tuning.tuned(res, m)),
      f"{c['state_bytes']:,}",
      f"{c['state_bytes'] / c['params_bytes']:.2f}",
      f"{c['extra_bytes']:+,}",
      f"{c['step_ms']:.2f}",
      f"{c['step_ratio']:.2f}x",
    ]
    for m, c in ((m, ext["cost"][m]) for m in methods)
  ]
  params = ext["cost"]["AdamW"]["params_bytes"]
  longer = ext["adamw_continued"]
  factor_rows = [
    [m, f"{f['target']:.4f}", f"{f['factor'] * f['horizon']:.0f}" if np.isfinite(f["factor"]) else "-", factor_text(f)]
    for m, f in ((m, ext["compute_factor"][m]) for m in methods if m in ext["compute_factor"])
  ]
  curve = f"{cfg['curve_windows']} validation windows" if "curve_windows" in cfg else "the whole validation split"
  lines = [
    f"### Cost of one run at the tuned setting ({params:,} bytes of params)",
    "",
    "Optimizer state in bytes (the averages EMA and LAWA keep, Lookahead's and SNOO's slow weights and Schedule-Free's "
    "z sequence included), and the step (loss, gradient, update) of one run, jitted, timed in "
    f"{cfg['timing']['rounds']} interleaved rounds of {cfg['timing']['steps']} steps: the median, and the median of "
    "the per-round ratios to AdamW.",
    "",
    report.markdown_table(
      ["method", "tuned setting", "state bytes", "state / params", "beyond AdamW", "step ms", "step / AdamW"],
      cost_rows,
    ),
    "",
    f"### Compute factor against AdamW (validation loss curve: {curve})",
    "",
    f"AdamW at its tuned rate ({setting_label({'lr': longer['lr']})}) continued to {cfg['factor_steps']}x the "
    f"steps ({cfg['factor_steps'] * cfg['steps']}), the same seeds; the steps its mean curve needs to reach each "
    f"method's final mean validation loss (step {cfg['steps']}), linear between evaluations every "
    f"{cfg['eval_every']} steps, over {cfg['steps']}. 95 % percentile bootstrap over seeds (2000 draws, the same "
    "seeds for both); '>' where AdamW does not get there within its continued run. The continued run's first "
    f"{cfg['steps']} steps differ from AdamW's tuned run by at most {longer['max_gap_to_tuned_run']:.1e} in "
    "validation loss. The SNOO paper reports compute factors of 1.5-2.5x for SNOO over AdamW in runs of up to "
    "1e23 training FLOPs, growing with model size. AdamW's rate is tuned for the original steps, so for a longer run "
    "another rate might get there sooner: the factors are upper estimates of what a retuned AdamW needs.",
    "",
    report.markdown_table(
      ["method", "final val loss", "AdamW steps to reach it", "compute factor [95% CI]"], factor_rows
    ),
    "",
    f"![compute factor]({factor_figure(res, figdir)})",
  ]
  return "\n".join(lines)


def factor_figure(res: dict, figdir: str) -> str:
  """AdamW's continued anytime curve, each method's final validation loss as a level and where AdamW reaches it."""
  plt = report.pyplot()
  ext = res["extras"]
  longer = ext["adamw_continued"]
  steps = np.asarray(longer["steps"])
  mean, std = report.mean_curve(longer["val_loss"])
  fig, ax = plt.subplots(figsize=(6.4, 3.9))
  (line,) = ax.plot(steps, mean, color="k", label=f"AdamW, lr {longer['lr']:g}, continued")
  ax.fill_between(steps, mean - std, mean + std, alpha=0.12, color=line.get_color())
  horizon = res["config"]["steps"]
  ax.axvline(horizon, color="gray", lw=0.8, ls=":")
  for method in (m for m in res["config"]["methods"] if m in ext["compute_factor"]):
    f = ext["compute_factor"][method]
    reach = f["factor"] * horizon
    (level,) = ax.plot(
      [horizon, min(reach, steps[-1])], [f["target"]] * 2, ls="--", label=f"{method}: {factor_text(f)}"
    )
    if np.isfinite(reach):
      ax.plot([reach], [f["target"]], marker="o", color=level.get_color())
  ax.set(xlabel="step", ylabel="val loss", title=f"{res['task']}: steps AdamW needs to reach each final loss")
  ax.set_yscale("log")
  ax.legend(fontsize=7)
  name = f"{res['task']}_compute_factor.png"
  report.save_figure(fig, os.path.join(figdir, name))
  return name


def summary_lines(summary: dict) -> list[str]:
  """What the command prints after the verdict table: per task, each method's cost and compute factor."""
  lines = []
  for name, res in summary["tasks"].items():
    ext = res.get("extras")
    if not ext:
      continue
    lines.append(f"{name}: state bytes / AdamW's, step time / AdamW's, compute factor against AdamW [95% CI]:")
    for m in res["config"]["methods"]:
      c, f = ext["cost"][m], ext["compute_factor"].get(m)
      lines.append(
        f"  {m:12s} state {c['state_ratio']:.2f}x, step {c['step_ratio']:.2f}x"
        + (f", compute factor {factor_text(f)}" if f else "")
      )
  return lines


# ----------------------------------------------------------------------- tasks

PAPER = dict.fromkeys((f"{a} vs {b}" for a, b in PAIRS), "-") | {
  "AdamW vs LA(AdamW)": "Lookahead paper (5.3): LA(Adam) ahead of Adam on language modelling",
  "AdamW vs SNOO(AdamW)": "SNOO paper: compute factor 1.5-2.5x over AdamW",
  "AdamW vs SF-AdamW": "Schedule-Free paper: matches or beats scheduled AdamW",
  "AdamW vs LAWA(AdamW)": "LAWA papers: ahead of the last iterate, most early in training",
}
"""What the papers behind each method report against AdamW ("-": no published claim to set beside it)."""

LM = snoo.LM._replace(
  name="alternatives-lm",
  title="Character Transformer on pydoc text: AdamW, its wrappers, Schedule-Free AdamW and weight averages",
  paper=PAPER,
  optimizer=optimizer(snoo.lm_optimizer, lm_schedule_free),
  methods=AVERAGES,
  weights=weights,
  extras=extras(lambda: LM),
)
TRANSLATION = snoo.TRANSLATION._replace(
  name="alternatives-translation",
  title="Number-word translation: AdamW, its wrappers, Schedule-Free AdamW and weight averages",
  paper=PAPER | {"AdamW vs LA(AdamW)": snoo.TRANSLATION.paper["AdamW vs LA(AdamW)"]},
  optimizer=optimizer(snoo.translation_optimizer, translation_schedule_free),
  methods=AVERAGES,
  weights=weights,
  extras=extras(lambda: TRANSLATION),
)

TASKS = {"lm": (LM, LM_FULL, LM_QUICK), "translation": (TRANSLATION, TRANSLATION_FULL, TRANSLATION_QUICK)}
"""Task name -> (task, full config, quick config)."""
