"""What a Lookahead step costs on top of its inner optimizer, measured side by side in one run.

For each inner optimizer, sync period k, parameter count and params dtype, the
optimizer-only step (``update`` + ``apply_updates``, jitted, params and state
donated) of the bare inner optimizer; ``lookahead_optax.lookahead`` with each
``inner_state_policy``, without its placement check, and (bfloat16 params) with
float32 slow weights; ``snoo``; and ``optax.lookahead``. Then SNOO against
DiLoCo under ``shard_map``, one replica per local device (their non-sync step
alone, and on average), and a full training step (forward, backward, update) of
an MLP and a small Transformer, bare vs lookahead. Per configuration: median
ms/step over repeats (implementations interleaved within each repeat, so machine
noise hits all alike), the ratio to the bare inner optimizer and to
``optax.lookahead``, the compiled memory figures, and the optimizer-state size.

Regenerate the committed results (about 25 minutes on 2 CPU cores, two
simulated devices for the DiLoCo table)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.overhead

writes ``benchmarks/results/overhead/overhead.md``, ``overhead.json`` and ``overhead.png``.
``--quick`` runs a small subset in about a minute; ``--device-tag NAME`` writes
``overhead_NAME.*`` instead (a run on another machine, e.g. a GPU); ``--report-only``
rewrites the table and plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import data, models, report, timing, train
from lookahead_optax import diloco, lookahead, snoo

INNERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "sgd": lambda: optax.sgd(1e-2),
  "sgd+momentum": lambda: optax.sgd(1e-2, momentum=0.9),
  "adam": lambda: optax.adam(1e-3),
}


class Impl(NamedTuple):
  """One implementation: how to build it, wrap params for it, and the params dtypes it is measured with."""

  name: str
  build: Callable[[optax.GradientTransformation, int], optax.GradientTransformation]
  wrap: Callable = lambda p: p
  dtypes: tuple = ("float32", "bfloat16")


IMPLS = [
  Impl("inner", lambda inner, k: inner),
  Impl("lookahead (maintain)", lambda inner, k: lookahead(inner, k, 0.5)),
  Impl("lookahead (reset)", lambda inner, k: lookahead(inner, k, 0.5, inner_state_policy="reset"), dtypes=("float32",)),
  Impl(
    "lookahead (interpolate)",
    lambda inner, k: lookahead(inner, k, 0.5, inner_state_policy="interpolate"),
    dtypes=("float32",),
  ),
  Impl(
    "lookahead, no placement check",
    lambda inner, k: lookahead(inner, k, 0.5, placement_check="off"),
    dtypes=("float32",),
  ),
  Impl(
    "lookahead, slow_dtype=float32",
    lambda inner, k: lookahead(inner, k, 0.5, slow_dtype=jnp.float32),
    dtypes=("bfloat16",),
  ),
  Impl("snoo", lambda inner, k: snoo(inner, k)),
  Impl(
    "optax.lookahead",
    lambda inner, k: optax.lookahead(inner, k, 0.5),
    # separate buffers for fast and slow, so that both can be donated
    wrap=lambda p: optax.LookaheadParams(fast=p, slow=jax.tree.map(jnp.copy, p)),
    dtypes=("float32",),
  ),
]


def make_params(n: int, seed: int = 0, dtype=jnp.float32):
  """About ``n`` params in four leaves of different shapes, like a small network."""
  shapes = [(n // 2 // 1024, 1024), (n // 4 // 512, 512), (n // 8,), (n - n // 2 - n // 4 - n // 8,)]
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {f"p{i}": jax.random.normal(key, shape).astype(dtype) for i, (key, shape) in enumerate(zip(keys, shapes))}


def optimizer_step(tx: optax.GradientTransformation):
  """The jitted, donated optimizer-only step ``(params, state, grads) -> (params, state)``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_memory(jitted, *args) -> dict:
  mem = jitted.lower(*args).compile().memory_analysis()
  return {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
  }


def bench_optimizer(inner_name: str, k: int, n: int, dtype: str, repeats: int, steps: int, progress) -> list[dict]:
  """All implementations for one (inner, k, n, params dtype); interleaved repeats; one row each."""
  grads_fast = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), make_params(n, 1, dtype))
  runs = []
  for impl in [i for i in IMPLS if dtype in i.dtypes]:
    tx = impl.build(INNERS[inner_name](), k)
    params = impl.wrap(make_params(n, 0, dtype))
    state = tx.init(params)
    step = optimizer_step(tx)
    memory = compiled_memory(step, params, state, grads_fast)
    inner_bytes = tree_bytes(INNERS[inner_name]().init(make_params(n, 0, dtype)))
    runs.append(
      {
        "impl": impl.name,
        "step": step,
        "args": (params, state),
        "memory": memory,
        "state_bytes": tree_bytes(state),
        "inner_state_bytes": inner_bytes,
        "param_bytes": tree_bytes(make_params(n, 0, dtype)),
        "times": [],
      }
    )
  for _ in range(repeats):
    for run in runs:
      fn = lambda p, s, run=run: run["step"](p, s, grads_fast)
      times, run["args"] = timing.time_steps(fn, run["args"], steps=steps, repeats=1, warmup=2)
      run["times"] += times
      progress.update(1)
  return [
    {
      "inner": inner_name,
      "k": k,
      "params": n,
      "dtype": dtype,
      "impl": r["impl"],
      "ms": float(np.median(r["times"])),
      "times_ms": r["times"],
      **r["memory"],
      "state_bytes": r["state_bytes"],
      "inner_state_bytes": r["inner_state_bytes"],
      "param_bytes": r["param_bytes"],
    }
    for r in runs
  ]


REPLICA_LAYOUTS = ("sliced", "blocks")
"""How each replica's params and state (a leading replica axis) enter ``update`` under ``shard_map``:
sliced off (``a[0]``) before and added back (``a[None]``) after; or as the per-device blocks themselves
(leading axis of size 1, scalars of the state shared with ``P()``), as the distributed guide shows."""


def replica_optimizers(k: int) -> list[tuple[str, optax.GradientTransformation]]:
  adam = INNERS["adam"]
  return [
    ("inner", adam()),
    ("snoo", snoo(adam(), k)),
    ("diloco", diloco(adam(), k, axis_name="replica")),
    (
      "streaming diloco (F=4, int8, EF)",
      diloco(adam(), k, axis_name="replica", fragments=4, communication_dtype="int8", error_feedback=True),
    ),
  ]


def replica_step(tx, layout: str, mesh, params, grads):
  """``(step, args, grads)`` of one optimizer-only step under ``shard_map`` over ``mesh``'s replica axis."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  def body(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  stack = lambda tree: jax.device_put(
    jax.tree.map(lambda x: jnp.stack([x] * jax.device_count()), tree), NamedSharding(mesh, P("replica"))
  )
  params, grads = stack(params), stack(grads)
  if layout == "blocks":
    specs = jax.tree.map(lambda x: P("replica") if x.ndim else P(), jax.eval_shape(tx.init, params))
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P("replica"), out_specs=specs))
    step = jax.jit(
      jax.shard_map(body, mesh=mesh, in_specs=(P("replica"), specs, P("replica")), out_specs=(P("replica"), specs)),
      donate_argnums=(0, 1),
    )
    return step, (params, init(params)), grads
  local = lambda tree: jax.tree.map(lambda x: x[0], tree)
  expand = lambda tree: jax.tree.map(lambda x: x[None], tree)
  smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=P("replica"), out_specs=P("replica"))
  step = jax.jit(smap(lambda p, s, g: expand(body(local(p), local(s), local(g)))), donate_argnums=(0, 1))
  return step, (params, jax.jit(smap(lambda p: expand(tx.init(local(p)))))(params)), grads


def bench_replicas(n: int, repeats: int, steps: int, progress) -> list[dict]:
  """Non-sync and average steps of SNOO and (Streaming) DiLoCo under shard_map, one replica per local device.

  Each replica runs its own optimizer (no gradient all-reduce); DiLoCo averages
  the pseudo-gradient over the replicas at a sync. ``k=10**9`` never syncs in
  the timed steps: the non-sync step alone. Both layouts of
  :data:`REPLICA_LAYOUTS`.
  """
  mesh = jax.make_mesh((jax.device_count(),), ("replica",))
  rows = []
  for k in (5, 10**9):
    for layout in REPLICA_LAYOUTS:
      runs = []
      for name, tx in replica_optimizers(k):
        params = make_params(n)
        step, args, grads = replica_step(
          tx, layout, mesh, params, jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), make_params(n, 1))
        )
        runs.append({"impl": name, "step": step, "grads": grads, "args": args, "times": []})
      for _ in range(repeats):
        for run in runs:
          fn = lambda p, s, run=run: run["step"](p, s, run["grads"])
          times, run["args"] = timing.time_steps(fn, run["args"], steps=steps, repeats=1, warmup=2)
          run["times"] += times
          progress.update(1)
      rows += [
        {
          "k": k,
          "layout": layout,
          "params": n,
          "replicas": jax.device_count(),
          "impl": r["impl"],
          "ms": float(np.median(r["times"])),
          "times_ms": r["times"],
        }
        for r in runs
      ]
  return rows


def training_tasks(quick: bool):
  """(name, model, loss_fn, batch) for the full-training-step comparison."""
  ds = data.digits()
  x = np.tile(ds.train.x, (2, 1))[:512]
  y = np.tile(ds.train.y, 2)[:512]
  mlp = models.MLP((64, 512, 512, 10) if quick else (64, 2048, 2048, 10), rngs=nnx.Rngs(0))
  corpus = data.char_corpus(max_chars=50_000)
  lm_batch = next(data.lm_batches(corpus.train, 8 if quick else 16, 64, np.random.default_rng(0)))
  lm = models.TransformerLM(
    len(corpus.vocab), dim=64 if quick else 256, heads=4, layers=2, max_len=64, rngs=nnx.Rngs(0)
  )
  return [
    ("MLP on digits", mlp, lambda apply, p, b: train.cross_entropy(apply(p, b.x), b.y), data.Split(x, y)),
    ("Transformer LM", lm, lambda apply, p, b: train.cross_entropy(apply(p, b.x), b.y), lm_batch),
  ]


def bench_training(quick: bool, repeats: int, steps: int, progress) -> list[dict]:
  rows = []
  for name, model, loss, batch in training_tasks(quick):
    apply, params = train.functional(model)
    loss_fn = lambda p, b, apply=apply, loss=loss: loss(apply, p, b)
    runs = []
    for impl_name, tx in [("inner", optax.adam(1e-3)), ("lookahead (maintain)", lookahead(optax.adam(1e-3), 5, 0.5))]:
      step = train.make_step(loss_fn, tx)
      p = jax.tree.map(jnp.copy, params)
      runs.append({"impl": impl_name, "step": step, "args": (p, tx.init(p)), "times": []})
    for _ in range(repeats):
      for run in runs:
        fn = lambda p, s, run=run, batch=batch: run["step"](p, s, batch)[:2]
        times, run["args"] = timing.time_steps(fn, run["args"], steps=steps, repeats=1, warmup=2)
        run["times"] += times
        progress.update(1)
    n = sum(x.size for x in jax.tree.leaves(params))
    rows += [
      {"task": name, "params": int(n), "impl": r["impl"], "ms": float(np.median(r["times"])), "times_ms": r["times"]}
      for r in runs
    ]
  return rows


def count_compiles(steps: int = 1000) -> dict:
  """Jit the step with a trace counter, run ``steps`` steps, report traces and cache entries."""
  tx = lookahead(optax.adam(1e-3), 5, 0.5)
  traces = 0

  def step(params, state, grads):
    nonlocal traces
    traces += 1
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1))
  params = make_params(1 << 12)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(steps):
    params, state = jitted(params, state, grads)
  return {"steps": steps, "traces": traces, "compiled": jitted._cache_size()}


def add_ratios(rows: list[dict]) -> None:
  by_key = {}
  for r in rows:
    by_key.setdefault((r["inner"], r["k"], r["params"], r["dtype"]), {})[r["impl"]] = r["ms"]
  for r in rows:
    group = by_key[(r["inner"], r["k"], r["params"], r["dtype"])]
    r["ratio_vs_inner"] = r["ms"] / group["inner"]
    r["ratio_vs_optax_lookahead"] = r["ms"] / group["optax.lookahead"] if "optax.lookahead" in group else None


def write_markdown(path: str, result: dict) -> None:
  mb = lambda b: f"{b / 2**20:.1f}"
  lines = [
    f"# Lookahead overhead ({result['device']})",
    "",
    f"Generated by `python -m benchmarks.overhead {' '.join(result['argv'])}`.".replace("  ", " "),
    f"Environment: `{json.dumps(result['environment'])}`.",
    "",
    f"Median of {result['repeats']} repeats of {result['steps']} steps after warm-up; implementations",
    "interleaved within each repeat; ratios taken within the same run. Bytes from",
    "`jax.jit(step).lower(...).compile().memory_analysis()` (MiB).",
    "",
    "## Optimizer-only step (update + apply_updates, jitted, params and state donated)",
    "",
  ]
  headers = [
    "inner",
    "k",
    "params",
    "dtype",
    "implementation",
    "ms/step",
    "× inner",
    "× optax.lookahead",
    "argument MiB",
    "output MiB",
    "temp MiB",
    "state − inner state − params (MiB)",
  ]
  ratio = lambda x: "—" if x is None else f"{x:.3f}"
  table = [
    [
      r["inner"],
      r["k"],
      f"{r['params'] / 1e6:.0f}M",
      r["dtype"],
      r["impl"],
      f"{r['ms']:.3f}",
      ratio(r["ratio_vs_inner"]),
      ratio(r["ratio_vs_optax_lookahead"]),
      mb(r["argument_bytes"]),
      mb(r["output_bytes"]),
      mb(r["temp_bytes"]),
      "—"
      if r["impl"] in ("inner", "optax.lookahead")
      else mb(r["state_bytes"] - r["inner_state_bytes"] - r["param_bytes"]),
    ]
    for r in result["optimizer"]
  ]
  lines += [report.markdown_table(headers, table), ""]
  if result.get("replicas"):
    rows = result["replicas"]
    layout = lambda r: r.get("layout", "sliced")
    base = {(r["k"], layout(r)): r["ms"] for r in rows if r["impl"] == "inner"}
    lines += [
      f"## SNOO and DiLoCo under shard_map ({rows[0]['replicas']} replica(s), one per device, Adam inner, "
      f"{rows[0]['params'] / 1e6:.0f}M params each)",
      "",
      "k = 10⁹ never syncs in the timed steps: the non-sync step alone. Layout: `sliced`, params and "
      "state with a leading replica axis sliced off before `update` (`a[0]`) and added back after; "
      "`blocks`, `update` on the per-device blocks (leading axis of size 1).",
      "",
      report.markdown_table(
        ["k", "layout", "implementation", "ms/step", "× inner"],
        [
          [
            r["k"] if r["k"] < 10**9 else "10⁹",
            layout(r),
            r["impl"],
            f"{r['ms']:.3f}",
            f"{r['ms'] / base[(r['k'], layout(r))]:.3f}",
          ]
          for r in rows
        ],
      ),
      "",
    ]
  if result["training"]:
    lines += ["## Full training step (forward, backward, Adam update), bare vs lookahead(adam, k=5)", ""]
    base = {r["task"]: r["ms"] for r in result["training"] if r["impl"] == "inner"}
    lines += [
      report.markdown_table(
        ["task", "params", "implementation", "ms/step", "× inner"],
        [
          [r["task"], r["params"], r["impl"], f"{r['ms']:.3f}", f"{r['ms'] / base[r['task']]:.3f}"]
          for r in result["training"]
        ],
      ),
      "",
    ]
  lines += [
    "## What the compiled program does",
    "",
    "A non-sync lookahead step compiles to the inner optimizer's own loop fusions with the landing",
    "(`where(sync, land on the slow weights, inner update)`) fused into the fusion that writes the params,",
    "plus `conditional`s whose non-sync branches pass the slow weights, outer state and inner state",
    "through untouched. Plain Lookahead computes its slow step element-wise inside that fusion; SNOO,",
    "`slow_dtype`, adaptive alpha and DiLoCo compute it in a sync-only branch before the landing. Either way",
    "the one extra cost of a non-sync step is one read stream of the slow weights (`tests/test_compiled.py`",
    "checks this, and that no donated buffer is copied, for every path). On a memory-bound machine that",
    "bounds the ratio at (streams + 1) / streams of the bare step: SGD 4/3, SGD+momentum 6/5, Adam 11/10.",
    "A sync step adds the sync branch; staged paths run the k-th inner step a second time there and",
    "materialise the pseudo-gradient (temp above). The placement check compares params and slow weights",
    "once per cycle. `optax.lookahead` runs its selects as separate passes with param-sized temporaries.",
    "",
  ]
  c = result["compiles"]
  lines += [
    f"Compile check: {c['steps']} jitted lookahead steps traced {c['traces']} time(s), "
    f"{c['compiled']} compiled executable(s).",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot(path: str, rows: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  inners = sorted({r["inner"] for r in rows}, key=list(INNERS).index)
  ks = sorted({r["k"] for r in rows})
  fig, axes = plt.subplots(len(ks), len(inners), figsize=(4.2 * len(inners), 3.4 * len(ks)), squeeze=False)
  for i, k in enumerate(ks):
    for j, inner in enumerate(inners):
      ax = axes[i][j]
      for impl in [m.name for m in IMPLS[1:]]:
        pts = sorted(
          (r["params"], r["ratio_vs_inner"])
          for r in rows
          if r["inner"] == inner and r["k"] == k and r["impl"] == impl and r["dtype"] == "float32"
        )
        if pts:
          ax.plot([p for p, _ in pts], [q for _, q in pts], marker="o", label=impl)
      ax.axhline(1.0, color="gray", lw=0.8)
      ax.axhline(1.05, color="gray", lw=0.8, ls="--")
      ax.set_xscale("log")
      ax.set_title(f"{inner}, k={k}")
      ax.set_xlabel("parameters")
      ax.set_ylabel("step time / inner step time")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small subset: adam, k=5, 1M params, 3 repeats of 20 steps")
  parser.add_argument(
    "--inners", default=",".join(INNERS), help=f"comma-separated inner optimizers from {list(INNERS)}"
  )
  parser.add_argument("--ks", default="5,10", help="comma-separated sync periods k (default 5,10)")
  parser.add_argument("--sizes", default="1000000,8000000", help="comma-separated parameter counts")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated params dtypes")
  parser.add_argument("--no-replicas", action="store_true", help="skip the SNOO/DiLoCo shard_map comparison")
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (default 5)")
  parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat (default 50)")
  parser.add_argument("--no-training", action="store_true", help="skip the full-training-step comparison")
  parser.add_argument(
    "--out", default=report.results_dir("overhead"), help="output directory (default benchmarks/results/overhead)"
  )
  parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json, run nothing")
  parser.add_argument("--device-tag", default="", help="write overhead_NAME.{json,md,png}: a run on another device")
  args = parser.parse_args(argv)
  if args.quick:
    args.inners, args.ks, args.sizes, args.repeats, args.steps = "adam", "5", "1000000", 3, 20
    args.dtypes = "float32"
  args.inners = args.inners.split(",")
  unknown = [i for i in args.inners if i not in INNERS]
  if unknown:
    parser.error(f"--inners: unknown inner optimizer(s) {unknown}; choose from {list(INNERS)}")
  args.ks = [int(k) for k in args.ks.split(",")]
  args.dtypes = args.dtypes.split(",")
  if set(args.dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes: choose from float32, bfloat16; got {args.dtypes}")
  args.sizes = [int(float(n)) for n in args.sizes.split(",")]
  if min(args.ks) < 1 or min(args.sizes) < 4096 or args.repeats < 1 or args.steps < 1:
    parser.error("--ks must be >= 1, --sizes >= 4096, --repeats and --steps >= 1")
  return args


def run(args, argv=()) -> dict:
  from tqdm.auto import tqdm

  configs = [(i, k, n, d) for i in args.inners for k in args.ks for n in args.sizes for d in args.dtypes]
  impls = lambda d: sum(d in i.dtypes for i in IMPLS)
  total = (
    sum(impls(c[3]) for c in configs) * args.repeats
    + (0 if args.no_training else 4 * args.repeats)
    + (0 if args.no_replicas else 2 * len(REPLICA_LAYOUTS) * len(replica_optimizers(5)) * args.repeats)
  )
  with tqdm(total=total, desc="overhead", mininterval=2.0) as progress:
    optimizer_rows = [row for c in configs for row in bench_optimizer(*c, args.repeats, args.steps, progress)]
    replica_rows = [] if args.no_replicas else bench_replicas(max(args.sizes), args.repeats, args.steps, progress)
    training_rows = [] if args.no_training else bench_training(args.quick, args.repeats, args.steps, progress)
  add_ratios(optimizer_rows)
  env = report.environment()
  return {
    "device": args.device_tag or env["device"],
    "environment": env,
    "argv": list(argv),
    "repeats": args.repeats,
    "steps": args.steps,
    "optimizer": optimizer_rows,
    "replicas": replica_rows,
    "training": training_rows,
    "compiles": count_compiles(),
  }


def main(argv=None):
  import sys

  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  stem = "overhead" + (f"_{args.device_tag}" if args.device_tag else "")
  if args.report_only:
    with open(os.path.join(args.out, stem + ".json")) as f:
      result = json.load(f)
  else:
    result = run(args, argv)
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, stem + ".json"), result)
  write_markdown(os.path.join(args.out, stem + ".md"), result)
  plot(os.path.join(args.out, stem + ".png"), result["optimizer"])
  print(open(os.path.join(args.out, stem + ".md")).read())


if __name__ == "__main__":
  main()
