"""The compiled step of every path: what it copies, holds, reads and writes outside the sync branch.

Structure, not timing (``benchmarks/overhead.py`` measures the time). Each path (plain Lookahead with each
inner-state policy, an ``outer`` optimizer, ``slow_dtype``, adaptive alpha, a replica mean: full precision,
int4, top-k, eager or weighted; fragments, a delayed compressed exchange) is compiled as a jitted, donated
optimizer-only step and its HLO is read: the non-sync step must do what plain Lookahead does, one extra read of
the slow weights; everything that changes only at a sync is written by a ``conditional``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.overhead import optimizer_step, tree_bytes  # the step the overhead benchmark times
from lookahead_optax import adaptive_alpha, diloco, force_sync, lookahead, replica_mean, snoo, streaming
from tests.compiled import assert_calls_no_host
from tests.helpers import jit_and_count_traces

N = 1 << 18
SMALL = 64 * 1024  # bytes: scalars and bookkeeping, far below one param leaf
ADAM = lambda: optax.adam(1e-3)


def nesterov(**exchange):
  """DiLoCo's outer optimizer: ``replica_mean("replica", **exchange)``, then Nesterov momentum."""
  return optax.chain(replica_mean("replica", **exchange), optax.sgd(0.7, momentum=0.9, nesterov=True))


# name: (optimizer, params dtype, extra temporaries allowed, in param copies)
PATHS = {
  "maintain": (lambda: lookahead(ADAM(), 5, 0.5), jnp.float32, 0),
  "reset": (lambda: lookahead(ADAM(), 5, 0.5, inner_state_policy="reset"), jnp.float32, 0),
  "interpolate": (lambda: lookahead(ADAM(), 5, 0.5, inner_state_policy="interpolate"), jnp.float32, 0),
  "sgd inner": (lambda: lookahead(optax.sgd(0.1), 5, 0.5), jnp.float32, 0),
  "momentum inner": (lambda: lookahead(optax.sgd(0.1, momentum=0.9), 5, 0.5), jnp.float32, 0),
  "slow_dtype": (lambda: lookahead(ADAM(), 5, 0.5, slow_dtype=jnp.float32), jnp.bfloat16, 0),
  "slow_dtype reset": (
    lambda: lookahead(ADAM(), 5, 0.5, slow_dtype=jnp.float32, inner_state_policy="reset"),
    jnp.bfloat16,
    0,
  ),
  # snoo's Nesterov outer step computes the pseudo-gradient twice, in place (lookahead_optax._outer).
  "outer (SNOO)": (lambda: snoo(ADAM(), 5), jnp.float32, 0),
  "outer (SNOO) reset": (lambda: snoo(ADAM(), 5, inner_state_policy="reset"), jnp.float32, 0),
  "outer slow_dtype": (lambda: snoo(ADAM(), 5, slow_dtype=jnp.float32), jnp.bfloat16, 0),
  # Any other outer optimizer: the pseudo-gradient feeds both its state and the slow weights (as it feeds
  # adaptive alpha's sums and the slow weights, or the all-reduce): XLA keeps it inside the sync branch.
  "outer (any)": (lambda: lookahead(ADAM(), 5, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)), jnp.float32, 1),
  "adaptive alpha": (lambda: lookahead(ADAM(), 5, adaptive_alpha()), jnp.float32, 3),
  "replica mean (DiLoCo)": (lambda: diloco(ADAM(), 5, axis_name="replica"), jnp.float32, 2),  # + all-reduce result
  "replica mean, alpha": (
    lambda: lookahead(ADAM(), 5, outer=optax.chain(replica_mean("replica"), optax.sgd(0.5))),
    jnp.float32,
    2,
  ),
  "replica mean, streaming int8 delayed": (
    lambda: diloco(ADAM(), 5, fragments=2, communication_dtype="int8", error_feedback=True, delay=1),
    jnp.float32,
    2,
  ),
  # int4 with error feedback: as DiLoCo's all-reduce, the pseudo-gradient (plus residual) and the mean.
  "replica mean int4 EF": (
    lambda: lookahead(ADAM(), 5, outer=nesterov(dtype="int4", error_feedback=True)),
    jnp.float32,
    2,
  ),
  # top-k (with error feedback): DiLoCo's 2 plus top-k's dense scatters, flat float32 per leaf, of the mean and
  # of what this replica sent (for its residual); 3 without error feedback.
  "replica mean top-k": (
    lambda: lookahead(ADAM(), 5, outer=nesterov(top_k=0.02, error_feedback=True)),
    jnp.float32,
    4,
  ),
  # eager: DiLoCo's 2, this replica's share and what it returns now, all inside the sync branch
  "replica mean eager": (lambda: lookahead(ADAM(), 5, outer=nesterov(eager=True)), jnp.float32, 4),
  # DiLoCo's exchange, the step passing a replica_weight: as "replica mean (DiLoCo)"
  "replica mean weighted": (lambda: diloco(ADAM(), 5, axis_name="replica"), jnp.float32, 2),
  "fragments": (lambda: lookahead(ADAM(), 5, 0.5, schedule=streaming(2)), jnp.float32, 0),
  "fragments, outer": (
    lambda: lookahead(ADAM(), 5, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), schedule=streaming(2)),
    jnp.float32,
    1,
  ),
}
REPLICAS = "replica mean"  # paths whose step runs inside shard_map over a replica axis
# (test, path) that fail today, reported, with what the HLO shows; strict: once fixed the test passes and the entry goes
KNOWN: dict = {}


def paths(test: str) -> list:
  """Every path, those of KNOWN for ``test`` marked as expected to fail (strictly)."""
  known = lambda name: pytest.mark.xfail(strict=True, reason=KNOWN[test, name])
  return [pytest.param(n, marks=known(n)) if (test, n) in KNOWN else n for n in sorted(PATHS)]


def make_params(n: int, dtype):
  """About ``n`` params in four leaves of different shapes, like a small network."""
  shapes = [(n // 2 // 1024, 1024), (n // 4 // 512, 512), (n // 8,), (n - n // 2 - n // 4 - n // 8,)]
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {f"p{i}": jax.random.normal(key, shape).astype(dtype) for i, (key, shape) in enumerate(zip(keys, shapes))}


def per_replica(name) -> bool:
  """A compressed exchange keeps a residual per replica (an eager one, this replica's share of the mean): params
  and state are laid out as per-device blocks."""
  return any(word in name for word in ("int8", "int4", "top-k", "eager"))


def weighted(name) -> bool:
  """The step passes ``replica_weight`` (a fourth, not donated, argument: the tokens this replica processed)."""
  return "weighted" in name


@functools.cache
def replica_mesh():
  return jax.make_mesh((1,), ("replica",))


def block_specs(tree):
  """Each array split over the replica axis along its first dimension (a leading block of 1); scalars replicated."""
  return jax.tree.map(lambda x: P("replica") if jnp.ndim(x) else P(), tree)


def step_for(name, tx, args=None):
  """The jitted, donated step; a replica mean's runs inside shard_map over a one-device replica axis.

  With a per-replica state the optimizer runs on the per-device blocks themselves (leading axis of 1), as the
  distributed guide lays them out: no slicing, so no copies of the donated buffers.
  """
  if REPLICAS not in name:
    return optimizer_step(tx)
  specs = block_specs(args) if per_replica(name) else P()
  out_specs = (specs[0], specs[1]) if per_replica(name) else P()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  @functools.partial(jax.shard_map, mesh=replica_mesh(), in_specs=specs, out_specs=out_specs)
  def step(params, state, grads, *weight):
    updates, state = tx.update(grads, state, params, **({"replica_weight": weight[0]} if weight else {}))
    return optax.apply_updates(params, updates), state

  return step


def inputs(name, tx, n, dtype):
  """Params, state and gradients for the step of ``step_for`` (per-device blocks of one replica where per replica)."""
  params = make_params(n, dtype)
  if per_replica(name):
    params = jax.tree.map(lambda x: x[None], params)
  grads = jax.tree.map(lambda x: (1e-3 * jnp.ones_like(x)).astype(dtype), params)
  args = (params, tx.init(params), grads) + ((jnp.float32(3.0),) if weighted(name) else ())
  if not per_replica(name):
    return args
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(replica_mesh(), spec), block_specs(args))
  return jax.device_put(args, shardings)


@functools.cache
def compiled(name):
  build, dtype, _ = PATHS[name]
  tx = build()
  args = inputs(name, tx, N, dtype)
  params, state = args[:2]
  outputs = jax.eval_shape(lambda p, s: (p, s), params, state)
  return step_for(name, tx, args).lower(*args).compile(), params, state, outputs


def entry(text: str) -> list[str]:
  """The instructions of the entry computation (the step outside every branch)."""
  body = text[text.index("\nENTRY") :]
  return body[: body.index("\n}")].splitlines()[2:]


PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "copy"}


def idle_branches(text: str) -> dict:
  """The branches of the step's conditionals that compute nothing (pass their operands through): name -> lines.

  A no-sync branch is one of them; whatever it copies is copied on every step that does not sync.
  Conditionals nested in a sync branch (which runs only at a sync) are not read.
  """
  calls = re.findall(r"branch_computations=\{([^}]*)\}", "\n".join(entry(text)))
  names = {n for group in calls for n in re.findall(r"%([\w.\-]+)", group)}
  found = {}
  for block in re.split(r"\n(?=\S)", text):
    head = re.match(r"%([\w.\-]+) ", block)
    if not head or head.group(1) not in names:
      continue
    lines = [line for line in block.splitlines()[1:] if " = " in line]
    if {parse(line)[1] for line in lines} <= PASS_THROUGH:
      found[head.group(1)] = lines
  return found


def parse(line: str):
  """(name, op, operand names, op_name metadata) of one HLO instruction."""
  m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\((.*?)\)(?:, |$)", line)
  meta = re.search(r'op_name="([^"]*)"', line)
  return m.group(1), m.group(2), re.findall(r"%([\w.\-]+)", m.group(3)), meta.group(1) if meta else ""


def param_sized(line: str, params) -> bool:
  smallest = min(x.size for x in jax.tree.leaves(params))
  shape = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]", line)
  return bool(shape) and shape.group(1) != "" and eval("*".join(shape.group(1).split(",")) or "1") >= smallest


@pytest.mark.parametrize("name", paths("copies"))
def test_no_copies_of_donated_buffers_outside_the_sync_branch(name):
  exe, params, _, _ = compiled(name)
  copies = [line for line in entry(exe.as_text()) if " copy(" in line and param_sized(line, params)]
  assert not copies, copies


@pytest.mark.parametrize("name", paths("idle copies"))
def test_a_branch_that_does_nothing_copies_nothing(name):
  """The no-sync branches pass the slow weights, outer and inner state through in place: no param-sized copy."""
  exe, params, _, _ = compiled(name)
  idle = idle_branches(exe.as_text())
  assert idle, "no pass-through branch found: the reader no longer matches the program"
  copies = [line for lines in idle.values() for line in lines if " copy(" in line and param_sized(line, params)]
  assert not copies, copies


@pytest.mark.parametrize("name", sorted(PATHS))
def test_temporaries(name):
  """No param-sized temporaries, except the pseudo-gradient some paths hold inside the sync branch."""
  exe, params, _, _ = compiled(name)
  _, dtype, extra_copies = PATHS[name]
  args = inputs(name, ADAM(), N, dtype)
  bare = step_for(name, ADAM(), args).lower(*args).compile().memory_analysis().temp_size_in_bytes
  allowed = bare + extra_copies * tree_bytes(params) + SMALL
  temp = exe.memory_analysis().temp_size_in_bytes
  assert temp <= allowed, f"temp bytes {temp} vs bare {bare} + {extra_copies} param copies"
  if extra_copies:  # and no more than stated
    assert temp > bare + (extra_copies - 1) * tree_bytes(params), "the bound is not tight: update PATHS"


@pytest.mark.parametrize("name", paths("sync-only state"))
def test_sync_only_state_is_written_only_by_a_conditional(name):
  """Slow weights, outer state (and a reset or interpolated inner state) come out of a sync branch."""
  exe, params, _, outputs = compiled(name)
  lines = entry(exe.as_text())
  producers = {parse(line)[0]: parse(line) for line in lines if "=" in line}
  root = parse(next(line for line in lines if line.lstrip().startswith("ROOT")))
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(outputs)[0]]
  assert len(paths) == len(root[2])
  sync_only = ["].slow", "].outer_state"]
  if "reset" in name or "interpolate" in name:
    sync_only.append("].slow_inner_state")
  checked = 0
  for path, operand in zip(paths, root[2]):
    if not any(key in path for key in sync_only):
      continue
    _, op, args, _ = producers[operand]
    while op in ("get-tuple-element", "bitcast"):  # through the branch's output tuple
      _, op, args, _ = producers[args[0]]
    assert op == "conditional", f"{path} is written by {op}, outside the sync branch"
    checked += 1
  assert checked >= len(jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(PATHS))
def test_non_sync_step_reads_the_slow_weights_once_and_the_outer_state_never(name):
  """Outside the branches: one fused read per slow leaf (the landing); the outer state is never read.

  The landing reads the slow weights either from the state (fused path) or from
  the sync branch's output (staged path): both are counted.
  """
  exe, params, _, _ = compiled(name)
  text = entry(exe.as_text())
  lines = {parse(line)[0]: (parse(line), line) for line in text if "=" in line}
  meta = {n: m for n, ((_, op, _, m), _) in lines.items() if op == "parameter"}

  def source(arg):
    """'state.slow...' and such for a parameter; 'branch output' for a param-sized output of a conditional."""
    if arg in meta:
      return meta[arg]
    (_, op, args, _), line = lines[arg]
    if op == "get-tuple-element" and lines[args[0]][0][1] == "conditional" and param_sized(line, params):
      return "branch output"
    return ""

  reads = {}
  for (_, op, args, _), _ in lines.values():
    if op == "fusion":
      for arg in args:
        reads.setdefault(source(arg), []).append(arg)
  slow_reads = [
    a for key, args in reads.items() if key.startswith("state.slow[") or key == "branch output" for a in args
  ]
  assert len(slow_reads) == len(set(slow_reads)) == len(jax.tree.leaves(params)), slow_reads
  assert not [k for k in reads if k.startswith("state.outer_state")], reads.keys()


@pytest.mark.parametrize("name", sorted(PATHS))
def test_state_is_inner_state_plus_one_copy_of_the_slow_weights(name):
  """The state holds the inner state, one slow copy in its dtype, and only what the path needs besides."""
  build, dtype, _ = PATHS[name]
  params = make_params(N, dtype)
  state = build().init(params)
  inner_bytes = tree_bytes(state.inner_state)  # the inner optimizer's own state, as it would be bare
  slow_bytes = tree_bytes(params) * (2 if dtype == jnp.bfloat16 else 1)
  expected = inner_bytes + slow_bytes
  if "interpolate" in name:
    expected += inner_bytes  # the snapshot of the inner state at the last sync
  if any(word in name for word in ("outer", "DiLoCo", "streaming", "EF", "top-k", "eager", "weighted")):
    expected += slow_bytes  # Nesterov's momentum, in the slow weights' dtype
  if any(word in name for word in ("int8", "EF", "top-k")):
    expected += tree_bytes(params)  # the error-feedback residual, float32
  if "eager" in name:
    expected += 2 * tree_bytes(params)  # the last round's mean and this replica's share of it
  assert expected <= tree_bytes(state) <= expected + 64  # + count, syncs, alpha


@pytest.mark.parametrize("name", sorted(PATHS))
def test_the_step_has_no_side_effects(name):
  """No host callback (debug, io or pure) in the compiled step: it has no effects and never waits on the host."""
  build, dtype, _ = PATHS[name]
  tx = build()
  args = inputs(name, tx, 1 << 12, dtype)
  # No host call at all: the placement check counts into the state (a callback would make each call wait for the step).
  assert_calls_no_host(jax.make_jaxpr(step_for(name, tx, args))(*args))


@pytest.mark.parametrize("name", sorted(n for n in PATHS if not n.startswith(REPLICAS)))
def test_force_sync_has_no_side_effects_and_compiles_once(name):
  """force_sync under jit, on every path outside a replica axis: no host call, one trace for every call."""
  build, dtype, _ = PATHS[name]
  tx = build()
  params = make_params(1 << 12, dtype)
  state, traces = tx.init(params), []
  grads = {"grads": params} if "adaptive" in name else {}  # adaptive alpha's estimate takes the last gradient
  sync = jax.jit(lambda s, p: (traces.append(1), force_sync(s, p, tx, **grads))[1])
  assert_calls_no_host(jax.make_jaxpr(lambda s, p: force_sync(s, p, tx, **grads))(state, params))
  for _ in range(3):
    updates, state = jax.jit(tx.update)(params, state, params)
    params = optax.apply_updates(params, updates)
    state, params = sync(state, params)
  assert len(traces) == 1


def replica_steps(name, steps):
  """``jit_and_count_traces`` for a path run inside shard_map: ``steps`` calls of its donated step (step_for)."""
  build, dtype, _ = PATHS[name]
  tx, traces = build(), []
  counted = optax.GradientTransformationExtraArgs(tx.init, lambda *a, **k: (traces.append(1), tx.update(*a, **k))[1])
  params, state, *rest = inputs(name, counted, 1 << 12, dtype)
  step = step_for(name, counted, (params, state, *rest))
  # placed as the step returns them (P("replica", None) where inputs wrote P("replica"): to jit, another sharding)
  returned = jax.eval_shape(step_for(name, tx, (params, state, *rest)), params, state, *rest)
  params, state = jax.device_put(
    (params, state), jax.tree.map(lambda x: NamedSharding(replica_mesh(), x.sharding.spec), returned)
  )
  for _ in range(steps):
    params, state = step(params, state, *rest)
  return len(traces), step._cache_size(), state


@pytest.mark.parametrize("name", sorted(PATHS))
def test_one_compile_for_every_step(name):
  build, dtype, _ = PATHS[name]
  if REPLICAS in name:
    traces, executables, state = replica_steps(name, 23)
  else:
    traces, executables, state = jit_and_count_traces(build(), make_params(1 << 12, dtype), 23)
  # syncs after 23 steps at k=5: 4; with 2 fragments it counts fragment syncs, 4 of fragment 0 (steps 4, 9,
  # 14, 19) and 5 of fragment 1 (steps 1, 6, 11, 16, 21).
  fragments = "fragments" in name or "streaming" in name
  assert (traces, executables, int(state.syncs)) == (1, 1, 9 if fragments else 4)
