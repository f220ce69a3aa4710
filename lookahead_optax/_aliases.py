"""Ready-made combinations built on :func:`lookahead`; each checks its own arguments and names itself in errors."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import optax
from jax.typing import DTypeLike

from lookahead_optax import _exchange, _outer, _streaming
from lookahead_optax._config import check_number, make_config
from lookahead_optax._lookahead import build


def ranger(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.95,
  b2: float = 0.999,
  eps: float = 1e-5,
  weight_decay: float = 0.0,
  k: int = 6,
  alpha: float = 0.5,
  *,
  inner_state_policy: str = "maintain",
  slow_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Ranger: RAdam inside Lookahead, with the popular PyTorch "Ranger" defaults.

  .. math::  \text{ranger} = \text{lookahead}(\text{RAdam}(\eta, \beta_1, \beta_2, \epsilon)
             \to \text{decoupled weight decay},\ k=6,\ \alpha=0.5)

  The defaults (``b1=0.95``, ``b2=0.999``, ``eps=1e-5``, ``k=6``, ``alpha=0.5``)
  are those of the widely used PyTorch Ranger; gradient centralization, which
  that package also applies, is not included. ``weight_decay`` is AdamW-style
  (decoupled, scaled by the learning rate).

  Args:
    learning_rate: RAdam's step size, > 0: a number or an optax schedule.
    b1: RAdam's decay of the gradient average, in [0, 1).
    b2: RAdam's decay of the squared-gradient average, in [0, 1).
    eps: added to RAdam's denominator, > 0.
    weight_decay: decoupled weight decay, >= 0, scaled by the learning rate.
    k: inner steps per sync (:func:`lookahead`'s ``k``).
    alpha: the slow step size in [0, 1] (:func:`lookahead`'s ``alpha``).
    inner_state_policy: as in :func:`lookahead`.
    slow_dtype: as in :func:`lookahead`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`LookaheadState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from lookahead_optax import ranger
    >>> opt = ranger(1e-3)
    >>> state = opt.init({"w": jnp.zeros(3)})
  """
  check_number("ranger", "learning_rate", learning_rate, 0.0, float("inf"), low_open=True, schedule=True)
  check_number("ranger", "b1", b1, 0.0, 1.0, high_open=True)
  check_number("ranger", "b2", b2, 0.0, 1.0, high_open=True)
  check_number("ranger", "eps", eps, 0.0, float("inf"), low_open=True)
  check_number("ranger", "weight_decay", weight_decay, 0.0, float("inf"))
  inner = optax.chain(
    optax.scale_by_radam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  return build(make_config("ranger", inner, k, alpha, inner_state_policy, None, slow_dtype, None))


def _nesterov(caller: str, outer_learning_rate, outer_momentum) -> optax.GradientTransformation:
  check_number(caller, "outer_learning_rate", outer_learning_rate, 0.0, float("inf"), low_open=True, schedule=True)
  check_number(caller, "outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
  return _outer.nesterov(outer_learning_rate, outer_momentum)


def snoo(
  inner: optax.GradientTransformation,
  k: int = 20,
  outer_learning_rate: optax.ScalarOrSchedule = 0.7,
  outer_momentum: float = 0.9,
  *,
  inner_state_policy: str = "maintain",
  slow_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SNOO: Lookahead whose slow step is Nesterov SGD on the pseudo-gradient.

  With slow weights :math:`w_t`, fast weights after k inner steps
  :math:`\tilde w_{t,k}` and pseudo-gradient :math:`s_t = w_t - \tilde w_{t,k}`:

  .. math::

    b_t = \mu\, b_{t-1} + s_t, \qquad w_{t+1} = w_t - \eta\,(\mu\, b_t + s_t).

  ``outer_momentum=0`` with ``outer_learning_rate=alpha`` is plain Lookahead.
  The inner learning rate belongs to ``inner``; SNOO has no ``alpha`` (the
  outer optimizer takes the slow step). It computes what
  ``lookahead(inner, k, outer=optax.sgd(outer_learning_rate, outer_momentum, nesterov=True))``
  computes (same state; the same values up to float rounding), and its sync
  holds no params-sized buffer besides the state: the pseudo-gradient is
  computed twice, once for the momentum and once for the slow weights, each
  written in place.

  Args:
    inner: the inner (fast) optimizer, e.g. ``optax.adamw(...)``.
    k: inner steps between slow steps.
    outer_learning_rate: the outer learning rate :math:`\eta` > 0 (or a schedule
      of the number of syncs).
    outer_momentum: the outer Nesterov momentum :math:`\mu` in [0, 1).
    inner_state_policy: ``"maintain"`` or ``"reset"``, as in :func:`lookahead`.
    slow_dtype: as in :func:`lookahead`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`LookaheadState`.

  SNOO across replicas is :func:`diloco`. Defaults (``k=20``, 0.7, 0.9) are DiLoCo's outer settings; tune ``k`` and
  the outer learning rate for your problem.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lookahead_optax import snoo
    >>> opt = snoo(optax.adamw(1e-3), k=20, outer_learning_rate=0.7, outer_momentum=0.9)
    >>> state = opt.init({"w": jnp.zeros(3)})

  References:
    Kallusky, Rao, Nandavanam, Shi, `SNOO: Step-K Nesterov Outer Optimizer
    <https://arxiv.org/abs/2510.15830>`_, 2025.
  """
  outer = _nesterov("snoo", outer_learning_rate, outer_momentum)
  return build(make_config("snoo", inner, k, None, inner_state_policy, outer, slow_dtype, None))


def diloco(
  inner: optax.GradientTransformation,
  k: int = 500,
  outer_learning_rate: optax.ScalarOrSchedule = 0.7,
  outer_momentum: float = 0.9,
  axis_name: Hashable = "replica",
  *,
  fragments: Any = None,
  communication_dtype: DTypeLike | None = None,
  error_feedback: bool = False,
  delay: int | None = None,
  mixing: float | None = None,
  inner_state_policy: str = "maintain",
  slow_dtype: DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: replicas train independently for k steps, then take one shared Nesterov outer step.

  Call ``update`` inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name``,
  with each replica's own gradients (no gradient all-reduce in the training
  step). At each sync, on replica :math:`m` with fast weights :math:`\theta^m`:

  .. math::

    \Delta = \tfrac{1}{M}\textstyle\sum_m (\phi - \theta^m), \qquad
    \phi \leftarrow \phi + \mathrm{Nesterov}_{\eta,\mu}(\Delta), \qquad \theta^m \leftarrow \phi .

  The only cross-replica communication is that one average every ``k`` steps,
  inside the sync branch. Defaults are the DiLoCo paper's: inner AdamW (pass
  it), ``k=500`` inner steps, outer Nesterov with learning rate 0.7 and
  momentum 0.9. It is :func:`snoo` with :func:`replica_mean` in front of the
  outer step:

  .. code-block:: python

    lookahead(inner, k, outer=optax.chain(
        replica_mean(axis_name, dtype=communication_dtype, error_feedback=error_feedback),
        optax.sgd(outer_learning_rate, momentum=outer_momentum, nesterov=True)),
      schedule=streaming(fragments, delay=delay, mixing=mixing))

  Args:
    inner: the inner optimizer of each replica, e.g. ``optax.adamw(...)``.
    k: inner steps between syncs (DiLoCo's H).
    outer_learning_rate: the outer learning rate > 0 (or a schedule of the
      number of syncs).
    outer_momentum: the outer Nesterov momentum in [0, 1).
    axis_name: the mapped axis over the replicas.
    fragments: Streaming DiLoCo's fragments (:func:`streaming`); default 1.
    communication_dtype: the exchange's dtype (:func:`replica_mean`'s
      ``dtype``); default: float32.
    error_feedback: keep what compression lost (:func:`replica_mean`).
    delay: 0 or 1: the exchange overlaps the next step (:func:`streaming`).
    mixing: ``delay=1`` only: the landing's weight of this step's inner update
      (:func:`streaming`).
    inner_state_policy: ``"maintain"`` or ``"reset"``, as in :func:`lookahead`.
    slow_dtype: as in :func:`lookahead`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`LookaheadState`.

  Example:
    >>> import optax
    >>> from lookahead_optax import diloco
    >>> opt = diloco(optax.adamw(4e-4), k=500, axis_name="replica")
    >>> streaming = diloco(optax.adamw(4e-4), k=100, fragments=4, communication_dtype="int8",
    ...                    error_feedback=True, delay=1)

  References:
    Douillard et al., `DiLoCo: Distributed Low-Communication Training of
    Language Models <https://arxiv.org/abs/2311.08105>`_, 2023.
    Douillard et al., `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025.
  """
  if axis_name is None:
    raise ValueError(
      "diloco: axis_name must name the mapped replica axis, got None. For a single replica "
      "use snoo(...), the same slow step without the average."
    )
  exchange = _exchange.make("diloco", axis_name, communication_dtype, error_feedback, "communication_dtype")
  outer = optax.chain(exchange, _nesterov("diloco", outer_learning_rate, outer_momentum))
  schedule = _streaming.make("diloco", 1 if fragments is None else fragments, 0 if delay is None else delay, mixing)
  return build(make_config("diloco", inner, k, None, inner_state_policy, outer, slow_dtype, schedule))
