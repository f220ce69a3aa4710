"""Shared test helpers: small problems, the references the library is checked against, and runners.

The references use only optax and jax.tree, no code of lookahead_optax:

- :func:`reference_lookahead`: the paper's Algorithm 1 as a plain loop.
- :func:`reference_snoo`: SNOO (Kallusky et al. 2025, Algorithm 1): every k inner
  steps, with the pseudo-gradient s = w - fast_k, b = mu * b + s; w = w - lr * (mu * b + s).
- :func:`reference_diloco`: DiLoCo (Douillard et al. 2023): M replicas run the
  inner optimizer on their own gradients; every k steps the pseudo-gradients are
  averaged over replicas before the same Nesterov step, and every replica
  restarts from the new w.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import chex
import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

INNERS = {
  "sgd": lambda: optax.sgd(0.05),
  "momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "adam": lambda: optax.adam(0.05),
  "chain_wd": lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.scale_by_adam(), optax.scale(-0.05)),
}
TOL = dict(rtol=2e-5, atol=2e-6)


def make_params(seed: int = 0, dtype=jnp.float32):
  """Nested-dict params of mixed shapes."""
  rng = np.random.default_rng(seed)
  return {
    "dense": {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=(3,)), dtype)},
    "scale": jnp.asarray(rng.normal(size=()), dtype),
    "emb": [jnp.asarray(rng.normal(size=(2, 2, 2)), dtype)],
  }


def small_params(seed: int = 5):
  """Two leaves: enough for tree handling, cheap to compile."""
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


def quadratic_grad(params, t: int):
  """Gradient of a noisy ill-conditioned quadratic, deterministic in (params, t)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    curv = jnp.linspace(0.5, 4.0, p.size, dtype=jnp.float32).reshape(p.shape)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(i), t), p.shape, jnp.float32)
    out.append((curv * p.astype(jnp.float32) - 1.0 + 0.1 * noise).astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


def replica_grad(params, t, m):
  """Replica m's gradient at step t: the quadratic above with replica-specific noise and target."""
  g = quadratic_grad(params, 1000 * m + t)
  return jax.tree.map(lambda g: g - 0.3 * m, g)


# The optax states that hold moment buffers, by type: what "reset" re-initialises in the references.
MOMENT_STATES = (
  optax.ScaleByAdamState,
  optax.TraceState,
  optax.ScaleByRmsState,
  optax.ScaleByRStdDevState,
  optax.ScaleByBeliefState,
)


def reset_moments(state, fresh):
  """``state`` with every moment state (by type, :data:`MOMENT_STATES`) taken from a fresh ``init``."""
  is_moment = lambda x: isinstance(x, MOMENT_STATES)
  return jax.tree.map(lambda cur, new: new if is_moment(cur) else cur, state, fresh, is_leaf=is_moment)


def reference_lookahead(inner, k, alpha, params, grad_fn, steps, policy="maintain"):
  """Algorithm 1 as the paper writes it: an outer loop over syncs, an inner loop of k steps.

  Returns the fast and slow weights after every inner step (fast weights after a
  sync are the new slow weights). ``alpha`` may be a callable of the sync index.
  ``policy="reset"`` re-initialises the moment states and keeps everything else
  (a schedule's step count); ``"interpolate"`` moves floating leaves toward
  their value at the previous sync.
  """
  slow, fast = params, params
  state = inner.init(params)
  slow_state = state
  fasts, slows = [], []
  t = 0
  for sync in range(steps // k + 1):
    for _ in range(k):
      if t == steps:
        return fasts, slows
      updates, state = inner.update(grad_fn(fast, t), state, fast)
      fast = optax.apply_updates(fast, updates)
      t += 1
      if t % k == 0:
        a = alpha(sync) if callable(alpha) else alpha
        slow = jax.tree.map(lambda s, f: s + a * (f - s), slow, fast)
        fast = slow
        if policy == "reset":
          state = reset_moments(state, inner.init(fast))
        elif policy == "interpolate":
          state = jax.tree.map(
            lambda s0, s1: s0 + a * (s1 - s0) if jnp.issubdtype(s1.dtype, jnp.inexact) else s1, slow_state, state
          )
          slow_state = state
      fasts.append(fast)
      slows.append(slow)
  return fasts, slows


def reference_snoo(inner, k, lr, mu, params, grad_fn, steps, policy="maintain"):
  """SNOO's Algorithm 1 as a plain loop; returns fast weights, slow weights and momentum b after each step."""
  slow, fast, b = params, params, jax.tree.map(jnp.zeros_like, params)
  state = inner.init(params)
  fasts, slows, bs = [], [], []
  for t in range(steps):
    updates, state = inner.update(grad_fn(fast, t), state, fast)
    fast = optax.apply_updates(fast, updates)
    if (t + 1) % k == 0:
      s = jax.tree.map(lambda w, f: w - f, slow, fast)
      b = jax.tree.map(lambda b, s: mu * b + s, b, s)
      slow = jax.tree.map(lambda w, b, s: w - lr * (mu * b + s), slow, b, s)
      fast = slow
      if policy == "reset":
        state = reset_moments(state, inner.init(fast))
    fasts.append(fast)
    slows.append(slow)
    bs.append(b)
  return fasts, slows, bs


def reference_diloco(inner, k, lr, mu, params, replicas, steps):
  """DiLoCo as a Python loop over M copies; returns per step the list of M fast weights and the slow weights."""
  slow, b = params, jax.tree.map(jnp.zeros_like, params)
  fast = [params] * replicas
  states = [inner.init(params) for _ in range(replicas)]
  fasts, slows = [], []
  for t in range(steps):
    for m in range(replicas):
      updates, states[m] = inner.update(replica_grad(fast[m], t, m), states[m], fast[m])
      fast[m] = optax.apply_updates(fast[m], updates)
    if (t + 1) % k == 0:
      delta = jax.tree.map(lambda w, *fs: sum(w - f for f in fs) / replicas, slow, *fast)
      b = jax.tree.map(lambda b, d: mu * b + d, b, delta)
      slow = jax.tree.map(lambda w, b, d: w - lr * (mu * b + d), slow, b, delta)
      fast = [slow] * replicas
    fasts.append(list(fast))
    slows.append(slow)
  return fasts, slows


def run(opt, params, grad_fn, steps, jit=True, extra=None):
  """Train with a lookahead-bearing optimizer; returns fast params and states after each step."""
  state = opt.init(params)

  def step(params, state, t):
    updates, state = opt.update(grad_fn(params, t), state, params, **(extra or {}))
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  fasts, states = [], []
  for t in range(steps):
    params, state = step(params, state, t)
    fasts.append(params)
    states.append(state)
  return fasts, states


def jit_and_count_traces(opt, params, steps):
  """Run ``steps`` jitted, donated steps; returns (traces, compiled executables, final state)."""
  traces = 0

  def step(params, state, t):
    nonlocal traces
    traces += 1
    updates, state = opt.update(quadratic_grad(params, t), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params)
  params = jax.tree.map(jnp.copy, params)
  for t in range(steps):
    params, state = step(params, state, t)
  return traces, step._cache_size(), state


def assert_trajectories_close(fasts, slows, ref_fasts, ref_slows, rtol=2e-5, atol=2e-6):
  assert len(fasts) == len(slows) == len(ref_fasts) == len(ref_slows)
  for t, (f, s, rf, rs) in enumerate(zip(fasts, slows, ref_fasts, ref_slows)):
    chex.assert_trees_all_close(f, rf, rtol=rtol, atol=atol, custom_message=f"fast weights, step {t}")
    chex.assert_trees_all_close(s, rs, rtol=rtol, atol=atol, custom_message=f"slow weights, step {t}")


COLLECTIVES = ("psum", "all_gather", "all_reduce", "psum_scatter", "all_to_all", "ppermute", "pmax", "pmin")


def collective_inputs_depend_on(fn, args, argnum: int) -> dict:
  """For each collective in ``fn(*args)``'s program, whether its inputs depend on ``args[argnum]``.

  Walks the jaxpr and every sub-jaxpr (``shard_map``, ``cond``/``switch``
  branches, ``pjit``), propagating "depends on that argument" through each
  equation; keys name the collective and where it sits.
  """
  closed = jax.make_jaxpr(fn)(*args)
  flags = [i == argnum for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
  found = {}
  _taint(closed.jaxpr, flags, found, "")
  return found


def reference_compress(x, dtype):
  """Compress then decompress with numpy and ml_dtypes: what one replica sends, as float32."""
  x = np.asarray(x, np.float32)
  if dtype is None:
    return x
  if dtype == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)
  narrow = {"int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}[dtype]
  top = 127.0 if dtype == "int8" else float(ml_dtypes.finfo(narrow).max)
  amax = np.max(np.abs(x), axis=-1, keepdims=True) if x.ndim >= 2 else np.max(np.abs(x), keepdims=True)
  scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
  y = x / scale
  y = np.clip(np.round(y), -127, 127).astype(np.int8) if dtype == "int8" else y.astype(narrow)
  return y.astype(np.float32) * scale


def reference_mean(sent, dtype):
  """The replica mean that the exchange returns, from what each replica sent (compressed, as float32).

  Averaged in float32. A matrix that goes by reduce-scatter (``reference_block_rows``) travels back
  compressed once more, per row.
  """
  mean = np.mean(np.stack(sent), axis=0, dtype=np.float32)
  if dtype is not None and reference_block_rows(mean.shape, len(sent)):
    mean = reference_compress(mean, dtype)
  return mean


def reference_block_rows(shape, replicas: int) -> int:
  """Rows per replica when a compressed leaf goes by reduce-scatter (``2 ceil(R / M) < R``); 0 when all-gathered."""
  if len(shape) < 2:
    return 0
  rows = math.prod(shape[:-1])
  block = -(-rows // replicas)
  return block if 2 * block < rows else 0


def count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive ``name`` in ``jaxpr``, nested jaxprs (branches, bodies) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
        n += count_primitive(sub, name) if hasattr(sub, "eqns") else 0
  return n


def _taint(jaxpr, tainted_inputs, found, where):
  """Which outputs of ``jaxpr`` depend on its tainted inputs; records collectives in ``found``."""
  literal = lambda v: isinstance(v, jax.extend.core.Literal)
  tainted = {v for v, t in zip(jaxpr.invars, tainted_inputs) if t}
  for n, eqn in enumerate(jaxpr.eqns):
    ins = [not literal(v) and v in tainted for v in eqn.invars]
    name = eqn.primitive.name
    if any(c in name for c in COLLECTIVES):
      found[f"{where}{n}:{name}"] = any(ins)
    subs = [
      sub
      for value in eqn.params.values()
      for sub in (value if isinstance(value, tuple) else (value,))
      if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns")
    ]
    outs = [any(ins)] * len(eqn.outvars)
    if subs:
      operands = ins[1:] if name == "cond" else ins  # cond's first operand is the branch index
      results = []
      for i, sub in enumerate(subs):
        inner = sub if hasattr(sub, "eqns") else sub.jaxpr
        if len(inner.invars) == len(operands):
          results.append(_taint(inner, operands, found, f"{where}{n}:{name}/{i}/"))
      if results and all(len(r) == len(eqn.outvars) for r in results):
        index_tainted = name == "cond" and ins[0]
        outs = [index_tainted or any(r[o] for r in results) for o in range(len(eqn.outvars))]
    tainted.update(v for v, t in zip(eqn.outvars, outs) if t)
  return [not literal(v) and v in tainted for v in jaxpr.outvars]


# --------------------------------------------------------- compiled HLO text
# Read from ``jit(...).lower(...).compile().as_text()``: what each instruction produces and reads, and
# whether it runs on every step or inside a conditional's branch (a sync branch).

HLO_ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
HLO_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class HloInstruction(NamedTuple):
  """One instruction of an HLO computation."""

  name: str
  op: str
  """The opcode; an async collective is named by its ``-start`` half (``all-gather``; ``all-gather-done`` apart)."""
  arrays: tuple
  """What it produces: ``(element type, shape)`` per array (several for a tuple)."""
  operands: tuple
  """The names of its operands."""
  callees: tuple
  """The computations it calls; a ``conditional``'s branches in index order (false before true for a predicate)."""


class HloPlaced(NamedTuple):
  """An instruction reachable from the entry computation, with where it runs and what it reads."""

  instruction: HloInstruction
  operands: tuple
  """``(element type, shape)`` of each array it reads."""
  branches: tuple
  """The conditional branches it runs in, outermost first, as ``(conditional name, branch index)``; () outside
  every conditional (it runs on every step)."""


def hlo_arrays(type_text: str) -> tuple:
  """``"(f32[2,3]{1,0}, s8[4]{0})"`` -> ``(("f32", (2, 3)), ("s8", (4,)))``."""
  return tuple(
    (t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in re.findall(r"([a-z]\w*)\[([\d,]*)\]", type_text)
  )


def hlo_nbytes(arrays) -> int:
  return sum(HLO_ITEMSIZE[t] * math.prod(shape) for t, shape in arrays)


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at ``text[start]``."""
  pairs, depth = {"(": ")", "{": "}"}, 0
  for i in range(start, len(text)):
    if text[i] == text[start]:
      depth += 1
    elif text[i] == pairs[text[start]]:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start : start + 80]!r}")


def _instruction(line: str) -> HloInstruction | None:
  head = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
  if head is None:
    return None
  at = head.end()
  end = _closing(line, at) if line[at] == "(" else line.index(" ", at)
  type_text = line[at:end]
  op = re.match(r"\s*([\w\-]+)\(", line[end:])
  args_at = end + op.end() - 1
  args_end = _closing(line, args_at)
  rest = re.sub(r"metadata=\{[^}]*\}", "", line[args_end:])
  callees = []
  for _, value in re.findall(
    r"(calls|to_apply|body|condition|branch_computations|called_computations|"
    r"false_computation|true_computation)=(\{[^}]*\}|%?[\w.\-]+)",
    rest,
  ):
    callees += [n.strip().lstrip("%") for n in value.strip("{}").split(",") if n.strip()]
  return HloInstruction(
    head.group(1),
    re.sub(r"-start$", "", op.group(1)),
    hlo_arrays(type_text),
    tuple(re.findall(r"%([\w.\-]+)", line[args_at:args_end])),
    tuple(callees),
  )


def hlo_computations(text: str) -> tuple:
  """``(entry name, {computation name: {instruction name: HloInstruction}})`` of an HLO module's text."""
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name, comps[head.group(2)] = head.group(2), {}
      entry = name if head.group(1) else entry
    elif line.startswith("}"):
      name = None
    elif name is not None and (ins := _instruction(line)) is not None:
      comps[name][ins.name] = ins
  return entry, comps


def hlo_placed(text: str) -> list:
  """Every instruction reachable from the entry computation, as :class:`HloPlaced`.

  A computation reached from several places is listed once per place.
  """
  entry, comps = hlo_computations(text)
  out, seen, todo = [], set(), [(entry, ())]
  while todo:
    comp, branches = todo.pop()
    if (comp, branches) in seen or comp not in comps:
      continue
    seen.add((comp, branches))
    body = comps[comp]
    for ins in body.values():
      reads = tuple(a for n in ins.operands if n in body for a in body[n].arrays)
      out.append(HloPlaced(ins, reads, branches))
      if ins.op == "conditional":
        todo += [(c, (*branches, (ins.name, i))) for i, c in enumerate(ins.callees)]
      else:
        todo += [(c, branches) for c in ins.callees]
  return out
