"""Streaming DiLoCo on 8 simulated CPU devices, against a Python loop over 8 replica copies.

Run by ``test_streaming_replicas.py`` in a subprocess (``multidevice_utils.session_results``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one JSON line, per check what it measured.
``multiprocess_worker.py`` imports :func:`train_shard_map` to run the same training across two processes.

The reference is written here from Douillard et al. (2025), with numpy and ``ml_dtypes`` for the narrow
formats and none of the library's code: M replicas in a Python loop, each on its own noisy quadratic; fragment
``j`` syncs where ``(t - j k // F) % k == k - 1``; a syncing fragment's pseudo-gradients are compressed per
replica (per-row scale for float8 and int8), averaged in float32 (the mean of a matrix that goes by
reduce-scatter compressed once more, ``references.reference_mean``), and fed to a Nesterov step with one momentum
per leaf; error feedback keeps each replica's compression residual; with ``delay=1`` the pseudo-gradient is
taken from the weights the step starts from, and the fast weights land on ``(1 - mixing) slow + mixing fast``.

Each training case is compiled once; its compiled program is also read (``hlo_placed``): the collectives,
where they sit and what they carry, and what the step does outside its conditionals.

With the argument ``exchange`` (``python streaming_checks.py exchange``) it compiles instead, on 4 of the
devices, DiLoCo steps whose exchange is int8, int4, top-k or eager, and reads what their collectives carry and
what depends on them; nothing is trained.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lookahead_optax import ReplicaMeanState, diloco, lookahead, replica_mean, streaming
from tests.compiled import (
  HLO_COLLECTIVES,
  collective_inputs_depend_on,
  collective_results_reach,
  hlo_computations,
  hlo_nbytes,
  hlo_placed,
)
from tests.references import reference_compress, reference_mean

K, STEPS = 4, 10  # every fragment syncs at least twice; the run ends mid-cycle
INNER_LR, LR, MU, MIXING = 0.02, 0.7, 0.9, 0.25  # MIXING: not the default 0.5, so that a dropped weight shows
# Adam's first step moves every element by almost exactly the learning rate; with delay=1 that step is the
# first pseudo-gradient, and the mean of 8 such values (k/8 of it) lands on rounding ties of the int8 mean
# sent back, which XLA and numpy (summing in other orders) then break differently. An eps of the gradients'
# order keeps the steps apart.
INNER = lambda: optax.adam(INNER_LR, eps=0.1)
# Distinct element counts, for the values (12800, 48, 960, 24) and the per-row scales (200, 1, 30, 1): each
# collective operand names the leaf it carries.
SHAPES = {"a": (200, 64), "b": (48,), "c": (30, 32), "d": (24,)}
GLOO_SHAPES = {"a": (20, 8), "b": (8,), "c": (6, 4), "d": (4,)}  # small: its weights travel in the JSON line
# The fragment of each leaf (a, b, c, d in jax.tree.leaves order): contiguous whole leaves of near-equal size.
# F=2: 12800 | 1032 (no split of whole leaves is nearer to equal).
FRAGMENT_IDS = {1: (0, 0, 0, 0), 2: (0, 1, 1, 1), 4: (0, 1, 2, 3)}

# (mode, fragments, communication_dtype, error_feedback, delay): every F, dtype, error feedback and delay at
# least once under shard_map, a few under pmap; None is the float32 all-reduce.
CASES = [
  ("shard_map", 1, None, False, 0),
  ("shard_map", 2, None, False, 0),
  ("shard_map", 4, None, False, 1),
  ("shard_map", 2, "bfloat16", False, 0),
  ("shard_map", 1, "bfloat16", True, 1),
  ("shard_map", 4, "float8_e4m3fn", True, 0),
  ("shard_map", 2, "float8_e5m2", False, 1),
  ("shard_map", 2, "int8", True, 1),
  ("shard_map", 4, "int8", False, 0),
  ("pmap", 2, "int8", True, 1),
  ("pmap", 4, "bfloat16", False, 0),
  ("pmap", 1, None, False, 1),
]
GLOO_CASE = (2, "int8", True, 1)  # the two-process run of test_multiprocess.py, here on 4 of the 8 devices


def case_name(mode, n, dtype, error_feedback, delay) -> str:
  return f"{mode}/F{n}/{dtype or 'float32'}/{'ef' if error_feedback else 'no_ef'}/delay{delay}"


def make_opt(n, dtype, error_feedback, delay, axis_name="replica"):
  return diloco(
    INNER(),
    K,
    LR,
    MU,
    axis_name,
    fragments=n,
    communication_dtype=dtype,
    error_feedback=error_feedback,
    delay=delay,
    **({"mixing": MIXING} if delay else {}),
  )


# ------------------------------------------------------------------ problem


def make_problem(shapes, replicas, steps, seed=0):
  """Params, curvatures, and each replica's target and per-step gradient noise (numpy float32)."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: np.asarray(x, np.float32)
  params = {k: f32(rng.normal(size=s)) for k, s in shapes.items()}
  curv = {k: f32(np.linspace(0.5, 2.0, int(np.prod(s))).reshape(s)) for k, s in shapes.items()}
  target = {k: f32(rng.normal(size=(replicas, *s))) for k, s in shapes.items()}
  noise = {k: f32(0.1 * rng.normal(size=(steps, replicas, *s))) for k, s in shapes.items()}
  return params, curv, target, noise


def gradient(params, curv, target, noise):
  """One replica's gradient: a quadratic pulling toward its own target, plus its noise of the step."""
  return jax.tree.map(lambda p, c, y, e: c * (p - y) + e, params, curv, target, noise)


# ---------------------------------------------------------------- reference


@functools.cache
def _inner_update():
  return jax.jit(INNER().update)


def reference_streaming(n, dtype, error_feedback, delay, problem, steps):
  """Streaming DiLoCo as a Python loop over replicas and leaves.

  Returns per step ``(fast, slow, residual)``: fast and residual as ``[replica][leaf]``, slow as ``[leaf]``
  (numpy float32, leaves in ``SHAPES`` order).
  """
  params, curv, target, noise = problem
  names = list(params)
  replicas = next(iter(target.values())).shape[0]
  ids = FRAGMENT_IDS[n]
  slow = [params[k].copy() for k in names]
  fast = [[s.copy() for s in slow] for _ in range(replicas)]
  trace = [np.zeros_like(s) for s in slow]  # Nesterov momentum per leaf: a fragment's moves only at its syncs
  residual = [[np.zeros_like(s) for s in slow] for _ in range(replicas)]
  inner = INNER()
  states = [inner.init({k: jnp.asarray(params[k]) for k in names}) for _ in range(replicas)]
  out = []
  for t in range(steps):
    received = [[f.copy() for f in fast[m]] for m in range(replicas)]
    for m in range(replicas):
      p = dict(zip(names, fast[m]))
      g = {k: curv[k] * (p[k] - target[k][m]) + noise[k][t, m] for k in names}
      u, states[m] = _inner_update()(g, states[m], p)
      fast[m] = [p[k] + np.asarray(u[k]) for k in names]
    for i, j in enumerate(ids):
      if (t - j * K // n) % K != K - 1:
        continue
      sent = []
      for m in range(replicas):
        x = slow[i] - (received[m][i] if delay else fast[m][i]) + residual[m][i]
        q = reference_compress(x, dtype)
        if error_feedback:
          residual[m][i] = x - q
        sent.append(q)
      delta = reference_mean(sent, dtype)
      trace[i] = MU * trace[i] + delta
      slow[i] = slow[i] - LR * (MU * trace[i] + delta)
      for m in range(replicas):
        fast[m][i] = (1 - MIXING) * slow[i] + MIXING * fast[m][i] if delay else slow[i].copy()
    out.append(([list(f) for f in fast], list(slow), [list(r) for r in residual]))
  return out


# ---------------------------------------------------------------- training

squeeze = lambda tree: jax.tree.map(lambda a: a[0], tree)
expand = lambda tree: jax.tree.map(lambda a: a[None], tree)


def stacked(tree, replicas):
  return jax.tree.map(lambda a: np.stack([a] * replicas), tree)


def residual_of(outer_state):
  """The error-feedback residual, shaped like the params; None without error feedback.

  diloco's outer optimizer is ``optax.chain(replica_mean(...), nesterov)``: with one fragment the residual is
  ``outer_state[0].residual``; with F > 1 there is one outer state per fragment, ``outer_state[j][0].residual``,
  whose leaves of the other fragments are ``optax.MaskedNode``. Each leaf is taken from the fragment that owns it.
  """
  single = isinstance(outer_state[0], ReplicaMeanState)
  parts = [s[0].residual for s in ([outer_state] if single else outer_state)]
  if all(isinstance(r, optax.EmptyState) for r in parts):
    return None
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def owner(*leaves):
    owned = [x for x in leaves if not masked(x)]
    assert len(owned) == 1, f"a residual leaf kept by {len(owned)} fragments"
    return owned[0]

  return jax.tree.map(owner, *parts, is_leaf=masked)


def history_entry(params, state):
  """``(fast, slow, residual)`` as numpy, leading axis the replicas; residual None without error feedback."""
  gather = lambda tree: jax.tree.map(
    lambda a: np.asarray(a if a.is_fully_addressable else multihost_utils.process_allgather(a, tiled=True)), tree
  )
  residual = residual_of(state.outer_state)
  return gather(params), gather(state.slow), None if residual is None else gather(residual)


def train_shard_map(opt, mesh, problem, steps):
  """One replica per device of ``mesh`` (its one axis is the replica axis) under ``jax.shard_map``.

  ``check_vma`` is on (the default) and every spec is per replica: the state varies over the replicas. Each
  replica's gradient is computed by a step of its own, so that the optimizer step compiled (and read by
  :func:`hlo_facts`) is the optimizer alone. Works across processes (arrays built from each process's own
  shards). Returns the history and the compiled optimizer step.
  """
  spec = P(mesh.axis_names[0])
  params, curv, target, noise = problem
  smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

  def body(params, state, grads):
    params, state, grads = squeeze((params, state, grads))
    updates, state = opt.update(grads, state, params)
    return expand(optax.apply_updates(params, updates)), expand(state)

  sharding = NamedSharding(mesh, spec)
  put = lambda tree: jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), tree)
  grad_step = jax.jit(smap(lambda p, y, e: expand(gradient(squeeze(p), curv, squeeze(y), squeeze(e)))))
  p = put(stacked(params, mesh.devices.size))
  state = jax.jit(smap(lambda p: expand(opt.init(squeeze(p)))))(p)
  targets = put(target)
  step = jax.jit(smap(body), donate_argnums=(0, 1))
  compiled = step.lower(p, state, p).compile()
  hist = []
  for t in range(steps):
    p, state = compiled(p, state, grad_step(p, targets, put({k: v[t] for k, v in noise.items()})))
    hist.append(history_entry(p, state))
  return hist, compiled, (p, state)


def train_pmap(opt, problem, steps):
  params, curv, target, noise = problem
  replicas = jax.device_count()

  def step(params, state, target, noise):
    updates, state = opt.update(gradient(params, curv, target, noise), state, params)
    return optax.apply_updates(params, updates), state

  pstep = jax.pmap(step, axis_name="replica")
  p = stacked(params, replicas)
  state = jax.pmap(opt.init, axis_name="replica")(p)
  hist = []
  for t in range(steps):
    p, state = pstep(p, state, target, {k: v[t] for k, v in noise.items()})
    hist.append(history_entry(p, state))
  return hist


EXACT = 1e-6  # float32 rounding apart


def compare(hist, ref, error_feedback) -> dict:
  """Differences from the reference, every replica, every step; facts that keep the check honest.

  ``fraction_off``: the share of elements more than float32 rounding (:data:`EXACT`) from the reference.
  """
  names = list(hist[0][0])
  diff = {"fast": 0.0, "slow": 0.0, "residual": 0.0}
  off, total = {"fast": 0, "slow": 0, "residual": 0}, {"fast": 0, "slow": 0, "residual": 0}
  slow_identical, replicas_differ, residual_nonzero = True, False, False

  def fold(key, ours, theirs):
    d = np.abs(ours - theirs)
    diff[key] = max(diff[key], float(d.max()))
    off[key] += int((d > EXACT).sum())
    total[key] += d.size

  for (fast, slow, residual), (ref_fast, ref_slow, ref_residual) in zip(hist, ref, strict=True):
    for i, k in enumerate(names):
      replicas_differ |= bool((fast[k] != fast[k][:1]).any())
      slow_identical &= bool((slow[k] == slow[k][:1]).all())
      fold("slow", slow[k][0], ref_slow[i])
      for m in range(len(ref_fast)):
        fold("fast", fast[k][m], ref_fast[m][i])
        if error_feedback:
          fold("residual", residual[k][m], ref_residual[m][i])
          residual_nonzero |= bool(np.abs(residual[k][m]).max() > 0)
  return {
    "max_diff": diff,
    "fraction_off": {k: off[k] / max(total[k], 1) for k in off},
    "slow_identical_across_replicas": slow_identical,
    "replicas_differ": replicas_differ,
    "residual_nonzero": residual_nonzero,
    "max_abs_weight": float(max(np.abs(w).max() for w in ref[-1][1])),
  }


# ---------------------------------------------------------- compiled program

TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "conditional"}


def hlo_facts(compiled) -> dict:
  """Collectives and where they sit; what the entry computation (the step outside every branch) moves."""
  text = compiled.as_text()
  placed = hlo_placed(text)
  collectives = [
    {"op": p.instruction.op, "branches": p.branches, "operands": p.operands, "wire_bytes": hlo_nbytes(p.operands)}
    for p in placed
    if p.instruction.op in HLO_COLLECTIVES
  ]
  holding = {cond for c in collectives for cond, _ in c["branches"]}
  entry, comps = hlo_computations(text)
  smallest = min(int(np.prod(s)) for s in SHAPES.values())
  big = lambda arrays: [a for a in arrays if int(np.prod(a[1])) >= smallest]
  body = comps[entry]
  work = [ins for ins in body.values() if ins.op not in TRIVIAL]
  reads = lambda ins: [a for n in ins.operands if n in body for a in big(body[n].arrays)]
  return {
    "collectives": collectives,
    # per conditional with a collective in one of its branches: its number of branches
    "branch_counts": {
      p.instruction.name: len(p.instruction.callees)
      for p in placed
      if p.instruction.name in holding and p.instruction.op == "conditional"
    },
    "entry_param_sized_copies": sum(1 for ins in work if ins.op == "copy" and big(ins.arrays)),
    "entry_param_sized_fusions": sum(1 for ins in work if ins.op == "fusion" and big(ins.arrays)),
    # bytes of param-sized arrays read and written by the entry computation's instructions: its memory traffic
    "entry_param_sized_bytes": sum(hlo_nbytes(reads(ins)) + hlo_nbytes(big(ins.arrays)) for ins in work),
    "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,  # the largest branch's temporaries included
  }


def check_delay_dependency(n, dtype, delay) -> dict:
  """Typed shard_map on 8 devices, per-replica specs: does each collective's input depend on the gradient?"""
  mesh = jax.make_mesh((jax.device_count(),), ("replica",))
  opt = make_opt(n, dtype, False, delay)
  spec = P("replica")

  def body(params, state, grads):
    params, state, grads = squeeze((params, state, grads))
    updates, state = opt.update(grads, state, params)
    return expand(optax.apply_updates(params, updates)), expand(state)

  step = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)
  params = jax.device_put(stacked(make_problem(SHAPES, 1, 1)[0], jax.device_count()), NamedSharding(mesh, spec))
  state = jax.jit(jax.shard_map(lambda p: expand(opt.init(squeeze(p))), mesh=mesh, in_specs=spec, out_specs=spec))(
    params
  )
  return {"depends_on_gradient": collective_inputs_depend_on(step, (params, state, params), argnum=2)}


# --------------------------------------------------------------------- checks


def check_training():
  problem = make_problem(SHAPES, jax.device_count(), STEPS)
  mesh = jax.make_mesh((jax.device_count(),), ("replica",))
  plain_hist, plain_compiled, _ = train_shard_map(diloco(INNER(), K, LR, MU, "replica"), mesh, problem, STEPS)
  yield "shard_map/plain_diloco", lambda: hlo_facts(plain_compiled)
  for mode, n, dtype, error_feedback, delay in CASES:
    name = case_name(mode, n, dtype, error_feedback, delay)

    def run(mode=mode, n=n, dtype=dtype, error_feedback=error_feedback, delay=delay):
      opt = make_opt(n, dtype, error_feedback, delay)
      ref = reference_streaming(n, dtype, error_feedback, delay, problem, STEPS)
      if mode == "pmap":
        return compare(train_pmap(opt, problem, STEPS), ref, error_feedback)
      hist, compiled, _ = train_shard_map(opt, mesh, problem, STEPS)
      out = compare(hist, ref, error_feedback) | hlo_facts(compiled)
      if (n, dtype, delay) == (1, None, 0):  # the same program as plain DiLoCo: the same bits, every step
        out["bitwise_equal_to_plain_diloco"] = all(
          all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x[:2]), jax.tree.leaves(y[:2])))
          for x, y in zip(hist, plain_hist, strict=True)
        )
      return out

    yield name, run


def check_gloo_reference():
  """The two-process case of test_multiprocess.py, here in one process on 4 of the 8 devices; and vs the reference."""
  n, dtype, error_feedback, delay = GLOO_CASE
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  problem = make_problem(GLOO_SHAPES, 4, STEPS, seed=3)
  hist, _, _ = train_shard_map(make_opt(n, dtype, error_feedback, delay, "data"), mesh, problem, STEPS)
  out = compare(hist, reference_streaming(n, dtype, error_feedback, delay, problem, STEPS), error_feedback)
  fast, slow, _ = hist[-1]
  return out | {"fast": {k: v.tolist() for k, v in fast.items()}, "slow": {k: v.tolist() for k, v in slow.items()}}


# ------------------------------------------------ the exchange's paths, compiled
# DiLoCo (F=1) with ``optax.chain(replica_mean("replica", dtype, error_feedback, top_k, eager), Nesterov)`` on 4
# of the 8 devices. Only the compiled step is read: what its collectives carry, and what depends on what.

EXCHANGE_REPLICAS = 4
# Three matrices that go by reduce-scatter over 4 replicas (c's 30 rows pad to 32), a vector and a scalar.
EXCHANGE_SHAPES = {"a": (256, 64), "b": (96, 128), "c": (30, 32), "v": (300,), "s": ()}
# name: (dtype, top_k); a compressed or sparse exchange keeps its error-feedback residual
EXCHANGES = {
  "float32": (None, None),
  "int8": ("int8", None),
  "int4": ("int4", None),
  "top_k": (None, 0.02),
  "top_k_int8": ("int8", 0.02),
  "top_k_int4": ("int4", 0.02),
}
# name: (dtype, top_k, eager, delay); the last two are controls, where the dependence walks must find something
EAGER_CASES = {
  "eager/int4/delay1": ("int4", None, True, 1),
  "eager/top_k_int8/delay1": ("int8", 0.02, True, 1),
  "eager/int4/delay0": ("int4", None, True, 0),
  "not_eager/int4/delay1": ("int4", None, False, 1),
}


def exchange_opt(dtype, top_k, eager=False, delay=0):
  compressed = dtype is not None or top_k is not None
  exchange = replica_mean("replica", dtype=dtype, error_feedback=compressed, top_k=top_k, eager=eager)
  outer = optax.chain(exchange, optax.sgd(LR, momentum=MU, nesterov=True))
  return lookahead(INNER(), K, outer=outer, schedule=streaming(1, delay=delay, **({"mixing": MIXING} if delay else {})))


def exchange_step(opt):
  """``opt``'s step under typed shard_map on 4 devices, per-replica specs, returning ``(updates, state)``; its args."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:EXCHANGE_REPLICAS]), ("replica",))
  spec = P("replica")
  smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

  def body(params, state, grads):
    updates, state = opt.update(*squeeze((grads, state, params)))
    return expand(updates), expand(state)

  params = stacked(make_problem(EXCHANGE_SHAPES, 1, 1)[0], EXCHANGE_REPLICAS)
  params = jax.device_put(jax.tree.map(jnp.asarray, params), NamedSharding(mesh, spec))
  state = jax.jit(smap(lambda p: expand(opt.init(squeeze(p)))))(params)
  return smap(body), (params, state, params)


def check_exchange(dtype, top_k) -> dict:
  """The collectives of the compiled, donated step: op, operands, bytes and the branches they run in."""
  step, args = exchange_step(exchange_opt(dtype, top_k))
  text = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()
  collectives = [
    {"op": p.instruction.op, "branches": p.branches, "operands": p.operands, "wire_bytes": hlo_nbytes(p.operands)}
    for p in hlo_placed(text)
    if p.instruction.op in HLO_COLLECTIVES
  ]
  return {"collectives": collectives}


def check_eager(dtype, top_k, eager, delay) -> dict:
  """Which collectives' inputs depend on the gradient; which collectives' results reach the returned updates."""
  step, args = exchange_step(exchange_opt(dtype, top_k, eager, delay))
  jaxpr = jax.make_jaxpr(step)(*args)
  updates = range(len(jax.tree.leaves(args[0])))  # the step's first outputs
  return {
    "depends_on_gradient": collective_inputs_depend_on(step, args, argnum=2),
    "updates_wait_for": collective_results_reach(jaxpr.jaxpr, updates),
  }


def checks(group):
  if group == "training":
    yield from check_training()
    yield "delay_dependency/delay1", lambda: check_delay_dependency(2, "int8", 1)
    yield "delay_dependency/delay0", lambda: check_delay_dependency(2, "int8", 0)
    yield "gloo_reference", check_gloo_reference
  elif group == "exchange":
    for name, (dtype, top_k) in EXCHANGES.items():
      yield f"exchange/{name}", functools.partial(check_exchange, dtype, top_k)
    for name, case in EAGER_CASES.items():
      yield name, functools.partial(check_eager, *case)
  else:
    raise ValueError(f"unknown group {group!r}")


def main(group):
  assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
  results = {"device_count": jax.device_count()}
  try:
    for name, fn in checks(group):
      start = time.process_time()
      try:
        results[name] = fn()
      except Exception:  # reported to the test, which fails naming the check
        results[name] = {"error": traceback.format_exc()[-3000:]}
      results[name]["cpu_seconds"] = time.process_time() - start
  except Exception:  # the shared setup (plain DiLoCo) failed: every check reports it
    results["setup"] = {"error": traceback.format_exc()[-3000:]}
  print(json.dumps(results, default=float))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "training")
