"""A problem small enough to compile in a second, for the tests of the grid trainer and the protocol."""

import jax
import jax.numpy as jnp

from benchmarks.common import data, grid, train


def softmax_regression() -> grid.Problem:
  """Softmax regression on 300 digits: small enough to compile in a second."""
  ds = data.digits()
  split = lambda s, n: data.Split(jnp.asarray(s.x[:n]), jnp.asarray(s.y[:n]))
  apply = lambda p, x: x @ p["w"] + p["b"][None]
  loss = lambda p, b: train.cross_entropy(apply(p, b.x), b.y)
  return grid.Problem(
    init=lambda seed: {"w": 0.1 * jax.random.normal(jax.random.key(seed), (64, 10)), "b": jnp.zeros(10)},
    loss=loss,
    batch=lambda d, key, step: data.epoch_batch(d["train"], key, step, 16),
    evaluate=lambda w, d: {"val_loss": loss(w, d["val"]), "val_acc": train.accuracy(apply(w, d["val"].x), d["val"].y)},
    data={"train": split(ds.train, 300), "val": split(ds.test, 100)},
  )
