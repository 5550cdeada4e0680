"""Datasets read from local files only; nothing is ever downloaded.

* :func:`load_digits`: scikit-learn's bundled 8x8 digits (the default job's
  data: it ships with a dependency).
* :func:`load_idx`: MNIST or Fashion-MNIST from the four original idx ``.gz``
  files in any directory.
* :func:`batches`: a deterministic, seeded, endlessly repeating iterator.
"""

import gzip
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

IDX_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


class Dataset(NamedTuple):
  """A train/test split.

  Attributes:
    x_train: float32 ``[n_train, features]`` in ``[0, 1]``.
    y_train: int32 ``[n_train]`` class labels.
    x_test: float32 ``[n_test, features]`` in ``[0, 1]``.
    y_test: int32 ``[n_test]`` class labels.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's digits: 1,797 8x8 images as 64 features in ``[0, 1]``.

  Args:
    test_fraction: fraction of the examples held out for test.
    seed: seed of the (deterministic) permutation that splits the data.

  Returns:
    A :class:`Dataset` with 1,437 train and 360 test examples by default.
  """
  from sklearn import datasets  # here: importing sklearn takes ~2 s

  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = order[:n_test], order[n_test:]
  return Dataset(x[train], y[train], x[test], y[test])


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads one gzipped idx file as a uint8 array of its header's shape."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  found = int(np.frombuffer(raw, ">u4", count=1)[0])
  if found != magic:
    raise ValueError(
      f"{path}: idx magic number {found}, expected {magic}; is this an "
      "original MNIST / Fashion-MNIST idx file?"
    )
  ndim = magic & 0xFF
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(
      f"{path}: header says shape {shape} but the file holds {data.size} "
      "values; the file is truncated or corrupt."
    )
  return data.reshape(shape)


def load_idx(data_dir: str) -> Dataset:
  """MNIST or Fashion-MNIST from the four original idx ``.gz`` files.

  Images become float32 in ``[0, 1]``, flattened to 784 features.

  Args:
    data_dir: directory holding ``train-images-idx3-ubyte.gz``,
      ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
      ``t10k-labels-idx1-ubyte.gz``.

  Returns:
    A :class:`Dataset` (60,000 train and 10,000 test examples for MNIST).

  Raises:
    FileNotFoundError: a file is missing (the message names it and the
      expected names).
  """
  paths = [os.path.join(data_dir, name) for name in IDX_FILES]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"load_idx: {path} not found. {os.path.abspath(data_dir)!r} must "
        f"hold the four original idx files {', '.join(IDX_FILES)} (MNIST or "
        "Fashion-MNIST); nothing is downloaded. Set --config.data_dir."
      )
  images = [_read_idx(p, _IMAGES_MAGIC) for p in paths[0::2]]
  labels = [_read_idx(p, _LABELS_MAGIC) for p in paths[1::2]]
  for x, y, path in zip(images, labels, paths[0::2], strict=True):
    if len(x) != len(y):
      raise ValueError(f"{path}: {len(x)} images but {len(y)} labels.")
  x_train, x_test = (
    (x.reshape(len(x), -1) / np.float32(255)).astype(np.float32) for x in images
  )
  y_train, y_test = (y.astype(np.int32) for y in labels)
  return Dataset(x_train, y_train, x_test, y_test)


def batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  seed: int,
  start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless ``(x, y)`` batches, reshuffled every epoch; resumable.

  The order comes from ``np.random.default_rng(seed)``: epoch ``e`` is the
  ``e``-th permutation it draws, and batch ``s`` (counting from 0) is slice
  ``s mod b`` of epoch ``s div b``'s permutation, with ``b = len(x) div
  batch_size`` batches per epoch. The batches are thus a pure function of
  ``(seed, s)``: ``batches(..., start_step=k)`` yields exactly what a fresh
  iterator yields from its ``k``-th batch on (a resumed run sees the data an
  uninterrupted one would). The last incomplete batch of an epoch is
  dropped, so every batch has ``batch_size`` examples (no retracing).

  Args:
    x: inputs, first axis the examples.
    y: labels, same length as ``x``.
    batch_size: examples per batch, at most ``len(x)``.
    seed: seed of the shuffling RNG.
    start_step: index of the first batch to yield (0: from the start).

  Yields:
    ``(x[idx], y[idx])`` for successive batches of indices.
  """
  if not 0 < batch_size <= len(x):
    raise ValueError(
      f"batch_size={batch_size} must be in [1, {len(x)}] (the dataset size)."
    )
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  per_epoch = len(x) // batch_size
  epoch, position = divmod(start_step, per_epoch)
  rng = np.random.default_rng(seed)
  for _ in range(epoch):  # replay the draws of the skipped epochs
    rng.permutation(len(x))
  while True:
    order = rng.permutation(len(x))
    for start in range(
      position * batch_size, per_epoch * batch_size, batch_size
    ):
      idx = order[start : start + batch_size]
      yield x[idx], y[idx]
    position = 0
