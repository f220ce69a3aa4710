"""The mistakes that used to train a wrong model silently: each is now reported, and the right uses are not."""

from __future__ import annotations

import collections
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import (
  LookaheadPlacementWarning,
  LookaheadState,
  adaptive_alpha,
  diloco,
  find_lookahead_state,
  lookahead,
  replica_mean,
  slow_params,
  snoo,
)
from lookahead_optax._placement import SAMPLE
from tests.compiled import assert_calls_no_host, count_primitive, input_shapes
from tests.helpers import make_params, quadratic_grad, replica_grad

TARGET = 3.0


def misplaced(opt_state):
  """``LookaheadState.misplaced`` read without reporting it (``find_lookahead_state`` would warn)."""
  found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LookaheadState))
  return next(x for x in found if isinstance(x, LookaheadState)).misplaced


def train(opt, steps=12, params=None, jit=True, grads=None):
  """Minimise (w - 3)^2 from w = 0 (or quadratic_grad's problem); returns params, state, placement warnings.

  The warnings are those the host gives when it reads the state afterwards (``find_lookahead_state``, as
  ``slow_params`` does for an evaluation).
  """
  params = {"w": jnp.zeros(3)} if params is None else params
  grad_fn = grads or (lambda p, t: jax.tree.map(lambda w: 2 * (w - TARGET), p))
  state = opt.init(params)

  def step(params, state, t):
    updates, state = opt.update(grad_fn(params, t), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    for t in range(steps):
      params, state = step(params, state, t)
    find_lookahead_state(state)  # the host reads the state
  return params, state, [w for w in caught if issubclass(w.category, LookaheadPlacementWarning)]


# ------------------------------------------------------------- misplacement


@pytest.mark.parametrize(
  "after", [optax.scale_by_learning_rate(0.1), optax.clip_by_global_norm(0.01), optax.scale(0.5)]
)
def test_a_transformation_after_lookahead_is_counted_and_reported(after):
  """12 steps at k=5: cycles start at steps 0, 5 and 10; the last two find the params moved off the slow weights."""
  opt = optax.chain(lookahead(optax.scale_by_adam(), k=5), after)
  _, state, caught = train(opt)
  assert misplaced(state).tolist() == [2]
  assert len(caught) == 1, "one warning when the host reads the state"
  message = str(caught[0].message)
  assert "a transformation placed after lookahead changed its updates" in message
  assert "at the start of 2 cycle(s)" in message
  assert "params['w']" in message and "warnings.filterwarnings('ignore'" in message


def test_the_compiled_step_calls_no_host_and_a_filter_silences_the_report():
  opt = optax.chain(lookahead(optax.scale_by_adam(), k=5), optax.scale_by_learning_rate(0.1))
  params = {"w": jnp.zeros(3)}
  assert_calls_no_host(jax.make_jaxpr(opt.update)(params, opt.init(params), params))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.filterwarnings("ignore", category=LookaheadPlacementWarning)
    state = opt.init(params)
    for _ in range(12):
      updates, state = jax.jit(opt.update)(params, state, params)
      params = optax.apply_updates(params, updates)
    slow_params(state)
  assert not [w for w in caught if issubclass(w.category, LookaheadPlacementWarning)]


def test_params_changed_outside_the_optimizer_are_reported_at_the_next_eager_update():
  opt = lookahead(optax.sgd(0.1), k=2)
  params, state = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
  for _ in range(2):
    updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    params = optax.apply_updates(params, updates)
  params = {"w": jnp.clip(params["w"], -0.01, 0.01)}  # e.g. a projection applied by hand
  _, state = opt.update({"w": jnp.ones(3)}, state, params)  # counted here
  assert state.misplaced.tolist() == [1]
  with pytest.warns(LookaheadPlacementWarning, match=r"at the start of 1 cycle\(s\).*params\['w'\]"):
    opt.update({"w": jnp.ones(3)}, state, params)  # reported when the host next hands the state in


def test_the_counts_saturate_and_the_syncs_go_on():
  """A count at the int32 maximum stays there, and the steps after it still sync on schedule."""
  opt = lookahead(optax.sgd(0.1), k=2, alpha=0.5)
  params = {"w": jnp.zeros(3)}
  top = jnp.iinfo(jnp.int32).max
  state = opt.init(params)._replace(misplaced=jnp.array([top - 1], jnp.int32))
  step = jax.jit(opt.update)
  grads = {"w": jnp.ones(3)}
  for _ in range(3):  # three cycles, each begun away from the slow weights
    params = {"w": params["w"] + 1.0}
    for _ in range(2):
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
    assert int(state.misplaced[0]) == top
    assert int(state.count) == 0 and bool(jnp.all(params["w"] == state.slow["w"]))  # synced, landed
  assert int(state.syncs) == 3


def test_the_check_runs_once_per_cycle():
  """Params changed in the middle of a cycle are not compared (the check costs one pass per cycle)."""
  opt = lookahead(optax.sgd(0.1), k=4)
  params, state = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
  updates, state = opt.update({"w": jnp.ones(3)}, state, params)
  params = {"w": optax.apply_updates(params, updates)["w"] + 1.0}  # mid-cycle: not checked
  _, state = opt.update({"w": jnp.ones(3)}, state, params)
  assert state.misplaced.tolist() == [0]


def test_the_check_reads_a_sample_of_each_leaf():
  """A large leaf is compared on evenly spaced elements; a change to most of them is found, a small leaf whole."""
  opt = lookahead(optax.sgd(0.1), k=2)
  params = {"big": jnp.zeros(100_000), "small": jnp.zeros(5)}
  state = opt.init(params)
  moved = {"big": jnp.full(100_000, 1e-3), "small": jnp.zeros(5).at[4].set(1e-3)}  # as a weight decay would
  _, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, moved)
  assert state.misplaced.tolist() == [1, 1]
  compared = input_shapes(jax.make_jaxpr(opt.update)(params, state, params).jaxpr, "abs")
  # one (leaves, sample) array of differences: the big leaf is read as a sample of at most 2 * SAMPLE elements
  assert compared and max(math.prod(shape) for shape in compared) <= 2 * (2 * SAMPLE)


def test_under_vmap_the_step_is_the_same_program_for_any_number_of_runs():
  """A vmapped grid of runs compiles to the same program, with no host call, for 1 or 64 runs."""
  opt = lookahead(optax.sgd(0.1), k=3)

  def program(runs):
    params = {"w": jnp.zeros((runs, 3))}
    jaxpr = jax.make_jaxpr(jax.vmap(opt.update))(params, jax.vmap(opt.init)(params), params)
    assert jaxpr.effects == set() and count_primitive(jaxpr.jaxpr, "pure_callback") == 0
    return [count_primitive(jaxpr.jaxpr, p) for p in ("cond", "select_n", "reduce_max")]

  assert program(1) == program(64)


def test_under_vmap_a_misplaced_run_is_counted_for_that_run_only():
  """One run of a nested vmap misplaced: its count is 1, the others' 0; the host's report names the leaf."""
  opt = lookahead(optax.sgd(0.5), k=3)
  params = {"w": jnp.ones((2, 3, 4))}
  state = jax.vmap(jax.vmap(opt.init))(params)
  step = jax.jit(jax.vmap(jax.vmap(opt.update)))
  for t in range(6):
    updates, state = step(params, state, params)
    params = optax.apply_updates(params, updates)
    if t == 2:  # right after the first sync, one run's params leave its slow weights
      params = {"w": params["w"].at[1, 2, 0].add(1.0)}
  expected = jnp.zeros((2, 3, 1), jnp.int32).at[1, 2, 0].set(1)
  assert jnp.array_equal(state.misplaced, expected)
  with pytest.warns(LookaheadPlacementWarning, match=r"\(params\['w'\];"):
    find_lookahead_state(state)


# ---------------------------------------------------- no false alarms

PLACEMENTS = {
  "last in a chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), lookahead(optax.adam(0.05), 3)),
  "MultiSteps(lookahead)": lambda: optax.MultiSteps(lookahead(optax.adam(0.05), 3), every_k_schedule=2),
  "apply_if_finite": lambda: optax.apply_if_finite(lookahead(optax.adam(0.05), 3), max_consecutive_errors=3),
  "inject_hyperparams": lambda: optax.inject_hyperparams(lookahead)(inner=optax.adam(0.05), k=3, alpha=0.5),
  "masked": lambda: optax.masked(
    lookahead(optax.adam(0.05), 3), {"dense": {"w": True, "b": False}, "scale": True, "emb": [False]}
  ),
  "multi_transform": lambda: optax.multi_transform(
    {"la": lookahead(optax.adam(0.05), 3), "sgd": optax.sgd(0.01)},
    {"dense": {"w": "la", "b": "sgd"}, "scale": "la", "emb": ["sgd"]},
  ),
  "reset": lambda: lookahead(optax.adam(0.05), 3, inner_state_policy="reset"),
  "interpolate": lambda: lookahead(optax.adam(0.05), 3, inner_state_policy="interpolate"),
  "snoo": lambda: snoo(optax.adam(0.05), 3),
  "adaptive alpha": lambda: lookahead(optax.adam(0.05), 3, adaptive_alpha()),
  "slow_dtype": lambda: lookahead(optax.adam(0.05), 3, slow_dtype=jnp.float32),
  "slow_dtype snoo": lambda: snoo(optax.adam(0.05), 3, slow_dtype=jnp.float32),
}


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_no_false_alarm_for_supported_placements(name):
  params = make_params(0, jnp.bfloat16 if "slow_dtype" in name else jnp.float32)
  nan_at_4 = lambda p, t: jax.tree.map(lambda g: g * jnp.where(t == 4, jnp.nan, 1.0), quadratic_grad(p, t))
  grads = nan_at_4 if name == "apply_if_finite" else quadratic_grad
  _, state, caught = train(PLACEMENTS[name](), steps=13, params=params, grads=grads)
  assert not caught, caught[0].message


def test_no_false_alarm_for_diloco_replicas():
  """Replicas land on the shared slow weights within a rounding each: no alarm."""
  params = make_params()
  opt = diloco(optax.adam(0.05), k=3, axis_name="replica")

  @jax.jit
  @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0))
  def step(params, state, t, m):
    updates, state = opt.update(replica_grad(params, t, m), state, params)
    return optax.apply_updates(params, updates), state

  stacked = jax.tree.map(lambda x: jnp.stack([x] * 4), params)
  state = jax.vmap(opt.init)(stacked)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    for t in range(10):
      stacked, state = step(stacked, state, t, jnp.arange(4))
    find_lookahead_state(state)
  assert not caught and not state.misplaced.any()


# ---------------------------------------------------- axis and state guards


def test_axis_name_outside_a_mapped_axis_names_axis_name():
  opt = diloco(optax.adam(0.1), k=3, axis_name="replica")
  params = {"w": jnp.ones(2)}
  with pytest.raises(
    ValueError,
    match=r"diloco: axis_name='replica' is not a mapped axis here. Call update inside "
    r"jax.shard_map, jax.pmap or jax.vmap",
  ):
    opt.update(params, opt.init(params), params)
  plain = lookahead(optax.sgd(0.1), outer=optax.chain(replica_mean("data"), optax.sgd(0.5)))
  with pytest.raises(ValueError, match=r"replica_mean: axis_name='data' is not a mapped axis"):
    plain.update(params, plain.init(params), params)


@pytest.mark.parametrize("jit", [False, True])
def test_a_count_beyond_a_lowered_k_ends_the_cycle_at_that_step(jit):
  """A state at count 4 in a k=3 lookahead (a larger k before) syncs at its next step, like one at count 2."""
  params = {"w": jnp.ones(2)}
  grads = {"w": jnp.array([0.5, -1.0])}
  smaller = lookahead(optax.sgd(0.1), k=3, alpha=0.3)
  update = jax.jit(smaller.update) if jit else smaller.update
  start = smaller.init(params)._replace(slow={"w": jnp.full(2, 2.0)})
  updates, beyond = update(grads, start._replace(count=jnp.asarray(4, jnp.int32)), params)
  expected_updates, at_end = update(grads, start._replace(count=jnp.asarray(2, jnp.int32)), params)
  # Algorithm 1 by hand: fast = 1 - 0.1 g; slow = 2 + 0.3 (fast - 2); the params land on slow.
  slow = 2.0 + 0.3 * ((1.0 - 0.1 * grads["w"]) - 2.0)
  assert jnp.allclose(optax.apply_updates(params, updates)["w"], slow, rtol=1e-6)
  assert int(beyond.count) == 0 and int(beyond.syncs) == 1
  assert jnp.array_equal(updates["w"], expected_updates["w"])
  assert jnp.array_equal(beyond.slow["w"], at_end.slow["w"])


def test_optax_lookahead_params_are_named():
  params = optax.LookaheadParams(fast={"w": jnp.ones(2)}, slow={"w": jnp.ones(2)})
  opt = lookahead(optax.sgd(0.1), k=3)
  with pytest.raises(ValueError, match=r"lookahead: params is an optax.LookaheadParams .*migrating.md"):
    opt.init(params)
  state = opt.init(params.fast)
  with pytest.raises(ValueError, match=r"lookahead: params is an optax.LookaheadParams"):
    opt.update(params.fast, state, params)
  with pytest.raises(ValueError, match=r"lookahead: updates is an optax.LookaheadParams"):
    opt.update(params, state, params.fast)


def test_a_0_1_state_is_named():
  """A state object with the 0.1 fields (a trailing ``residual``) is named as such, in one line."""
  Old = collections.namedtuple("Old", (*LookaheadState._fields[:-1], "residual"))
  opt = lookahead(optax.sgd(0.1), k=3)
  params = {"w": jnp.ones(2)}
  old = Old(*opt.init(params)[:-1], optax.EmptyState())
  with pytest.raises(ValueError, match=r"lookahead: this is a lookahead-optax 0.1 state"):
    opt.update(params, old, params)


@pytest.mark.parametrize(
  "saved,loaded,match",
  [
    (
      dict(inner_state_policy="interpolate"),
      dict(),
      r"made by a lookahead with inner_state_policy='interpolate'.*"
      r"This one has inner_state_policy='maintain'",
    ),
    (dict(), dict(inner_state_policy="interpolate"), r"inner_state_policy 'maintain' or 'reset'.*'interpolate'"),
    (dict(outer=optax.sgd(0.5)), dict(), r"made by a lookahead with an outer optimizer.*This one has outer=None"),
    (dict(), dict(outer=optax.sgd(0.5)), r"made by a lookahead with alpha and no outer optimizer"),
    (dict(slow_dtype=jnp.float32), dict(), r"slow weights of dtype float32.*slow_dtype=None"),
    (
      dict(alpha=adaptive_alpha(fisher="ema")),
      dict(),
      r"made by a lookahead with adaptive_alpha keeping its own gradient EMA.*This one has alpha=0\.5",
    ),
    (dict(), dict(alpha=adaptive_alpha(fisher="ema")), r"with no gradient EMA for alpha.*fisher='ema'"),
    (dict(alpha=adaptive_alpha()), dict(alpha=adaptive_alpha(fisher="ema")), r"with no gradient EMA for alpha"),
    (dict(alpha=adaptive_alpha(fisher="ema")), dict(alpha=adaptive_alpha()), r"keeping its own gradient EMA"),
  ],
)
def test_a_state_of_another_configuration_is_named(saved, loaded, match):
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  state = lookahead(optax.adam(0.1), k=3, **saved).init(params)
  with pytest.raises(ValueError, match=match):
    lookahead(optax.adam(0.1), k=3, **loaded).update(params, state, params)


def test_params_not_shaped_like_the_slow_weights_are_named():
  opt = lookahead(optax.sgd(0.1), k=3)
  state = opt.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"params passed to update are not shaped like the slow weights"):
    opt.update({"v": jnp.ones(2)}, state, {"v": jnp.ones(2)})


def test_placement_warning_class_is_a_user_warning():
  assert issubclass(LookaheadPlacementWarning, UserWarning)
