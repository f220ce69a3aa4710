"""Figures 2, 3 and 4 of the paper, from ``lookahead_optax.theory`` and the shared training loop.

Regenerate the PNGs (and ``theory.json`` with the plotted numbers) in ``benchmarks/results/theory/`` with

    python -m benchmarks.theory_figures            # all three, about 30 s on CPU
    python -m benchmarks.theory_figures --only 3   # one of them

- Fig. 3 (``theory_fig3_nqm.png``): noisy quadratic model, expected loss after
  1000 updates against the steady-state loss, SGD against Lookahead(SGD, k=5)
  for 100 values of alpha in (0, 1], each curve a sweep of the learning rate.
- Fig. 4 (``theory_fig4_rates.png``): 1 - rate against the condition number at
  the optimal learning rate, classical momentum against Lookahead(CM, k=20,
  alpha=0.5), on the 2-D quadratic diag(1, kappa) and over a whole spectrum.
- Fig. 2 (``theory_fig2_adaptive_alpha.png``): training loss of Adam, Lookahead
  with fixed alpha and with the adaptive alpha of section 2.1, at two Adam
  learning rates, on scikit-learn's digits (the paper used CIFAR-10).

The figures use matplotlib's object API (no pyplot), so they work with any backend.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.common import report, train
from lookahead_optax import theory

# Noisy quadratic model of Fig. 3: curvatures 1/i and gradient-noise variance
# a_i^2 sigma_i^2 = a_i (Fisher = Hessian, as in Zhang et al. 2019), start at 1.
NQM_DIM = 100
FIG3_STEPS = 1000
FIG3_K = 5


def nqm_problem(dim: int = NQM_DIM):
  a = 1.0 / np.arange(1, dim + 1)
  return a, 1.0 / a, np.ones(dim)


def figure3_data(steps: int = FIG3_STEPS, k: int = FIG3_K, num_alpha: int = 100, num_lr: int = 300) -> dict:
  """Excess expected loss (eq. 5 minus its irreducible part) after ``steps`` updates and at steady state."""
  a, sigma2, x0 = nqm_problem()
  irreducible = 0.5 * np.sum(a * sigma2)
  lrs = np.geomspace(1e-3, 1.99 / a.max(), num_lr)[:, None]
  alphas = np.linspace(1.0 / num_alpha, 1.0, num_alpha)[:, None, None]
  zero = np.zeros_like(a)

  def excess(moments):
    return theory.nqm_expected_loss(a, sigma2, moments) - irreducible

  return {
    "lr": lrs[:, 0],
    "alpha": alphas[:, 0, 0],
    "sgd_final": excess(theory.Moments(zero, theory.nqm_sgd_variance(a, sigma2, lrs))),
    "sgd_at_T": excess(theory.nqm_sgd_moments(a, sigma2, lrs, steps, x0)),
    "la_final": excess(theory.Moments(zero, theory.nqm_lookahead_variance(a, sigma2, lrs, k, alphas))),
    "la_at_T": excess(theory.nqm_lookahead_moments(a, sigma2, lrs, k, alphas, steps, x0)),
  }


def figure3(path: str | None = None, data: dict | None = None) -> dict:
  from matplotlib import cm, colors
  from matplotlib.figure import Figure

  data = data or figure3_data()
  fig = Figure(figsize=(6.4, 4.6), dpi=120)
  ax = fig.add_subplot()
  norm = colors.Normalize(0.0, 1.0)
  for alpha, final, at_t in zip(data["alpha"], data["la_final"], data["la_at_T"]):
    ax.loglog(final, at_t, color=cm.viridis(norm(alpha)), lw=0.7, alpha=0.8)
  ax.loglog(data["sgd_final"], data["sgd_at_T"], color="black", lw=1.8, ls="--", label="SGD")
  ax.plot([], [], color=cm.viridis(0.6), lw=1.5, label=f"Lookahead(SGD), k={FIG3_K}")
  lo = min(data["sgd_final"].min(), data["la_final"].min())
  ax.loglog([lo, 10.0], [lo, 10.0], color="gray", ls=":", lw=1, label="converged (y = x)")
  ax.set_xlim(1e-2, 2.0)
  ax.set_ylim(0.1, 2.0)
  ax.set_xlabel("steady-state excess loss (sweep of the learning rate)")
  ax.set_ylabel(f"expected excess loss after {FIG3_STEPS} updates")
  ax.set_title(f"Noisy quadratic model (d={NQM_DIM}, $a_i=1/i$): lower is faster")
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cm.viridis), ax=ax, label=r"Lookahead $\alpha$")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
  return data


def figure4_data(num_kappa: int = 21) -> dict:
  """Optimal-learning-rate rates of CM and Lookahead(CM, k=20, alpha=0.5) over condition numbers."""
  kappas = np.geomspace(1.0, 1e5, num_kappa)
  out = {"kappa": kappas, "momentum": [0.5, 0.9, 0.99]}
  # Two curvatures: the landscape in lr is rugged, so a fine grid; the spectrum: 300 curvatures.
  for spectrum, kw in (("ends", dict(num_curvatures=2, num_lr=5000)), ("dense", dict(num_curvatures=300, num_lr=100))):
    for beta in out["momentum"]:
      out[f"cm_{spectrum}_{beta}"] = theory.optimal_rate(kappas, beta, **kw).rate
      out[f"la_{spectrum}_{beta}"] = theory.optimal_rate(kappas, beta, k=20, alpha=0.5, **kw).rate
  return out


def figure4(path: str | None = None, data: dict | None = None) -> dict:
  from matplotlib.figure import Figure

  data = data or figure4_data()
  fig = Figure(figsize=(10, 4.2), dpi=120)
  titles = {"ends": r"2-D quadratic diag$(1, \kappa)$", "dense": r"worst case over a spectrum in $[1, \kappa]$"}
  palette = {0.5: "tab:red", 0.9: "tab:blue", 0.99: "tab:green"}
  axes = fig.subplots(1, 2, sharey=True)
  for ax, spectrum in zip(axes, ("ends", "dense")):
    for beta in data["momentum"]:
      color = palette[beta]
      ax.loglog(data["kappa"], 1 - data[f"cm_{spectrum}_{beta}"], color=color, lw=1.8, label=f"CM, β={beta}")
      ax.loglog(
        data["kappa"], 1 - data[f"la_{spectrum}_{beta}"], color=color, lw=1.8, ls="--", label=f"LA(CM), β={beta}"
      )
    ax.set_title(titles[spectrum], fontsize=10)
    ax.set_xlabel(r"condition number $\kappa$")
    ax.grid(True, which="major", alpha=0.3)
  axes[0].set_ylabel(r"$1 - \rho$ at the optimal learning rate (higher is faster)")
  axes[0].legend(fontsize=7, ncol=2, loc="lower left")
  fig.suptitle("Deterministic quadratic: classical momentum vs Lookahead(CM), k=20, α=0.5", fontsize=11)
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
  return data


def figure2_data(steps: int = 500, lrs=(1e-3, 3e-3), k: int = 5, alpha: float = 0.5, seed: int = 0) -> dict:
  """Digits MLP training losses: Adam, Lookahead(Adam) fixed alpha, adaptive alpha (alpha_low = alpha)."""
  import optax
  from flax import nnx

  from benchmarks.common import data, models
  from lookahead_optax import adaptive_alpha, find_lookahead_state, lookahead

  ds = data.digits()
  out = {"steps": steps, "k": k, "alpha": alpha, "lrs": list(lrs), "runs": {}}
  for lr in lrs:
    optimizers = {
      "Adam": optax.adam(lr),
      f"Lookahead fixed α={alpha}": lookahead(optax.adam(lr), k, alpha),
      f"Lookahead adaptive α∈[{alpha}, 1]": lookahead(optax.adam(lr), k, adaptive_alpha(alpha, b2=0.999)),
    }
    for name, tx in optimizers.items():
      apply, params = train.functional(models.MLP((64, 64, 10), rngs=nnx.Rngs(seed)))
      loss_fn = lambda p, b, apply=apply: train.cross_entropy(apply(p, b.x), b.y)
      batches = data.batches(ds.train, 64, np.random.default_rng(seed))
      _, state, hist = train.train(loss_fn, params, tx, batches, steps, progress=False)
      run = {"loss": hist.losses}
      if "adaptive" in name:
        run["last_alpha"] = float(find_lookahead_state(state).alpha)
      out["runs"][(lr, name)] = run
  return out


def figure2(path: str | None = None, data: dict | None = None) -> dict:
  from matplotlib.figure import Figure

  data = data or figure2_data()
  fig = Figure(figsize=(10, 4.0), dpi=120)
  axes = fig.subplots(1, len(data["lrs"]), sharey=True)
  styles = {"Adam": dict(color="black"), "fixed": dict(color="tab:blue"), "adaptive": dict(color="tab:orange")}
  window = 25
  for ax, lr in zip(np.atleast_1d(axes), data["lrs"]):
    for (run_lr, name), run in data["runs"].items():
      if run_lr != lr:
        continue
      style = styles["Adam"] if name == "Adam" else styles["fixed" if "fixed" in name else "adaptive"]
      smooth = np.convolve(run["loss"], np.ones(window) / window, mode="valid")
      ax.semilogy(np.arange(window, len(run["loss"]) + 1), smooth, lw=1.6, label=name, **style)
    ax.set_title(f"Adam learning rate {lr:g}", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel(f"training loss ({window}-step mean)")
  np.atleast_1d(axes)[0].legend(fontsize=8)
  fig.suptitle(f"Digits MLP: fixed vs adaptive slow step size, k={data['k']}", fontsize=11)
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
  return data


PATHS = {
  "2": "theory/theory_fig2_adaptive_alpha.png",
  "3": "theory/theory_fig3_nqm.png",
  "4": "theory/theory_fig4_rates.png",
}
"""Figure number -> its file under ``benchmarks/results``."""


def summary(fig2=None, fig3=None, fig4=None) -> dict:
  """The numbers the README quotes, JSON-ready."""
  out = {"command": "python -m benchmarks.theory_figures", "environment": report.environment()}
  if fig3 is not None:
    # At matched steady-state loss: the best Lookahead alpha vs SGD, loss after T updates.
    rows = []
    for target in (0.03, 0.1, 0.3, 1.0):
      i = int(np.argmin(np.abs(np.log(fig3["sgd_final"] / target))))
      best = np.inf
      for final, at_t in zip(fig3["la_final"], fig3["la_at_T"]):
        j = int(np.argmin(np.abs(np.log(final / target))))
        if abs(np.log(final[j] / target)) < 0.02:
          best = min(best, float(at_t[j]))
      rows.append({"steady_state": target, "sgd_at_T": float(fig3["sgd_at_T"][i]), "best_lookahead_at_T": best})
    out["fig3_matched_steady_state"] = rows
    # Per alpha: Lookahead's loss after T over SGD's at the same steady-state loss, over the shared range.
    order = np.argsort(fig3["sgd_final"])
    ratios = []
    for final, at_t in zip(fig3["la_final"], fig3["la_at_T"]):
      sgd_at = np.interp(
        np.log(final), np.log(fig3["sgd_final"][order]), np.log(fig3["sgd_at_T"][order]), left=np.nan, right=np.nan
      )
      ok = np.isfinite(sgd_at)
      ratios.append(np.exp(np.log(at_t[ok]) - sgd_at[ok]))
    out["fig3_ratio_to_sgd"] = {
      f"{a:.2f}": [float(r.min()), float(r.max())]
      for a, r in zip(fig3["alpha"], ratios)
      if a in fig3["alpha"][[0, 4, 9, 24, 49, 74, 98]]
    }
  if fig4 is not None:
    out["fig4"] = {key: np.asarray(v).tolist() for key, v in fig4.items()}
  if fig2 is not None:
    out["fig2_final_loss_last50"] = {
      f"{lr:g} {name}": float(np.mean(run["loss"][-50:])) for (lr, name), run in fig2["runs"].items()
    }
    out["fig2_last_adaptive_alpha"] = {
      f"{lr:g}": run["last_alpha"] for (lr, name), run in fig2["runs"].items() if "last_alpha" in run
    }
  return out


def main(argv=None, results: str = report.RESULTS) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=sorted(PATHS), help="make only this figure")
  args = parser.parse_args(argv)
  os.makedirs(results, exist_ok=True)
  which = [args.only] if args.only else sorted(PATHS)
  made = {}
  for number in which:
    made[number] = {"2": figure2, "3": figure3, "4": figure4}[number](os.path.join(results, PATHS[number]))
    print("wrote", os.path.join(results, PATHS[number]))
  if not args.only:
    report.write_json(os.path.join(results, "theory", "theory.json"), summary(made["2"], made["3"], made["4"]))
  return made


if __name__ == "__main__":
  main()
