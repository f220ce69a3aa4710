"""The translation task every translating experiment uses: English number words to German ones.

"twenty one" -> "einundzwanzig": the German target puts units before tens and
writes one word, so the model must reorder, not only substitute. The data is
generated (nothing to download); train, validation and test numbers are
disjoint. The model is ``models.Seq2SeqTransformer``; here are its loss, greedy
decoding, exact match (in one teacher-forced pass), Vaswani et al.'s
learning-rate schedule, and data-parallel training over a device mesh.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import data, grid, models, train, tuning
from benchmarks.common.tuning import Metric

PAD, BOS, EOS = 0, 1, 2

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
  """Token arrays (padded with ``PAD``) of the three splits, the vocabularies and the numbers behind each split."""

  train: data.Split
  val: data.Split
  test: data.Split
  src_vocab: list
  tgt_vocab: list
  numbers: dict
  """``split name -> the numbers`` whose words the split holds."""


def number_words(
  n_train: int = 700, n_val: int = 100, n_test: int = 200, max_number: int = 1000, seed: int = 0
) -> TranslationData:
  """English number words (word tokens) to German number words (character tokens), disjoint splits.

  Source: the English words and EOS; target: BOS, the German characters, EOS.
  """
  if n_train + n_val + n_test > max_number:
    raise ValueError(
      f"number_words: {n_train} + {n_val} + {n_test} examples need max_number >= their sum, got {max_number}."
    )
  numbers = np.random.default_rng(seed).permutation(max_number)
  parts = {
    "train": numbers[:n_train],
    "val": numbers[n_train : n_train + n_val],
    "test": numbers[n_train + n_val : n_train + n_val + n_test],
  }
  src_vocab = ["<pad>", "<bos>", "<eos>"] + sorted({w for n in range(max_number) for w in english_number(n).split()})
  tgt_vocab = ["<pad>", "<bos>", "<eos>"] + sorted({c for n in range(max_number) for c in german_number(n)})
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
    return data.Split(src, tgt)

  return TranslationData(
    encode(parts["train"]), encode(parts["val"]), encode(parts["test"]), src_vocab, tgt_vocab, parts
  )


class Translation(NamedTuple):
  """The data of the task and the architecture of its model."""

  data: TranslationData
  graphdef: Any
  """The NNX graph definition of the ``Seq2SeqTransformer`` (``nnx.merge(graphdef, params)``)."""
  sizes: dict
  """``dim``, ``heads``, ``layers`` of the model."""

  def init(self, seed: int):
    """Freshly initialised params (model seed ``seed``)."""
    return nnx.split(_model(self.data, seed, **self.sizes))[1]

  def loss(self, params, batch: data.Split) -> jax.Array:
    """Teacher-forced token cross-entropy; ``batch.x`` source tokens, ``batch.y`` BOS, target, EOS."""
    logits = nnx.merge(self.graphdef, params)(batch.x, batch.y[:, :-1])
    labels = batch.y[:, 1:]
    return train.cross_entropy(logits, labels, labels != PAD)

  def exact(self, params, batch: data.Split) -> jax.Array:
    """Per sentence: would greedy decoding reproduce the target exactly (up to and including EOS)?

    One teacher-forced pass: greedy decoding reproduces the target exactly
    when, and only when, the model's most likely next token is the target's at
    every position up to EOS, given the (then correct) prefix.
    """
    logits = nnx.merge(self.graphdef, params)(batch.x, batch.y[:, :-1])
    labels = batch.y[:, 1:]
    return jnp.all((logits.argmax(-1) == labels) | (labels == PAD), axis=1)

  def decode(self, params, src) -> jax.Array:
    """Greedy decoding (traceable): target tokens ``[batch, target length]`` starting with BOS."""
    model = nnx.merge(self.graphdef, params)
    memory, mask = model.encode(src)
    length = self.data.train.y.shape[1]
    tgt = jnp.zeros((src.shape[0], length), jnp.int32).at[:, 0].set(BOS)

    def step(i, tgt):
      logits = model.decode(memory, mask, tgt[:, :-1])  # causal: positions after i do not matter
      return tgt.at[:, i + 1].set(jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(0, length - 1, step, tgt)

  def problem(self, batch_size: int) -> grid.Problem:
    """The task for the grid trainer: shuffled epochs of ``batch_size`` pairs, validation loss as the curve."""
    arrays = {
      k: data.Split(jnp.asarray(s.x), jnp.asarray(s.y))
      for k, s in (("train", self.data.train), ("val", self.data.val), ("test", self.data.test))
    }
    return grid.Problem(
      init=self.init,
      loss=self.loss,
      batch=lambda d, key, step: data.epoch_batch(d["train"], key, step, batch_size),
      evaluate=lambda w, d: {"val_loss": self.loss(w, d["val"])},
      data=arrays,
    )

  def test_metrics(self, weights, d: dict) -> dict:
    """``{val_loss, val_exact_match, test_loss, exact_match}`` of one run's weights (``d``: ``problem().data``)."""
    return {
      "val_loss": self.loss(weights, d["val"]),
      "val_exact_match": self.exact(weights, d["val"]).mean(),
      "test_loss": self.loss(weights, d["test"]),
      "exact_match": self.exact(weights, d["test"]).mean(),
    }


def make_task(
  n_train: int = 700,
  n_val: int = 100,
  n_test: int = 200,
  max_number: int = 1000,
  dim: int = 32,
  heads: int = 4,
  layers: int = 2,
  data_seed: int = 0,
) -> Translation:
  """The number-word data (fixed by ``data_seed``) and a ``Seq2SeqTransformer`` of the given sizes."""
  ds = number_words(n_train, n_val, n_test, max_number, data_seed)
  sizes = dict(dim=dim, heads=heads, layers=layers)
  return Translation(ds, nnx.split(_model(ds, 0, **sizes))[0], sizes)


def from_config(cfg: dict) -> Translation:
  """:func:`make_task` from a config's ``n_train``, ``n_val``, ``n_test``, ``max_number``, ``dim``, ``heads``, ``layers``."""
  return make_task(
    cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["max_number"], cfg["dim"], cfg["heads"], cfg["layers"]
  )


DATA = dict(n_train=700, n_val=100, n_test=200, max_number=1000)
"""The number words of a full run (``from_config``): 700 training, 100 validation, 200 test numbers below 1000."""
CONFIG = dict(DATA, steps=400, batch=32, dim=32, heads=4, layers=1, warmup=0.1, eval_every=40)
"""A full run (paper suite, SNOO): 400 steps of 32 pairs, a one-layer ``Seq2SeqTransformer`` of width 32, the
learning rate warmed up over the first 10 % of the steps (``schedule``), the validation curve every 40 steps."""


def finals(cfg: dict, prob: grid.Problem, g: grid.Grid) -> dict:
  """Validation and test loss and exact match of a grid's final weights of each name (``tuning.Task.finals``)."""
  return tuning.final_metrics(from_config(cfg).test_metrics, prob, g)


METRICS = dict(
  select=Metric("val_loss", "val loss", False, 1.0, 4),
  headline=Metric("exact_match", "exact match %", True, 100.0),
  columns=(
    Metric("train_loss", "final train loss", False, 1.0, 4),
    Metric("val_loss", "val loss", False, 1.0, 4),
    Metric("test_loss", "test loss", False, 1.0, 4),
    Metric("exact_match", "exact match %", True, 100.0),
  ),
)
"""How a translation task is tuned and judged (``tuning.Task`` fields): validation loss, test exact match."""


def _model(ds: TranslationData, seed: int, dim: int, heads: int, layers: int) -> models.Seq2SeqTransformer:
  max_len = max(ds.train.x.shape[1], ds.train.y.shape[1])
  return models.Seq2SeqTransformer(
    len(ds.src_vocab), len(ds.tgt_vocab), dim=dim, heads=heads, layers=layers, max_len=max_len, rngs=nnx.Rngs(seed)
  )


def exact_match(pred, target) -> float:
  """Fraction of sequences translated exactly: every token up to and including EOS, nothing after it.

  Tokens ``pred`` emits after its first EOS are ignored; both start with BOS.

  >>> import numpy as np
  >>> exact_match(np.array([[1, 5, 2, 7], [1, 5, 6, 2]]), np.array([[1, 5, 2, 0], [1, 5, 2, 0]]))
  0.5
  """
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"exact_match: pred and target must have one shape, got {pred.shape} and {target.shape}.")
  after_eos = np.cumsum(pred == EOS, axis=1) - (pred == EOS) > 0
  pred = np.where(after_eos, PAD, pred)
  return float(np.mean(np.all(pred == target, axis=1)))


def schedule(cfg: dict, peak, use_warmup: bool = True):
  """:func:`warmup_rsqrt` at ``peak`` warming up over ``cfg["warmup"]`` of ``cfg["steps"]`` (at least one step)."""
  return warmup_rsqrt(peak, max(1, int(cfg["warmup"] * cfg["steps"])), use_warmup)


def warmup_rsqrt(peak, warmup: int, use_warmup: bool = True):
  r"""Vaswani et al.'s schedule: :math:`\eta_t = \eta \min(t / w, \sqrt{w / t})`, step ``t = count + 1``.

  Linear warmup to ``peak`` over ``warmup`` steps, then inverse square root
  decay; without warmup, :math:`\eta \min(1, \sqrt{w / t})` (the same decay
  from the first step). ``peak`` may be a traced value.

  >>> s = warmup_rsqrt(1e-3, 100)
  >>> float(s(49)), float(s(99)), float(s(399))
  (0.0005, 0.001, 0.0005)
  """
  if warmup < 1:
    raise ValueError(f"warmup_rsqrt: warmup must be an int >= 1, got {warmup!r}.")

  def schedule(count):
    t = jnp.asarray(count, jnp.float32) + 1.0
    decay = jnp.sqrt(warmup / t)
    return peak * (jnp.minimum(t / warmup, decay) if use_warmup else jnp.minimum(1.0, decay))

  return schedule


# ----------------------------------------------------------- data parallel


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh, axis ``"data"``, over ``devices`` (default: all of ``jax.devices()``)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices), ("data",))


def sharded_batches(
  split: data.Split, batch_size: int, rng: np.random.Generator, mesh: jax.sharding.Mesh
) -> Iterator[data.Split]:
  """``data.batches`` placed on ``mesh``: each batch split over ``"data"`` along its first axis."""
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(f"batch_size must be divisible by the number of devices ({n}), got batch_size={batch_size}.")
  sharding = NamedSharding(mesh, P("data"))
  for batch in data.batches(split, batch_size, rng):
    yield data.Split(*jax.device_put((batch.x, batch.y), sharding))


def train_data_parallel(
  task: Translation,
  tx: optax.GradientTransformation,
  steps: int,
  *,
  batch_size: int = 32,
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  progress: bool = False,
):
  """Data-parallel training over ``mesh`` (default: every device): ``train.train``'s ``(params, opt_state, History)``.

  The params (and so the slow weights and the optimizer state, which follow
  them) are replicated; each batch is split over the devices, and ``jax.jit``
  inserts the gradient all-reduce. The same code runs on one CPU, on simulated
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on an
  accelerator slice and across processes after ``jax.distributed.initialize``
  (every process builds the same task and feeds the same global batches).
  """
  mesh = data_mesh() if mesh is None else mesh
  params = jax.device_put(task.init(seed), NamedSharding(mesh, P()))
  batches = sharded_batches(task.data.train, batch_size, np.random.default_rng(seed), mesh)
  return train.train(task.loss, params, tx, batches, steps, progress=progress)
