"""What the "Coming from PyTorch" page says about our side, against numpy re-statements of the PyTorch rules.

No torch here. Each PyTorch Lookahead's rule is written as a plain numpy loop
that does what its source does, in place where it works in place (the
official file's momentum cache is the buffer object itself: the loop keeps it
the same way, so the alpha(2 - alpha) factor comes out of the aliasing, not
out of the test). Our runs are float64 so the comparisons hold to 1e-12.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import peers
from lookahead_optax import lookahead

K, LR, MU, STEPS = 5, 0.05, 0.9, 23
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def problem(n: int = 6, seed: int = 3):
  """A quadratic with gradient ``A x - b`` (numpy, float64) and its start."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.geomspace(0.1, 1.0, n)) @ q.T
  return (a + a.T) / 2, rng.normal(size=n), rng.normal(size=n)


def ours(opt, steps: int = STEPS):
  """Our params and inner states after every step, from the problem's start, in float64."""
  a, b, x0 = problem()
  params = {"x": jnp.asarray(x0)}
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update({"x": jnp.asarray(a) @ p["x"] - jnp.asarray(b)}, s, p))
  xs, states = [], []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    assert params["x"].dtype == jnp.float64
    xs.append(np.asarray(params["x"]))
    states.append(state)
  return np.stack(xs), states


def official_sgd(alpha: float, option: str, copy: bool, steps: int = STEPS):
  """The official PyTorch Lookahead over SGD with momentum, in numpy, as its ``step`` does it.

  Returns the params after every step and, per sync, ``(buffer the inner step produced, buffer after the sync)``.
  ``copy=False`` caches the momentum buffer object itself, as the published file does.
  """
  a, b, x = problem()
  x = x.copy()
  slow, cache, buf = x.copy(), np.zeros_like(x), None
  xs, syncs = [], []
  for t in range(1, steps + 1):
    g = a @ x - b
    if buf is None:
      buf = g.copy()
    else:
      buf *= MU  # torch's SGD updates its buffer in place
      buf += g
    x -= LR * buf
    if t % K == 0:
      produced = buf.copy()
      x *= alpha
      x += (1 - alpha) * slow
      slow = x.copy()
      if option == "pullback":
        buf *= alpha
        buf += (1 - alpha) * cache
        cache = buf.copy() if copy else buf
      elif option == "reset":
        buf = np.zeros_like(x)
      syncs.append((produced, buf.copy()))
    xs.append(x.copy())
  return np.stack(xs), syncs


def sgd_lookahead(alpha, policy):
  return lookahead(optax.sgd(LR, momentum=MU), K, alpha, inner_state_policy=policy)


def trace(state):
  """The momentum buffer of ``optax.sgd(lr, momentum)`` inside a Lookahead state."""
  is_trace = lambda s: isinstance(s, optax.TraceState)
  (buffer,) = [s.trace["x"] for s in jax.tree.leaves(state.inner_state, is_leaf=is_trace) if is_trace(s)]
  return np.asarray(buffer)


@pytest.mark.parametrize("alpha", [0.8, 0.5])
def test_interpolate_is_the_official_pullback_with_its_cache_copied(x64, alpha):
  xs, states = ours(sgd_lookahead(alpha, "interpolate"))
  ref_xs, syncs = official_sgd(alpha, "pullback", copy=True)
  np.testing.assert_allclose(xs, ref_xs, rtol=1e-12, atol=1e-12)
  for s, (_, after) in enumerate(syncs):
    np.testing.assert_allclose(trace(states[K * (s + 1) - 1]), after, rtol=1e-12, atol=1e-12, err_msg=f"sync {s + 1}")


@pytest.mark.parametrize("option,policy", [("none", "maintain"), ("reset", "reset")])
def test_the_official_none_and_reset_with_sgd_are_maintain_and_reset(x64, option, policy):
  xs, _ = ours(sgd_lookahead(0.8, policy))
  np.testing.assert_allclose(xs, official_sgd(0.8, option, copy=False)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.8, 0.5])
def test_the_published_pullback_scales_the_buffer_by_alpha_then_alpha_2_minus_alpha(x64, alpha):
  """The page's claim about the official file, and where our rule parts from it: the second sync."""
  _, syncs = official_sgd(alpha, "pullback", copy=False)
  assert len(syncs) == STEPS // K >= 3
  for s, (produced, after) in enumerate(syncs):
    factor = alpha if s == 0 else alpha * (2 - alpha)
    np.testing.assert_allclose(after, factor * produced, rtol=1e-12, err_msg=f"sync {s + 1}")

  # Ours follows the published file up to the second sync, where it keeps the buffer of the first sync in the mix.
  xs, states = ours(sgd_lookahead(alpha, "interpolate"))
  published_xs, _ = official_sgd(alpha, "pullback", copy=False)
  np.testing.assert_allclose(xs[: 2 * K], published_xs[: 2 * K], rtol=1e-12, atol=1e-12)
  (_, first), (produced, published) = syncs[0], syncs[1]
  ours_after = trace(states[2 * K - 1])
  np.testing.assert_allclose(ours_after, alpha * produced + (1 - alpha) * first, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(published, alpha * (2 - alpha) * produced, rtol=1e-12)
  assert np.max(np.abs(ours_after - published)) > 1e-3
  assert np.max(np.abs(xs[2 * K :] - published_xs[2 * K :])) > 1e-3


def adam_lookahead_numpy(alpha: float, restart: bool, lr=0.05, b1=0.9, b2=0.999, eps=1e-8, steps=STEPS):
  """Adam under Lookahead in numpy; ``restart``: moments and step count back to zero at every sync."""
  a, b, x = problem()
  slow, m, v, n = x.copy(), np.zeros_like(x), np.zeros_like(x), 0
  xs, moments = [], []
  for t in range(1, steps + 1):
    g = a @ x - b
    n += 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    x = x - lr * (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + eps)
    if t % K == 0:
      slow = slow + alpha * (x - slow)
      x = slow.copy()
      if restart:
        m, v, n = np.zeros_like(x), np.zeros_like(x), 0
    xs.append(x)
    moments.append((m, v, n))
  return np.stack(xs), moments


def adam_state(state):
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  (s,) = [s for s in jax.tree.leaves(state.inner_state, is_leaf=is_adam) if is_adam(s)]
  return np.asarray(s.mu["x"]), np.asarray(s.nu["x"]), int(s.count)


@pytest.mark.parametrize("policy,restart", [("reset", True), ("maintain", False)])
def test_reset_zeroes_adams_moments_at_a_sync_and_maintain_keeps_them(x64, policy, restart):
  """The PyTorch peers' reset and pullback leave Adam as it is: that is "maintain" here; "reset" restarts it."""
  xs, states = ours(lookahead(optax.adam(0.05), K, 0.5, inner_state_policy=policy))
  ref_xs, moments = adam_lookahead_numpy(0.5, restart)
  np.testing.assert_allclose(xs, ref_xs, rtol=1e-12, atol=1e-12)
  for t, (state, (m, v, n)) in enumerate(zip(states, moments)):
    mu, nu, count = adam_state(state)
    assert count == n, f"step {t + 1}"
    np.testing.assert_allclose(mu, m, rtol=1e-12, atol=1e-15, err_msg=f"step {t + 1}")
    np.testing.assert_allclose(nu, v, rtol=1e-12, atol=1e-15, err_msg=f"step {t + 1}")
    if (t + 1) % K == 0:
      assert (not np.any(mu) and not np.any(nu) and count == 0) == restart, f"sync at step {t + 1}"


def torch_optimizer_sgd(alpha: float, steps: int = STEPS):
  """torch_optimizer's Lookahead over SGD with momentum, in numpy, as its ``step`` does it.

  The counter starts at 0 and is tested before it is incremented: the slow weights are taken after the
  first step (that sync moves nothing), and the next syncs come after steps k + 1, 2k + 1, ...
  """
  a, b, x = problem()
  counter, slow, buf, xs = 0, None, None, []
  for _ in range(steps):
    g = a @ x - b
    buf = g.copy() if buf is None else MU * buf + g
    x = x - LR * buf
    if counter == 0:
      slow = x.copy() if slow is None else slow
      x = alpha * x + (1 - alpha) * slow
      slow = x.copy()
    counter = (counter + 1) % K
    xs.append(x)
  return np.stack(xs)


def test_torch_optimizer_is_maintain_one_step_late(x64):
  """The page's recipe (one inner step alone, then Lookahead with the inner state carried on) is its rule."""
  a, b, x0 = problem()
  grad = lambda p: {"x": jnp.asarray(a) @ p["x"] - jnp.asarray(b)}
  inner = optax.sgd(LR, momentum=MU)
  params = {"x": jnp.asarray(x0)}
  inner_state = inner.init(params)
  updates, inner_state = inner.update(grad(params), inner_state, params)
  params = optax.apply_updates(params, updates)
  opt = lookahead(inner, K, 0.5)
  state = opt.init(params)._replace(inner_state=inner_state)
  xs = [np.asarray(params["x"])]
  for _ in range(STEPS - 1):
    updates, state = opt.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
    xs.append(np.asarray(params["x"]))
  reference = torch_optimizer_sgd(0.5)
  np.testing.assert_allclose(np.stack(xs), reference, rtol=1e-12, atol=1e-12)
  on_time, _ = ours(sgd_lookahead(0.5, "maintain"))
  assert np.max(np.abs(on_time - reference)) > 1e-3  # and it is not our schedule


# ----------------------------------------------------------------------------- benchmarks/peers.py, without torch


def test_the_benchmark_without_torch_says_how_to_install_it_and_exits_2(tmp_path):
  """As if torch were not installed (whether or not it is here): one line, exit status 2, nothing written."""
  code = "import sys; sys.modules['torch'] = None; from benchmarks import peers; sys.exit(peers.main(sys.argv[1:]))"
  proc = subprocess.run(
    [sys.executable, "-c", code, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1 and "needs torch" in lines[0] and "pip install -e '.[peers]'" in lines[0], lines
  assert not list(tmp_path.iterdir())


def test_quadratic_gradient_is_the_closed_form(x64):
  pr = peers.quadratic()
  a, b = jnp.asarray(pr.data["a"]), jnp.asarray(pr.data["b"])
  x = jnp.asarray(pr.params["x"])
  auto = jax.grad(lambda p: 0.5 * p["x"] @ a @ p["x"] - b @ p["x"])({"x": x})["x"]
  np.testing.assert_allclose(peers.jax_grad_fn(pr)({"x": x})["x"], auto, rtol=1e-12)
  assert np.all(np.linalg.eigvalsh(pr.data["a"]) > 0)


def row(peer, option, alpha, diffs, error=None):
  matches = [v for v, d in diffs.items() if d <= peers.MATCH]
  return dict(
    peer=peer, problem="p", inner="adam", option=option, alpha=alpha, error=error, max_abs_diff=diffs, matches=matches
  )


def test_summary_matches_only_what_matches_in_every_run_and_reports_errors():
  close, far = 1e-15, 0.3
  diffs = lambda m: {v: (close if v == m else far) for v in peers.VARIANTS}
  rows = [
    row("a", "none", 0.5, diffs("maintain")),
    row("a", "none", 0.8, diffs("maintain")),
    row("a", "reset", 0.5, diffs("reset")),
    row("a", "reset", 0.8, diffs("maintain")),  # matches a different policy at another alpha: no match
    row("b", "pullback", 0.5, {}, error="KeyError: 'momentum_buffer' (step 5)"),
  ]
  summary = {(s["peer"], s["option"]): s for s in peers.summarize(rows)}
  assert summary[("a", "none")]["matches"] == ["maintain"]
  assert summary[("a", "none")]["max_abs_diff"]["reset"] == far
  assert summary[("a", "reset")]["matches"] == []
  assert summary[("a", "reset")]["max_abs_diff"]["maintain"] == far
  assert summary[("b", "pullback")]["matches"] == []
  assert summary[("b", "pullback")]["errors"] == ["KeyError: 'momentum_buffer' (step 5)"]
  h1, r1, *_ = peers.tables({"summary": peers.summarize(rows), "pullback_buffers": [], "rows": rows})
  cells = {(r[0], r[2]): r[-1] for r in r1}
  assert cells[("a", "none")] == "maintain" and cells[("a", "reset")] == "none"
  assert cells[("b", "pullback")].startswith("KeyError")
