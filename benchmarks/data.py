"""Datasets that ship with an installed package or with Python itself; no downloads.

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).
- ``text``: English documentation text from ``pydoc_data.topics`` (ships with CPython),
  split into train/val/test by document.
- ``number_words``: a deterministic English-to-German number-word translation task.
- ``cifar10``: the standard ``cifar-10-batches-bin`` files from a user-given directory.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

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


def augment_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
  """Random translations by up to ``max_shift`` pixels (zero fill), per image, NHWC."""
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))):
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[i, ys, xs] = x[i, yd, xd]
  return out


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
  vocab = "\x00" + "".join(chr(c) for c in range(32, 127)) + "\n"
  lookup = np.zeros(256, np.int32)
  for i, ch in enumerate(vocab):
    lookup[ord(ch)] = i

  def encode(ids):
    text = "\n".join(docs[i] for i in ids)
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
    out = lookup[codes]
    return out[:max_chars] if max_chars else out

  return CharCorpus(*(encode(p) for p in parts), vocab=vocab)


def lm_batches(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> Iterator[Split]:
  """Random windows of ``seq_len + 1`` tokens: inputs and next-token targets."""
  high = len(tokens) - seq_len - 1
  while True:
    starts = rng.integers(0, high, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    yield Split(windows[:, :-1], windows[:, 1:])


# ------------------------------------------------------ synthetic translation

_EN_UNITS = "zero one two three four five six seven eight nine".split()
_EN_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DE_UNITS = "null eins zwei drei vier fünf sechs sieben acht neun".split()
_DE_TEENS = "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn".split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


def english_number(n: int) -> str:
  """0 <= n < 1,000,000 in English words ("twenty one", "three hundred five")."""
  if n < 10:
    return _EN_UNITS[n]
  if n < 20:
    return _EN_TEENS[n - 10]
  if n < 100:
    return _EN_TENS[n // 10] + ("" if n % 10 == 0 else " " + _EN_UNITS[n % 10])
  if n < 1000:
    rest = n % 100
    return _EN_UNITS[n // 100] + " hundred" + ("" if rest == 0 else " " + english_number(rest))
  rest = n % 1000
  return english_number(n // 1000) + " thousand" + ("" if rest == 0 else " " + english_number(rest))


def german_number(n: int) -> str:
  """0 <= n < 1,000,000 in German words, one token ("einundzwanzig"): units before tens."""
  if n == 1:
    return "eins"
  if n < 10:
    return _DE_UNITS[n]
  if n < 20:
    return _DE_TEENS[n - 10]
  if n < 100:
    unit = "ein" if n % 10 == 1 else _DE_UNITS[n % 10]
    return _DE_TENS[n // 10] if n % 10 == 0 else unit + "und" + _DE_TENS[n // 10]
  if n < 1000:
    head = "ein" if n // 100 == 1 else _DE_UNITS[n // 100]
    rest = n % 100
    return head + "hundert" + ("" if rest == 0 else german_number(rest))
  head = "ein" if n // 1000 == 1 else german_number(n // 1000)
  rest = n % 1000
  return head + "tausend" + ("" if rest == 0 else german_number(rest))


class TranslationData(NamedTuple):
  """Token arrays (padded with 0) and vocabularies of the number-word task."""

  train: Split
  test: Split
  src_vocab: list[str]
  tgt_vocab: list[str]
  test_numbers: np.ndarray


PAD, BOS, EOS = 0, 1, 2


def number_words(n_train: int = 4000, n_test: int = 500, max_number: int = 10000, seed: int = 0) -> TranslationData:
  """English number words (word tokens) to German number words (character tokens).

  The target reverses the order of units and tens ("twenty one" ->
  "einundzwanzig"), so the model must reorder, not only substitute. Train and
  test numbers are disjoint.
  """
  rng = np.random.default_rng(seed)
  numbers = rng.permutation(max_number)[: n_train + n_test]
  src_vocab = ["<pad>", "<bos>", "<eos>"] + sorted({w for n in range(max_number) for w in english_number(n).split()})
  tgt_chars = sorted({c for n in range(max_number) for c in german_number(n)})
  tgt_vocab = ["<pad>", "<bos>", "<eos>"] + tgt_chars
  s_index = {w: i for i, w in enumerate(src_vocab)}
  t_index = {c: i for i, c in enumerate(tgt_vocab)}
  src_len = max(len(english_number(n).split()) for n in range(max_number)) + 1
  tgt_len = max(len(german_number(n)) for n in range(max_number)) + 2

  def encode(ns):
    src = np.zeros((len(ns), src_len), np.int32)
    tgt = np.zeros((len(ns), tgt_len), np.int32)
    for i, n in enumerate(ns):
      s = [s_index[w] for w in english_number(int(n)).split()] + [EOS]
      t = [BOS] + [t_index[c] for c in german_number(int(n))] + [EOS]
      src[i, : len(s)] = s
      tgt[i, : len(t)] = t
    return Split(src, tgt)

  return TranslationData(
      encode(numbers[:n_train]), encode(numbers[n_train:]), src_vocab, tgt_vocab, numbers[n_train:]
  )


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
