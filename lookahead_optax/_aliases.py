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
