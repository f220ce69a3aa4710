"""Readers of compiled programs: jaxpr walks (primitives, collectives and what they depend on, effects) and HLO text."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.extend

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


def collective_results_reach(jaxpr, outputs) -> list:
  """The collectives of ``jaxpr`` whose results flow into any of its ``outputs`` (indices), by name and position.

  Forward from each collective's results through every equation, output by
  output into ``shard_map``, ``jit`` and ``cond`` (each branch; the branch index
  reaches every output); any other equation with a collective nested in it
  (a loop) counts as one, whose results all depend on it (conservative).
  """
  found = _reach(jaxpr, [set() for _ in jaxpr.invars], "")
  return sorted({src for i in outputs for src in found[i]})


ENTERED = ("shard_map", "jit", "pjit", "cond", "closed_call", "remat", "checkpoint")  # outputs follow their bodies'


def _reach(jaxpr, sources, where) -> list:
  """Per output of ``jaxpr``: the collectives that reach it, given the collectives reaching each input."""
  literal = lambda v: isinstance(v, jax.extend.core.Literal)
  reached = dict(zip(jaxpr.invars, sources))
  get = lambda v: set() if literal(v) else reached.get(v, set())
  for n, eqn in enumerate(jaxpr.eqns):
    name, ins = eqn.primitive.name, [get(v) for v in eqn.invars]
    subs = [s for v in eqn.params.values() for s in map(_sub, v if isinstance(v, (tuple, list)) else (v,)) if s]
    operands, index = (ins[1:], ins[0]) if name == "cond" else (ins, set())
    if name in ENTERED and subs and all(len(s.invars) == len(operands) for s in subs):
      results = [_reach(s, operands, f"{where}{n}:{name}/{i}/") for i, s in enumerate(subs)]
      outs = [index.union(*(r[o] for r in results)) for o in range(len(eqn.outvars))]
    else:
      held = any(c in name for c in COLLECTIVES) or any(count_primitive(s, c) for s in subs for c in COLLECTIVES)
      outs = [set().union(*ins) | ({f"{where}{n}:{name}"} if held else set())] * len(eqn.outvars)
    reached.update(zip(eqn.outvars, outs))
  return [get(v) for v in jaxpr.outvars]


def _sub(value):
  """A jaxpr held in an equation parameter, or None."""
  if hasattr(value, "eqns"):
    return value
  inner = getattr(value, "jaxpr", None)
  return inner if hasattr(inner, "eqns") else None


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


def assert_calls_no_host(closed_jaxpr) -> None:
  """No effects and no host callback (debug, io or pure) anywhere in the program: it never waits on the host."""
  assert closed_jaxpr.effects == set()
  for callback in ("debug_callback", "io_callback", "pure_callback"):
    assert count_primitive(closed_jaxpr.jaxpr, callback) == 0, callback


def input_shapes(jaxpr, name: str) -> list:
  """The shapes of the first operand of every ``name`` equation in ``jaxpr``, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(tuple(eqn.invars[0].aval.shape))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
        found += input_shapes(sub, name) if hasattr(sub, "eqns") else []
  return found


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
