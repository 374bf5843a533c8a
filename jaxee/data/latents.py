"""Latent-space data: pre-extracted VAE moments, posterior sampling, on-the-fly encoding.

Reproduces the latent pipelines of the original code:

* U-ViT `FrozenAutoencoderKL.sample`: `moments` = mean || logvar along channels;
  z = (mean + exp(0.5 * clip(logvar, -30, 20)) * eps) * 0.18215, a fresh eps every step.
* U-ViT `scripts/extract_imagenet_feature.py`: moments of the ADM-centre-cropped image *and* of
  its horizontal flip are stored, so the latent dataset has 2x the images and training applies
  no further flip.
* DiT/ASE/L2C encode on the fly (`vae.encode(x).latent_dist.sample() * 0.18215`), flip first;
  sampling from stored moments is distributionally identical.

Stored format (written by `extract_moments`, NHWC, float32 or float16): a directory with
`meta.json` and shards `moments_{k:05d}.npy` (N_k, h, w, 2C), `labels_{k:05d}.npy` (N_k,) and,
with flips, `moments_flip_{k:05d}.npy`. Shards are written atomically (temp file + `os.replace`)
and skipped when present, so an interrupted extraction resumes. Shards are memory-mapped when
read. A single `.npz` ('moments', optional 'labels' and 'moments_flip') or `.npy` (moments
only) file also works. Record i < N is the original, N <= i < 2N the flipped copy of i - N.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SCALE = 0.18215
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def latents_from_moments(moments: Any, eps: Any, scale: float = SCALE) -> Any:
  """z = (mean + exp(0.5 * clip(logvar, -30, 20)) * eps) * scale (NumPy or JAX arrays).

  Args:
    moments: (..., 2C) mean || logvar on the last axis.
    eps: standard normal noise of shape (..., C).
    scale: latent scale factor (0.18215 for the SD VAE).

  Returns:
    The scaled latent (..., C).
  """
  xp = jnp if isinstance(moments, jax.Array) or isinstance(eps, jax.Array) else np
  mean, logvar = xp.split(moments, 2, axis=-1)
  std = xp.exp(0.5 * xp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
  return (mean + std * eps) * scale


def sample_latents(moments: jax.Array, key: jax.Array, scale: float = SCALE) -> jax.Array:
  """Draws posterior samples on device (jittable), e.g. once per training step.

  Args:
    moments: (B, h, w, 2C).
    key: PRNG key.
    scale: latent scale factor.

  Returns:
    float32 latents (B, h, w, C).
  """
  moments = jnp.asarray(moments, jnp.float32)
  eps = jax.random.normal(key, moments.shape[:-1] + (moments.shape[-1] // 2,), jnp.float32)
  return latents_from_moments(moments, eps, scale)


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
  fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _shard_paths(out: pathlib.Path, k: int, flip: bool) -> dict[str, pathlib.Path]:
  paths = {'labels': out / f'labels_{k:05d}.npy', 'moments': out / f'moments_{k:05d}.npy'}
  if flip:
    paths['moments_flip'] = out / f'moments_flip_{k:05d}.npy'
  return paths


def extract_moments(source: Any, encode_fn: Callable[[np.ndarray], Any],
                    out_path: str | os.PathLike[str], batch_size: int, *,
                    shard_size: int | None = None, flip: bool = True,
                    dtype: Any = np.float32) -> dict[str, Any]:
  """Encodes a whole image source to VAE moments on disk, resumably.

  Args:
    source: random-access source whose examples hold 'image' (HWC in [-1, 1]) and 'label';
      only the deterministic `__getitem__` is used (no augmentation).
    encode_fn: images (B, H, W, 3) float32 -> moments (B, h, w, 2C), e.g. a jitted
      `lambda x: vae.apply(params, x, method='encode_moments')`.
    out_path: output directory (created).
    batch_size: images per `encode_fn` call (flipped copies are a second call).
    shard_size: examples per shard file (default 16 batches).
    flip: also store the moments of the horizontally flipped images (U-ViT's 2x dataset).
    dtype: storage dtype of the moments.

  Returns:
    The metadata written to `meta.json`.
  """
  out = pathlib.Path(out_path)
  out.mkdir(parents=True, exist_ok=True)
  n = len(source)
  if n == 0:
    raise ValueError('Cannot extract moments from an empty source.')
  shard_size = int(shard_size or 16 * batch_size)
  num_shards = -(-n // shard_size)
  meta_path = out / 'meta.json'
  if meta_path.exists():
    old = json.loads(meta_path.read_text())
    if (old['num_examples'], old['shard_size'], old['flip']) != (n, shard_size, flip):
      raise ValueError(f'{out} holds a different extraction {old}; use another out_path.')
  for k in range(num_shards):
    paths = _shard_paths(out, k, flip)
    if all(p.exists() for p in paths.values()):
      continue
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in paths}
    for lo in range(k * shard_size, min((k + 1) * shard_size, n), batch_size):
      hi = min(lo + batch_size, (k + 1) * shard_size, n)
      examples = [source[i] for i in range(lo, hi)]
      images = np.stack([np.asarray(ex['image'], np.float32) for ex in examples])
      chunks['labels'].append(np.asarray([int(ex.get('label', 0)) for ex in examples], np.int32))
      chunks['moments'].append(np.asarray(encode_fn(images), dtype))
      if flip:
        flipped = np.ascontiguousarray(images[:, :, ::-1])
        chunks['moments_flip'].append(np.asarray(encode_fn(flipped), dtype))
    # Moments last: a shard is complete once all of its files exist.
    for name in sorted(paths, key=lambda s: s.startswith('moments')):
      _atomic_save(paths[name], np.concatenate(chunks[name]))
  moments_shape = list(np.load(_shard_paths(out, 0, flip)['moments'], mmap_mode='r').shape[1:])
  meta = {'num_examples': n, 'shard_size': shard_size, 'num_shards': num_shards, 'flip': flip,
          'moments_shape': moments_shape, 'dtype': np.dtype(dtype).name}
  tmp = meta_path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, meta_path)
  return meta


class LatentSource:
  """Random-access latent dataset over stored moments (see the module docstring).

  `__getitem__` returns {'moments', 'label'}; `augment` replaces them, when `sample=True`, by
  {'image': z, 'label'} with eps from the record's generator, so each epoch sees a new,
  reproducible posterior sample. With `sample=False` batches keep 'moments' for on-device
  `sample_latents`.
  """

  def __init__(self, path: str | os.PathLike[str], *, scale: float = SCALE,
               include_flips: bool = True, sample: bool = True):
    """Opens a moments directory, `.npz` or `.npy` file.

    Args:
      path: output of `extract_moments`, or a single `.npz`/`.npy` file.
      scale: latent scale factor.
      include_flips: use the stored flipped copies (2x records) when present.
      sample: draw z in `augment` (else keep 'moments').
    """
    self.path = pathlib.Path(path)
    self.scale, self.sample = scale, sample
    if self.path.is_dir():
      meta_file = self.path / 'meta.json'
      if not meta_file.exists():
        raise FileNotFoundError(f'{self.path} has no meta.json: extraction incomplete? Rerun '
                                f'extract_moments(..., out_path={str(self.path)!r}) to resume.')
      meta = json.loads(meta_file.read_text())
      shards = [_shard_paths(self.path, k, meta['flip']) for k in range(meta['num_shards'])]
      load = lambda p: np.load(p, mmap_mode='r')
      self._moments = [load(s['moments']) for s in shards]
      self._flips = [load(s['moments_flip']) for s in shards] if meta['flip'] else None
      labels = [np.asarray(load(s['labels'])) for s in shards]
    elif self.path.suffix == '.npz':
      with np.load(self.path) as data:
        self._moments = [data['moments']]
        self._flips = [data['moments_flip']] if 'moments_flip' in data else None
        labels = [data['labels'] if 'labels' in data else np.zeros(len(data['moments']))]
    elif self.path.suffix == '.npy':
      self._moments = [np.load(self.path, mmap_mode='r')]
      self._flips, labels = None, [np.zeros(len(self._moments[0]))]
    else:
      raise FileNotFoundError(f'No latent moments at {self.path} (directory, .npz or .npy).')
    self._labels = np.concatenate(labels).astype(np.int64)
    self._starts = np.cumsum([0] + [len(m) for m in self._moments])
    self.num_base = int(self._starts[-1])
    if len(self._labels) != self.num_base:
      raise ValueError(f'{len(self._labels)} labels for {self.num_base} moments in {self.path}.')
    self.has_flips = include_flips and self._flips is not None

  def __len__(self) -> int:
    return self.num_base * (2 if self.has_flips else 1)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    flipped, base = divmod(index, self.num_base)
    shard = int(np.searchsorted(self._starts, base, side='right')) - 1
    arrays = self._flips if flipped else self._moments
    moments = np.asarray(arrays[shard][base - self._starts[shard]], np.float32)
    return {'moments': moments, 'label': int(self._labels[base])}

  def augment(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Samples z from the example's moments when `sample=True`.

    Args:
      example: output of `__getitem__`.
      rng: the record's generator for this epoch.

    Returns:
      {'image': z, 'label'} or the example unchanged.
    """
    if not self.sample:
      return example
    moments = example['moments']
    eps = rng.standard_normal(moments.shape[:-1] + (moments.shape[-1] // 2,), np.float32)
    z = latents_from_moments(moments, eps, self.scale).astype(np.float32)
    return {'image': z, 'label': example['label']}

  def __repr__(self) -> str:
    return f'LatentSource({str(self.path)!r}, n={len(self)}, flips={self.has_flips})'


class OnTheFlyLatents:
  """Encodes image batches to latents each step (DiT/ASE/L2C style), given a VAE callable.

  `encode_moments` is e.g. `functools.partial(vae.apply, {'params': p},
  method='encode_moments')` for `jaxee.models.vae.AutoencoderKL`; flips should already be
  applied by the image source (they are, in the `DataLoader`).
  """

  def __init__(self, encode_moments: Callable[[jax.Array], jax.Array], scale: float = SCALE,
               jit: bool = True):
    """Wraps the encoder.

    Args:
      encode_moments: images (B, H, W, 3) in [-1, 1] -> moments (B, h, w, 2C).
      scale: latent scale factor.
      jit: jit-compile encode + sample together.
    """
    self.encode_moments = encode_moments
    self.scale = scale

    def encode(images, key):
      return sample_latents(self.encode_moments(images), key, self.scale)

    self._encode = jax.jit(encode) if jit else encode

  def __call__(self, batch: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Replaces batch['image'] by sampled latents.

    Args:
      batch: dict with 'image' (B, H, W, 3).
      key: PRNG key for the posterior sample.

    Returns:
      A new dict with 'image' = z (B, h, w, C); other entries unchanged.
    """
    return dict(batch, image=self._encode(batch['image'], key))
