"""The compiled Lookahead step: no param-sized temporaries or copies, one trace, minimal state.

Structure, not timing: these are what keep the step at the cost of its arithmetic
(benchmarks/overhead.py measures the time).
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks.overhead import compiled_memory, make_params, optimizer_step, tree_bytes
from lookahead_optax import lookahead

N = 1 << 18
SMALL = 64 * 1024  # bytes: scalars and bookkeeping, far below one param leaf
INNERS = {"sgd": lambda: optax.sgd(0.1), "momentum": lambda: optax.sgd(0.1, momentum=0.9), "adam": lambda: optax.adam(1e-3)}


def compile_step(tx, params):
  state = tx.init(params)
  step = optimizer_step(tx)
  return step.lower(params, state, params).compile(), state


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("policy", ["maintain", "reset", "interpolate"])
def test_no_param_sized_temporaries_or_copies(inner, policy):
  params = make_params(N)
  smallest_leaf = min(x.nbytes for x in jax.tree.leaves(params))
  assert smallest_leaf > SMALL
  bare = compiled_memory(optimizer_step(INNERS[inner]()), params, INNERS[inner]().init(params), params)
  compiled, _ = compile_step(lookahead(INNERS[inner](), 5, 0.5, inner_state=policy), params)
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= bare["temp_bytes"] + SMALL, f"temp bytes {temp} vs bare {bare['temp_bytes']}"
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[: entry.index("\n}")]
  param_copies = [line for line in entry.splitlines() if re.search(r"f32\[\d{4,}(,\d+)?\]\{[^}]*\} copy\(", line)]
  assert not param_copies, param_copies  # copies only inside the sync branch


@pytest.mark.parametrize("policy,extra_copies", [("maintain", 1), ("reset", 1), ("interpolate", 2)])
def test_state_is_inner_state_plus_one_copy_of_params(policy, extra_copies):
  params = make_params(N)
  inner_bytes = tree_bytes(optax.adam(1e-3).init(params))
  state = lookahead(optax.adam(1e-3), 5, 0.5, inner_state=policy).init(params)
  expected = inner_bytes + tree_bytes(params) + (extra_copies - 1) * inner_bytes
  assert expected <= tree_bytes(state) <= expected + 64  # + count, syncs, alpha


def test_outer_optimizer_state_is_one_more_param_copy():
  params = make_params(N)
  inner_bytes = tree_bytes(optax.adam(1e-3).init(params))
  state = lookahead(optax.adam(1e-3), 5, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)).init(params)
  assert inner_bytes + 2 * tree_bytes(params) <= tree_bytes(state) <= inner_bytes + 2 * tree_bytes(params) + 64
