"""The DDPM U-Net (Ho et al., 2020) in diffusers' `UNet2DModel` layout, in Flax linen, NHWC.

Reproduces diffusers `models/unets/unet_2d.py` `UNet2DModel` with the blocks the released DDPM
checkpoints use (`google/ddpm-cifar10-32`, `ddpm-church-256`, `ddpm-bedroom-256`):

* time: `Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)` — frequencies
  `exp(-ln(10⁴)·k / (half − freq_shift))`, `[sin, cos]` (or `[cos, sin]` when flipped) — then
  `TimestepEmbedding` linear_1 → SiLU → linear_2 (width 4·block_out_channels[0]);
* `conv_in` 3×3; down blocks `DownBlock2D` / `AttnDownBlock2D` (`layers_per_block` ResnetBlock2D
  [+ attention], each output pushed on the skip stack, then `Downsample2D`: with
  `downsample_padding=0` torch pads (0, 1, 0, 1) and runs a stride-2 3×3 conv with padding 0; its
  output is pushed too); `UNetMidBlock2D` (ResNet, attention, ResNet); up blocks `UpBlock2D` /
  `AttnUpBlock2D` (`layers_per_block + 1` ResNets over `concat[h, skip]`, skips popped LIFO,
  [+ attention], then `Upsample2D`: nearest ×2 and a 3×3 conv); `conv_norm_out` → SiLU →
  `conv_out`;
* `ResnetBlock2D`: GroupNorm → SiLU → conv1 → + time_emb_proj(SiLU(temb)) → GroupNorm → SiLU →
  (dropout: inference, none) → conv2, plus a 1×1 `conv_shortcut` when channels change, divided by
  `output_scale_factor`; `resnet_time_scale_shift='scale_shift'` applies `norm2(h)·(1+s)+b`;
* attention (`Attention` with `AttnProcessor`, `_from_deprecated_attn_block`): GroupNorm →
  to_q/to_k/to_v (Linear) → heads of `attention_head_dim` channels (None: one head of C) →
  softmax in fp32 → to_out.0 → + residual, divided by `rescale_output_factor`.

Fields use the diffusers `config.json` names, with diffusers' `UNet2DModel` defaults (the DDPM
presets in `registry.py` set every field). `t` is the integer timestep of the 1000-step chain.
Param names follow the diffusers modules (`down_blocks_1/resnets_0/conv1`, `.../to_out_0`,
`mid_block/attentions_0`, `up_blocks_0/upsamplers_0/conv`), so `jaxee.convert.unet_rules` maps a
`diffusion_pytorch_model.{bin,safetensors}` by renaming only. The backbone contract view is
`jaxee/models/unet_units.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@functools.lru_cache(maxsize=None)
def timestep_frequencies(half: int, shift: float, max_period: float = 10000.0) -> np.ndarray:
  """diffusers `get_timestep_embedding` frequencies, with torch's fp32 argument arithmetic."""
  args = (np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period)))
  args = args / np.float32(half - shift)
  return np.exp(args.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float) -> jax.Array:
  """diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift=shift)`."""
  half = dim // 2
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(timestep_frequencies(half, shift))
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(groups: int, eps: float, dtype: Dtype, name: Optional[str] = None):
  # torch GroupNorm: contiguous channel groups, biased two-pass variance.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                      name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: Optional[str] = None, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (conv_shortcut 1×1 iff channels change)."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  time_scale_shift: str = "default"
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    c = self.out_channels
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv(c, 3, self.dtype, "conv1")(h)
    scale_shift = self.time_scale_shift == "scale_shift"
    t = nn.Dense(2 * c if scale_shift else c, dtype=self.dtype, name="time_emb_proj")(
        nn.silu(temb))[:, None, None, :]
    if scale_shift:
      s, b = jnp.split(t, 2, axis=-1)
      h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h) * (1 + s) + b
    else:
      h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h + t)
    h = conv(c, 3, self.dtype, "conv2")(nn.silu(h))
    if x.shape[-1] != c:
      x = conv(c, 1, self.dtype, "conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class AttentionBlock(nn.Module):
  """diffusers `Attention` over an NHWC map (GroupNorm, residual, heads of `head_dim`)."""
  groups: Optional[int]
  eps: float
  head_dim: Optional[int] = None
  rescale_output_factor: float = 1.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    d = self.head_dim or c
    heads = c // d
    h = x.reshape(b, hh * ww, c)
    if self.groups is not None:
      h = group_norm(self.groups, self.eps, self.dtype, "group_norm")(h)
    q, k, v = (nn.Dense(heads * d, dtype=self.dtype, name=n)(h).reshape(b, hh * ww, heads, d)
               for n in ("to_q", "to_k", "to_v"))
    w = jnp.einsum("bihd,bjhd->bhij", q, k) * (float(d) ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    o = jnp.einsum("bhij,bjhd->bihd", w, v).reshape(b, hh * ww, heads * d)
    o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o).reshape(b, hh, ww, c)
    return (o + x) / self.rescale_output_factor


class Sampler(nn.Module):
  """`Downsample2D` / `Upsample2D` with `use_conv=True` (param `conv`)."""
  channels: int
  up: bool
  padding: int = 1
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return conv(self.channels, 3, self.dtype, "conv")(x)
    p = self.padding
    pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
    return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class UNetBlock(nn.Module):
  """A down, mid or up block's params: `resnets_j`, `attentions_j`, `{down,up}samplers_0`.

  The forward is written out in `UNet.__call__` (the skip stack crosses blocks).
  """
  where: str                 # 'down' | 'mid' | 'up'
  channels: int
  num_layers: int
  attention: bool
  sampler: bool
  groups: int
  eps: float
  head_dim: Optional[int]
  attn_groups: Optional[int] = None
  scale: float = 1.0
  time_scale_shift: str = "default"
  downsample_padding: int = 1
  dtype: Dtype = None

  def setup(self):
    c = self.channels
    self.resnets = [ResnetBlock2D(c, self.groups, self.eps, self.scale, self.time_scale_shift,
                                  self.dtype) for _ in range(self.num_layers)]
    n_attn = 1 if self.where == "mid" else self.num_layers
    groups = self.attn_groups if self.where == "mid" else self.groups
    self.attentions = [AttentionBlock(groups, self.eps, self.head_dim, self.scale, self.dtype)
                       for _ in range(n_attn if self.attention else 0)]
    if self.sampler and self.where == "down":
      self.downsamplers = [Sampler(c, False, self.downsample_padding, self.dtype)]
    if self.sampler and self.where == "up":
      self.upsamplers = [Sampler(c, True, 1, self.dtype)]


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 → SiLU → linear_2."""
  width: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.width, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.width, dtype=self.dtype, name="linear_2")(nn.silu(x))


def _tuple(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


class UNet(nn.Module):
  """diffusers `UNet2DModel` (DDPM blocks); fields are the `config.json` keys."""
  sample_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  center_input_sample: bool = False
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None
  freq_shift: int = 0
  flip_sin_to_cos: bool = True
  down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                       "AttnDownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2D"
  up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                     "UpBlock2D")
  block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
  layers_per_block: int = 2
  mid_block_scale_factor: float = 1.0
  downsample_padding: int = 1
  downsample_type: str = "conv"
  upsample_type: str = "conv"
  dropout: float = 0.0
  act_fn: str = "silu"
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "default"
  add_attention: bool = True
  class_embed_type: Optional[str] = None
  num_class_embeds: Optional[int] = None
  num_train_timesteps: Optional[int] = None
  default_schedule: str = "linear_discrete"
  dtype: Dtype = None

  family = "unet"
  cfg_convention = "uvit"  # unconditional: no guidance is ever applied
  learn_sigma = False
  num_classes = -1
  null_class = None

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, _tuple(getattr(self, name)))
    if isinstance(self.sample_size, (list, tuple)):
      object.__setattr__(self, "sample_size", int(self.sample_size[0]))
    super().__post_init__()

  def validate(self) -> None:
    """Raises a ValueError naming every unsupported or inconsistent setting."""
    bad = []
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      bad.append(f"{n} block_out_channels but {len(self.down_block_types)} down_block_types and "
                 f"{len(self.up_block_types)} up_block_types")
    bad += [f"down block type {t!r} (supported: {DOWN_TYPES})" for t in self.down_block_types
            if t not in DOWN_TYPES]
    bad += [f"up block type {t!r} (supported: {UP_TYPES})" for t in self.up_block_types
            if t not in UP_TYPES]
    for field, want in (("time_embedding_type", "positional"), ("act_fn", "silu"),
                        ("downsample_type", "conv"), ("upsample_type", "conv"),
                        ("mid_block_type", "UNetMidBlock2D"), ("class_embed_type", None),
                        ("num_class_embeds", None)):
      if getattr(self, field) != want:
        bad.append(f"{field}={getattr(self, field)!r} (only {want!r} is supported)")
    if self.resnet_time_scale_shift not in ("default", "scale_shift"):
      bad.append(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r}")
    if self.norm_num_groups is None or any(c % self.norm_num_groups for c in
                                           self.block_out_channels):
      bad.append(f"norm_num_groups={self.norm_num_groups} must divide block_out_channels "
                 f"{self.block_out_channels}")
    if self.sample_size % (2 ** (n - 1)):
      bad.append(f"sample_size {self.sample_size} is not divisible by 2^{n - 1}")
    if bad:
      raise ValueError("unsupported UNet2DModel config: " + "; ".join(bad))

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def backbone(self, granularity: str = "block"):
    """This model behind the unit contract (`jaxee.models.unet_units.UNetBackbone`)."""
    from jaxee.models import unet_units  # pylint: disable=g-import-not-at-top
    return unet_units.UNetBackbone(self, granularity)

  def _block(self, where, channels, num_layers, attention, sampler, **kw):
    return UNetBlock(where, channels, num_layers, attention, sampler, self.norm_num_groups,
                     self.norm_eps, self.attention_head_dim,
                     time_scale_shift=self.resnet_time_scale_shift,
                     downsample_padding=self.downsample_padding, dtype=self.dtype, **kw)

  def setup(self):
    self.validate()
    boc, n, lpb = self.block_out_channels, len(self.block_out_channels), self.layers_per_block
    self.time_embedding = TimestepEmbedding(self.time_embed_dim, self.dtype)
    self.conv_in = conv(boc[0], 3, self.dtype)
    self.down_blocks = [self._block("down", boc[i], lpb, kind.startswith("Attn"), i < n - 1)
                        for i, kind in enumerate(self.down_block_types)]
    attn_groups = self.attn_norm_num_groups or (
        self.norm_num_groups if self.resnet_time_scale_shift == "default" else None)
    self.mid_block = self._block("mid", boc[-1], 2, self.add_attention, False,
                                 attn_groups=attn_groups, scale=self.mid_block_scale_factor)
    rev = boc[::-1]
    self.up_blocks = [self._block("up", rev[i], lpb + 1, kind.startswith("Attn"), i < n - 1)
                      for i, kind in enumerate(self.up_block_types)]
    self.conv_norm_out = group_norm(self.norm_num_groups, self.norm_eps, self.dtype)
    self.conv_out = conv(self.out_channels, 3, self.dtype)

  # Pieces (used by the forward below and by `unet_units`) --------------------------------------
  def embed(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None):
    """(conv_in(x), temb): the stream's first value (also skip 0) and the time embedding."""
    b, hh, ww, c = x.shape
    s = self.sample_size
    if (hh, ww, c) != (s, s, self.in_channels):
      raise ValueError(f"UNet expects input (B, {s}, {s}, {self.in_channels}) NHWC, got {x.shape}")
    if y is not None:
      raise ValueError("this UNet is unconditional but labels were given")
    if self.center_input_sample:
      x = 2 * x - 1.0
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos,
                             self.freq_shift)
    temb = self.time_embedding(emb.astype(self.dtype or jnp.float32))
    return self.conv_in(x), temb

  def block(self, where: str, i: int = 0) -> UNetBlock:
    return {"down": self.down_blocks, "up": self.up_blocks}[where][i] if where != "mid" else (
        self.mid_block)

  def resnet(self, where: str, i: int, j: int, h, temb, skip=None):
    if skip is not None:
      h = jnp.concatenate([h, skip], axis=-1)
    return self.block(where, i).resnets[j](h, temb)

  def attention(self, where: str, i: int, j: int, h):
    return self.block(where, i).attentions[j](h)

  def sampler(self, where: str, i: int, h):
    blk = self.block(where, i)
    return (blk.downsamplers if where == "down" else blk.upsamplers)[0](h)

  def head(self, h: jax.Array) -> jax.Array:
    return self.conv_out(nn.silu(self.conv_norm_out(h))).astype(jnp.float32)  # any compute dtype

  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None) -> jax.Array:
    h, temb = self.embed(x, t, y)
    skips = [h]
    for blk in self.down_blocks:
      for j, res in enumerate(blk.resnets):
        h = res(h, temb)
        if blk.attention:
          h = blk.attentions[j](h)
        skips.append(h)
      if blk.sampler:
        h = blk.downsamplers[0](h)
        skips.append(h)
    mid = self.mid_block
    h = mid.resnets[0](h, temb)
    if mid.attention:
      h = mid.attentions[0](h)
    h = mid.resnets[1](h, temb)
    for blk in self.up_blocks:
      for j, res in enumerate(blk.resnets):
        h = res(jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if blk.attention:
          h = blk.attentions[j](h)
      if blk.sampler:
        h = blk.upsamplers[0](h)
    return self.head(h)


def config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
  """The `UNet` keyword arguments of a diffusers `config.json` (private `_` keys dropped)."""
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  out = {k: v for k, v in cfg.items() if not k.startswith("_")}
  unknown = sorted(set(out) - fields)
  if unknown:
    raise ValueError(f"config.json has key(s) {unknown} that UNet2DModel (jaxee UNet) does not "
                     f"take")
  return out
