"""A sample-quality metric for tiny-image demos, built on a small digits classifier.

Inception-v3 features (FID, Inception Score) are meaningless on 8x8 or 16x16 images: the images
must be upsampled 40x to reach the network's input size, and the features then describe the
upsampling blur rather than the content. For the scikit-learn digits demo this module trains a
small convolutional classifier on the real data instead and uses it like FID uses Inception:

* ``DigitsClassifier``: grey 8x8 input -> two 3x3 convolutions -> 2x2 average pooling -> a
  ``feature_dim`` hidden layer (the *features*, after SiLU) -> ``num_classes`` logits.
  Inputs are NHWC floats in [-1, 1] of any size and channel count: channels are averaged to grey
  and the image is resized to 8x8 first (``to_classifier_input``; exact 2x2/4x4 box averages for
  sides that are multiples of 8, antialiased linear resizing otherwise). Nearest-upsampled digits
  at 16x16 therefore give exactly the same outputs as the native 8x8 images. Detail finer than
  8x8 is not judged; the real data holds none.
* ``train_classifier``: AdamW with warmup-cosine decay, batches drawn with replacement and
  shifted by up to one pixel, one jitted step; deterministic for a seed; a few seconds on CPU.
* ``features_and_probs``: features (float64) and softmax probabilities, one compiled shape.
* ``ClassifierMetric``: trains the classifier on part of the real data, keeps two held-out real
  subsets, and reports the Fréchet distance of sample features to the first subset (with
  ``jaxee.eval.fid.frechet_distance``), the same distance for the second subset (the noise floor
  of the metric), the mean max-softmax confidence, the accuracy against conditioning labels and a
  "classifier score" (the Inception Score computed with this classifier).

Like FID, the Fréchet distance is biased upwards for small sample sets: compare numbers computed
from the same number of samples, and read them against ``reference_frechet()``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxee.eval.fid import frechet_distance
from jaxee.eval.fid import inception_score
from jaxee.eval.fid import stats_from_features

INPUT_SIZE = 8


def load_digits_arrays(image_size: int = 8, split: str = 'train+test'
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Real digits as model-space arrays, read through jaxee's TFDS digits builder (no download).

  Args:
    image_size: output side, a multiple of 8 (pixels are repeated, i.e. nearest upsampling).
    split: a TFDS split of `jaxee.data.digits` ('train' 1,500, 'test' 297, 'train+test').

  Returns:
    (images float32 (N, S, S, 1) in [-1, 1], labels int32 (N,)).
  """
  if image_size % INPUT_SIZE:
    raise ValueError(f'image_size must be a multiple of {INPUT_SIZE}, got {image_size}')
  from jaxee.data import digits  # pylint: disable=g-import-not-at-top
  source = digits.DigitsSource(split, image_size=image_size, channels=1,
                               resize_method='nearest')
  examples = [source[i] for i in range(len(source))]
  images = np.stack([ex['image'] for ex in examples]).astype(np.float32)
  return images, np.asarray([ex['label'] for ex in examples], np.int32)


def to_classifier_input(images: jax.Array) -> jax.Array:
  """Maps NHWC images of any size and channel count to grey 8x8, the classifier's input.

  Args:
    images: (B, H, W, C) floats in [-1, 1].

  Returns:
    (B, 8, 8, 1) float32: the channel mean, box-averaged when H and W are multiples of 8 (so
    nearest-upsampled images map back exactly), antialiased linear resizing otherwise.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f'expected NHWC images, got shape {x.shape}')
  x = jnp.mean(x, axis=-1, keepdims=True)
  b, h, w, _ = x.shape
  if (h, w) == (INPUT_SIZE, INPUT_SIZE):
    return x
  if h % INPUT_SIZE == 0 and w % INPUT_SIZE == 0:
    fh, fw = h // INPUT_SIZE, w // INPUT_SIZE
    return x.reshape(b, INPUT_SIZE, fh, INPUT_SIZE, fw, 1).mean(axis=(2, 4))
  return jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, 1), 'linear', antialias=True)


class DigitsClassifier(nn.Module):
  """Small CNN for 8x8 digits returning ``(logits, features)``.

  Attributes:
    num_classes: number of output classes.
    feature_dim: width of the hidden layer whose (SiLU) activations are the features.
    width: channels of the first convolution (the second has twice as many).
  """
  num_classes: int = 10
  feature_dim: int = 64
  width: int = 32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classifies a batch.

    Args:
      images: (B, H, W, C) floats in [-1, 1]; see ``to_classifier_input``.

    Returns:
      (logits (B, num_classes), features (B, feature_dim)), float32.
    """
    x = to_classifier_input(images)
    x = nn.silu(nn.Conv(self.width, (3, 3), padding='SAME')(x))
    x = nn.silu(nn.Conv(2 * self.width, (3, 3), padding='SAME')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.silu(nn.Dense(self.feature_dim)(x))
    logits = nn.Dense(self.num_classes)(features)
    return logits, features


def _shift_one_pixel(key: jax.Array, x: jax.Array) -> jax.Array:
  """Shifts each (8, 8, 1) image by -1, 0 or +1 pixel per axis, filling with background (-1)."""
  offsets = jax.random.randint(key, (x.shape[0], 2), 0, 3)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (INPUT_SIZE, INPUT_SIZE, 1))

  return jax.vmap(crop)(padded, offsets)


def train_classifier(images, labels, *, seed: int = 0, steps: int = 600, batch_size: int = 128,
                     learning_rate: float = 3e-3, weight_decay: float = 1e-4,
                     augment: bool = True, num_classes: int = 10, feature_dim: int = 64
                     ) -> tuple[DigitsClassifier, Any]:
  """Trains a ``DigitsClassifier`` with cross-entropy.

  The data is converted to 8x8 grey once and kept on the device; each step draws a batch with
  replacement (and, with ``augment``, shifts it by up to one pixel) inside one jitted function,
  compiled once. Results depend only on ``seed`` (and the other arguments).

  Args:
    images: (N, H, W, C) floats in [-1, 1].
    labels: (N,) integer labels in [0, num_classes).
    seed: seed for initialization, batch sampling and augmentation.
    steps: optimizer steps.
    batch_size: examples per step.
    learning_rate: peak AdamW learning rate (linear warmup over 5% of the steps, cosine decay).
    weight_decay: AdamW decoupled weight decay.
    augment: random one-pixel shifts.
    num_classes: classifier outputs.
    feature_dim: feature width.

  Returns:
    (model, params).
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or labels.shape != (images.shape[0],):
    raise ValueError(f'need (N, H, W, C) images and (N,) labels, got {images.shape}, '
                     f'{labels.shape}')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes})')
  x_all = to_classifier_input(images)
  y_all = jnp.asarray(labels)
  n = x_all.shape[0]

  model = DigitsClassifier(num_classes=num_classes, feature_dim=feature_dim)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_key, x_all[:1])['params']
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), max(steps, 2), learning_rate * 0.01)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    idx_key, aug_key = jax.random.split(key)
    idx = jax.random.randint(idx_key, (batch_size,), 0, n)
    x, y = x_all[idx], y_all[idx]
    if augment:
      x = _shift_one_pixel(aug_key, x)

    def loss_fn(p):
      logits, _ = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for key in jax.random.split(data_key, steps):
    params, opt_state, _ = step(params, opt_state, key)
  return model, jax.device_get(params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: DigitsClassifier, params: Any, images: jax.Array):
  logits, features = model.apply({'params': params}, images)
  return features, jax.nn.softmax(logits, axis=-1)


def features_and_probs(model: DigitsClassifier, params: Any, images, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Runs the classifier over images in fixed-size batches (the last one zero-padded).

  Args:
    model: the classifier.
    params: its parameters.
    images: (N, H, W, C) floats in [-1, 1].
    batch_size: images per forward pass; every pass has this shape, so one compilation per
      image shape.

  Returns:
    (features (N, feature_dim) float64, probs (N, num_classes) float64).
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f'need a non-empty (N, H, W, C) array, got shape {images.shape}')
  bad = ~np.isfinite(images).reshape(images.shape[0], -1).all(axis=1)
  if bad.any():
    raise ValueError(f'{int(bad.sum())} of {images.shape[0]} images contain NaN or inf '
                     f'(first: index {int(np.argmax(bad))}); refusing to score them')
  feats, probs = [], []
  for i in range(0, images.shape[0], batch_size):
    batch = images[i:i + batch_size]
    n = batch.shape[0]
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
    f, p = _apply(model, params, jnp.asarray(batch))
    feats.append(np.asarray(f, np.float64)[:n])
    probs.append(np.asarray(p, np.float64)[:n])
  return np.concatenate(feats), np.concatenate(probs)


@dataclasses.dataclass
class ClassifierMetric:
  """Fréchet distance, confidence and class accuracy under a digits classifier.

  Build it with ``ClassifierMetric.fit``. Attributes:
    model: the classifier.
    params: its parameters.
    mu: (F,) mean of the reference (first held-out) real features.
    sigma: (F, F) covariance of the reference real features.
    floor_features: features of the second held-out real subset (for ``reference_frechet``).
    heldout_accuracy: classifier accuracy on both held-out real subsets.
    batch_size: forward batch size.
  """
  model: DigitsClassifier
  params: Any
  mu: np.ndarray
  sigma: np.ndarray
  floor_features: np.ndarray
  heldout_accuracy: float
  batch_size: int = 256

  @classmethod
  def fit(cls, real_images, real_labels, seed: int = 0, *, holdout_fraction: float = 0.3,
          batch_size: int = 256, **train_kwargs) -> ClassifierMetric:
    """Trains the classifier and computes the reference statistics.

    The real data is permuted with ``seed``; a ``holdout_fraction`` of it is kept from training
    and split in two halves: the reference (whose feature statistics samples are compared with)
    and the floor subset (the real-vs-real distance of ``reference_frechet``). Neither was seen
    by the classifier, like generated samples.

    Args:
      real_images: (N, H, W, C) floats in [-1, 1].
      real_labels: (N,) integer labels.
      seed: seed for the split and for ``train_classifier``.
      holdout_fraction: share of the data held out (both halves need >= 2 images).
      batch_size: forward batch size.
      **train_kwargs: passed to ``train_classifier`` (steps, batch_size is named
        ``train_batch_size`` here, learning_rate, ...).

    Returns:
      The metric.
    """
    real_images = np.asarray(real_images, np.float32)
    real_labels = np.asarray(real_labels, np.int32)
    n = real_images.shape[0]
    n_hold = int(round(n * holdout_fraction))
    if n_hold < 4 or n - n_hold < 2:
      raise ValueError(f'holdout_fraction={holdout_fraction} leaves too few images of {n}')
    perm = np.random.default_rng(seed).permutation(n)
    train_idx, ref_idx, floor_idx = np.split(perm, [n - n_hold, n - n_hold // 2])
    if 'train_batch_size' in train_kwargs:
      train_kwargs['batch_size'] = train_kwargs.pop('train_batch_size')
    model, params = train_classifier(real_images[train_idx], real_labels[train_idx], seed=seed,
                                     **train_kwargs)
    hold_idx = np.concatenate([ref_idx, floor_idx])
    feats, probs = features_and_probs(model, params, real_images[hold_idx], batch_size)
    accuracy = float(np.mean(probs.argmax(-1) == real_labels[hold_idx]))
    mu, sigma = stats_from_features(feats[:len(ref_idx)])
    return cls(model=model, params=params, mu=mu, sigma=sigma,
               floor_features=feats[len(ref_idx):], heldout_accuracy=accuracy,
               batch_size=batch_size)

  def features_and_probs(self, samples) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, F) and class probabilities (N, K) of samples, float64."""
    return features_and_probs(self.model, self.params, samples, self.batch_size)

  def frechet_from_features(self, feats: np.ndarray) -> float:
    """Fréchet distance of the Gaussian fitted to (N, F) features to the reference statistics."""
    mu, sigma = stats_from_features(feats)
    return frechet_distance(mu, sigma, self.mu, self.sigma)

  def frechet(self, samples) -> float:
    """Fréchet distance between the samples' features and the reference statistics.

    Args:
      samples: (N, H, W, C) floats in [-1, 1], N >= 2.

    Returns:
      The distance (0 for identical Gaussians; biased upwards for small N).
    """
    return self.frechet_from_features(self.features_and_probs(samples)[0])

  def reference_frechet(self) -> float:
    """Distance of the second held-out real subset to the reference: the metric's noise floor."""
    return self.frechet_from_features(self.floor_features)

  def confidence(self, samples) -> float:
    """Mean max-softmax probability over the samples (recognisable digits score near 1)."""
    return float(self.features_and_probs(samples)[1].max(axis=-1).mean())

  def class_accuracy(self, samples, labels) -> float:
    """Fraction of samples classified as their conditioning label.

    Args:
      samples: (N, H, W, C) floats in [-1, 1].
      labels: (N,) integer labels the samples were conditioned on.

    Returns:
      The accuracy in [0, 1].
    """
    labels = np.asarray(labels)
    probs = self.features_and_probs(samples)[1]
    if labels.shape != (probs.shape[0],):
      raise ValueError(f'labels shape {labels.shape} does not match {probs.shape[0]} samples')
    return float(np.mean(probs.argmax(-1) == labels))

  def report(self, samples, labels=None) -> dict[str, Any]:
    """All metrics of one sample set in one forward pass.

    Args:
      samples: (N, H, W, C) floats in [-1, 1], N >= 2.
      labels: optional (N,) conditioning labels.

    Returns:
      A dict: ``frechet``, ``reference_frechet`` (noise floor), ``confidence``,
      ``classifier_score`` (Inception Score with this classifier, one split; at most
      ``num_classes``), ``class_histogram`` (predicted-class fractions, a list),
      ``heldout_accuracy`` (of the classifier on real data), ``num_samples`` and, when labels are
      given, ``class_accuracy``.
    """
    return self.report_from_outputs(*self.features_and_probs(samples), labels)

  def report_from_outputs(self, feats: np.ndarray, probs: np.ndarray, labels=None
                          ) -> dict[str, Any]:
    """``report`` from already computed ``features_and_probs(samples)`` (no second forward)."""
    pred = probs.argmax(-1)
    out = {
        'frechet': self.frechet_from_features(feats),
        'reference_frechet': self.reference_frechet(),
        'confidence': float(probs.max(axis=-1).mean()),
        'classifier_score': inception_score(np.log(np.maximum(probs, 1e-30)), splits=1)[0],
        'class_histogram': (np.bincount(pred, minlength=probs.shape[1]) / len(pred)).tolist(),
        'heldout_accuracy': self.heldout_accuracy,
        'num_samples': int(probs.shape[0]),
    }
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != pred.shape:
        raise ValueError(f'labels shape {labels.shape} does not match {pred.shape[0]} samples')
      out['class_accuracy'] = float(np.mean(pred == labels))
    return out
