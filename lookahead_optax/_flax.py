"""One-call helpers for Flax: evaluate on the slow weights, and take a sync now, for linen and nnx.

Only the nnx helpers import Flax, when called; the library does not depend on it.

Non-trainable state is not touched: a BatchNorm's running statistics (linen
``batch_stats``, nnx ``BatchStat``) stay those gathered by the fast weights.
When evaluation on the slow weights needs statistics of their own, run a few
training-mode forward passes on the slow model before evaluating.
"""

from __future__ import annotations

from typing import Any

import jax

from lookahead_optax._state import force_sync, slow_params


def slow_train_state(state: Any) -> Any:
  """A copy of a linen ``TrainState`` whose params are the slow weights, for evaluation.

  Works with any state that has ``params``, ``opt_state`` and ``replace``
  (``flax.training.train_state.TrainState`` and its subclasses). The state you
  train with keeps the fast weights.

  Args:
    state: the ``TrainState`` you train with; its ``tx`` has one
      :func:`lookahead` in it. Left as it is.

  Returns:
    A copy of ``state`` whose ``params`` are the slow weights, cast to the
    params' dtypes; its ``opt_state`` and ``step`` are ``state``'s.

  Example:
    >>> import jax.numpy as jnp, optax, flax.linen as nn
    >>> from flax.training.train_state import TrainState
    >>> from lookahead_optax import lookahead, slow_train_state
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=lookahead(optax.adam(1e-3)))
    >>> eval_state = slow_train_state(state)
  """
  return state.replace(params=slow_params(state.opt_state, state.params))


def sync_train_state(state: Any, *, grads: Any | None = None) -> Any:
  """:func:`force_sync` on a linen ``TrainState``: a copy whose params are the synced slow weights.

  Args:
    state: the ``TrainState`` you train with; its ``tx`` has one
      :func:`lookahead` in it. Left as it is.
    grads: for adaptive alpha only: the gradient that stands in for the one
      at the fast weights (see :func:`force_sync`); ``None`` otherwise.

  Returns:
    A copy of ``state`` with the synced params (the new slow weights) and
    optimizer state, as after a regular sync.

  Example:
    >>> import jax.numpy as jnp, optax, flax.linen as nn
    >>> from flax.training.train_state import TrainState
    >>> from lookahead_optax import lookahead, sync_train_state
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=lookahead(optax.adam(1e-3)))
    >>> state = sync_train_state(state)  # e.g. before saving the final model
  """
  opt_state, params = force_sync(state.opt_state, state.params, state.tx, grads=grads)
  return state.replace(params=params, opt_state=opt_state)


def slow_model(model: Any, optimizer: Any) -> Any:
  """A copy of an nnx model holding the slow weights of its ``nnx.Optimizer``, for evaluation.

  Args:
    model: the ``nnx.Module`` you train (it holds the fast weights). Left as
      it is.
    optimizer: its ``nnx.Optimizer``, whose ``tx`` has one :func:`lookahead`
      in it. Left as it is.

  Returns:
    A clone of ``model`` whose ``optimizer.wrt`` variables (``nnx.Param`` by
    default) hold the slow weights; its other variables are ``model``'s.

  Example:
    >>> import optax
    >>> from flax import nnx
    >>> from lookahead_optax import lookahead, slow_model
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, lookahead(optax.adam(1e-3)), wrt=nnx.Param)
    >>> evaluated = slow_model(model, optimizer)
  """
  from flax import nnx

  copy = nnx.clone(model)
  nnx.update(copy, slow_params(optimizer.opt_state, nnx.state(model, optimizer.wrt)))
  return copy


def sync_nnx(model: Any, optimizer: Any, *, grads: Any | None = None) -> None:
  """:func:`force_sync` on an nnx model and its ``nnx.Optimizer``, in place, as nnx objects are.

  Afterwards the model holds the synced slow weights and the optimizer the
  synced state (its variables updated in place).

  Args:
    model: the ``nnx.Module`` you train; its params become the synced slow
      weights.
    optimizer: its ``nnx.Optimizer``, whose ``tx`` has one :func:`lookahead`
      in it; its state becomes the synced state.
    grads: for adaptive alpha only: the gradient that stands in for the one
      at the fast weights (see :func:`force_sync`); ``None`` otherwise.

  Returns:
    None: ``model`` and ``optimizer`` are updated in place.

  Example:
    >>> import optax
    >>> from flax import nnx
    >>> from lookahead_optax import lookahead, sync_nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, lookahead(optax.adam(1e-3)), wrt=nnx.Param)
    >>> sync_nnx(model, optimizer)
  """
  from flax import nnx

  opt_state, params = force_sync(optimizer.opt_state, nnx.state(model, optimizer.wrt), optimizer.tx, grads=grads)
  nnx.update(model, params)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  jax.tree.map(lambda variable, value: variable.set_value(value), optimizer.opt_state, opt_state, is_leaf=is_variable)
