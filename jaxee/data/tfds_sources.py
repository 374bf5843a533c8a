"""Image sources over prepared TFDS datasets and local image folders, with the papers' recipes.

Nothing here downloads. TFDS datasets must already be prepared in `array_record` (or parquet)
format, which TFDS reads with `as_data_source()` without TensorFlow; a missing dataset raises
`DatasetNotPreparedError` saying how to prepare it. Recipes reproduced:

* CIFAR-10 (`cifar10`): U-ViT `datasets.CIFAR10` with `random_flip=True` (its CIFAR config):
  `ToTensor`, `Normalize(0.5, 0.5)`, random horizontal flip. DuoDiff/DeeDiff use no flip
  (`random_flip=False`).
* CelebA 64 (`celeb_a`): U-ViT `datasets.CelebA`: 128x128 box at rows [57, 185), columns
  [25, 153), `Resize(64)` (PIL bilinear), random flip, [-1, 1]; U-ViT trains on the 'train'
  split (162,770 images) without labels. `recipe='duodiff'`: DuoDiff's normalise, `CenterCrop(178)`,
  float bilinear `Resize(64)`, no flip, on split 'all' (202,599 images).
* ImageNet 256 (`imagenet2012`): ADM `center_crop_arr` (BOX halvings, BICUBIC, centre crop),
  random horizontal flip, `arr / 127.5 - 1`, as DiT/ASE/L2C training and U-ViT's `ImageDataset`.
  TFDS labels are the sorted synset indices, as torchvision's `ImageFolder`.
* `ImageFolderSource`: torchvision `ImageFolder` layout (sorted class subfolders -> labels 0..K-1),
  PIL decoding, then the ADM centre crop (or DuoDiff's plain resize) and optional flip.

Every source returns {'image': float32 HWC in [-1, 1], 'label': int} from `__getitem__`
(deterministic) and applies its random flip in `augment(example, rng)`, the hook `DataLoader`
calls with a generator seeded from (seed, epoch, index).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxee.data import transforms

Preprocess = Callable[[np.ndarray], np.ndarray]
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared (in a random-access format) in the data directory."""


def _how_to_prepare(name: str, data_dir: str) -> str:
  manual = ''
  if name.startswith(('imagenet2012', 'celeb_a')):
    manual = (f' {name} needs manually downloaded archives: put them in '
              f'{os.path.join(data_dir, "downloads", "manual")} first (see the TFDS catalog page).')
  return (f'Prepare it once, on a machine with network access and TensorFlow installed:\n'
          f'  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
          f'(or in Python: tfds.builder({name!r}, data_dir={data_dir!r}, '
          f"file_format='array_record').download_and_prepare()), then pass data_dir= (or set "
          f'TFDS_DATA_DIR) pointing at that directory.{manual}')


def load_prepared(name: str, split: str, data_dir: str | os.PathLike[str] | None = None,
                  **kwargs: Any) -> Any:
  """Opens a prepared TFDS dataset for random access; never downloads.

  Args:
    name: TFDS name, optionally with config/version ('cifar10', 'celeb_a:2.1.0', ...).
    split: TFDS split string ('train', 'test', 'train[:10%]', 'train+test', ...).
    data_dir: TFDS data directory (default: TFDS's, i.e. $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    **kwargs: passed to `tfds.data_source` (e.g. `decoders`).

  Returns:
    The random-access data source (`len`, `[i]` -> dict of NumPy values).

  Raises:
    DatasetNotPreparedError: the dataset is absent or stored as TFRecord only.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  builder = tfds.builder(name, data_dir=data_dir)
  root = str(builder.data_dir)
  base_dir = data_dir or str(pathlib.Path(root).parents[1])
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f'TFDS dataset {name!r} is not prepared under {root} (download=False: jaxee never '
        f'downloads). {_how_to_prepare(name, base_dir)}')
  file_format = getattr(builder.info.file_format, 'value', str(builder.info.file_format))
  if file_format not in _RANDOM_ACCESS_FORMATS:
    raise DatasetNotPreparedError(
        f'TFDS dataset {name!r} under {root} is stored as {file_format}, which needs TensorFlow '
        f'to read; jaxee needs array_record. Rebuild it in another data_dir. '
        f'{_how_to_prepare(name, base_dir)}')
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)


class TfdsImageSource:
  """A prepared TFDS image dataset with a deterministic preprocess and an optional flip."""

  def __init__(self, name: str, split: str = 'train', *,
               data_dir: str | os.PathLike[str] | None = None,
               preprocess: Preprocess | None = None, random_flip: bool = False,
               image_key: str = 'image', label_key: str | None = 'label',
               num_classes: int | None = None):
    """Opens the dataset.

    Args:
      name: TFDS name.
      split: TFDS split string.
      data_dir: TFDS data directory.
      preprocess: uint8 HWC -> float32 HWC in [-1, 1]; default `transforms.to_float`.
      random_flip: horizontal flip with p = 0.5 in `augment`.
      image_key: feature holding the image.
      label_key: feature holding the class label; None gives label 0 (unconditional).
      num_classes: recorded for users (None if unconditional).
    """
    self.name, self.split = name, split
    self._ds = load_prepared(name, split, data_dir)
    self.preprocess = preprocess or transforms.to_float
    self.random_flip = random_flip
    self.image_key, self.label_key = image_key, label_key
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._ds[int(index)]
    image = self.preprocess(np.asarray(ex[self.image_key]))
    label = int(ex[self.label_key]) if self.label_key else 0
    return {'image': np.asarray(image, np.float32), 'label': label}

  def augment(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Random horizontal flip (p = 0.5) when enabled.

    Args:
      example: output of `__getitem__`.
      rng: the record's generator for this epoch.

    Returns:
      The example, image possibly flipped.
    """
    if self.random_flip:
      example = dict(example, image=transforms.random_hflip(example['image'], rng))
    return example

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, '
            f'random_flip={self.random_flip})')


def cifar10(split: str = 'train', *, data_dir: str | os.PathLike[str] | None = None,
            random_flip: bool = True) -> TfdsImageSource:
  """CIFAR-10 32x32 in [-1, 1] (U-ViT recipe; `random_flip=False` for DuoDiff's).

  Args:
    split: 'train' (50,000) or 'test' (10,000), or any TFDS split string.
    data_dir: TFDS data directory holding a prepared `cifar10`.
    random_flip: random horizontal flip.

  Returns:
    The source.
  """
  return TfdsImageSource('cifar10', split, data_dir=data_dir, random_flip=random_flip,
                         num_classes=10)


def celeba64(split: str = 'train', *, data_dir: str | os.PathLike[str] | None = None,
             recipe: str = 'uvit', image_size: int = 64,
             random_flip: bool | None = None) -> TfdsImageSource:
  """CelebA at 64x64 in [-1, 1], unconditional (label 0).

  Args:
    split: TFDS split ('train', 'validation', 'test'); 'all' means all three (DuoDiff).
    data_dir: TFDS data directory holding a prepared `celeb_a`.
    recipe: 'uvit' (face box 128 -> 64, flip) or 'duodiff' (centre 178 -> 64, no flip).
    image_size: output side.
    random_flip: overrides the recipe's flip.

  Returns:
    The source.
  """
  recipes = {'uvit': (transforms.uvit_celeba64, True),
             'duodiff': (transforms.duodiff_celeba64, False)}
  if recipe not in recipes:
    raise ValueError(f'Unknown CelebA recipe {recipe!r}; expected one of {sorted(recipes)}.')
  fn, flip = recipes[recipe]
  if split == 'all':
    split = 'train+validation+test'
  return TfdsImageSource('celeb_a', split, data_dir=data_dir,
                         preprocess=lambda x: fn(x, image_size),
                         random_flip=flip if random_flip is None else random_flip,
                         label_key=None)


def imagenet(split: str = 'train', *, data_dir: str | os.PathLike[str] | None = None,
             image_size: int = 256, random_flip: bool = True) -> TfdsImageSource:
  """ImageNet (ILSVRC 2012) with the ADM centre crop, flip and [-1, 1] (DiT/U-ViT recipe).

  Args:
    split: 'train' or 'validation' (or a TFDS split string).
    data_dir: TFDS data directory holding a prepared `imagenet2012`.
    image_size: output side (256 for DiT-256 / U-ViT-256).
    random_flip: random horizontal flip.

  Returns:
    The source, labels 0..999.
  """
  return TfdsImageSource('imagenet2012', split, data_dir=data_dir,
                         preprocess=lambda x: transforms.to_float(
                             transforms.center_crop_arr(x, image_size)),
                         random_flip=random_flip, num_classes=1000)


class ImageFolderSource:
  """Images in class subfolders (torchvision `ImageFolder` layout), decoded with PIL."""

  def __init__(self, root: str | os.PathLike[str], *, image_size: int | None = None,
               crop: str = 'adm', random_flip: bool = True, channels: int = 3,
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """Lists the files (sorted) and assigns labels.

    Args:
      root: folder with one subfolder per class; a folder with only image files gives one
        class (label 0).
      image_size: output side; None keeps the decoded size (then all images must match).
      crop: 'adm' (ADM centre crop, DiT/U-ViT) or 'resize' (bilinear resize of the whole image
        to a square after normalising, DuoDiff's ImageNet 64).
      random_flip: random horizontal flip in `augment`.
      channels: 3 (RGB) or 1 (grey).
      extensions: accepted file suffixes (case-insensitive).
    """
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f'Image folder {self.root} does not exist.')
    if crop not in ('adm', 'resize'):
      raise ValueError(f"crop must be 'adm' or 'resize', got {crop!r}.")
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    exts = tuple(e.lower() for e in extensions)

    def images_under(folder: pathlib.Path) -> list[pathlib.Path]:
      return sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in exts)

    self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
    self.files: list[pathlib.Path] = []
    self.labels: list[int] = []
    for label, name in enumerate(self.classes):
      found = images_under(self.root / name)
      self.files += found
      self.labels += [label] * len(found)
    if not self.classes:
      self.files = images_under(self.root)
      self.labels = [0] * len(self.files)
    if not self.files:
      raise ValueError(f'No images with extensions {exts} under {self.root}.')
    self.num_classes = max(len(self.classes), 1)
    self.image_size, self.crop = image_size, crop
    self.random_flip, self.channels = random_flip, channels

  def __len__(self) -> int:
    return len(self.files)

  def load_uint8(self, index: int) -> np.ndarray:
    """Decodes file `index` to a uint8 HWC array with `channels` channels.

    Args:
      index: file index.

    Returns:
      The decoded image, unresized.
    """
    with Image.open(self.files[index]) as img:
      img.load()
      return transforms.from_pil(img, self.channels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    image = self.load_uint8(index)
    if self.image_size is None:
      out = transforms.to_float(image)
    elif self.crop == 'adm':
      out = transforms.to_float(transforms.center_crop_arr(image, self.image_size))
    else:
      out = transforms.resize_float(transforms.to_float(image), self.image_size, 'bilinear')
    return {'image': out, 'label': self.labels[index]}

  augment = TfdsImageSource.augment

  def __repr__(self) -> str:
    return (f'ImageFolderSource({str(self.root)!r}, n={len(self)}, classes={self.num_classes}, '
            f'image_size={self.image_size})')
