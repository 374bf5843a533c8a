"""jaxee input pipelines: named sources, a deterministic loader, latent datasets.

`get_source(name, split=...)` returns a random-access source (`len`, `[i]` -> dict, optional
`augment(example, rng)`) for `DataLoader`. Sources and their original recipes:

* 'digits': scikit-learn's bundled 8x8 digits via a local TFDS builder (no download);
* 'cifar10': U-ViT CIFAR-10 (flip, [-1, 1]);
* 'celeba64': U-ViT CelebA 64 (face box 128 -> 64, flip); `recipe='duodiff'` for DuoDiff's;
* 'imagenet256': ADM centre crop + flip (DiT, ASE, L2C, U-ViT pixels);
* 'folder:<path>': an `ImageFolder`-style tree, ADM centre crop;
* 'latents:<path>': pre-extracted VAE moments (U-ViT style), z sampled per epoch and record.

TFDS-backed modules are imported lazily, so `import jaxee.data` stays cheap.
"""

from __future__ import annotations

import os
from typing import Any

from jaxee.data.pipeline import collate
from jaxee.data.pipeline import data_mesh
from jaxee.data.pipeline import DataLoader
from jaxee.data.pipeline import make_global_batch
from jaxee.data.pipeline import shard_for_devices

SOURCE_NAMES = ('digits', 'cifar10', 'celeba64', 'imagenet256', 'folder:<path>',
                'latents:<path>')

__all__ = ['SOURCE_NAMES', 'DataLoader', 'collate', 'data_mesh', 'get_source',
           'make_global_batch', 'shard_for_devices']


def _require_size(name: str, image_size: int | None, native: int) -> None:
  if image_size not in (None, native):
    raise ValueError(f'{name} is {native}x{native}; image_size={image_size} is not supported.')


def get_source(name: str, *, split: str = 'train',
               data_dir: str | os.PathLike[str] | None = None, image_size: int | None = None,
               random_flip: bool | None = None, **kwargs: Any) -> Any:
  """Builds a named random-access source.

  Args:
    name: one of `SOURCE_NAMES` ('folder:' and 'latents:' followed by a path).
    split: split name ('train', 'test', a TFDS split string, ...). For 'folder:<path>',
      `<path>/<split>` is used when that subfolder exists; latents have one split.
    data_dir: TFDS data directory (digits: jaxee's cache, default ~/.cache/jaxee/tfds;
      others: TFDS's default); unused for folders and latents.
    image_size: output side (digits default 16; cifar10 32; celeba64 64; imagenet256 256;
      folders keep the decoded size when None).
    random_flip: override the recipe's random horizontal flip (not for digits/latents).
    **kwargs: source-specific options: digits `channels`, `resize_method`; celeba64
      `recipe`; folder `crop`, `channels`; latents `scale`, `include_flips`, `sample`.

  Returns:
    The source.

  Raises:
    ValueError: unknown name (the message lists the valid ones) or unsupported option.
  """
  flip = {} if random_flip is None else {'random_flip': random_flip}
  if name == 'digits':
    if random_flip:
      raise ValueError('digits does not support random_flip.')
    from jaxee.data import digits  # pylint: disable=g-import-not-at-top
    return digits.DigitsSource(split, data_dir=data_dir, image_size=image_size or 16, **kwargs)
  if name in ('cifar10', 'celeba64', 'imagenet256'):
    from jaxee.data import tfds_sources  # pylint: disable=g-import-not-at-top
    if name == 'cifar10':
      _require_size(name, image_size, 32)
      return tfds_sources.cifar10(split, data_dir=data_dir, **flip, **kwargs)
    if name == 'celeba64':
      return tfds_sources.celeba64(split, data_dir=data_dir, image_size=image_size or 64,
                                   **flip, **kwargs)
    return tfds_sources.imagenet(split, data_dir=data_dir, image_size=image_size or 256,
                                 **flip, **kwargs)
  if name.startswith('folder:'):
    from jaxee.data import tfds_sources  # pylint: disable=g-import-not-at-top
    root = os.path.expanduser(name[len('folder:'):])
    if split and os.path.isdir(os.path.join(root, split)):
      root = os.path.join(root, split)
    return tfds_sources.ImageFolderSource(root, image_size=image_size, **flip, **kwargs)
  if name.startswith('latents:'):
    if random_flip:
      raise ValueError('Latent flips are stored copies: use include_flips=True.')
    from jaxee.data import latents  # pylint: disable=g-import-not-at-top
    return latents.LatentSource(os.path.expanduser(name[len('latents:'):]), **kwargs)
  raise ValueError(f'Unknown data source {name!r}; valid names: {", ".join(SOURCE_NAMES)}.')
