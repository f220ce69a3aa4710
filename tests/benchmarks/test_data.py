"""The shipped datasets and the CIFAR-10 binary reader."""

import numpy as np
import pytest

from benchmarks import data


def test_digits_split_is_disjoint_and_complete():
  ds = data.digits(seed=3)
  assert len(ds.train.x) + len(ds.test.x) == 1797
  assert ds.train.x.max() <= 1.0 and ds.train.x.min() >= 0.0
  assert set(np.unique(ds.train.y)) == set(range(10))


def test_char_corpus_splits_by_document():
  corpus = data.char_corpus()
  assert min(len(corpus.train), len(corpus.val), len(corpus.test)) > 10_000
  assert corpus.train.max() < len(corpus.vocab)


@pytest.mark.parametrize("n,en,de", [
    (21, "twenty one", "einundzwanzig"), (1, "one", "eins"), (101, "one hundred one", "einhunderteins"),
    (17, "seventeen", "siebzehn"), (1234, "one thousand two hundred thirty four", "eintausendzweihundertvierunddreißig"),
    (90, "ninety", "neunzig"), (30, "thirty", "dreißig")])
def test_number_words(n, en, de):
  assert data.english_number(n) == en
  assert data.german_number(n) == de


def test_number_words_train_test_disjoint():
  t = data.number_words(n_train=300, n_test=100, max_number=1000)
  train_src = {tuple(r) for r in t.train.x}
  assert not train_src & {tuple(r) for r in t.test.x}


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
