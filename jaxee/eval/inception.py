"""Inception-v3 as used for FID / IS, in Flax linen (NHWC).

Reproduces the TF-graph-compatible Inception-v3 of the FID paper (Heusel et al., 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), i.e. the
TensorFlow graph ``pool_3`` / ``logits`` network ("inception-2015-12-05") that pytorch-fid
(``FIDInceptionA/C/E_1/E_2``), torch-fidelity (``inception-v3-compat``) and the ADM evaluator
reproduce. Relative to torchvision's Inception-v3 (Szegedy et al., 2016, "Rethinking the
Inception Architecture for Computer Vision") the FID variant differs in:

* input: any size uint8 image, resized to 299x299 with TensorFlow-1 bilinear semantics
  (``align_corners=False`` *without* half-pixel centres: ``src = dst * in / out``), then scaled
  as ``(x - 128) / 128``;
* BatchNorm epsilon 1e-3;
* the average pools of Mixed_5b..5d (A blocks), Mixed_6b..6e (C blocks) and Mixed_7b (E_1)
  exclude padding from the average (``count_include_pad=False``);
* Mixed_7c (E_2) uses a 3x3 *max* pool in its pool branch;
* the classifier has 1008 outputs; ``logits_unbiased`` is ``pool @ fc.weight.T`` (no bias), the
  quantity torch-fidelity feeds to the Inception Score.

Module and branch names mirror the torchvision/pytorch-fid key names (``Conv2d_1a_3x3``,
``Mixed_5b.branch1x1``, ...) so that conversion is a mechanical rename, see
``jaxee/eval/inception_convert.py``.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008


def _resize_tables(in_size: int, out_size: int):
  """Indices and weights of TF1 bilinear resizing along one axis (host side, float64).

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    (lo, hi, frac): int32 index arrays of the two source samples and float32 weights of ``hi``.
  """
  scale = in_size / out_size
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  return lo.astype(np.int32), hi.astype(np.int32), frac


def resize_like_tf1(x: jax.Array, size: int | Sequence[int] = INPUT_SIZE) -> jax.Array:
  """Bilinear resize with TensorFlow-1 semantics (``align_corners=False``, no half-pixel centres).

  The output sample ``d`` reads the input at ``s = d * in / out``: it interpolates between
  ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weight ``s - floor(s)``. This is
  ``tf.compat.v1.image.resize_bilinear`` and torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``; ``jax.image.resize`` and torch's
  ``F.interpolate`` use half-pixel centres and differ.

  Args:
    x: (B, H, W, C) array (any float dtype; integer input is converted to float32).
    size: output size, an int (square) or (height, width).

  Returns:
    (B, out_h, out_w, C) float array.
  """
  if isinstance(size, int):
    size = (size, size)
  out_h, out_w = int(size[0]), int(size[1])
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  # Width first, then height (the order of the two lerps as in TF's kernel).
  lo, hi, frac = _resize_tables(in_w, out_w)
  left = jnp.take(x, lo, axis=2)
  right = jnp.take(x, hi, axis=2)
  x = left + (right - left) * frac[None, None, :, None].astype(x.dtype)
  lo, hi, frac = _resize_tables(in_h, out_h)
  top = jnp.take(x, lo, axis=1)
  bottom = jnp.take(x, hi, axis=1)
  return top + (bottom - top) * frac[None, :, None, None].astype(x.dtype)


def preprocess(images: jax.Array) -> jax.Array:
  """Turns uint8 (or [0, 255] float) NHWC images into the network input.

  Args:
    images: (B, H, W, 3) uint8 or float in [0, 255]; any spatial size.

  Returns:
    (B, 299, 299, 3) float32, resized like TF1 and scaled as ``(x - 128) / 128``.
  """
  x = images.astype(jnp.float32)
  x = resize_like_tf1(x, INPUT_SIZE)
  return (x - 128.0) / 128.0


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU.

  Attributes:
    features: output channels.
    kernel: (kh, kw).
    strides: (sh, sw).
    padding: (ph, pw) symmetric zero padding.
    precision: matmul precision of the convolution.
  """
  features: int
  kernel: Sequence[int] = (1, 1)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3x3 stride-1 average pool, padding 1, padding excluded from the count."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x, stride):
  """3x3 max pool with the given stride; stride 1 pads by one (with -inf)."""
  pad = ((1, 1), (1, 1)) if stride == 1 else 'VALID'
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b..5d): 1x1 | 5x5 | double 3x3 | avg pool (no pad count) + 1x1."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, name='branch1x1')(x)
    b5 = conv(48, name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a), the 35 -> 17 grid reduction: 3x3/2 | double 3x3 (/2) | max pool/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
    bd = conv(64, name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(bd)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..6e): factorised 7x7 branches, avg pool without pad count."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, name='branch1x1')(x)
    b7 = conv(c7, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a), the 17 -> 8 grid reduction."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(b3)
    b7 = conv(192, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(b7)
    bp = _max_pool_3x3(x, 2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, avg pool without pad count) / FIDInceptionE_2 (Mixed_7c, max pool).

  Attributes:
    pool: 'avg' (E_1) or 'max' (E_2) for the pool branch.
    precision: convolution precision.
  """
  pool: str = 'avg'
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, name='branch1x1')(x)
    b3 = conv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
    ], axis=-1)
    bd = conv(448, name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
    ], axis=-1)
    if self.pool == 'avg':
      bp = _avg_pool_3x3(x)
    elif self.pool == 'max':
      bp = _max_pool_3x3(x, 1)
    else:
      raise ValueError(f'pool must be "avg" or "max", got {self.pool!r}')
    bp = conv(192, name='branch_pool')(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 2048 -> 1008 linear layer, returning both the unbiased and the biased logits.

  Attributes:
    features: number of logits.
    precision: matmul precision.
  """
  features: int = NUM_LOGITS
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased, unbiased + bias


class InceptionV3FID(nn.Module):
  """The FID Inception-v3 network.

  ``apply({'params': p, 'batch_stats': s}, images)`` with uint8 NHWC images of any size (or
  float images in [0, 255]) returns float32
  ``{'pool': (B, 2048), 'logits_unbiased': (B, 1008), 'logits': (B, 1008)}``.

  Attributes:
    precision: matmul precision of the convolutions and the classifier (default HIGHEST, i.e.
      true fp32 also on accelerators that would otherwise use TF32/bf16 passes).
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = preprocess(images)
    x = conv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)  # 149
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # 147
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)  # 147
    x = _max_pool_3x3(x, 2)  # 73
    x = conv(80, name='Conv2d_3b_1x1')(x)  # 73
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # 71
    x = _max_pool_3x3(x, 2)  # 35
    x = InceptionA(32, p, name='Mixed_5b')(x)  # 256
    x = InceptionA(64, p, name='Mixed_5c')(x)  # 288
    x = InceptionA(64, p, name='Mixed_5d')(x)  # 288
    x = InceptionB(p, name='Mixed_6a')(x)  # 17x17x768
    x = InceptionC(128, p, name='Mixed_6b')(x)
    x = InceptionC(160, p, name='Mixed_6c')(x)
    x = InceptionC(160, p, name='Mixed_6d')(x)
    x = InceptionC(192, p, name='Mixed_6e')(x)
    x = InceptionD(p, name='Mixed_7a')(x)  # 8x8x1280
    x = InceptionE('avg', p, name='Mixed_7b')(x)  # 2048
    x = InceptionE('max', p, name='Mixed_7c')(x)  # 2048
    pool = jnp.mean(x, axis=(1, 2))
    unbiased, logits = Classifier(NUM_LOGITS, p, name='fc')(pool)
    return {'pool': pool, 'logits_unbiased': unbiased, 'logits': logits}
