"""The mistakes that used to train a wrong model silently: each is now reported, and the right uses are not."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import LookaheadPlacementError, LookaheadPlacementWarning, adaptive_alpha, diloco, lookahead, snoo
from tests.compiled import count_primitive
from tests.helpers import make_params, quadratic_grad, replica_grad

TARGET = 3.0


def train(opt, steps=12, params=None, jit=True, grads=None):
  """Minimise (w - 3)^2 from w = 0 (or quadratic_grad's problem); returns params, state, placement warnings."""
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
    jax.effects_barrier()
  return params, state, [w for w in caught if issubclass(w.category, LookaheadPlacementWarning)]


# ------------------------------------------------------------- misplacement


@pytest.mark.parametrize(
  "after", [optax.scale_by_learning_rate(0.1), optax.clip_by_global_norm(0.01), optax.scale(0.5)]
)
def test_a_transformation_after_lookahead_is_reported(after):
  opt = optax.chain(lookahead(optax.scale_by_adam(), k=5), after)
  _, _, caught = train(opt)
  assert caught, "no warning"
  message = str(caught[0].message)
  assert "a transformation placed after lookahead changed its updates" in message
  assert "params['w']" in message and "placement_check='off'" in message


def test_placement_check_raise_and_off():
  bad = lambda check: optax.chain(
    lookahead(optax.scale_by_adam(), k=5, placement_check=check), optax.scale_by_learning_rate(0.1)
  )
  with pytest.raises(Exception, match="changed its updates") as info:
    train(bad("raise"))
  assert "LookaheadPlacementError" in str(info.value) or isinstance(info.value, LookaheadPlacementError)
  _, _, caught = train(bad("off"))
  assert not caught


def test_params_changed_outside_the_optimizer_are_reported():
  opt = lookahead(optax.sgd(0.1), k=2)
  params, state = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    for _ in range(2):
      updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      params = optax.apply_updates(params, updates)
    params = {"w": jnp.clip(params["w"], -0.01, 0.01)}  # e.g. a projection applied by hand
    opt.update({"w": jnp.ones(3)}, state, params)
    jax.effects_barrier()
  assert [w for w in caught if issubclass(w.category, LookaheadPlacementWarning)]


def test_the_check_runs_once_per_cycle():
  """Params changed in the middle of a cycle are not compared (the check costs one pass per cycle)."""
  opt = lookahead(optax.sgd(0.1), k=4)
  params, state = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    params = {"w": optax.apply_updates(params, updates)["w"] + 1.0}  # mid-cycle: not checked
    opt.update({"w": jnp.ones(3)}, state, params)
    jax.effects_barrier()
  assert not caught


@pytest.mark.parametrize("runs", [1, 64])
def test_under_vmap_the_checks_call_the_host_once_per_step(runs):
  """A vmapped grid of runs reports from one host call per check, not one per run (same program for 1 or 64 runs)."""
  opt = lookahead(optax.sgd(0.1), k=3)
  params = {"w": jnp.zeros((runs, 3))}
  state = jax.vmap(opt.init)(params)
  step = jax.vmap(opt.update)
  assert (
    count_primitive(jax.make_jaxpr(step)(params, state, params).jaxpr, "debug_callback") == 2
  )  # the count guard, the placement
  lowered = jax.jit(step).lower(params, state, params).as_text()
  assert lowered.count("callback") == jax.jit(opt.update).lower(
    {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)}), {"w": jnp.zeros(3)}
  ).as_text().count("callback")


def test_under_vmap_a_misplaced_run_and_a_wrong_count_are_reported():
  """One run of a nested vmap misplaced: one warning naming the leaf; one run's count too large: the error."""
  opt = lookahead(optax.sgd(0.5), k=3)
  params = {"w": jnp.ones((2, 3, 4))}
  state = jax.vmap(jax.vmap(opt.init))(params)
  step = jax.jit(jax.vmap(jax.vmap(opt.update)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", LookaheadPlacementWarning)
    for t in range(6):
      updates, state = step(params, state, params)
      params = optax.apply_updates(params, updates)
      if t == 2:  # right after the first sync, one run's params leave its slow weights
        params = {"w": params["w"].at[1, 2, 0].add(1.0)}
    jax.effects_barrier()
  assert len(caught) == 1 and "(params['w'])" in str(caught[0].message)
  wrong = state._replace(count=state.count.at[0, 1].set(5))
  with pytest.raises(Exception, match=r"the state's count is 5, but k=3 allows 0..2"):
    jax.block_until_ready(step(params, wrong, params))


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
    jax.effects_barrier()
  assert not caught


# ---------------------------------------------------- axis and state guards


def test_axis_name_outside_a_mapped_axis_names_axis_name():
  opt = diloco(optax.adam(0.1), k=3, axis_name="replica")
  params = {"w": jnp.ones(2)}
  with pytest.raises(
    ValueError,
    match=r"diloco: axis_name='replica' is not a mapped axis here. Call update inside "
    r"jax.shard_map or jax.pmap",
  ):
    opt.update(params, opt.init(params), params)
  plain = lookahead(optax.sgd(0.1), axis_name="data")
  with pytest.raises(ValueError, match=r"lookahead: axis_name='data' is not a mapped axis"):
    plain.update(params, plain.init(params), params)


def test_a_state_from_a_larger_k_is_named():
  params = {"w": jnp.ones(2)}
  saved = lookahead(optax.sgd(0.1), k=5).init(params)._replace(count=jnp.asarray(4, jnp.int32))
  smaller = lookahead(optax.sgd(0.1), k=3)
  with pytest.raises(ValueError, match=r"lookahead: the state's count is 4, but k=3 allows 0..2"):
    smaller.update(params, saved, params)  # eager: raised before tracing
  with pytest.raises(Exception, match=r"the state's count is 4, but k=3 allows 0..2"):
    jax.block_until_ready(jax.jit(smaller.update)(params, saved, params))  # under jit: from the device


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
  assert issubclass(LookaheadPlacementError, ValueError)
