"""Ready-made combinations built on :func:`lookahead`."""

from __future__ import annotations

from typing import Any

import optax

from lookahead_optax._lookahead import lookahead


def ranger(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.999,
    eps: float = 1e-5,
    weight_decay: float = 0.0,
    k: int = 6,
    alpha: float = 0.5,
    **lookahead_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Ranger: RAdam inside Lookahead, with the popular PyTorch "Ranger" defaults.

  .. math::  \text{ranger} = \text{lookahead}(\text{RAdam}(\eta, \beta_1, \beta_2, \epsilon)
             \to \text{decoupled weight decay},\ k=6,\ \alpha=0.5)

  The defaults (``b1=0.95``, ``b2=0.999``, ``eps=1e-5``, ``k=6``, ``alpha=0.5``)
  are those of the widely used PyTorch Ranger; gradient centralization, which
  that package also applies, is not included. ``weight_decay`` is AdamW-style
  (decoupled, scaled by the learning rate).

  Example:
    >>> import jax.numpy as jnp
    >>> from lookahead_optax import ranger
    >>> opt = ranger(1e-3)
    >>> state = opt.init({"w": jnp.zeros(3)})
  """
  inner = optax.chain(
      optax.scale_by_radam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
  return lookahead(inner, k=k, alpha=alpha, **lookahead_kwargs)


def snoo(
    inner: optax.GradientTransformation,
    k: int = 20,
    learning_rate: optax.ScalarOrSchedule = 0.7,
    momentum: float = 0.9,
    **lookahead_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SNOO: Lookahead whose slow step is Nesterov SGD on the pseudo-gradient.

  With slow weights :math:`w_t`, fast weights after k inner steps
  :math:`\tilde w_{t,k}` and pseudo-gradient :math:`s_t = w_t - \tilde w_{t,k}`:

  .. math::

    b_t = \mu\, b_{t-1} + s_t, \qquad w_{t+1} = w_t - \eta\,(\mu\, b_t + s_t).

  ``momentum=0`` and ``learning_rate=alpha`` is plain Lookahead.

  Args:
    inner: the inner (fast) optimizer, e.g. ``optax.adamw(...)``.
    k: inner steps between slow steps.
    learning_rate: the outer learning rate :math:`\eta`.
    momentum: the outer Nesterov momentum :math:`\mu`.
    **lookahead_kwargs: passed to :func:`lookahead` (``inner_state``,
      ``slow_dtype``, ``axis_name``).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import snoo
    >>> opt = snoo(optax.adamw(1e-3), k=20)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Kallusky, Rao, Nandavanam, Shi, `SNOO: Step-K Nesterov Outer Optimizer
    <https://arxiv.org/abs/2510.15830>`_, 2025.
  """
  outer = optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  return lookahead(inner, k=k, outer=outer, **lookahead_kwargs)


def diloco(
    inner: optax.GradientTransformation,
    k: int = 500,
    outer_learning_rate: optax.ScalarOrSchedule = 0.7,
    outer_momentum: float = 0.9,
    axis_name: Any = "replica",
    **lookahead_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: replicas train independently for k steps, then take one shared Nesterov outer step.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name``, with each
  replica's own gradients (no gradient all-reduce in the training step). At
  each sync, on replica :math:`m` with fast weights :math:`\theta^m`:

  .. math::

    \Delta = \tfrac{1}{M}\textstyle\sum_m (\phi - \theta^m), \qquad
    \phi \leftarrow \phi + \mathrm{Nesterov}_{\eta,\mu}(\Delta), \qquad \theta^m \leftarrow \phi .

  The only cross-replica communication is that one average every ``k`` steps,
  inside the sync branch. Defaults are the DiLoCo paper's: inner AdamW (pass
  it), ``k=500`` inner steps, outer Nesterov with learning rate 0.7 and
  momentum 0.9.

  Example:
    >>> import optax
    >>> from lookahead_optax import diloco
    >>> opt = diloco(optax.adamw(4e-4), k=500, axis_name="replica")

  References:
    Douillard et al., `DiLoCo: Distributed Low-Communication Training of
    Language Models <https://arxiv.org/abs/2311.08105>`_, 2023.
  """
  outer = optax.sgd(outer_learning_rate, momentum=outer_momentum, nesterov=True)
  return lookahead(inner, k=k, outer=outer, axis_name=axis_name, **lookahead_kwargs)
