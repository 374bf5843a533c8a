"""Image transforms shared by jaxee's data sources (host side, NumPy + PIL).

Reproduces the preprocessing of the original training code:

* ADM / guided-diffusion `center_crop_arr`, used by DiT (`train.py`), ASE, L2C and U-ViT's
  `ImageDataset` for ImageNet: while the short side is at least twice the target, halve the image
  with PIL BOX filtering; then resize with BICUBIC so that the short side equals the target
  (sizes rounded); then take the centre crop (offsets floored).
* U-ViT CelebA 64 (`datasets.CelebA`): crop the 128x128 box centred on (x=89, y=121) of the
  178x218 aligned image, i.e. rows [57, 185) and columns [25, 153), then `Resize(64)` on the PIL
  image (bilinear, antialiased), then random horizontal flip.
* DuoDiff / DeeDiff CelebA (`datasets/celeba.py`): normalise first, then centre-crop 178x178,
  then bilinear `Resize(64)` on the float tensor. Resizing a float image reproduces this order
  (bilinear weights sum to one, so normalisation commutes with it up to rounding).
* `ToTensor` + `Normalize(0.5, 0.5)`, i.e. uint8 -> x / 127.5 - 1 in [-1, 1], and
  `RandomHorizontalFlip(p=0.5)`.

Random transforms never use global state: they take a `numpy.random.Generator`, which the
pipeline derives from (seed, epoch, record index) with `example_rng`, so every epoch is
reproducible and independent of batch size, prefetching and the number of processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

Example = dict[str, Any]

# PIL resampling filters by name.
RESAMPLE = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'box': Image.Resampling.BOX,
    'lanczos': Image.Resampling.LANCZOS,
}

# U-ViT's CelebA crop: a 128x128 box around (cx, cy) = (89, 121) in the 178x218 image.
UVIT_CELEBA_BOX = (121 - 64, 89 - 64, 128, 128)  # (top, left, height, width)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator for the random transforms of one record in one epoch.

  Args:
    seed: the pipeline seed.
    epoch: the epoch number.
    index: the record's index in its source (not its position in a batch).

  Returns:
    A fresh `numpy.random.Generator`; the same arguments always give the same stream.
  """
  return np.random.default_rng([int(seed), int(epoch), 1, int(index)])


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (`ToTensor` then `Normalize(0.5, 0.5)`).

  Args:
    image: an integer image array.

  Returns:
    The float32 image `image / 127.5 - 1`.
  """
  return np.asarray(image, np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8, as U-ViT/ADM save samples (clip(127.5 x + 128) for DiT aside).

  Args:
    image: a float image in [-1, 1].

  Returns:
    `round(clip((x + 1) / 2, 0, 1) * 255)` as uint8.
  """
  x = np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return np.round(x * 255.0).astype(np.uint8)


def random_hflip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Flips an HWC image left-right with probability `p` (`RandomHorizontalFlip`).

  Args:
    image: an HWC (or HW) array.
    rng: the record's generator.
    p: flip probability.

  Returns:
    The image, flipped or not (a contiguous copy when flipped).
  """
  if rng.random() < p:
    return np.ascontiguousarray(image[:, ::-1])
  return image


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  """Wraps a uint8 HWC/HW array (or passes a PIL image through).

  Args:
    image: uint8 array with 1 or 3 channels, or a PIL image.

  Returns:
    A PIL image ('L' for one channel, 'RGB' for three).
  """
  if isinstance(image, Image.Image):
    return image
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr)


def from_pil(image: Image.Image, channels: int | None = None) -> np.ndarray:
  """PIL image -> uint8 HWC array, optionally forcing 1 or 3 channels.

  Args:
    image: a PIL image.
    channels: 1 (grayscale), 3 (RGB) or None to keep the image's own mode.

  Returns:
    A uint8 array of shape (H, W, C).
  """
  if channels == 1:
    image = image.convert('L')
  elif channels == 3:
    image = image.convert('RGB')
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr


def center_crop_arr(image: np.ndarray | Image.Image, image_size: int) -> np.ndarray:
  """ADM's `center_crop_arr`: BOX halvings, BICUBIC resize of the short side, centre crop.

  Args:
    image: uint8 HWC array or PIL image (any size, possibly smaller than `image_size`).
    image_size: output height and width.

  Returns:
    uint8 array (image_size, image_size, C).
  """
  pil = as_pil(image)
  while min(pil.size) >= 2 * image_size:
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=RESAMPLE['box'])
  scale = image_size / min(pil.size)
  new_size = (round(pil.size[0] * scale), round(pil.size[1] * scale))
  pil = pil.resize(new_size, resample=RESAMPLE['bicubic'])
  arr = from_pil(pil)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
  """`torchvision.transforms.functional.crop` for an in-bounds box on an HWC array.

  Args:
    image: HWC array.
    top: first row.
    left: first column.
    height: box height.
    width: box width.

  Returns:
    The (height, width, C) slice.
  """
  if top < 0 or left < 0 or top + height > image.shape[0] or left + width > image.shape[1]:
    raise ValueError(f'Crop box {(top, left, height, width)} outside image {image.shape}.')
  return image[top:top + height, left:left + width]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """`torchvision` `CenterCrop(size)` (offsets rounded like torchvision) on an HWC array.

  Args:
    image: HWC array at least `size` in both dimensions.
    size: side of the square crop.

  Returns:
    The (size, size, C) centre crop.
  """
  top = int(round((image.shape[0] - size) / 2.0))
  left = int(round((image.shape[1] - size) / 2.0))
  return crop(image, top, left, size, size)


def resize_uint8(image: np.ndarray, size: int | tuple[int, int],
                 method: str = 'bilinear') -> np.ndarray:
  """Resizes a uint8 HWC image with PIL (rounding to uint8, like torchvision on PIL images).

  Args:
    image: uint8 HWC array with 1 or 3 channels.
    size: output side, or (height, width).
    method: a key of `RESAMPLE`.

  Returns:
    uint8 array (height, width, C).
  """
  h, w = (size, size) if isinstance(size, int) else size
  channels = image.shape[-1]
  pil = as_pil(image).resize((w, h), resample=RESAMPLE[method])
  return from_pil(pil, channels)


def resize_float(image: np.ndarray, size: int | tuple[int, int],
                 method: str = 'bilinear') -> np.ndarray:
  """Resizes a float HWC image channel by channel with PIL mode 'F' (no rounding).

  Args:
    image: float HWC array.
    size: output side, or (height, width).
    method: a key of `RESAMPLE`.

  Returns:
    float32 array (height, width, C).
  """
  h, w = (size, size) if isinstance(size, int) else size
  image = np.asarray(image, np.float32)
  planes = [
      np.asarray(Image.fromarray(image[..., c], mode='F').resize(
          (w, h), resample=RESAMPLE[method]))
      for c in range(image.shape[-1])
  ]
  return np.stack(planes, axis=-1)


def uvit_celeba64(image: np.ndarray, image_size: int = 64) -> np.ndarray:
  """U-ViT's CelebA preprocessing before the flip: fixed 128x128 face box, `Resize(64)`.

  Args:
    image: uint8 (218, 178, 3) aligned CelebA image.
    image_size: output side (U-ViT uses 64).

  Returns:
    float32 (image_size, image_size, 3) in [-1, 1].
  """
  return to_float(resize_uint8(crop(image, *UVIT_CELEBA_BOX), image_size, 'bilinear'))


def duodiff_celeba64(image: np.ndarray, image_size: int = 64) -> np.ndarray:
  """DuoDiff's CelebA preprocessing: normalise, `CenterCrop(178)`, bilinear `Resize(64)`.

  Args:
    image: uint8 (218, 178, 3) aligned CelebA image.
    image_size: output side.

  Returns:
    float32 (image_size, image_size, 3) in [-1, 1].
  """
  return resize_float(center_crop(to_float(image), 178), image_size, 'bilinear')


def set_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Converts an HWC image to 1 or 3 channels (gray is replicated, RGB uses ITU-R 601 luma).

  Args:
    image: HWC array with 1 or 3 channels.
    channels: 1 or 3.

  Returns:
    HWC array with `channels` channels, same dtype.
  """
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    return from_pil(as_pil(image).convert('L'), 1)
  raise ValueError(f'Cannot convert {have} channels to {channels}.')
