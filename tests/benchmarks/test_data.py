"""The shipped datasets, on-device batching and augmentation, the CIFAR-10 reader, the patch convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.common import data, models
from benchmarks.common import translation as tr


def test_digits_split_is_disjoint_and_complete():
  ds = data.digits(seed=3)
  assert len(ds.train.x) + len(ds.test.x) == 1797
  assert ds.train.x.max() <= 1.0 and ds.train.x.min() >= 0.0
  assert set(np.unique(ds.train.y)) == set(range(10))


def test_char_corpus_splits_by_document():
  corpus = data.char_corpus()
  assert min(len(corpus.train), len(corpus.val), len(corpus.test)) > 10_000
  assert corpus.train.max() < len(corpus.vocab) and corpus.vocab == data.CHAR_VOCAB


@pytest.mark.parametrize(
  "n,en,de",
  [
    (21, "twenty one", "einundzwanzig"),
    (1, "one", "eins"),
    (101, "one hundred one", "einhunderteins"),
    (17, "seventeen", "siebzehn"),
    (1234, "one thousand two hundred thirty four", "eintausendzweihundertvierunddreißig"),
    (90, "ninety", "neunzig"),
    (30, "thirty", "dreißig"),
  ],
)
def test_number_words(n, en, de):
  assert tr.english_number(n) == en
  assert tr.german_number(n) == de


def test_number_words_splits_are_disjoint():
  t = tr.number_words(n_train=300, n_val=50, n_test=100, max_number=1000)
  splits = [{tuple(r) for r in s.x} for s in (t.train, t.val, t.test)]
  assert len(splits[0]) == 300 and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
  assert t.train.y[0, 0] == tr.BOS and tr.EOS in t.train.y[0]
  with pytest.raises(ValueError, match="max_number"):
    tr.number_words(n_train=900, n_val=100, n_test=100, max_number=1000)


def test_epoch_batch_visits_every_example_once_per_epoch():
  split = data.Split(jnp.arange(10) * 10, jnp.arange(10))
  key = jax.random.key(0)
  epoch = lambda e: np.concatenate(
    [np.asarray(data.epoch_batch(split, key, jnp.asarray(s), 3).y) for s in range(3 * e, 3 * e + 3)]
  )
  first, second = epoch(0), epoch(1)
  assert len(set(first)) == 9 and len(set(second)) == 9  # 3 batches of 3 from 10 examples, no repeat
  assert not np.array_equal(first, second)  # reshuffled
  b = data.epoch_batch(split, key, jnp.asarray(4), 3)
  np.testing.assert_array_equal(b.x, 10 * b.y)  # inputs and targets stay paired


def test_shift_images_moves_each_image_by_at_most_one_pixel_with_zero_fill():
  x = np.random.default_rng(0).uniform(1.0, 2.0, (64, 5, 5, 1)).astype(np.float32)
  y = np.asarray(data.shift_images(jax.random.key(1), jnp.asarray(x), 1))
  seen = set()
  for img, out in zip(x, y):
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    match = [(dy, dx) for dy in range(3) for dx in range(3) if np.array_equal(padded[dy : dy + 5, dx : dx + 5], out)]
    assert len(match) == 1
    seen.add(match[0])
  assert len(seen) == 9  # every shift occurs


def test_flip_labels_changes_exactly_the_fraction_asked():
  y = np.arange(1000) % 10
  flipped = data.flip_labels(y, 0.3, 10, seed=0)
  assert (flipped != y).sum() == 300 and flipped.min() >= 0 and flipped.max() <= 9
  np.testing.assert_array_equal(y, np.arange(1000) % 10)  # input untouched


def test_windows_and_random_windows_pair_inputs_with_next_tokens():
  tokens = np.arange(50)
  w = data.windows(tokens, 8)
  assert w.x.shape == (6, 8) and np.array_equal(w.y, w.x + 1)
  r = data.random_windows(jnp.asarray(tokens), jax.random.key(0), 4, 8)
  assert r.x.shape == (4, 8) and np.array_equal(np.asarray(r.y), np.asarray(r.x) + 1)
  rest, held = data.holdout(data.Split(np.arange(20), np.arange(20)), 5)
  assert len(held.x) == 5 and sorted(np.concatenate([rest.x, held.x]).tolist()) == list(range(20))


@pytest.mark.parametrize("stride, size", [(1, 8), (2, 8), (2, 7)])
def test_patch_convolution_equals_nnx_conv(stride, size):
  conv = models.Conv3x3(3, 5, stride=stride, rngs=nnx.Rngs(0))
  ref = nnx.Conv(3, 5, (3, 3), strides=stride, rngs=nnx.Rngs(0))
  ref.kernel[...] = conv.kernel[...].reshape(3, 3, 3, 5).transpose(1, 2, 0, 3)  # (channel, dy, dx) rows
  ref.bias[...] = conv.bias[...]
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  np.testing.assert_allclose(conv(x), ref(x), atol=1e-5)


def test_cifar10_reader_on_a_generated_file(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
  labels = np.array([3, 0, 9, 1, 7], np.uint8)
  raw = np.concatenate([np.concatenate([[l], im.ravel()]) for l, im in zip(labels, images)]).astype(np.uint8)
  folder = tmp_path / "cifar-10-batches-bin"
  folder.mkdir()
  raw.tofile(folder / "data_batch_1.bin")
  raw[: 2 * data.CIFAR_RECORD].tofile(folder / "test_batch.bin")
  ds = data.cifar10(str(tmp_path))
  assert ds.train.x.shape == (5, 32, 32, 3) and ds.test.x.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(ds.train.y, labels)
  np.testing.assert_allclose(ds.train.x[2, 4, 7], images[2, :, 4, 7] / 255.0)  # CHW bytes -> HWC


def test_cifar10_reader_rejects_a_wrong_file(tmp_path):
  path = tmp_path / "data_batch_1.bin"
  np.zeros(100, np.uint8).tofile(path)
  with pytest.raises(ValueError, match="not a multiple of the CIFAR-10 record size"):
    data.read_cifar10_bin(str(path))
