"""Lookahead here against the PyTorch Lookahead implementations: same problems, same gradients, float64.

Each run starts both sides from the same params; each side computes its own
gradients (a closed form on the quadratic, autodiff on the MLP), so the
trajectories can only part where the update rules do. For every peer, inner
optimizer (SGD with momentum 0.9, Adam), peer option and alpha (0.5, 0.8), with
k=5, the table gives the largest difference between the peer's params and ours
over all steps and coordinates, for each of our ``inner_state_policy`` values
and for "maintain" started one step late; "matches" lists those within 1e-9.

The peers:

- the official PyTorch Lookahead (michaelrzhang/lookahead,
  ``lookahead_pytorch.py``), which is not on PyPI: its update rule is restated
  below (:class:`OfficialLookahead`), once as published and once with its
  momentum cache copied;
- ``pytorch_optimizer.Lookahead`` and ``torch_optimizer.Lookahead``, imported.

A second table follows the momentum buffer through each "pullback" sync (SGD,
quadratic): the buffer after the sync divided by the buffer the inner step
produced, when it is one number for every coordinate.

Needs PyTorch and the two peer packages, none of them a dependency of the
library: ``pip install -e '.[peers]'``. Regenerate
``benchmarks/results/peers/peers.{md,json}``:

    python -m benchmarks.peers [--steps 100]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np

COMMAND = "python -m benchmarks.peers"
INSTALL = "pip install 'torch==2.13.0' pytorch_optimizer torch_optimizer  (or: pip install -e '.[peers]')"
PEER_MODULES = ("torch", "pytorch_optimizer", "torch_optimizer")
K = 5
ALPHAS = (0.5, 0.8)
INNERS = ("sgd momentum", "adam")
SGD_LR, MOMENTUM = 0.05, 0.9
ADAM_LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8
# Our runs that a peer row is compared with: policy, and whether the run syncs one step late.
VARIANTS = {
  "maintain": ("maintain", False),
  "reset": ("reset", False),
  "interpolate": ("interpolate", False),
  "maintain, one step late": ("maintain", True),
}
OPTION_TO_POLICY = {"none": "maintain", "reset": "reset", "pullback": "interpolate"}
MATCH = 1e-9  # float64 trajectories that follow one rule agree to ~1e-15; different rules part by > 1e-4


def missing_modules() -> list[str]:
  """The peer modules that do not import here."""
  missing = []
  for name in PEER_MODULES:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  return missing


# ----------------------------------------------------------------------------- problems


class Problem(NamedTuple):
  """Initial params (float64, by name) and fixed data, shared by both sides."""

  name: str
  params: dict[str, np.ndarray]
  data: dict[str, np.ndarray]


def quadratic(n: int = 10, seed: int = 0) -> Problem:
  r"""``f(x) = x^T A x / 2 - b^T x`` with ``A`` of eigenvalues 0.05 to 1: gradient ``A x - b``, in closed form."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.geomspace(0.05, 1.0, n)) @ q.T
  return Problem("quadratic", {"x": rng.normal(size=n)}, {"a": (a + a.T) / 2, "b": rng.normal(size=n)})


def mlp(samples: int = 64, width: int = 16, seed: int = 1) -> Problem:
  """A 4-16-1 tanh MLP regressing ``sin`` of a random projection: mean squared error on 64 fixed samples."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(samples, 4))
  y = np.sin(x @ rng.normal(size=(4, 1)))
  params = {
    "b1": np.zeros(width),
    "b2": np.zeros(1),
    "w1": 0.5 * rng.normal(size=(4, width)),
    "w2": 0.25 * rng.normal(size=(width, 1)),
  }
  return Problem("mlp", params, {"x": x, "y": y})


def jax_grad_fn(problem: Problem) -> Callable:
  """Our side's gradient: ``params -> grads`` in jax.numpy."""
  import jax
  import jax.numpy as jnp

  data = {k: jnp.asarray(v) for k, v in problem.data.items()}
  if problem.name == "quadratic":
    return lambda p: {"x": data["a"] @ p["x"] - data["b"]}

  def loss(p):
    out = jnp.tanh(data["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean((out - data["y"]) ** 2)

  return jax.grad(loss)


def torch_grad_fn(problem: Problem) -> Callable:
  """The peers' gradient: ``list of tensors (sorted names) -> list of grads`` in torch."""
  import torch

  data = {k: torch.from_numpy(v) for k, v in problem.data.items()}
  names = sorted(problem.params)
  if problem.name == "quadratic":
    return lambda ts: [data["a"] @ ts[0].detach() - data["b"]]

  def grads(ts):
    p = dict(zip(names, ts))
    out = torch.tanh(data["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return list(torch.autograd.grad(torch.mean((out - data["y"]) ** 2), ts))

  return grads


def flat(arrays) -> np.ndarray:
  return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


# ----------------------------------------------------------------------------- our side


def our_inner(name: str):
  import optax

  if name == "sgd momentum":
    return optax.sgd(SGD_LR, momentum=MOMENTUM)
  return optax.adam(ADAM_LR, b1=B1, b2=B2, eps=EPS)


def our_trajectory(problem: Problem, inner: str, alpha: float, policy: str, late: bool, steps: int) -> np.ndarray:
  """The params after every step (rows), ``lookahead(inner, K, alpha, inner_state_policy=policy)``.

  ``late``: one step of the inner optimizer alone, then Lookahead from there
  with the inner state carried on, so that every sync comes one step later.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from lookahead_optax import lookahead

  grad = jax_grad_fn(problem)
  names = sorted(problem.params)
  params = {k: jnp.asarray(v) for k, v in problem.params.items()}
  rows = []
  inner_state = None
  if late:
    bare = our_inner(inner)
    inner_state = bare.init(params)
    updates, inner_state = bare.update(grad(params), inner_state, params)
    params = optax.apply_updates(params, updates)
    rows.append(flat(params[k] for k in names))
  opt = lookahead(our_inner(inner), K, alpha, inner_state_policy=policy)
  state = opt.init(params)
  if late:
    state = state._replace(inner_state=inner_state)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(grad(params), state, params)
    return optax.apply_updates(params, updates), state

  while len(rows) < steps:
    params, state = step(params, state)
    rows.append(flat(params[k] for k in names))
  return np.stack(rows)


# ----------------------------------------------------------------------------- the peers


class OfficialLookahead:
  """The official PyTorch Lookahead's update rule, restated.

  Upstream: michaelrzhang/lookahead, ``lookahead_pytorch.py``, ``Lookahead.step``.
  After every ``k``-th step of the inner optimizer, each param moves to
  ``alpha * fast + (1 - alpha) * slow`` and becomes the new slow weight. Then
  ``"pullback"`` moves the inner optimizer's ``momentum_buffer`` the same way
  toward the buffer kept at the previous sync (zeros at first) and keeps the
  result; ``"reset"`` puts a zero buffer in its place; ``"none"`` leaves it.

  Upstream keeps the buffer object itself as the cached momentum, so the inner
  optimizer's in-place updates of that buffer change the cache too.
  ``copy_momentum=False`` keeps that; ``True`` caches a copy, the rule the
  code means.
  """

  def __init__(self, optimizer, k: int, alpha: float, pullback_momentum: str = "none", copy_momentum: bool = False):
    import torch

    self.optimizer, self.k, self.alpha = optimizer, k, alpha
    self.pullback_momentum, self.copy_momentum = pullback_momentum, copy_momentum
    self.params = [p for group in optimizer.param_groups for p in group["params"]]
    self.steps = 0
    self.slow = [p.detach().clone() for p in self.params]
    self.slow_momentum = [torch.zeros_like(p) for p in self.params]

  def step(self):
    import torch

    self.optimizer.step()
    self.steps += 1
    if self.steps < self.k:
      return
    self.steps = 0
    with torch.no_grad():
      for i, p in enumerate(self.params):
        p.mul_(self.alpha).add_(self.slow[i], alpha=1.0 - self.alpha)
        self.slow[i].copy_(p)
        state = self.optimizer.state[p]
        if self.pullback_momentum == "pullback":
          buffer = state["momentum_buffer"]  # as upstream: a KeyError for an inner optimizer without one (Adam)
          buffer.mul_(self.alpha).add_(self.slow_momentum[i], alpha=1.0 - self.alpha)
          self.slow_momentum[i] = buffer.clone() if self.copy_momentum else buffer
        elif self.pullback_momentum == "reset":
          state["momentum_buffer"] = torch.zeros_like(p)


class Peer(NamedTuple):
  """One peer implementation: ``make(inner_optimizer, alpha, option)`` returns an object with ``step()``."""

  name: str
  options: tuple[str, ...]
  make: Callable[[Any, float, str], Any]


def peers() -> list[Peer]:
  import pytorch_optimizer
  import torch_optimizer

  po = f"pytorch_optimizer {metadata.version('pytorch_optimizer')}"
  to = f"torch_optimizer {metadata.version('torch_optimizer')}"
  return [
    Peer("official, as published", ("none", "reset", "pullback"), lambda o, a, m: OfficialLookahead(o, K, a, m)),
    Peer("official, momentum cache copied", ("pullback",), lambda o, a, m: OfficialLookahead(o, K, a, m, True)),
    Peer(po, ("none", "reset", "pullback"), lambda o, a, m: pytorch_optimizer.Lookahead(o, K, a, m)),
    Peer(to, ("(none)",), lambda o, a, m: torch_optimizer.Lookahead(o, K, a)),
  ]


def torch_inner(name: str, tensors):
  import torch

  if name == "sgd momentum":
    return torch.optim.SGD(tensors, lr=SGD_LR, momentum=MOMENTUM)
  return torch.optim.Adam(tensors, lr=ADAM_LR, betas=(B1, B2), eps=EPS)


def peer_trajectory(problem: Problem, inner: str, alpha: float, peer: Peer, option: str, steps: int) -> dict:
  """``{"params": rows, "error": str or None, "ratios": [...]}``: the peer's params after every step.

  ``ratios``: at each sync, with SGD, the momentum buffer after the step over
  the buffer the inner step itself produced (``momentum * previous + grad``),
  when that is one number for every coordinate; ``None`` when it is not.
  """
  import torch

  names = sorted(problem.params)
  tensors = [torch.tensor(problem.params[k], dtype=torch.float64, requires_grad=True) for k in names]
  grad = torch_grad_fn(problem)
  optimizer = torch_inner(inner, tensors)
  opt = peer.make(optimizer, alpha, option)
  rows, ratios = [], []
  for t in range(steps):
    for p, g in zip(tensors, grad(tensors)):
      p.grad = g
    before = None
    if inner == "sgd momentum":
      previous = [optimizer.state[p].get("momentum_buffer") for p in tensors]
      before = [g.clone() if b is None else b * MOMENTUM + g for b, g in zip(previous, (p.grad for p in tensors))]
    try:
      opt.step()
    except Exception as e:  # a peer that fails on this combination: reported, not hidden
      return {"params": np.stack(rows), "error": f"{type(e).__name__}: {e} (step {t + 1})", "ratios": ratios}
    rows.append(flat(p.detach().numpy() for p in tensors))
    if before is not None and (t + 1) % K == 0:
      after = flat(optimizer.state[p]["momentum_buffer"].numpy() for p in tensors)
      r = after / flat(b.numpy() for b in before)
      ratios.append(float(r.mean()) if np.ptp(r) <= 1e-12 * abs(r.mean()) else None)
  return {"params": np.stack(rows), "error": None, "ratios": ratios}


# ----------------------------------------------------------------------------- the comparison


def run(steps: int = 100) -> dict:
  import torch

  torch.set_num_threads(1)
  problems = [quadratic(), mlp()]
  ours = {
    (pr.name, inner, alpha, variant): our_trajectory(pr, inner, alpha, policy, late, steps)
    for pr in problems
    for inner in INNERS
    for alpha in ALPHAS
    for variant, (policy, late) in VARIANTS.items()
  }
  rows, buffers = [], []
  for peer in peers():
    for pr in problems:
      for inner in INNERS:
        for option in peer.options:
          for alpha in ALPHAS:
            out = peer_trajectory(pr, inner, alpha, peer, option, steps)
            diffs = {}
            if out["error"] is None:
              diffs = {v: float(np.max(np.abs(out["params"] - ours[(pr.name, inner, alpha, v)]))) for v in VARIANTS}
            rows.append(
              dict(
                peer=peer.name,
                problem=pr.name,
                inner=inner,
                option=option,
                alpha=alpha,
                error=out["error"],
                max_abs_diff=diffs,
                matches=[v for v, d in diffs.items() if d <= MATCH],
              )
            )
            if option == "pullback" and inner == "sgd momentum" and pr.name == "quadratic":
              buffers.append(dict(peer=peer.name, alpha=alpha, ratios=out["ratios"][:3]))
  return {
    "config": dict(
      steps=steps, k=K, alphas=list(ALPHAS), sgd=dict(lr=SGD_LR, momentum=MOMENTUM), adam=dict(lr=ADAM_LR, b1=B1, b2=B2)
    ),
    "match_tolerance": MATCH,
    "rows": rows,
    "summary": summarize(rows),
    "pullback_buffers": buffers,
  }


def summarize(rows: list[dict]) -> list[dict]:
  """One line per (peer, inner, option): the largest difference over problems and alphas, what matches in all."""
  keys = list(dict.fromkeys((r["peer"], r["inner"], r["option"]) for r in rows))
  out = []
  for key in keys:
    group = [r for r in rows if (r["peer"], r["inner"], r["option"]) == key]
    errors = sorted({r["error"] for r in group if r["error"]})
    ok = [r for r in group if not r["error"]]
    diffs = {v: max(r["max_abs_diff"][v] for r in ok) for v in VARIANTS} if ok else {}
    matches = [v for v in VARIANTS if ok and all(v in r["matches"] for r in ok)]
    out.append(dict(peer=key[0], inner=key[1], option=key[2], max_abs_diff=diffs, matches=matches, errors=errors))
  return out


def _cell(d: dict, v: str) -> str:
  return f"{d[v]:.1e}" if v in d else "—"


def tables(results: dict) -> tuple[list[str], list[list], list[str], list[list], list[str], list[list]]:
  """``(headers, rows)`` of the summary, of the pullback buffers and of the full table."""
  variants = list(VARIANTS)
  h1 = ["peer", "inner", "option"] + [f"vs {v}" for v in variants] + ["matches"]
  r1 = [
    [s["peer"], s["inner"], s["option"]]
    + [_cell(s["max_abs_diff"], v) for v in variants]
    + [", ".join(s["matches"]) or ("; ".join(s["errors"]) if s["errors"] else "none")]
    for s in results["summary"]
  ]
  h2 = ["peer", "alpha", "alpha(2 - alpha)", "sync 1", "sync 2", "sync 3"]
  r2 = [
    [b["peer"], b["alpha"], round(b["alpha"] * (2 - b["alpha"]), 4)]
    + [f"× {r:.4f}" if r is not None else "not a multiple" for r in b["ratios"]]
    for b in results["pullback_buffers"]
  ]
  h3 = ["peer", "problem", "inner", "option", "alpha"] + [f"vs {v}" for v in variants] + ["matches"]
  r3 = [
    [r["peer"], r["problem"], r["inner"], r["option"], r["alpha"]]
    + [_cell(r["max_abs_diff"], v) for v in variants]
    + [r["error"] or ", ".join(r["matches"]) or "none"]
    for r in results["rows"]
  ]
  return h1, r1, h2, r2, h3, r3


def environment() -> dict:
  import jax
  import optax
  import torch

  import lookahead_optax

  return {
    "lookahead_optax": lookahead_optax.__version__,
    "jax": jax.__version__,
    "optax": optax.__version__,
    "torch": torch.__version__,
    "pytorch_optimizer": metadata.version("pytorch_optimizer"),
    "torch_optimizer": metadata.version("torch_optimizer"),
    "python": platform.python_version(),
  }


def markdown(results: dict) -> str:
  from benchmarks.common import report

  h1, r1, h2, r2, h3, r3 = tables(results)
  env = results["environment"]
  cfg = results["config"]
  return "\n".join(
    [
      "# Lookahead here and in PyTorch: the same runs, side by side",
      "",
      f"Regenerate: `{COMMAND}` (needs `pip install -e '.[peers]'`). "
      + ", ".join(f"{k} {v}" for k, v in env.items())
      + ".",
      "",
      f"float64 on both sides, k={cfg['k']}, alpha {' and '.join(map(str, cfg['alphas']))}, {cfg['steps']} steps; "
      f"SGD lr {SGD_LR} momentum {MOMENTUM}, Adam lr {ADAM_LR}. Problems: a 10-dimensional quadratic "
      "(gradient in closed form on each side) and a 4-16-1 tanh MLP on 64 fixed samples (autodiff on each "
      "side). Each cell: the largest absolute difference of the params over every step and coordinate, against "
      "`lookahead(inner, k, alpha, inner_state_policy=...)`; the last column against `maintain` started one "
      f'inner step later. "matches": within {results["match_tolerance"]:g}. The official file is restated '
      "in `benchmarks/peers.py` (it is not on PyPI): as published, and with its momentum cache copied.",
      "",
      "## Summary (largest difference over both problems and both alphas)",
      "",
      report.markdown_table(h1, r1),
      "",
      "## The momentum buffer at a pullback sync (SGD, quadratic)",
      "",
      "The buffer after the sync over the buffer the inner step produced, when it is one number for every "
      "coordinate. The rule as meant gives `alpha * buffer + (1 - alpha) * buffer at the previous sync`, "
      "not a multiple from the second sync on.",
      "",
      report.markdown_table(h2, r2),
      "",
      "## Every run",
      "",
      report.markdown_table(h3, r3),
    ]
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
  parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/peers)")
  args = parser.parse_args(argv)
  missing = missing_modules()
  if missing:
    print(f"benchmarks.peers needs {', '.join(missing)}, not installed here: {INSTALL}")
    return 2

  import jax

  jax.config.update("jax_enable_x64", True)
  from benchmarks.common import report

  results = run(args.steps)
  results["environment"] = environment()
  results["command"] = COMMAND
  out = args.out or report.results_dir("peers")
  report.write_json(os.path.join(out, "peers.json"), results)
  report.write_text(os.path.join(out, "peers.md"), markdown(results))
  h1, r1, h2, r2, _, _ = tables(results)
  print(report.text_table(h1, r1))
  print()
  print("momentum buffer at a pullback sync (SGD, quadratic): after / produced by the inner step")
  print(report.text_table(h2, r2))
  print(f"\nwrote {os.path.join(out, 'peers.md')} and peers.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
