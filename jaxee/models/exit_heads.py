"""Exit heads g_i for early-exit methods, shaped like each backbone's own head.

Reproduces `razvanmatisan/duodiff` `models/early_exit.py` `OutputHead` (`research/ee_methods.md`
§2.2–2.3) for U-ViT, and a `FinalLayer`-shaped head for DiT (no public DeeDiff head exists for
DiT; this mirrors the backbone's own head so an exit sees the same conditioning c):

* `UViTExitHead`: LayerNorm(D, eps 1e-5, affine) → Linear(D→p²·C) → drop the `extras` tokens →
  unpatchify → Conv2d(C→C, 3×3, pad 1).
* `DiTExitHead`: adaLN (SiLU → Linear(D→2D), shift then scale), LayerNorm without affine (eps
  1e-6), Linear(D→p²·C_out) → unpatchify.

PyTorch's default `nn.Linear`/`nn.Conv2d` init (kaiming-uniform(a=√5): U(±1/√fan_in) for weights
and biases), because the original creates the heads after the backbone's `_init_weights`. The
backbones hand these out through the contract (`Backbone.exit_head_module`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxee.models import layers


def _torch_uniform(fan_in: int):
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in),
                  name=name)


class UViTExitHead(nn.Module):
  """Exit head g_i of the U-ViT re-implementation (`OutputHead`)."""
  dim: int
  patch_size: int
  channels: int
  extras: int

  @nn.compact
  def __call__(self, tokens: jax.Array, ctx: Any = None) -> jax.Array:
    del ctx
    h = layers.layer_norm(1e-5, affine=True, name="norm")(tokens)
    h = _dense(self.patch_size ** 2 * self.channels, self.dim, "linear")(h)[:, self.extras:]
    img = layers.unpatchify(h, self.patch_size, self.channels)
    fan_in = 9 * self.channels
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv",
                   kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))(img)


class DiTExitHead(nn.Module):
  """Exit head for DiT, shaped like the backbone's `FinalLayer`."""
  dim: int
  patch_size: int
  channels: int

  @nn.compact
  def __call__(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    mod = _dense(2 * self.dim, self.dim, "adaLN_modulation")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = layers.modulate(layers.layer_norm(1e-6, affine=False)(tokens), shift, scale)
    h = _dense(self.patch_size ** 2 * self.channels, self.dim, "linear")(h)
    return layers.unpatchify(h, self.patch_size, self.channels)
