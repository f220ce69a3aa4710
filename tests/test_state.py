"""``force_sync`` is a regular sync taken now: after j < k steps it equals an optimizer with k = j at its sync."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lookahead_optax import (
  _streaming,
  adaptive_alpha,
  diloco,
  find_lookahead_state,
  force_sync,
  lookahead,
  slow_params,
  snoo,
  streaming,
)
from tests.compiled import assert_calls_no_host
from tests.helpers import make_params, quadratic_grad, replica_grad, run

J = 3  # force the sync after three inner steps of a k = 5 optimizer
CLOSE = dict(rtol=1e-6, atol=1e-7)

CONFIGS = {
  "constant alpha": lambda k: lookahead(optax.adam(0.05), k, 0.4),
  "alpha schedule": lambda k: lookahead(optax.adam(0.05), k, lambda n: 0.3 + 0.2 * n),
  "reset": lambda k: lookahead(optax.sgd(0.05, momentum=0.9), k, 0.6, inner_state_policy="reset"),
  "interpolate": lambda k: lookahead(optax.adam(0.05), k, 0.7, inner_state_policy="interpolate"),
  "outer (SNOO)": lambda k: snoo(optax.adam(0.05), k, outer_learning_rate=0.7, outer_momentum=0.9),
  "outer reset": lambda k: snoo(optax.adam(0.05), k, 0.5, 0.5, inner_state_policy="reset"),
  "slow_dtype": lambda k: lookahead(optax.adam(0.05), k, 0.5, slow_dtype=jnp.float32),
  "slow_dtype outer": lambda k: snoo(optax.adam(0.05), k, slow_dtype=jnp.float32),
  "adaptive alpha": lambda k: lookahead(optax.adam(0.05), k, adaptive_alpha(0.1)),
  "adaptive ema": lambda k: lookahead(optax.sgd(0.05, momentum=0.9), k, adaptive_alpha(0.1, fisher="ema")),
  "adaptive reset": lambda k: lookahead(optax.adam(0.05), k, adaptive_alpha(0.1), inner_state_policy="reset"),
  "adaptive interpolate": lambda k: lookahead(
    optax.sgd(0.05, momentum=0.9), k, adaptive_alpha(0.1, fisher="ema"), inner_state_policy="interpolate"
  ),
  "chain with clipping": lambda k: optax.chain(optax.clip_by_global_norm(1.0), lookahead(optax.adam(0.05), k, 0.5)),
  "inject_hyperparams": lambda k: optax.inject_hyperparams(lookahead)(inner=optax.adam(0.05), k=k, alpha=0.5),
}


def assert_states_close(got, want, what, **tol):
  chex.assert_trees_all_close(got, want, **(tol or CLOSE), custom_message=what)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_force_sync_equals_a_regular_sync_with_k_equal_to_the_steps_taken(name):
  params = make_params(0, jnp.bfloat16 if "slow_dtype" in name else jnp.float32)
  adaptive = "adaptive" in name
  long, short = CONFIGS[name](5), CONFIGS[name](J)
  fasts, states = run(long, params, quadratic_grad, J)
  kwargs = {"grads": quadratic_grad(fasts[J - 2], J - 1)} if adaptive else {}  # the gradient of the J-th update
  state, synced = force_sync(states[-1], fasts[-1], long, **kwargs)
  ref_fasts, ref_states = run(short, params, quadratic_grad, J)
  got, want = find_lookahead_state(state), find_lookahead_state(ref_states[-1])
  # bfloat16 params: XLA may keep the regular sync's fast weights in float32 (excess precision), while
  # force_sync starts from the params as rounded to bfloat16; the results agree to bfloat16 resolution.
  params_tol = dict(rtol=2**-6, atol=2**-6) if "slow_dtype" in name else {}
  assert_states_close(synced, ref_fasts[-1], "params", **params_tol)
  assert_states_close(got.slow, want.slow, "slow weights", **params_tol)
  assert_states_close(got.inner_state, want.inner_state, "inner state")
  assert_states_close(got.slow_inner_state, want.slow_inner_state, "interpolation snapshot")
  assert_states_close(got.outer_state, want.outer_state, "outer state", **params_tol)
  assert_states_close(got.alpha, want.alpha, "alpha used")
  assert (int(got.count), int(got.syncs)) == (0, 1) == (int(want.count), int(want.syncs))
  chex.assert_trees_all_equal(synced, slow_params(state, synced))  # fast == slow, bit for bit (to params' dtype)
  # and training continues from there as from the regular sync
  more = run_from(long, synced, state, J, 4)
  ref_more = run_from(short, ref_fasts[-1], ref_states[-1], J, 2)
  assert_states_close(more[0][1], ref_more[0][1], "params one step later", **params_tol)


def run_from(opt, params, state, t0, steps):
  out = []
  for t in range(t0, t0 + steps):
    updates, state = opt.update(quadratic_grad(params, t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((state, params))
  return [(s, p) for s, p in out]


def test_force_sync_is_pure_and_leaves_the_rest_of_the_state_alone():
  params = make_params()
  opt = optax.chain(optax.add_noise(0.01, 0.5, key=jax.random.key(0)), lookahead(optax.sgd(0.1), 5, 0.5))
  _, states = run(opt, params, quadratic_grad, 2)
  before = jax.tree.map(jnp.copy, states[-1])
  state, _ = force_sync(states[-1], params, opt)
  chex.assert_trees_all_equal(states[-1], before)  # arguments untouched
  chex.assert_trees_all_equal(state[0], states[-1][0])  # the noise transformation's state is not advanced


@pytest.mark.parametrize("name", ["constant alpha", "outer (SNOO)", "alpha schedule"])
def test_force_sync_right_after_a_sync_keeps_the_model_and_state(name):
  """Nothing to sync: no outer (momentum) step on a zero pseudo-gradient, no sync counted (the model saved at the
  end of a run that ends on a sync is the one trained)."""
  params = make_params()
  opt = CONFIGS[name](2)
  fasts, states = run(opt, params, quadratic_grad, 4)  # synced at the 4th update: fast == slow
  state, synced = force_sync(states[-1], fasts[-1], opt)
  chex.assert_trees_all_equal(synced, fasts[-1])
  chex.assert_trees_all_equal(state, states[-1])
  again, _ = force_sync(opt.init(params), params, opt)  # nor before the first update
  chex.assert_trees_all_equal(again, opt.init(params))


def test_force_sync_with_fragments_leaves_the_fragment_that_just_synced():
  """Fragment 1 of 2 synced at the last update (k=4: at steps 1 and 5): only fragment 0 syncs now, as a
  regular sync of an optimizer whose fragment 0 comes due at this point would."""
  params = make_params()
  opt = lookahead(optax.sgd(0.1), 4, outer=optax.sgd(0.5, momentum=0.9), schedule=streaming(2))
  fasts, states = run(opt, params, quadratic_grad, 6)  # fragment 0 synced at step 3, fragment 1 at step 5
  before = states[-1]
  state, synced = force_sync(before, fasts[-1], opt)
  assert int(before.syncs) == 3 and int(state.syncs) == 4  # only fragment 0 counted
  ids = _streaming.assign("lookahead", 2, params)
  fragment = iter(ids)
  for p, s_old, s_new, f in zip(
    jax.tree.leaves(synced), jax.tree.leaves(before.slow), jax.tree.leaves(state.slow), jax.tree.leaves(fasts[-1])
  ):
    if next(fragment) == 1:  # untouched: its slow weights and the params as they were
      chex.assert_trees_all_equal((s_new, p), (s_old, f))
    else:  # moved: slow + outer step on (slow - fast), with the fragment's momentum
      assert not jnp.array_equal(s_new, s_old)
  chex.assert_trees_all_equal(state.outer_state[1], before.outer_state[1])


def test_force_sync_errors():
  params = make_params()
  opt = lookahead(optax.sgd(0.1), 5, 0.5)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"force_sync: grads is only used by adaptive_alpha"):
    force_sync(state, params, opt, grads=params)
  adaptive = lookahead(optax.adam(0.1), 5, adaptive_alpha())
  with pytest.raises(ValueError, match=r"force_sync: this lookahead uses adaptive_alpha.*pass grads="):
    force_sync(adaptive.init(params), params, adaptive)
  with pytest.raises(ValueError, match=r"force_sync: tx does not reach a lookahead update"):
    force_sync(state, params, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"found no LookaheadState"):
    force_sync(optax.sgd(0.1).init(params), params, opt)


def test_force_sync_under_axis_name_averages_like_a_regular_sync(small):
  """DiLoCo on 3 replicas (vmap with an axis name): force_sync after J steps equals diloco(k=J)'s sync."""
  replicas = 3
  long, short = (diloco(optax.adam(0.05), k, 0.7, 0.9, axis_name="replica") for k in (5, J))

  def train(opt, steps):
    @jax.jit
    @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, 0, None, 0))
    def step(params, state, t, m):
      updates, state = opt.update(replica_grad(params, t, m), state, params)
      return optax.apply_updates(params, updates), state

    stacked = jax.tree.map(lambda x: jnp.stack([x] * replicas), small)
    state = jax.vmap(opt.init)(stacked)
    for t in range(steps):
      stacked, state = step(stacked, state, t, jnp.arange(replicas))
    return stacked, state

  stacked, state = train(long, J)
  replica_sync = jax.vmap(lambda s, p: force_sync(s, p, long), axis_name="replica")
  assert_calls_no_host(jax.make_jaxpr(replica_sync)(state, stacked))  # the replica path calls no host either
  state, synced = replica_sync(state, stacked)
  ref_params, ref_state = train(short, J)
  assert_states_close(synced, ref_params, "params of every replica")
  assert_states_close(state.slow, ref_state.slow, "slow weights")
  assert_states_close(state.outer_state, ref_state.outer_state, "outer state")
  with pytest.raises(ValueError, match=r"diloco: axis_name='replica' is not a mapped axis here.*shard_map"):
    force_sync(jax.tree.map(lambda x: x[0], state), jax.tree.map(lambda x: x[0], synced), long)


def test_slow_params_survive_a_donated_step():
  """What slow_params returns is a copy: the next step may donate (and delete) the state's own buffers."""
  opt = lookahead(optax.sgd(0.1), k=2)
  params = {"w": jnp.ones(3)}
  state = opt.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state)
  best = slow_params(state)
  params, state = step(params, state)
  assert jnp.array_equal(best["w"], jnp.ones(3))  # still readable: the state's buffers were donated
  assert not jnp.array_equal(slow_params(state)["w"], best["w"])
