"""Datasets that ship with an installed package or with Python itself; no downloads.

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).
- ``text``: English documentation text from ``pydoc_data.topics`` (ships with CPython),
  split into train/val/test by document.
- ``cifar10``: the standard ``cifar-10-batches-bin`` files from a user-given directory.

Host-side iterators (``batches``, ``lm_batches``) feed the plain training loop;
their on-device counterparts (``epoch_batch``, ``shift_images``,
``random_windows``) run inside a compiled program, so that a whole grid of runs
draws its batches without leaving the device. The translation data lives with
the translation task in ``translation.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Split(NamedTuple):
  """Arrays of one split: inputs ``x`` and targets ``y``."""

  x: np.ndarray
  y: np.ndarray


class Dataset(NamedTuple):
  """A train/test (and optional validation) split with its metadata."""

  train: Split
  test: Split
  val: Split | None = None
  num_classes: int = 0


def digits(seed: int = 0, test_fraction: float = 0.25, image: bool = False) -> Dataset:
  """scikit-learn's digits, scaled to [0, 1]; flat (64,) or images (8, 8, 1)."""
  from sklearn.datasets import load_digits

  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  if image:
    x = x.reshape(-1, 8, 8, 1)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = order[:n_test], order[n_test:]
  return Dataset(Split(x[train], y[train]), Split(x[test], y[test]), num_classes=10)


def batches(split: Split, batch_size: int, rng: np.random.Generator) -> Iterator[Split]:
  """Endless shuffled minibatches (full batches only), reshuffled every epoch."""
  n = len(split.x)
  if batch_size > n:
    raise ValueError(f"batch_size must be <= the split size {n}, got {batch_size}.")
  while True:
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = order[i : i + batch_size]
      yield Split(split.x[idx], split.y[idx])


def holdout(split: Split, n: int, seed: int = 0) -> tuple[Split, Split]:
  """``(rest, held_out)``: ``n`` random examples of ``split`` held out (a validation split)."""
  order = np.random.default_rng(seed).permutation(len(split.x))
  take = lambda idx: Split(split.x[idx], split.y[idx])
  return take(order[n:]), take(order[:n])


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int = 0) -> np.ndarray:
  """A copy of ``y`` with ``fraction`` of the labels replaced by a different class, uniformly at random."""
  rng = np.random.default_rng(seed)
  y = np.array(y)
  idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
  y[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
  return y


def epoch_batch(split: Split, key: jax.Array, step: jax.Array, batch_size: int) -> Split:
  """Batch ``step`` of shuffled epochs over ``split`` (device arrays): each epoch a fresh permutation from ``key``.

  The on-device counterpart of :func:`batches`, traceable with a traced ``step``.
  """
  n = split.x.shape[0]
  per_epoch = n // batch_size
  epoch, i = step // per_epoch, step % per_epoch
  order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
  idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
  return Split(split.x[idx], split.y[idx])


def shift_images(key: jax.Array, x: jax.Array, max_shift: int = 1) -> jax.Array:
  """Random translations of NHWC images by up to ``max_shift`` pixels (zero fill), on device.

  Every possible shift of the whole batch is cut out with static slices and each
  image picks its own: cheaper to compile and run than a gather per image.
  """
  n, h, w = x.shape[:3]
  m = max_shift
  padded = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
  shifts = jnp.stack([padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * m + 1) for dx in range(2 * m + 1)])
  pick = jax.nn.one_hot(jax.random.randint(key, (n,), 0, (2 * m + 1) ** 2), (2 * m + 1) ** 2, dtype=x.dtype)
  return jnp.einsum("sn...,ns->n...", shifts, pick)


# ----------------------------------------------------------------------- text


def text_documents() -> list[str]:
  """The documents of ``pydoc_data.topics`` in a fixed order."""
  from pydoc_data import topics

  return [topics.topics[key] for key in sorted(topics.topics)]


class CharCorpus(NamedTuple):
  """Character-level corpus: integer token arrays per split and the vocabulary."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  vocab: str


CHAR_VOCAB = "\x00" + "".join(chr(c) for c in range(32, 127)) + "\n"
"""The characters of :func:`char_corpus`: an unknown symbol, printable ASCII, newline."""


def char_corpus(seed: int = 0, fractions=(0.8, 0.1, 0.1), max_chars: int | None = None) -> CharCorpus:
  """Character tokens, split by document (no document crosses splits).

  Characters outside printable ASCII map to one unknown symbol. ``max_chars``
  truncates each split (for quick runs).
  """
  docs = text_documents()
  order = np.random.default_rng(seed).permutation(len(docs))
  n_train = int(len(docs) * fractions[0])
  n_val = int(len(docs) * fractions[1])
  parts = [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]
  vocab = CHAR_VOCAB
  lookup = np.zeros(256, np.int32)
  for i, ch in enumerate(vocab):
    lookup[ord(ch)] = i

  def encode(ids):
    text = "\n".join(docs[i] for i in ids)
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
    out = lookup[codes]
    return out[:max_chars] if max_chars else out

  return CharCorpus(*(encode(p) for p in parts), vocab=vocab)


def windows(tokens: np.ndarray, seq_len: int) -> Split:
  """Non-overlapping (input, next-token) windows covering ``tokens``: an evaluation split."""
  n = (len(tokens) - 1) // seq_len
  return Split(tokens[: n * seq_len].reshape(n, seq_len), tokens[1 : n * seq_len + 1].reshape(n, seq_len))


def random_windows(tokens: jax.Array, key: jax.Array, batch_size: int, seq_len: int) -> Split:
  """``batch_size`` random windows of ``tokens`` (a device array): inputs and next-token targets, on device."""
  starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - seq_len - 1)
  rows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(tokens, s, seq_len + 1))(starts)
  return Split(rows[:, :-1], rows[:, 1:])


def lm_batches(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> Iterator[Split]:
  """Random windows of ``seq_len + 1`` tokens: inputs and next-token targets."""
  high = len(tokens) - seq_len - 1
  while True:
    starts = rng.integers(0, high, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    yield Split(windows[:, :-1], windows[:, 1:])


# ------------------------------------------------------------------- CIFAR-10

CIFAR_RECORD = 1 + 32 * 32 * 3


def read_cifar10_bin(path: str) -> Split:
  """One ``data_batch_*.bin`` / ``test_batch.bin`` file: label byte then 3x32x32 CHW bytes per record."""
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size % CIFAR_RECORD:
    raise ValueError(f"{path}: size {raw.size} is not a multiple of the CIFAR-10 record size {CIFAR_RECORD}.")
  records = raw.reshape(-1, CIFAR_RECORD)
  labels = records[:, 0].astype(np.int32)
  if labels.max(initial=0) > 9:
    raise ValueError(f"{path}: label {labels.max()} out of range 0..9; is this a CIFAR-10 binary file?")
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
  return Split(images, labels)


def cifar10(data_dir: str) -> Dataset:
  """CIFAR-10 from the ``cifar-10-batches-bin`` directory (or its parent)."""
  if os.path.isdir(os.path.join(data_dir, "cifar-10-batches-bin")):
    data_dir = os.path.join(data_dir, "cifar-10-batches-bin")
  train_files = sorted(f for f in os.listdir(data_dir) if f.startswith("data_batch_") and f.endswith(".bin"))
  if not train_files or not os.path.exists(os.path.join(data_dir, "test_batch.bin")):
    raise FileNotFoundError(f"{data_dir}: expected data_batch_*.bin and test_batch.bin (cifar-10-batches-bin).")
  parts = [read_cifar10_bin(os.path.join(data_dir, f)) for f in train_files]
  train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
  return Dataset(train, read_cifar10_bin(os.path.join(data_dir, "test_batch.bin")), num_classes=10)
