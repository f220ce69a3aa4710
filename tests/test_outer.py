"""snoo's outer optimizer (lookahead_optax._outer): optax.sgd with Nesterov momentum, with no pseudo-gradient buffer.

The reference is ``optax.sgd(learning_rate, momentum, nesterov=True)`` itself:
its state and its updates, compared bitwise when called directly, and as the
slow step of a jitted Lookahead. ``tests/test_compiled.py`` reads the buffers
of the compiled step (no params-sized temporary).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import lookahead, snoo
from lookahead_optax._outer import nesterov
from tests.helpers import make_params, quadratic_grad, run

LEARNING_RATES = {"constant": 0.7, "schedule": optax.linear_schedule(0.9, 0.3, 4)}


def deltas(params, steps):
  """Pseudo-gradient-like trees, different at each step."""
  return [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) - 0.3 * i, params) for i in range(steps)]


@pytest.mark.parametrize("lr", sorted(LEARNING_RATES))
def test_update_and_split_are_optax_sgd_nesterov_bitwise(lr):
  params = make_params()
  lr = LEARNING_RATES[lr]
  want, got = optax.sgd(lr, momentum=0.9, nesterov=True), nesterov(lr, 0.9)
  s_want = want.init(params)
  s_got = got.init(params)
  s_split = got.init(params)
  chex.assert_trees_all_equal_structs(s_got, s_want)
  update, split = jax.jit(got.update), jax.jit(lambda d, s: got.update.split(d, lambda: d, s))
  for delta in deltas(params, 6):
    u_want, s_want = jax.jit(want.update)(delta, s_want)
    u_got, s_got = update(delta, s_got)
    u_split, s_split = split(delta, s_split)
    chex.assert_trees_all_equal(u_got, u_want)
    chex.assert_trees_all_equal(s_got, s_want)
    chex.assert_trees_all_equal(u_split, u_want)
    chex.assert_trees_all_equal(s_split, s_want)


def test_split_takes_the_updates_from_again_and_the_new_momentum():
  """``again()`` feeds the updates, ``delta`` the momentum: ``u = -lr (again + mu b_new)``, ``b_new = delta + mu b``."""
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx = nesterov(0.5, 0.25)
  state = tx.init(params)
  state = tx.update({"w": jnp.array([4.0, 8.0, -4.0])}, state)[1]  # b = [4, 8, -4]
  updates, state = tx.update.split({"w": jnp.array([2.0, 0.0, 1.0])}, lambda: {"w": jnp.array([1.0, 1.0, 1.0])}, state)
  chex.assert_trees_all_equal(state[0].trace, {"w": jnp.array([3.0, 2.0, 0.0])})  # 2 + 4/4, 0 + 8/4, 1 - 4/4
  chex.assert_trees_all_equal(updates, {"w": jnp.array([-0.875, -0.75, -0.5])})  # -(1 + b/4) / 2


@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_snoo_is_lookahead_with_optax_sgd_nesterov(inner):
  """snoo's sync (pseudo-gradient computed twice) lands where optax's Nesterov SGD as ``outer`` lands.

  Within float32 rounding: the compiled kernels that compute the pseudo-gradient
  differ, and XLA may contract a multiply-add into one rounding in one of them.
  """
  params = make_params()
  make = {"momentum": lambda: optax.sgd(0.05, momentum=0.9), "adam": lambda: optax.adam(0.05)}[inner]
  k, steps = 3, 10
  got_f, got_s = run(snoo(make(), k, 0.7, 0.9), params, quadratic_grad, steps)
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  want_f, want_s = run(lookahead(make(), k, outer=outer), params, quadratic_grad, steps)
  for t in range(steps):
    close = lambda got, want, what: chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7, custom_message=what)
    close(got_f[t], want_f[t], f"fast weights, step {t}")
    close(got_s[t].slow, want_s[t].slow, f"slow weights, step {t}")
    close(got_s[t].outer_state, want_s[t].outer_state, f"outer state, step {t}")
