r"""Nesterov SGD as the outer optimizer, with a slow step that keeps no pseudo-gradient buffer.

:func:`nesterov` is ``optax.sgd(learning_rate, momentum, nesterov=True)``, the
same state and the same updates bit for bit, with one more way to call its
update (:meth:`NesterovUpdate.split`). Nesterov's updates can be written from
the *new* momentum:

.. math::

  b_t = \Delta_t + \mu\, b_{t-1}, \qquad u_t = -\eta\,(\Delta_t + \mu\, b_t),

so a sync can compute the pseudo-gradient :math:`\Delta` twice, once for the
momentum (written over the old one) and once for the slow weights (written
over the old ones, reading the new momentum), in two loops that each read
their inputs and write one buffer in place. A generic outer optimizer reads the
old state for its updates, and XLA keeps :math:`\Delta` in a params-sized
buffer between the two. :func:`lookahead_optax.snoo` builds its outer
optimizer here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax


class NesterovUpdate:
  """The update function of :func:`nesterov`: ``optax.sgd``'s update, and :meth:`split`."""

  def __init__(self, learning_rate: optax.ScalarOrSchedule, momentum: float):
    self.momentum = momentum
    self.trace = optax.trace(decay=momentum, nesterov=True)
    self.scale = optax.scale_by_learning_rate(learning_rate)
    self.sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=True)

  def __call__(self, updates, state, params=None, **extra_args):
    return self.sgd.update(updates, state, params, **extra_args)

  def split(self, delta, again: Callable[[], optax.Updates], state):
    """``self(delta, state)``, with ``delta`` taken again from ``again()`` for the updates.

    ``again()`` must return the same values as ``delta``, computed so that XLA
    does not share the computation (:func:`lookahead_optax._tree.ordered_after`).
    The new momentum comes from ``delta``; the updates from ``again()`` and the
    new momentum, as ``optax.trace`` computes them.
    """
    trace_state, scale_state = state
    _, trace_state = self.trace.update(delta, trace_state)
    nesterov = jax.tree.map(lambda g, t: g + self.momentum * t, again(), trace_state.trace)
    updates, scale_state = self.scale.update(nesterov, scale_state)
    return updates, (trace_state, scale_state)


def nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float) -> optax.GradientTransformationExtraArgs:
  """``optax.sgd(learning_rate, momentum, nesterov=True)`` whose update also has :meth:`NesterovUpdate.split`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = nesterov(0.5, 0.9)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> delta = {"w": jnp.array([1.0, -2.0])}
    >>> updates, _ = tx.update.split(delta, lambda: delta, state)  # b = delta; u = -0.5 (delta + 0.9 b)
    >>> updates["w"]
    Array([-0.95,  1.9 ], dtype=float32)
  """
  update = NesterovUpdate(learning_rate, momentum)
  return optax.GradientTransformationExtraArgs(update.sgd.init, update)
