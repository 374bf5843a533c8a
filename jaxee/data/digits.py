"""The scikit-learn 8x8 digits as a TFDS dataset: real images that need no download.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (1,797 images of
8x8 pixels, 17 grey levels 0..16, labels 0..9) inside its wheel (`sklearn.datasets.load_digits`).
`SklearnDigits` is a `tfds.core.GeneratorBasedBuilder` that stores it once, in `array_record`
format, so that it is read exactly like the large TFDS datasets (`builder.as_data_source()`,
random access, no TensorFlow):

* pixels are stored as uint8 `round(v * 255 / 16)`, shape (8, 8, 1), at native resolution;
* the split is a fixed permutation (`numpy.random.default_rng(0)`) of the 1,797 images:
  the first 1,500 are 'train', the other 297 'test';
* each example keeps its original sklearn index as 'id'.

Resizing (nearest or bilinear, e.g. to 16x16), the channel count and the map to [-1, 1] are done
by `DigitsSource` when reading, not stored. Preparation takes well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxee.data import transforms

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
SPLIT_SEED = 0
ENV_DATA_DIR = 'JAXEE_DATA_DIR'


def default_data_dir() -> str:
  """Where jaxee's own TFDS datasets live: $JAXEE_DATA_DIR or ~/.cache/jaxee/tfds.

  Returns:
    An absolute path (not created here).
  """
  path = os.environ.get(ENV_DATA_DIR) or os.path.join('~', '.cache', 'jaxee', 'tfds')
  return os.path.abspath(os.path.expanduser(path))


def split_indices() -> dict[str, np.ndarray]:
  """The fixed train/test partition of the 1,797 sklearn indices.

  Returns:
    {'train': 1,500 indices, 'test': 297 indices}, each in permutation order.
  """
  perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': perm[:NUM_TRAIN], 'test': perm[NUM_TRAIN:]}


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """Reads `digits.csv.gz` from the installed scikit-learn without importing it (saves ~2 s).

  Returns:
    uint8 images (1797, 8, 8, 1) scaled by 255/16, and int64 labels (1797,).
  """
  spec = importlib.util.find_spec('sklearn')
  csv = None
  if spec is not None and spec.submodule_search_locations:
    csv = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'datasets/data/digits.csv.gz'
  if csv is not None and csv.exists():
    data = np.loadtxt(csv, delimiter=',')
    grey, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
  else:  # Unusual layout: let scikit-learn find its file.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    bunch = load_digits()
    grey, target = bunch.images, bunch.target
  if grey.shape != (NUM_EXAMPLES, 8, 8):
    raise ValueError(f'Unexpected digits array {grey.shape}; expected ({NUM_EXAMPLES}, 8, 8).')
  images = np.round(grey * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return images[..., None], target.astype(np.int64)


class SklearnDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder for scikit-learn's bundled 8x8 digits (no download)."""

  name = 'jaxee_sklearn_digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'sklearn load_digits, 1,500/297 split by a fixed permutation.'}
  # TFDS derives `code_path` through `importlib_resources` for builders defined inside a
  # package; that optional module is absent here, and the builder needs no checksums file.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('UCI optical handwritten digits (test set), 8x8, as bundled with '
                     'scikit-learn. Pixels are round(v * 255 / 16).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
            'id': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing to download.
    images, labels = _load_sklearn_digits()
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices().items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for i in indices:
      i = int(i)
      yield i, {'image': images[i], 'label': int(labels[i]), 'id': i}


def prepare_digits(data_dir: str | os.PathLike[str] | None = None) -> SklearnDigits:
  """Builds the digits dataset in `data_dir` once (array_record) and returns the builder.

  Args:
    data_dir: TFDS data directory; defaults to `default_data_dir()`.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split)`.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder = SklearnDigits(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


class DigitsSource:
  """Random-access digits: {'image': float32 (S, S, C) in [-1, 1], 'label': int, 'id': int}.

  Deterministic preprocessing only (no flip: digits are not mirror-symmetric).
  """

  def __init__(self, split: str = 'train', *, data_dir: str | os.PathLike[str] | None = None,
               image_size: int = 16, channels: int = 1, resize_method: str = 'nearest'):
    """Prepares (if needed) and opens the dataset.

    Args:
      split: a TFDS split string: 'train', 'test', 'train+test', 'train[:100]', ...
      data_dir: TFDS data directory (see `prepare_digits`).
      image_size: output side; 8 is native, 16 the usual upsampled size.
      channels: 1 (grey) or 3 (grey replicated to RGB).
      resize_method: 'nearest' or 'bilinear' (any key of `transforms.RESAMPLE`).
    """
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    if resize_method not in transforms.RESAMPLE:
      raise ValueError(f'resize_method must be one of {sorted(transforms.RESAMPLE)}.')
    self.builder = prepare_digits(data_dir)
    self.split = split
    self.image_size = int(image_size)
    self.channels = channels
    self.resize_method = resize_method
    self._ds = self.builder.as_data_source(split=split)
    self.num_classes = 10

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._ds[int(index)]
    image = ex['image']
    if self.image_size != image.shape[0]:
      image = transforms.resize_uint8(image, self.image_size, self.resize_method)
    image = transforms.set_channels(image, self.channels)
    return {'image': transforms.to_float(image), 'label': int(ex['label']), 'id': int(ex['id'])}

  def __repr__(self) -> str:
    return (f'DigitsSource(split={self.split!r}, n={len(self)}, image_size={self.image_size}, '
            f'channels={self.channels})')
