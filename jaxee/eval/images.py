"""Image utilities: model-space arrays → uint8, PNG grids written atomically.

Conversions follow the originals: DiT `sample_ddp.py` maps [-1, 1] to uint8 as
`clamp(127.5·x + 128, 0, 255)` with a truncating cast (note the +128); `save_image(normalize=True,
value_range=(-1, 1))` clamps to [-1, 1] and maps to [0, 1] before ×255 with rounding.
"""
from __future__ import annotations

import math
import os
import pathlib
import tempfile

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray, *, dit_fid: bool = False) -> np.ndarray:
  """[-1, 1] float NHWC → uint8 (DiT FID convention when `dit_fid`, else save_image's)."""
  x = np.asarray(x, np.float32)
  if dit_fid:
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
  x = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
  return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _label_rows(img: Image.Image, labels: list, row_height: int, top: int) -> Image.Image:
  """`img` with a left margin holding `labels[r]` beside grid row r (PIL's built-in font)."""
  from PIL import ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default()
  margin = 8 + max((int(font.getlength(str(t))) for t in labels), default=0)
  out = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
  out.paste(img, (margin, 0))
  draw = ImageDraw.Draw(out)
  for r, text in enumerate(labels):
    draw.text((4, top + r * row_height + row_height // 2 - 6), str(text), fill=(0, 0, 0),
              font=font)
  return out


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 → one (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 grid."""
  n, h, w, c = images.shape
  rows = math.ceil(n / nrow)
  grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, nrow)
    y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int = 8, *,
              scale: int = 0, row_labels=None) -> pathlib.Path:
  """Writes a PNG grid atomically; float input is taken as [-1, 1]; tiny images are upscaled.

  `row_labels`: one text per grid row, written in a white margin left of the row (so a reader
  can tell which variant each row shows).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  grid = make_grid(images, nrow=nrow)
  scale = scale or max(1, 128 // max(images.shape[1], 1))
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                     Image.NEAREST)
  if row_labels is not None:
    img = _label_rows(img, list(row_labels), row_height=(images.shape[1] + 2) * scale,
                      top=2 * scale)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
  os.close(fd)
  try:
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
