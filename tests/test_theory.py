"""lookahead_optax.theory against the real optimizer (Monte-Carlo, measured rates) and plain loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lookahead_optax import lookahead, theory

# ---------------------------------------------------------------------------
# Noisy quadratic model: many independent chains of the real optimizers in one vmap.

NQM_A = np.array([0.25, 0.5, 1.0, 1.5])
NQM_SIGMA2 = np.array([1.0, 2.0, 0.5, 1.0])


@functools.partial(jax.jit, static_argnames=("optimizers", "k", "chains", "syncs"))
def simulate_nqm(optimizers, k, chains, syncs, x0, seed):
  """Run each optimizer on the NQM (shared noise draws); returns params after every sync, (opt, syncs, chains, d).

  Per chain and coordinate: loss 1/2 a (x - c)^2, c ~ N(0, sigma2) drawn afresh each step.
  """
  a = jnp.asarray(NQM_A, jnp.float32)[None]
  scale = jnp.sqrt(jnp.asarray(NQM_SIGMA2, jnp.float32))[None]
  key = jax.random.key(seed, impl="rbg")  # the cheapest generator on CPU
  xs = tuple(jnp.full((chains, a.shape[1]), x0, jnp.float32) for _ in optimizers)
  states = tuple(jax.vmap(opt.init)(x) for opt, x in zip(optimizers, xs))

  def inner(carry, t):
    xs, states = carry
    c = scale * jax.random.normal(jax.random.fold_in(key, t), (chains, a.shape[1]))
    new_xs, new_states = [], []
    for opt, x, state in zip(optimizers, xs, states):
      updates, state = jax.vmap(opt.update)(a * (x - c), state, x)
      new_xs.append(optax.apply_updates(x, updates))
      new_states.append(state)
    return (tuple(new_xs), tuple(new_states)), None

  def outer(carry, n):
    carry, _ = jax.lax.scan(inner, carry, n * k + jnp.arange(k))
    return carry, jnp.stack(carry[0])

  _, out = jax.lax.scan(outer, (xs, states), jnp.arange(syncs))
  return jnp.moveaxis(out, 1, 0)


@pytest.mark.parametrize("lr,k,alpha", [(0.5, 5, 0.5), (1.0, 3, 0.8), (1.2, 4, 0.3)])
def test_nqm_steady_state_variance_matches_monte_carlo(lr, k, alpha):
  burn, samples = 25, 150
  out = simulate_nqm((lookahead(optax.sgd(lr), k, alpha), optax.sgd(lr)), k, 1024, burn + samples, 0.0, 0)
  # Started at 0, the mean stays 0: the variance is the mean square over chains and syncs after burn-in.
  la_var, sgd_var = np.asarray(jnp.mean(out[:, burn:] ** 2, axis=(1, 2)), np.float64)
  la_exact = theory.nqm_lookahead_variance(NQM_A, NQM_SIGMA2, lr, k, alpha)
  sgd_exact = theory.nqm_sgd_variance(NQM_A, NQM_SIGMA2, lr)
  np.testing.assert_allclose(la_var, la_exact, rtol=0.03, err_msg="Lookahead(SGD) vs eq. 7")
  np.testing.assert_allclose(sgd_var, sgd_exact, rtol=0.03, err_msg="SGD vs eq. 6")
  assert np.all(la_var < sgd_var)  # Proposition 2's remark, seen in the simulation


def test_nqm_expected_loss_matches_monte_carlo():
  lr, k, alpha, chains = 0.4, 5, 0.5, 4096
  out = simulate_nqm((lookahead(optax.sgd(lr), k, alpha), optax.sgd(lr)), 1, chains, 40, 1.0, 1)
  # 1/2 sum_i a_i (x_i^2 + sigma_i^2) per chain, after every update (k=1 in the scan: one update per row)
  per_chain = 0.5 * np.sum(NQM_A * (np.asarray(out, np.float64) ** 2 + NQM_SIGMA2), axis=-1)
  for t in (1, 4, 5, 7, 13, 40):
    la = theory.nqm_lookahead_moments(NQM_A, NQM_SIGMA2, lr, k, alpha, t, mean0=1.0)
    sgd = theory.nqm_sgd_moments(NQM_A, NQM_SIGMA2, lr, t, mean0=1.0)
    for name, moments, samples in (("lookahead", la, per_chain[0, t - 1]), ("sgd", sgd, per_chain[1, t - 1])):
      exact = theory.nqm_expected_loss(NQM_A, NQM_SIGMA2, moments)
      stderr = samples.std() / np.sqrt(chains)
      assert abs(samples.mean() - exact) < 4 * stderr, (name, t, samples.mean(), exact, stderr)
      assert abs(samples.mean() / exact - 1) < 0.02, (name, t, samples.mean(), exact)


def per_step_moments(a, sigma2, lr, k, alpha, steps, mean0, var0):
  """Moments of (slow, fast) propagated one inner step at a time: a plain loop, not the closed form."""
  m_s, m_f, v_s, v_f, cov = mean0, mean0, var0, var0, var0
  r, noise = 1 - lr * a, lr**2 * a**2 * sigma2
  for t in range(1, steps + 1):
    m_f, v_f, cov = r * m_f, r**2 * v_f + noise, r * cov
    if t % k == 0:  # slow <- (1 - alpha) slow + alpha fast; fast <- slow
      m_s = (1 - alpha) * m_s + alpha * m_f
      v_s = (1 - alpha) ** 2 * v_s + alpha**2 * v_f + 2 * alpha * (1 - alpha) * cov
      m_f, v_f, cov = m_s, v_s, v_s
  return m_f, v_f


@pytest.mark.parametrize("steps", [0, 1, 6, 10, 23])
def test_nqm_moments_match_per_step_recursion(steps):
  a, sigma2 = np.array([0.1, 0.7, 1.9]), np.array([1.0, 0.3, 2.0])
  for lr, k, alpha in ((0.5, 5, 0.5), (1.0, 3, 1.0), (0.3, 1, 0.2), (0.8, 4, 0.0)):
    mean, var = per_step_moments(a, sigma2, lr, k, alpha, steps, 1.5, 0.2)
    got = theory.nqm_lookahead_moments(a, sigma2, lr, k, alpha, steps, mean0=1.5, var0=0.2)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got.var, var, rtol=1e-12)
  mean, var = per_step_moments(a, sigma2, 0.5, 1, 1.0, steps, 1.5, 0.2)  # alpha = 1, k = 1: SGD
  got = theory.nqm_sgd_moments(a, sigma2, 0.5, steps, mean0=1.5, var0=0.2)
  np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(got.var, var, rtol=1e-12)


def test_nqm_fixed_points_are_the_limit_of_the_recursion():
  a, sigma2 = np.array([0.05, 0.7, 1.9]), np.array([1.0, 0.3, 2.0])
  for lr, k, alpha in ((0.5, 5, 0.5), (1.0, 3, 0.9), (0.3, 1, 0.2)):
    _, var = per_step_moments(a, sigma2, lr, k, alpha, 4000 * k, 0.0, 0.0)
    np.testing.assert_allclose(theory.nqm_lookahead_variance(a, sigma2, lr, k, alpha), var, rtol=1e-9)
    _, var = per_step_moments(a, sigma2, lr, 1, 1.0, 4000, 0.0, 0.0)
    np.testing.assert_allclose(theory.nqm_sgd_variance(a, sigma2, lr), var, rtol=1e-9)


def test_lookahead_variance_strictly_below_sgd():
  """Proposition 2's remark, over a grid: V_LA < V_SGD for alpha in (0, 1), equal at alpha = 1."""
  a = np.geomspace(1e-3, 1.0, 25)[:, None, None]
  lr = np.linspace(0.01, 1.99, 30)[None, :, None]
  alpha = np.linspace(0.01, 0.99, 40)[None, None, :]
  sgd = theory.nqm_sgd_variance(a, 1.0, lr)
  for k in (1, 2, 5, 20):
    la = theory.nqm_lookahead_variance(a, 1.0, lr, k, alpha)
    assert np.all(la < sgd)
    np.testing.assert_allclose(theory.nqm_lookahead_variance(a, 1.0, lr, k, 1.0), sgd, rtol=1e-12)


def test_nqm_loss_is_equation_5():
  a, sigma2 = np.array([1.0, 4.0]), np.array([0.5, 0.25])
  moments = theory.Moments(np.array([[2.0, -1.0]]), np.array([[0.5, 0.1]]))
  assert theory.nqm_expected_loss(a, sigma2, moments)[0] == pytest.approx(0.5 * (1 * 5.0 + 4 * 1.35))


# ---------------------------------------------------------------------------
# Deterministic quadratic (Fig. 4): exact rates vs the measured log-distance slope.


def measured_rates(opt, a, period, steps, windows=40):
  """Per-coordinate rate per step of ``opt`` on 1/2 sum_i a_i x_i^2, from the log-distance slope.

  Records |x_i| after every ``period`` updates; the slope is a least-squares fit
  of log(max over a window) against the step, over the decay from 1e30 to 1e-30
  (float32's range), skipping the first fifth (transients).
  """
  a32 = jnp.asarray(a, jnp.float32)

  @jax.jit
  def go():
    x = jnp.full(a32.shape, 1e30, jnp.float32)

    def inner(carry, _):
      x, state = carry
      updates, state = opt.update(a32 * x, state, x)
      return (optax.apply_updates(x, updates), state), None

    def outer(carry, _):
      carry, _ = jax.lax.scan(inner, carry, None, length=period)
      return carry, carry[0]

    return jax.lax.scan(outer, (x, opt.init(x)), None, length=steps // period)[1]

  xs = np.abs(np.asarray(go(), np.float64))
  rates = []
  for col in xs.T:
    stop = int(np.nonzero(col > 1e-30)[0][-1]) + 1
    start = stop // 5
    width = (stop - start) // windows
    maxima = col[start : start + windows * width].reshape(windows, width).max(axis=1)
    slope = np.polyfit((start + width * np.arange(windows)) * period, np.log(maxima), 1)[0]
    rates.append(np.exp(slope))
  return np.array(rates)


def separated(matrices):
  """Curvatures whose linear map has complex eigenvalues or real ones of clearly different moduli.

  Near-equal real moduli (beats, or a repeated root) make the log-distance reach its
  slope only after very long runs; those curvatures are left out of the measurement.
  """
  eig = np.linalg.eigvals(matrices)
  moduli = np.sort(np.abs(eig), axis=-1)
  return (np.abs(eig.imag).max(-1) > 1e-9) | (moduli[..., 0] < 0.8 * moduli[..., 1])


def cm_matrices(a, lr, beta):
  """The test's own (x, momentum) map of optax.sgd(lr, momentum=beta) on 1/2 a x^2."""
  return np.stack(
    [np.stack([1 - lr * a, -lr * beta * np.ones_like(a)], -1), np.stack([a, beta * np.ones_like(a)], -1)], -2
  )


@pytest.mark.parametrize("lr,beta", [(0.02, 0.5), (0.02, 0.9), (0.01, 0.99)])
def test_cm_rate_matches_measured_slope(lr, beta):
  a = np.geomspace(0.5, 150, 12)
  exact = theory.cm_rate(a, lr, beta)
  keep = separated(cm_matrices(a, lr, beta)) & (exact > 0.5) & (exact < 0.999)  # measurable in float32
  a, exact = a[keep], exact[keep]
  steps = int(60 / np.min(-np.log(exact)))  # the slowest coordinate decays by e^-60
  measured = measured_rates(optax.sgd(lr, momentum=beta), a, 1, steps)
  np.testing.assert_allclose(np.log(measured), np.log(exact), rtol=0.02)  # 2% of -log(rate) ~ 1 - rate


@pytest.mark.parametrize(
  "lr,beta,k,alpha,policy",
  [
    (0.02, 0.9, 20, 0.5, "maintain"),
    (0.015, 0.99, 20, 0.5, "maintain"),
    (0.01, 0.9, 10, 0.7, "maintain"),
    (0.03, 0.9, 5, 0.5, "reset"),
  ],
)
def test_lookahead_cm_rate_matches_measured_slope(lr, beta, k, alpha, policy):
  a = np.geomspace(0.5, 150, 40)
  mk = np.linalg.matrix_power(cm_matrices(a, lr, beta), k)
  sync = mk.copy()  # the test's own per-sync map of (slow weights, momentum)
  sync[:, 0, 0], sync[:, 0, 1] = 1 - alpha + alpha * mk[:, 0, 0], alpha * mk[:, 0, 1]
  if policy == "reset":
    sync[:, 1, 0] = sync[:, 1, 1] = 0.0
  keep = separated(sync)
  exact = theory.lookahead_cm_rate(a, lr, beta, k, alpha, policy)
  keep &= (exact < 0.999) & (exact**k > 0.3)  # measurable: a few thousand steps, >100 syncs before underflow
  a, exact = a[keep][::3], exact[keep][::3]
  assert len(a) >= 3
  steps = int(60 / np.min(-np.log(exact)))
  opt = lookahead(optax.sgd(lr, momentum=beta), k, alpha, inner_state_policy=policy)
  measured = measured_rates(opt, a, k, steps)  # observed right after each sync
  np.testing.assert_allclose(np.log(measured), np.log(exact), rtol=0.02)


def test_rates_reduce_to_known_cases():
  a = np.geomspace(0.1, 10, 7)
  # Gradient descent: |1 - lr a|; Lookahead with alpha = 1 is its inner optimizer.
  np.testing.assert_allclose(theory.cm_rate(a, 0.15, 0.0), np.abs(1 - 0.15 * a), rtol=1e-12)
  np.testing.assert_allclose(theory.lookahead_cm_rate(a, 0.1, 0.8, 7, 1.0), theory.cm_rate(a, 0.1, 0.8), rtol=1e-9)
  # Lookahead(GD), either policy: per sync 1 - alpha + alpha (1 - lr a)^k.
  for policy in ("maintain", "reset"):
    got = theory.lookahead_cm_rate(a, 0.15, 0.0, 4, 0.3, policy)
    np.testing.assert_allclose(got, np.abs(0.7 + 0.3 * (1 - 0.15 * a) ** 4) ** 0.25, rtol=1e-12)


def test_optimal_rate_known_closed_forms():
  kappa = np.array([1.0, 10.0, 1000.0])
  gd = theory.optimal_rate(kappa, 0.0)  # gradient descent: lr 2/(1+kappa), rate (kappa-1)/(kappa+1)
  np.testing.assert_allclose(gd.rate, (kappa - 1) / (kappa + 1), atol=1e-6)
  np.testing.assert_allclose(gd.lr[1:], 2 / (1 + kappa[1:]), rtol=1e-4)
  # Heavy ball with fixed beta: sqrt(beta) while [1, kappa] fits in the complex-eigenvalue band.
  beta = 0.81
  fits = ((1 + np.sqrt(beta)) / (1 - np.sqrt(beta))) ** 2
  np.testing.assert_allclose(theory.optimal_rate([1.0, 30.0, 0.9 * fits], beta).rate, np.sqrt(beta), rtol=1e-6)
  assert theory.optimal_rate(10 * fits, beta).rate > np.sqrt(beta) + 1e-3
  # Lookahead's optimum is no worse than the rate at any lr it could pick (here CM's optimal lr).
  cm = theory.optimal_rate(100.0, 0.9, num_curvatures=50)
  la = theory.optimal_rate(100.0, 0.9, k=20, alpha=0.5, num_curvatures=50)
  at_cm_lr = theory.lookahead_cm_rate(np.geomspace(1, 100, 50), cm.lr, 0.9, 20, 0.5).max()
  assert la.rate <= at_cm_lr + 1e-12


# ---------------------------------------------------------------------------
# Proposition 1.


def test_optimal_alpha_minimises_the_loss_along_the_line():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(5, 5))
  A = q @ q.T + 0.5 * np.eye(5)
  b, slow, fast = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
  grid = np.linspace(-3, 3, 60001)
  line = slow + grid[:, None] * (fast - slow)
  values = 0.5 * np.einsum("ti,ij,tj->t", line, A, line) - line @ b
  assert theory.optimal_alpha_quadratic(A, b, slow, fast) == pytest.approx(grid[int(np.argmin(values))], abs=1e-4)
  # The diagonal form equals the matrix form.
  d = np.abs(rng.normal(size=5)) + 0.1
  assert theory.optimal_alpha_quadratic(d, b, slow, fast) == pytest.approx(
    theory.optimal_alpha_quadratic(np.diag(d), b, slow, fast), rel=1e-12
  )


# ---------------------------------------------------------------------------
# Bad input: a ValueError naming the argument.


@pytest.mark.parametrize(
  "call,name",
  [
    (lambda: theory.nqm_sgd_variance(0.0, 1.0, 0.1), "a"),
    (lambda: theory.nqm_sgd_variance([1.0, -1.0], 1.0, 0.1), "a"),
    (lambda: theory.nqm_sgd_variance(1.0, -1.0, 0.1), "sigma2"),
    (lambda: theory.nqm_sgd_variance(1.0, 1.0, 2.5), "lr"),
    (lambda: theory.nqm_sgd_variance(1.0, 1.0, float("nan")), "lr"),
    (lambda: theory.nqm_lookahead_variance(1.0, 1.0, 0.1, 0, 0.5), "k"),
    (lambda: theory.nqm_lookahead_variance(1.0, 1.0, 0.1, 2.0, 0.5), "k"),
    (lambda: theory.nqm_lookahead_variance(1.0, 1.0, 0.1, 5, 0.0), "alpha"),
    (lambda: theory.nqm_lookahead_variance(1.0, 1.0, 0.1, 5, 1.5), "alpha"),
    (lambda: theory.nqm_lookahead_moments(1.0, 1.0, 0.1, 5, 0.5, -1, 1.0), "steps"),
    (lambda: theory.nqm_sgd_moments(1.0, 1.0, 0.1, 3, "x"), "mean0"),
    (lambda: theory.nqm_sgd_moments(1.0, 1.0, 0.1, 3, 1.0, var0=-1.0), "var0"),
    (lambda: theory.nqm_expected_loss(1.0, 1.0, (1.0, 0.0)), "moments"),
    (lambda: theory.cm_rate(1.0, 0.1, 1.0), "momentum"),
    (lambda: theory.lookahead_cm_rate(1.0, 0.1, 0.9, 5, 0.5, "interpolate"), "inner_state_policy"),
    (lambda: theory.optimal_rate(0.5, 0.9), "condition_number"),
    (lambda: theory.optimal_rate(10.0, 0.9, num_lr=2), "num_lr"),
    (lambda: theory.optimal_alpha_quadratic([[1.0, 2.0], [0.0, 1.0]], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]), "A"),
    (lambda: theory.optimal_alpha_quadratic([1.0, 1.0], [1.0], [0.0, 0.0], [1.0, 1.0]), "b, slow and fast"),
    (lambda: theory.optimal_alpha_quadratic([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]), "fast"),
  ],
)
def test_bad_arguments_name_the_argument(call, name):
  with pytest.raises(ValueError, match=name):
    call()
