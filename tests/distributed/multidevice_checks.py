"""Lookahead and DiLoCo on 8 simulated CPU devices, against single-device and plain-loop references.

Run by ``test_multidevice.py`` and ``test_diloco_replicas.py`` in a subprocess
(``multidevice_utils.run_script``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Prints one JSON line:
per check, measured errors and facts (shardings, collective counts) that the
tests assert on. The references are written here, independently of the code
under test: a single-device jitted run, and DiLoCo as a Python loop over M
replica copies with a hand-written Nesterov outer step.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lookahead_optax import diloco, lookahead, replica_mean
from tests.compiled import HLO_COLLECTIVES, hlo_placed

K = 3
CYCLES = 3
STEPS = K * CYCLES + 1  # ends mid-cycle
NESTEROV_LR, NESTEROV_MU = 0.7, 0.9


# ------------------------------------------------------------------ problem


def make_problem(batch=64, seed=0):
  """A small tanh MLP regression: params, inputs, targets."""
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.normal(size=(16, 8)) / 4, jnp.float32),
    "b1": jnp.asarray(rng.normal(size=(8,)) / 4, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(8, 4)) / 3, jnp.float32),
    "b2": jnp.asarray(rng.normal(size=(4,)) / 4, jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(batch, 16)), jnp.float32)
  y = jnp.asarray(np.sin(rng.normal(size=(batch, 4))), jnp.float32)
  return params, x, y


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"][None])  # explicit broadcast: the suite raises on rank promotion
  return jnp.mean((h @ params["w2"] + params["b2"][None] - y) ** 2)


def elementwise_loss(params, x=None, y=None):
  """A separable quadratic: no contraction over sharded dimensions, so explicit sharding needs no reshard."""
  total = 0.0
  for w in jax.tree.leaves(params):
    curv = np.linspace(0.5, 2.0, w.size, dtype=np.float32).reshape(w.shape)
    total = total + jnp.sum(curv * (w - 1.0) ** 2)
  return total


# FSDP-style on a (data=4, model=2) mesh: every param is split, none replicated.
FSDP_SPECS = {"w1": P("data", "model"), "b1": P("model"), "w2": P("model", "data"), "b2": P("data")}

# The three inner-state policies, and a Nesterov outer step (SNOO-style) whose state is param-shaped too.
VARIANTS = ("maintain", "reset", "interpolate", "outer")


def make_opt(variant):
  # eps=1e-3: Adam's g / sqrt(v) would otherwise amplify reduction-order rounding in near-zero gradients.
  inner = optax.adam(0.02, eps=1e-3)
  if variant == "outer":
    return lookahead(inner, K, outer=optax.sgd(NESTEROV_LR, momentum=NESTEROV_MU, nesterov=True))
  return lookahead(inner, K, 0.5, inner_state_policy=variant)


OPTS = {v: make_opt(v) for v in VARIANTS}


def init_all(params):
  return {v: opt.init(params) for v, opt in OPTS.items()}


def update_all(grads, states, params):
  """One update of every variant: ``grads`` and ``params`` are dicts keyed by variant."""
  out = {v: OPTS[v].update(grads[v], states[v], params[v]) for v in VARIANTS}
  return {v: u for v, (u, _) in out.items()}, {v: s for v, (_, s) in out.items()}


def train_step(loss, reduce=lambda g: g, local=lambda p: p):
  """``(params_by_variant, states, x, y) -> (params, states)``.

  ``reduce`` combines gradients across devices; ``local`` marks params as
  per-device before differentiating (under ``shard_map``, so that the gradient
  is the local one and ``reduce`` is the only collective).
  """

  def step(ps, states, x, y):
    grads = {v: reduce(jax.grad(loss)(local(ps[v]), x, y)) for v in VARIANTS}
    updates, states = update_all(grads, states, ps)
    return {v: optax.apply_updates(ps[v], updates[v]) for v in VARIANTS}, states

  return step


@functools.cache
def reference_run(loss_name):
  """The reference: the same training on one device, full batch, every variant (one run shared by the checks).

  Returns per variant the lists of fast and slow weights after each step.
  """
  loss = mlp_loss if loss_name == "mlp" else elementwise_loss
  params, x, y = jax.device_put(make_problem(), jax.devices()[0])
  ps = {v: params for v in VARIANTS}
  states = init_all(params)
  step = jax.jit(train_step(loss))
  hist = {v: ([], []) for v in VARIANTS}
  for _ in range(STEPS):
    ps, states = step(ps, states, x, y)
    for v in VARIANTS:
      hist[v][0].append(ps[v])
      hist[v][1].append(states[v].slow)
  return hist


def max_diff(a, b) -> float:
  """Largest absolute difference between two pytrees of arrays, wherever they live."""
  return max(
    float(np.max(np.abs(np.asarray(u, np.float32) - np.asarray(v, np.float32))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def specs(tree):
  return jax.tree.map(lambda a: str(a.sharding.spec), tree)


def track(hist, diffs, t, ps, slows):
  """Fold the step-``t`` errors against the reference into ``diffs`` (per variant)."""
  for v in VARIANTS:
    diffs[v] = max(diffs.get(v, 0.0), max_diff(ps[v], hist[v][0][t]), max_diff(slows[v], hist[v][1][t]))


# --------------------------------------------------------------------- pmap


def check_pmap():
  """Data parallel under jax.pmap with lax.pmean of gradients, every variant."""
  n = jax.device_count()
  params, x, y = make_problem()
  xs, ys = x.reshape(n, -1, 16), y.reshape(n, -1, 4)
  pstep = jax.pmap(train_step(mlp_loss, lambda g: lax.pmean(g, "batch")), axis_name="batch")
  ps = {v: jax.tree.map(lambda a: jnp.stack([a] * n), params) for v in VARIANTS}
  states = jax.pmap(init_all)(ps["maintain"])
  hist = reference_run("mlp")
  diffs, spread = {}, 0.0
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  for t in range(STEPS):
    ps, states = pstep(ps, states, xs, ys)
    track(hist, diffs, t, first(ps), {v: first(states[v].slow) for v in VARIANTS})
    # replicas bitwise identical: every leaf of params and state equals replica 0's
    spread = max(spread, max(float(np.abs(a - a[:1]).max()) for a in map(np.asarray, jax.tree.leaves((ps, states)))))
  return {"max_diff_vs_single_device": diffs, "replica_spread": spread}


# ---------------------------------------------------------------- shard_map


def check_shard_map():
  """jax.shard_map over 8 devices, explicit lax.pmean of gradients, replicated params and state."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params, x, y = make_problem()
  body = train_step(mlp_loss, lambda g: lax.pmean(g, "data"), lambda p: lax.pcast(p, "data", to="varying"))
  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
  x_s, y_s = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  ps = {v: jax.device_put(params, NamedSharding(mesh, P())) for v in VARIANTS}
  states = init_all(ps["maintain"])
  hist = reference_run("mlp")
  diffs = {}
  for t in range(STEPS):
    ps, states = step(ps, states, x_s, y_s)
    track(hist, diffs, t, ps, {v: states[v].slow for v in VARIANTS})
  return {"max_diff_vs_single_device": diffs}


# ------------------------------------------------------ jit + NamedSharding


def fsdp_mesh(axis_type):
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def sharding_mismatches(state, params):
  """Paths of param-shaped state leaves whose sharding is not the matching param's.

  Param-shaped leaves are found by shape; scalars (counts, alpha) and the per-leaf placement counts
  (``misplaced``, one int per leaf, whatever its shape happens to match) are left out: an eager ``init``
  puts them on one device, a jitted one replicates them.
  """
  by_shape = {p.shape: p for p in jax.tree.leaves(params)}
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if jax.tree_util.keystr(path).endswith(".misplaced"):
      continue
    if leaf.ndim and leaf.shape in by_shape:
      p = by_shape[leaf.shape]
      if not leaf.sharding.is_equivalent_to(p.sharding, p.ndim):
        bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {p.sharding.spec}")
  return bad


def check_jit_fsdp():
  """jax.jit (automatic sharding) with params sharded FSDP-style and the batch sharded over 'data'."""
  mesh = fsdp_mesh(jax.sharding.AxisType.Auto)
  params, x, y = make_problem()
  params_s = jax.device_put(params, {n: NamedSharding(mesh, s) for n, s in FSDP_SPECS.items()})
  x_s, y_s = jax.device_put((x, y), NamedSharding(mesh, P("data", None)))
  ps = {v: params_s for v in VARIANTS}
  states = init_all(params_s)
  states_jit = jax.jit(init_all)(params_s)
  out = {
    "init": {v: sharding_mismatches(states[v], params_s) for v in VARIANTS},
    "jit_init_slow": {v: sharding_mismatches(states_jit[v].slow, params_s) for v in VARIANTS},
    # zero-initialised leaves (Adam's moments, the outer momentum) under a jitted init in Auto mode
    "jit_init_all": {v: sharding_mismatches(states_jit[v], params_s) for v in VARIANTS},
    "steps": {v: [] for v in VARIANTS},
  }
  step = jax.jit(train_step(mlp_loss))
  hist = reference_run("mlp")
  diffs = {}
  for t in range(STEPS):
    ps, states = step(ps, states, x_s, y_s)
    for v in VARIANTS:
      out["steps"][v] += [f"step {t}: {m}" for m in sharding_mismatches((ps[v], states[v]), params_s)]
    track(hist, diffs, t, ps, {v: states[v].slow for v in VARIANTS})
  out["max_diff_vs_single_device"] = diffs
  return out


EAGER_UPDATE_VARIANTS = ("maintain", "reset", "outer")  # op-by-op dispatch compiles every primitive: keep few


def check_explicit_sharding():
  """Sharding in types (AxisType.Explicit): the checks optax runs on its own optimizers, and a training run."""
  mesh = fsdp_mesh(jax.sharding.AxisType.Explicit)
  params, _, _ = make_problem()
  typ = lambda tree: jax.tree.map(lambda a: str(jax.typeof(a)), tree)
  out = {
    "slow_type_is_param_type": {},
    "outer_type_is_param_type": None,
    "init_vs_jit_init": {},
    "update_vs_init": {},
    "jit_update_vs_update": {},
    "eager_update_error": {},
  }
  with jax.set_mesh(mesh):
    params_s = jax.device_put(params, {n: NamedSharding(mesh, s) for n, s in FSDP_SPECS.items()})
    grads = jax.jit(jax.grad(elementwise_loss))(params_s)
    for v, opt in OPTS.items():
      state0 = opt.init(params_s)
      state1 = jax.jit(opt.init)(params_s)
      _, state3 = jax.jit(opt.update)(grads, state0, params_s)
      out["slow_type_is_param_type"][v] = typ(state0.slow) == typ(params_s) == typ(state3.slow)
      out["init_vs_jit_init"][v] = typ(state0) == typ(state1)
      out["update_vs_init"][v] = typ(state3) == typ(state0)
      if v not in EAGER_UPDATE_VARIANTS:
        continue
      try:
        _, state2 = opt.update(grads, state0, params_s)  # eager, as optax's own sharding test does
        out["jit_update_vs_update"][v] = typ(state3) == typ(state2)
      except Exception as e:  # reported, asserted on by the tests
        out["eager_update_error"][v] = f"{type(e).__name__}: {str(e)[:300]}"
    out["outer_type_is_param_type"] = typ(OPTS["outer"].init(params_s).outer_state[0].trace) == typ(params_s)
  hist = reference_run("elementwise")  # on one device: outside the mesh context
  with jax.set_mesh(mesh):
    ps = {v: params_s for v in VARIANTS}
    states = init_all(params_s)
    step = jax.jit(train_step(elementwise_loss))
    diffs, follows = {}, True
    for t in range(STEPS):
      ps, states = step(ps, states, None, None)
      follows &= all(typ(states[v].slow) == typ(ps[v]) == typ(params_s) for v in VARIANTS)
      track(hist, diffs, t, ps, {v: states[v].slow for v in VARIANTS})
  out["every_step_slow_type_is_param_type"] = bool(follows)
  out["max_diff_vs_single_device"] = diffs
  out["slow_types"] = typ(states["maintain"].slow)
  return out


# ------------------------------------------------------------------- DiLoCo


def reference_diloco(inner, params, xs, ys, steps, k, lr, mu, bad=()):
  """DiLoCo as the paper writes it: M replica copies in a Python loop, a hand-written Nesterov outer step.

  ``bad``: (step, replica) pairs whose gradient is NaN; at a sync a replica whose fast weights are not finite
  is left out of the mean (with none left, the slow weights and momentum stay). Returns per step the slow
  weights and the list of M fast weights.
  """
  m_count = xs.shape[0]
  grad = jax.jit(jax.grad(mlp_loss))
  inner_update = jax.jit(inner.update)
  phi = params
  momentum = jax.tree.map(jnp.zeros_like, params)
  fasts = [params] * m_count
  states = [inner.init(params) for _ in range(m_count)]
  slow_hist, fast_hist = [], []
  for t in range(steps):
    for m in range(m_count):
      g = grad(fasts[m], xs[m], ys[m])
      if (t, m) in bad:
        g = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), g)
      updates, states[m] = inner_update(g, states[m], fasts[m])
      fasts[m] = jax.tree.map(lambda a, u: a + u, fasts[m], updates)
    if (t + 1) % k == 0:
      ok = [all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(f)) for f in fasts]
      if any(ok):
        present = [f for f, good in zip(fasts, ok) if good]
        delta = jax.tree.map(lambda s, *f: sum(s - fi for fi in f) / len(present), phi, *present)
        momentum = jax.tree.map(lambda b, d: mu * b + d, momentum, delta)
        phi = jax.tree.map(lambda s, b, d: s - lr * (d + mu * b), phi, momentum, delta)
      fasts = [phi] * m_count
    slow_hist.append(phi)
    fast_hist.append(list(fasts))
  return slow_hist, fast_hist


def diloco_problem():
  n = jax.device_count()
  params, x, y = make_problem(batch=8 * n, seed=1)
  return params, x.reshape(n, -1, 16), y.reshape(n, -1, 4)


def replicated(tree, n):
  return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


def diloco_metrics(slow_hist, fast_hist, ref_slow, ref_fast):
  """Errors against the reference, and how identical the replicas are."""
  n = len(ref_fast[0])
  diff = 0.0
  slow_identical, fast_identical_after_sync = True, True
  fast_vs_slow_ulps, fast_mismatch = 0.0, 0
  slow_hist, fast_hist = jax.device_get((slow_hist, fast_hist))
  for t, (slow, fast) in enumerate(zip(slow_hist, fast_hist)):
    diff = max(diff, max_diff(jax.tree.map(lambda a: a[0], slow), ref_slow[t]))
    for m in range(n):
      diff = max(diff, max_diff(jax.tree.map(lambda a: a[m], fast), ref_fast[t][m]))
    for a in jax.tree.leaves(slow):
      a = np.asarray(a)
      slow_identical &= bool((a == a[:1]).all())
    if (t + 1) % K == 0:
      for f, s, before in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), jax.tree.leaves(fast_hist[t - 1])):
        f, s, before = np.asarray(f), np.asarray(s), np.asarray(before)
        fast_identical_after_sync &= bool((f == f[:1]).all())
        fast_mismatch += int((f != s).sum())
        # one rounding at the larger of the new slow weight and the replica's fast weight before the sync
        ulp = np.spacing(np.maximum(np.abs(s), np.abs(before)).astype(np.float32))
        fast_vs_slow_ulps = max(fast_vs_slow_ulps, float((np.abs(f - s) / ulp).max()))
  return {
    "max_diff_vs_reference": diff,
    "slow_identical_across_replicas": bool(slow_identical),
    "fast_identical_across_replicas_after_sync": bool(fast_identical_after_sync),
    "fast_ne_slow_elements_after_sync": fast_mismatch,
    "elements_checked_after_sync": sum(np.size(a) for a in jax.tree.leaves(fast_hist[0])) * (len(fast_hist) // K),
    "fast_vs_slow_max_ulps_after_sync": fast_vs_slow_ulps,
  }


def check_diloco_shard_map(check_vma):
  """diloco(...) inside jax.shard_map: one replica per device, each with its own data."""
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("replica",))
  inner = optax.adam(0.02)
  opt = diloco(inner, k=K, outer_learning_rate=NESTEROV_LR, outer_momentum=NESTEROV_MU, axis_name="replica")
  params, xs, ys = diloco_problem()
  squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
  expand = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def body(params, state, x, y):
    params, state, x, y = squeeze(params), squeeze(state), x[0], y[0]
    updates, state = opt.update(jax.grad(mlp_loss)(params, x, y), state, params)  # no gradient all-reduce
    return expand(optax.apply_updates(params, updates)), expand(state)

  spec = P("replica")
  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma))
  init = jax.jit(
    jax.shard_map(lambda p: expand(opt.init(squeeze(p))), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma)
  )
  put = lambda tree: jax.device_put(tree, NamedSharding(mesh, spec))
  p, xs_s, ys_s = put(replicated(params, n)), put(xs), put(ys)
  state = init(p)
  slow_hist, fast_hist = [], []
  for _ in range(STEPS):
    p, state = step(p, state, xs_s, ys_s)
    slow_hist.append(state.slow)
    fast_hist.append(p)
  ref_slow, ref_fast = reference_diloco(inner, params, xs, ys, STEPS, K, NESTEROV_LR, NESTEROV_MU)
  out = diloco_metrics(slow_hist, fast_hist, ref_slow, ref_fast)
  compiled = step.lower(p, state, xs_s, ys_s).compile().as_text()
  out.update(hlo_collectives(compiled))
  out.update(jaxpr_collectives(jax.make_jaxpr(step)(p, state, xs_s, ys_s).jaxpr))
  return out


def check_diloco_pmap():
  """lookahead(..., outer=optax.chain(replica_mean(...), Nesterov)) under jax.pmap, each replica with its own data."""
  n = jax.device_count()
  inner = optax.adam(0.02)
  nesterov = optax.sgd(NESTEROV_LR, momentum=NESTEROV_MU, nesterov=True)
  opt = lookahead(inner, K, outer=optax.chain(replica_mean("replica"), nesterov))
  params, xs, ys = diloco_problem()

  def step(params, state, x, y):
    updates, state = opt.update(jax.grad(mlp_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  pstep = jax.pmap(step, axis_name="replica")
  p = replicated(params, n)
  state = jax.pmap(opt.init, axis_name="replica")(p)
  slow_hist, fast_hist = [], []
  for _ in range(STEPS):
    p, state = pstep(p, state, xs, ys)
    slow_hist.append(state.slow)
    fast_hist.append(p)
  ref_slow, ref_fast = reference_diloco(inner, params, xs, ys, STEPS, K, NESTEROV_LR, NESTEROV_MU)
  out = diloco_metrics(slow_hist, fast_hist, ref_slow, ref_fast)
  out.update(hlo_collectives(pstep.lower(p, state, xs, ys).compile().as_text()))
  return out


BAD = {(1, 2), (4, 5)}  # (step, replica): a NaN gradient, in two different cycles


def check_diloco_bad_replica_pmap():
  """A replica whose gradient goes NaN is left out of that sync; it resumes from the slow weights (the guide's
  recipe) and takes part again. Inner SGD (no state to carry the NaN); against reference_diloco with ``bad``."""
  n = jax.device_count()
  inner = optax.sgd(0.05)
  nesterov = optax.sgd(NESTEROV_LR, momentum=NESTEROV_MU, nesterov=True)
  opt = lookahead(inner, K, outer=optax.chain(replica_mean("replica"), nesterov))
  params, xs, ys = diloco_problem()

  def step(params, state, x, y, poisoned):
    g = jax.tree.map(lambda a: jnp.where(poisoned, jnp.nan, a), jax.grad(mlp_loss)(params, x, y))
    updates, state = opt.update(g, state, params)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(params)]))
    resume = (state.count == 0) & ~finite  # right after a sync: back on the slow weights
    return jax.tree.map(lambda a, s: jnp.where(resume, s, a), params, state.slow), state

  pstep = jax.pmap(step, axis_name="replica")
  p = replicated(params, n)
  state = jax.pmap(opt.init, axis_name="replica")(p)
  slow_diff, fast_diff, excluded, finite = 0.0, 0.0, [], True
  ref_slow, ref_fast = reference_diloco(inner, params, xs, ys, STEPS, K, NESTEROV_LR, NESTEROV_MU, bad=BAD)
  for t in range(STEPS):
    p, state = pstep(p, state, xs, ys, jnp.asarray([(t, m) in BAD for m in range(n)]))
    slow_diff = max(slow_diff, max_diff(jax.tree.map(lambda a: a[0], state.slow), ref_slow[t]))
    if (t + 1) % K == 0:
      fast_diff = max(fast_diff, max(max_diff(jax.tree.map(lambda a: a[m], p), ref_fast[t][m]) for m in range(n)))
      excluded.append(int(state.outer_state[0].excluded[0]))
      finite &= all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(p))
  return {"slow_diff": slow_diff, "fast_diff_at_syncs": fast_diff, "excluded_at_syncs": excluded, "finite": finite}


def check_outer_state_fsdp(axis_type):
  """DiLoCo's outer (Nesterov) state under FSDP: 2 replicas x 4-way FSDP, shard_map manual over 'replica' only."""
  mesh = jax.make_mesh((2, 4), ("replica", "fsdp"), axis_types=(axis_type,) * 2)
  opt = diloco(optax.adam(0.02), k=K, axis_name="replica")
  params, _, _ = make_problem()
  fsdp = NamedSharding(mesh, P("replica", "fsdp"))  # every param's first dim is split 4-way within a replica
  squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
  expand = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def body(params, state):
    params, state = squeeze(params), squeeze(state)
    updates, state = opt.update(jax.grad(elementwise_loss)(params), state, params)
    return expand(optax.apply_updates(params, updates)), expand(state)

  # Manual over 'replica'; over 'fsdp' the compiler (Auto) or the types (Explicit) place the arrays.
  smap = lambda f: jax.shard_map(
    f, mesh=mesh, in_specs=P("replica"), out_specs=P("replica"), axis_names={"replica"}, check_vma=False
  )
  with jax.set_mesh(mesh):
    p = jax.device_put(replicated(params, 2), fsdp)
    state = jax.jit(smap(lambda q: expand(opt.init(squeeze(q)))))(p)
    step = jax.jit(smap(body))
    out = {"init": sharding_mismatches(state, p), "steps": []}
    for t in range(2 * K):
      p, state = step(p, state)
      out["steps"] += [
        f"step {t}: {m}" for m in sharding_mismatches((p, state), jax.device_put(replicated(params, 2), fsdp))
      ]
  # outer=chain(replica_mean, sgd(momentum, nesterov)): (ReplicaMeanState, (TraceState, EmptyState))
  out["trace_specs"] = specs(state.outer_state[1][0].trace)
  out["param_specs"] = specs(p)
  return out


# ------------------------------------------------------ collective counting


def hlo_collectives(hlo: str) -> dict:
  """Where the all-reduces of an optimized HLO module sit, relative to its conditionals.

  Returns the number of all-reduce ops outside every conditional branch, and, per conditional of the step
  (outermost), the number in each branch (branch 0 is the false/no-sync branch of a boolean ``lax.cond``).
  """
  placed = hlo_placed(hlo)
  per_branch = {
    p.instruction.name: [0] * len(p.instruction.callees)
    for p in placed
    if p.instruction.op == "conditional" and not p.branches
  }
  reduces = [p for p in placed if p.instruction.op == "all-reduce"]
  for p in reduces:
    if p.branches:
      cond, branch = p.branches[0]
      per_branch[cond][branch] += 1
  return {
    "hlo_all_reduce_total": len(reduces),
    "hlo_all_reduce_outside_conditionals": sum(not p.branches for p in reduces),
    "hlo_all_reduce_per_branch": list(per_branch.values()),
    "hlo_other_collectives_outside_conditionals": sum(
      1 for p in placed if not p.branches and p.instruction.op in HLO_COLLECTIVES[1:]
    ),
  }


def jaxpr_collectives(jaxpr) -> dict:
  """Cross-replica reductions in a jaxpr: outside any cond, and inside each cond branch."""
  collective = {
    "psum",
    "psum_invariant",
    "pmean",
    "all_gather",
    "reduce_scatter",
    "ppermute",
    "all_to_all",
    "pmax",
    "pmin",
  }
  outside, per_branch = 0, []

  def walk(jaxpr, inside):
    nonlocal outside
    count = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in collective or eqn.primitive.name.startswith("psum"):
        count += 1
        if not inside:
          outside += 1
      if eqn.primitive.name == "cond":
        per_branch.append([walk(b.jaxpr, True) for b in eqn.params["branches"]])
        continue
      for sub in _subjaxprs(eqn):
        count += walk(sub, inside)
    return count

  walk(jaxpr, False)
  return {"jaxpr_collectives_outside_cond": outside, "jaxpr_collectives_per_cond_branch": per_branch}


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in v if isinstance(v, (tuple, list)) else [v]:
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


# --------------------------------------------------------------------- main


def checks(group):
  if group == "lookahead":
    yield "pmap", check_pmap
    yield "shard_map", check_shard_map
    yield "jit_fsdp", check_jit_fsdp
    yield "explicit", check_explicit_sharding
  elif group == "diloco":
    yield "diloco/shard_map", lambda: check_diloco_shard_map(check_vma=False)
    yield "diloco/shard_map_check_vma", lambda: check_diloco_shard_map(check_vma=True)
    yield "diloco/pmap", check_diloco_pmap
    yield "diloco/bad_replica_pmap", check_diloco_bad_replica_pmap
    yield "diloco/outer_state_fsdp_auto", lambda: check_outer_state_fsdp(jax.sharding.AxisType.Auto)
    yield "diloco/outer_state_fsdp_explicit", lambda: check_outer_state_fsdp(jax.sharding.AxisType.Explicit)
  else:
    raise ValueError(f"unknown group {group!r}")


def main(groups):
  assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
  results = {"device_count": jax.device_count()}
  for group in groups:
    for name, fn in checks(group):
      start = time.process_time()
      try:
        results[name] = fn()
      except Exception:  # reported to the test, which fails naming the check
        results[name] = {"error": traceback.format_exc()[-3000:]}
      results[name]["cpu_seconds"] = time.process_time() - start
  print(json.dumps(results, default=float))


if __name__ == "__main__":
  main(sys.argv[1:] or ["lookahead", "diloco"])
