"""Classifier-free guidance: wrappers that turn a batched network into a denoiser.

A bound network has the signature `net(x, t_net, y, nfe_index, cache) -> (out, cache, stats)`
(`docs/ARCHITECTURE.md`); a denoiser is `denoise(x, t_net, nfe_index, cache) -> (out, cache,
stats)`. The wrappers reproduce (`research/dit_uvit.md` A5, B6):

* DiT `models.py` `DiT.forward_with_cfg`: the network runs on `[x; x]` with labels `[y; null]`
  and only the first three eps channels are guided, `uncond + s (cond - uncond)` ("for exact
  reproducibility"); eps channel 3 and the variance channels keep the conditional half. The
  original returns both halves and keeps the first at the end; returning the first half directly
  is the same thing.
* U-ViT `cfg_nnet` (eval scripts): `cond + s (cond - uncond)` on the whole output. The original
  makes two separate forward passes; here they are batched as `[x; x]`, which gives the same
  values row by row.

With guidance the network (and its cache) sees a batch of 2B; the returned output has batch B.
"""
from typing import Callable, Optional

import jax.numpy as jnp

Net = Callable


def _doubled(net: Net, labels, null_label: int):
  """Runs `net` on [x; x] with labels [y; null] and splits the output into (cond, uncond)."""
  labels = jnp.asarray(labels, jnp.int32)
  y2 = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

  def run(x, t_net, nfe_index, cache):
    b = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)
    t2 = jnp.concatenate([t_net, t_net], axis=0)
    out, cache, stats = net(x2, t2, y2, nfe_index, cache)
    return out[:b], out[b:], cache, stats

  return run


def dit_cfg(net: Net, labels, null_label: int = 1000, scale: float = 4.0,
            guided_channels: int = 3):
  """DiT `forward_with_cfg` as a denoiser.

  Args:
    net: `net(x, t_net, y, nfe_index, cache) -> (out, cache, stats)` on a batch of 2B.
    labels: class labels (B,).
    null_label: the null class (1000 for DiT).
    scale: guidance scale s in `uncond + s (cond - uncond)`.
    guided_channels: number of leading channels guided (3 in the original).

  Returns:
    `denoise(x, t_net, nfe_index, cache)` returning the (B, H, W, C_out) guided output.
  """
  run = _doubled(net, labels, null_label)

  def denoise(x, t_net, nfe_index, cache):
    cond, uncond, cache, stats = run(x, t_net, nfe_index, cache)
    g = guided_channels
    half = uncond[..., :g] + scale * (cond[..., :g] - uncond[..., :g])
    return jnp.concatenate([half, cond[..., g:]], axis=-1), cache, stats

  return denoise


def uvit_cfg(net: Net, labels, null_label: int = 1000, scale: float = 0.4):
  """U-ViT `cfg_nnet` as a denoiser: `cond + s (cond - uncond)` on the whole output.

  Args:
    net: `net(x, t_net, y, nfe_index, cache) -> (out, cache, stats)` on a batch of 2B.
    labels: class labels (B,).
    null_label: the null class (1000 for the ImageNet models).
    scale: s (0.4 for ImageNet256, 0.7 for ImageNet512).

  Returns:
    `denoise(x, t_net, nfe_index, cache)`.
  """
  run = _doubled(net, labels, null_label)

  def denoise(x, t_net, nfe_index, cache):
    cond, uncond, cache, stats = run(x, t_net, nfe_index, cache)
    return cond + scale * (cond - uncond), cache, stats

  return denoise


def no_guidance(net: Net, labels: Optional[jnp.ndarray] = None):
  """A denoiser that calls `net` once with `labels` (None for unconditional models)."""
  y = None if labels is None else jnp.asarray(labels, jnp.int32)

  def denoise(x, t_net, nfe_index, cache):
    return net(x, t_net, y, nfe_index, cache)

  return denoise


def make_denoiser(net: Net, labels=None, *, family: str = "dit", null_label: int = 1000,
                  scale: Optional[float] = None):
  """Picks the guidance convention of `family` ('dit' or 'uvit').

  Args:
    net: the bound network.
    labels: class labels (B,) or None.
    family: 'dit' (`uncond + s (cond - uncond)` on 3 channels) or 'uvit'
      (`cond + s (cond - uncond)`).
    null_label: the null class.
    scale: guidance scale in the family's convention; None (or no labels) means one unguided
      pass. Note DiT's scale 1 and U-ViT's scale 0 are unguided in value but still cost 2B.

  Returns:
    A denoiser.
  """
  if labels is None or scale is None:
    return no_guidance(net, labels)
  if family == "dit":
    return dit_cfg(net, labels, null_label, scale)
  if family == "uvit":
    return uvit_cfg(net, labels, null_label, scale)
  raise ValueError(f"unknown family {family!r}")
