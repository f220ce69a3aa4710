"""Every argument is checked at construction; errors name the function called, the argument and the value."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import adaptive_alpha, diloco, lookahead, ranger, snoo, streaming

NESTEROV = optax.sgd(0.7, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("k", [0, -3, 2.0, True, "5", None, jnp.array(2.5)])
def test_invalid_k(k):
  with pytest.raises(ValueError, match=r"lookahead: k must be an int >= 1, got"):
    lookahead(optax.sgd(0.1), k=k)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_invalid_alpha(alpha):
  with pytest.raises(ValueError, match=r"lookahead: alpha must be"):
    lookahead(optax.sgd(0.1), alpha=alpha)


@pytest.mark.parametrize("inner", [None, "adam", optax.adam, 0.1])
def test_invalid_inner(inner):
  with pytest.raises(TypeError, match=r"lookahead: inner must be an optax GradientTransformation"):
    lookahead(inner)


@pytest.mark.parametrize("outer", ["sgd", optax.sgd, 0.7, (optax.sgd(0.1),)])
def test_invalid_outer_names_the_argument(outer):
  with pytest.raises(TypeError, match=r"lookahead: outer must be an optax GradientTransformation .*got"):
    lookahead(optax.adam(0.1), k=5, outer=outer)


def test_invalid_inner_state_policy_lists_choices():
  with pytest.raises(
    ValueError, match=r"inner_state_policy must be one of 'maintain', 'reset', 'interpolate', got 'pullback'"
  ):
    lookahead(optax.sgd(0.1), inner_state_policy="pullback")


@pytest.mark.parametrize("dtype", [jnp.int32, "floaty", bool])
def test_invalid_slow_dtype(dtype):
  with pytest.raises(ValueError, match=r"slow_dtype must be a floating dtype, got"):
    lookahead(optax.sgd(0.1), slow_dtype=dtype)


def test_a_64_bit_slow_dtype_needs_64_bit_jax():
  """Without jax_enable_x64, float64 would be stored as float32: refused at construction, saying why."""
  with pytest.raises(ValueError, match=r"^lookahead: slow_dtype=float64 needs 64-bit JAX.*would store float32"):
    lookahead(optax.sgd(0.1), slow_dtype=jnp.float64)


def test_a_64_bit_slow_dtype_is_taken_with_64_bit_jax(x64):
  state = lookahead(optax.sgd(0.1), slow_dtype=jnp.float64).init({"w": jnp.ones(2, jnp.float32)})
  assert state.slow["w"].dtype == jnp.float64


def test_a_slow_dtype_narrower_than_the_params_is_refused_at_init():
  opt = lookahead(optax.sgd(0.1), slow_dtype=jnp.bfloat16)
  with pytest.raises(
    ValueError, match=r"^lookahead: slow_dtype=bfloat16 is narrower than params\['w'\]'s dtype float32"
  ):
    opt.init({"w": jnp.ones(2), "b": jnp.ones((), jnp.bfloat16)})


def test_a_python_float_param_is_refused_at_init():
  """A Python float has no dtype for its slow weight: named at init instead of failing at the first update."""
  with pytest.raises(
    ValueError, match=r"^lookahead: params\['b'\] is a Python float \(1\.5\): pass the params as arrays"
  ):
    lookahead(optax.sgd(0.1)).init({"w": jnp.ones(2), "b": 1.5})


@pytest.mark.parametrize(
  "name", ["axis_name", "fragments", "communication_dtype", "error_feedback", "delay", "mixing", "placement_check"]
)
def test_the_0_1_keywords_are_gone(name):
  """Each moved to its own piece (replica_mean, streaming) or to the warnings filter: passing one is an error."""
  with pytest.raises(TypeError, match=rf"unexpected keyword argument '{name}'"):
    lookahead(optax.sgd(0.1), **{name: 1})


@pytest.mark.parametrize("schedule", [2, "streaming", (2, 0, 0.5)])
def test_invalid_schedule(schedule):
  with pytest.raises(ValueError, match=r"lookahead: schedule must be None or made by streaming\(...\), got"):
    lookahead(optax.sgd(0.1), schedule=schedule)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(inner_state_policy="reset"), r"schedule=Streaming\(fragments=2.*inner_state_policy='reset'"),
    (dict(alpha=optax.constant_schedule(0.5)), r"schedule=Streaming\(fragments=2.* needs a constant alpha.*got alpha="),
    (dict(alpha=adaptive_alpha()), r"schedule=Streaming\(fragments=2.* needs a constant alpha"),
    (dict(k=1), r"fragments=2 makes 2 fragments, more than k=1"),
  ],
)
def test_a_fragment_schedule_names_what_it_rules_out(kwargs, match):
  with pytest.raises(ValueError, match="lookahead: " + match):
    lookahead(optax.sgd(0.1), **{"k": 4, **kwargs}, schedule=streaming(2))


def test_a_delayed_schedule_needs_an_exchange():
  with pytest.raises(ValueError, match=r"lookahead: schedule=Streaming\(.*delay=1.* but outer=None"):
    lookahead(optax.sgd(0.1), k=4, schedule=streaming(2, delay=1))
  opt = lookahead(optax.sgd(0.1), k=4, outer=optax.sgd(0.5), schedule=streaming(2, delay=1))
  with pytest.raises(ValueError, match=r"lookahead: schedule=.* has no replica_mean\(...\) in it"):
    opt.init({"w": jnp.ones(2), "b": jnp.ones(())})


@pytest.mark.parametrize("alpha", [0.1, 0.9, optax.constant_schedule(0.5), adaptive_alpha()])
def test_alpha_with_outer_raises_naming_both(alpha):
  with pytest.raises(ValueError, match=r"lookahead: alpha=.* has no meaning together with outer=.*Pass alpha or outer"):
    lookahead(optax.sgd(0.1), k=2, alpha=alpha, outer=optax.sgd(0.7))


def test_interpolate_with_outer_raises():
  with pytest.raises(ValueError, match=r"inner_state_policy='interpolate' .* outer optimizer does not have"):
    lookahead(optax.adam(0.1), inner_state_policy="interpolate", outer=NESTEROV)
  with pytest.raises(ValueError, match=r"snoo: inner_state_policy='interpolate'"):
    snoo(optax.adam(0.1), inner_state_policy="interpolate")


def test_multisteps_as_inner_raises():
  with pytest.raises(ValueError, match=r"lookahead: inner is an optax.MultiSteps.*optax.MultiSteps\(lookahead"):
    lookahead(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2))
  # The GradientTransformation form is only visible in the state: init names it.
  opt = lookahead(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2).gradient_transformation())
  with pytest.raises(ValueError, match=r"lookahead: the inner optimizer contains an optax.MultiSteps"):
    opt.init({"w": jnp.ones(2)})


# ------------------------------------------------------------------ aliases


@pytest.mark.parametrize("name", ["snoo", "diloco"])
@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(alpha=0.5), r"got an unexpected keyword argument 'alpha'"),
    (dict(learning_rate=1e-3), r"got an unexpected keyword argument 'learning_rate'"),
    (dict(momentum=0.9), r"got an unexpected keyword argument 'momentum'"),
    (dict(outer_learning_rate=-1.0), r"outer_learning_rate must be a number in \(0.0, inf\] or a schedule, got -1.0"),
    (dict(outer_learning_rate=0.0), r"outer_learning_rate must be a number in \(0.0, inf\]"),
    (dict(outer_momentum=1.2), r"outer_momentum must be a number in \[0.0, 1.0\), got 1.2"),
    (dict(outer_momentum=1.0), r"outer_momentum must be a number in \[0.0, 1.0\), got 1.0"),
    (dict(outer_momentum=-0.1), r"outer_momentum must be a number in \[0.0, 1.0\)"),
    (dict(k=0), r"k must be an int >= 1, got 0"),
    (dict(inner_state_policy="nope"), r"inner_state_policy must be one of"),
  ],
)
def test_alias_errors_name_the_alias_and_the_argument(name, kwargs, match):
  alias = {"snoo": snoo, "diloco": diloco}[name]
  with pytest.raises(
    (TypeError, ValueError),
    match=rf"{name}(\(\))?[: ].*" + match if "unexpected" not in match else rf"{name}\(\) " + match,
  ):
    alias(optax.adam(0.1), **kwargs)


def test_snoo_and_diloco_take_the_same_outer_argument_names():
  for alias in (snoo, diloco):
    opt = alias(optax.adam(0.1), k=3, outer_learning_rate=0.5, outer_momentum=0.5)
    assert callable(opt.update)


def test_diloco_needs_an_axis_name():
  with pytest.raises(ValueError, match=r"diloco: axis_name must name the mapped replica axis, got None"):
    diloco(optax.adam(0.1), axis_name=None)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(learning_rate=-1e-3), r"ranger: learning_rate must be a number in \(0.0, inf\] or a schedule, got -0.001"),
    (dict(learning_rate=1e-3, b1=1.0), r"ranger: b1 must be a number in \[0.0, 1.0\), got 1.0"),
    (dict(learning_rate=1e-3, b2=-0.5), r"ranger: b2 must be"),
    (dict(learning_rate=1e-3, eps=0.0), r"ranger: eps must be a number in \(0.0, inf\]"),
    (dict(learning_rate=1e-3, weight_decay=-1.0), r"ranger: weight_decay must be a number in \[0.0, inf\]"),
    (dict(learning_rate=1e-3, k=0), r"ranger: k must be an int >= 1, got 0"),
    (dict(learning_rate=1e-3, alpha=2.0), r"ranger: alpha must be a finite number in \[0, 1\], got 2.0"),
  ],
)
def test_ranger_errors_name_ranger(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ranger(**kwargs)
