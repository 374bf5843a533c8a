"""Fréchet Inception Distance and Inception Score on top of the FID Inception-v3.

* FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium", Eq. 6): ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians
  fitted to the 2048-d pool features, computed like the reference implementations (TTUR
  ``fid.py``, pytorch-fid, the ADM evaluator): ``scipy.linalg.sqrtm`` of ``S1 S2`` in float64,
  retried with ``eps * I`` added to both covariances when the product is singular, and the
  imaginary part dropped when it is numerical noise.
* Inception Score (Salimans et al., 2016, "Improved Techniques for Training GANs"):
  ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` consecutive chunks, mean and std over chunks.
  ``p(y|x)`` is the softmax over all 1008 *unbiased* logits (``pool @ W``, no bias) -- the
  original OpenAI ``inception_score.py`` (which multiplies ``pool_3`` by the softmax weights
  only) and torch-fidelity do the same.
* Reference statistics: ``.npz`` files holding ``mu``/``sigma`` (pytorch-fid, ADM reference
  batches) or ADM reference batches holding only images (``arr_0``, uint8 NHWC).
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from tqdm import tqdm

from jaxee.eval.inception import InceptionV3FID


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: (D,) mean of the first set of features.
    sigma1: (D, D) covariance of the first set.
    mu2: (D,) mean of the second set.
    sigma2: (D, D) covariance of the second set.
    eps: diagonal offset added to both covariances when ``sqrtm(sigma1 @ sigma2)`` is not finite.

  Returns:
    The distance as a Python float.

  Raises:
    ValueError: on mismatched shapes, or when the matrix square root has a significant imaginary
      component (the covariances are not positive semi-definite).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'mean shapes differ: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f'covariance shapes {sigma1.shape}, {sigma2.shape} do not match the means '
                     f'{mu1.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'imaginary component {np.max(np.abs(covmean.imag))} in sqrtm')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def stats_from_features(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (``rowvar=False``, ddof 1) of features, in float64.

  Args:
    feats: (N, D) features, N >= 2.

  Returns:
    (mu (D,), sigma (D, D)).
  """
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f'need (N >= 2, D) features, got shape {feats.shape}')
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def inception_score(logits, splits: int = 10, rng_seed: int | None = None
                    ) -> tuple[float, float]:
  """Inception Score from the 1008 unbiased logits.

  Args:
    logits: (N, 1008) ``logits_unbiased`` (softmax over all of them, see module docstring).
    splits: number of consecutive chunks (``N * i // splits`` boundaries).
    rng_seed: when given, samples are shuffled with ``np.random.RandomState(rng_seed)`` first.

  Returns:
    (mean, std) of the per-chunk scores (std with ddof 0).
  """
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f'need at least splits={splits} >= 1 samples, got {n}')
  if rng_seed is not None:
    logits = logits[np.random.RandomState(rng_seed).permutation(n)]
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0))
    kl = np.sum(p * (part - log_py[None]), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: InceptionV3FID, variables, images):
  out = model.apply(variables, images)
  return out['pool'], out['logits_unbiased']


def check_batch_size(batch_size: Any) -> int:
  """``batch_size`` as an int >= 1, else a ValueError (0 would loop forever in ``_batches``)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f'batch size must be an integer >= 1, got {batch_size!r}')
  return int(batch_size)


def _batches(images: Any, batch_size: int) -> Iterable[np.ndarray]:
  """Regroups an array or an iterable of images / batches into batches of ``batch_size``."""
  batch_size = check_batch_size(batch_size)
  if isinstance(images, (np.ndarray, jax.Array)) and np.ndim(images) == 4:
    for i in range(0, images.shape[0], batch_size):
      yield np.asarray(images[i:i + batch_size])
    return
  pending, count = [], 0
  for item in images:
    item = np.asarray(item)
    if item.ndim == 3:
      item = item[None]
    if item.ndim != 4:
      raise ValueError(f'expected (H, W, C) images or (B, H, W, C) batches, got {item.shape}')
    pending.append(item)
    count += item.shape[0]
    while count >= batch_size:
      joined = np.concatenate(pending)
      yield joined[:batch_size]
      rest = joined[batch_size:]
      pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
  if count:
    yield np.concatenate(pending)


def compute_features(images: Any, variables: Any, batch_size: int = 100, *,
                     model: InceptionV3FID | None = None, total: int | None = None,
                     progress: bool = True) -> dict[str, np.ndarray]:
  """Runs the FID Inception-v3 over images with one jitted batch shape.

  Args:
    images: uint8 NHWC images: an (N, H, W, C) array, or an iterable of (H, W, C) images or
      (B, H, W, C) batches of a common spatial size.
    variables: ``{'params', 'batch_stats'}`` from ``inception_params_from_state_dict``.
    batch_size: images per forward pass; the last batch is zero-padded and trimmed so that
      every call has the same shape (one compilation).
    model: the module (default ``InceptionV3FID()``).
    total: number of images for the progress bar (taken from ``len(images)`` when available).
    progress: show a tqdm progress bar.

  Returns:
    ``{'pool': (N, 2048) float32, 'logits_unbiased': (N, 1008) float32}`` NumPy arrays.
  """
  batch_size = check_batch_size(batch_size)
  model = model or InceptionV3FID()
  if total is None and hasattr(images, '__len__'):
    total = len(images)
  pools, logits = [], []
  with tqdm(total=total, unit='img', desc='inception', disable=not progress) as bar:
    for batch in _batches(images, batch_size):
      n = batch.shape[0]
      if n < batch_size:
        pad = np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)
        batch = np.concatenate([batch, pad])
      pool, logit = _forward(model, variables, jnp.asarray(batch))
      pools.append(np.asarray(pool)[:n])
      logits.append(np.asarray(logit)[:n])
      bar.update(n)
  if not pools:
    raise ValueError('no images given')
  return {'pool': np.concatenate(pools), 'logits_unbiased': np.concatenate(logits)}


def load_reference_stats(path: str | os.PathLike, variables: Any = None, *,
                         batch_size: int = 100, model: InceptionV3FID | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Loads FID reference statistics from an ``.npz`` file.

  Accepted layouts: ``mu``/``sigma`` arrays (pytorch-fid statistics, ``save_reference_stats``,
  and ADM reference batches, which also hold images and spatial statistics), or an ADM reference
  batch with images only (``arr_0``: uint8 NHWC), whose statistics are computed with the network.

  Args:
    path: the ``.npz`` file.
    variables: Inception variables, needed only when the statistics must be computed.
    batch_size: forward batch size when computing statistics.
    model: the module (default ``InceptionV3FID()``).

  Returns:
    (mu (2048,), sigma (2048, 2048)) in float64.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: when the file is not an ``.npz``, holds neither statistics nor images, images
      but no variables, or statistics with NaN/Inf or shapes that do not fit together.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'reference statistics {os.fspath(path)} not found')
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{os.fspath(path)} is not a readable .npz of reference statistics '
                     f'({type(e).__name__}: {e})') from None
  with data:
    keys = set(data.files)
    if {'mu', 'sigma'} <= keys:
      mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
      _check_stats(mu, sigma, os.fspath(path))
      return mu, sigma
    if 'arr_0' not in keys:
      raise ValueError(f'{os.fspath(path)}: expected "mu"/"sigma" or "arr_0" (images), '
                       f'found {sorted(keys)}')
    images = data['arr_0']
  if variables is None:
    raise ValueError(f'{os.fspath(path)} holds images only; pass the Inception variables to '
                     'compute its statistics')
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'{os.fspath(path)}: arr_0 must be uint8 NHWC, got {images.dtype} '
                     f'{images.shape}')
  feats = compute_features(images, variables, batch_size, model=model)['pool']
  return stats_from_features(feats)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  """Reference statistics must be finite, (D,) and (D, D)."""
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'{where}: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)')
  for name, value in (('mu', mu), ('sigma', sigma)):
    if not np.isfinite(value).all():
      raise ValueError(f'{where}: reference {name} holds NaN/Inf; regenerate the reference '
                       f'statistics')


def save_reference_stats(path: str | os.PathLike, mu, sigma) -> None:
  """Writes ``mu``/``sigma`` to an ``.npz`` file atomically (temporary file + ``os.replace``).

  Args:
    path: destination (written exactly there, no suffix added).
    mu: (D,) mean.
    sigma: (D, D) covariance.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, mu=np.asarray(mu), sigma=np.asarray(sigma))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def fid_from_features(feats1, feats2) -> float:
  """FID between two (N, 2048) feature sets.

  Args:
    feats1: features of the first set.
    feats2: features of the second set.

  Returns:
    The Fréchet distance of their Gaussian fits.
  """
  return frechet_distance(*stats_from_features(feats1), *stats_from_features(feats2))
