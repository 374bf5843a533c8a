"""Stable-Diffusion KL-f8 autoencoder (`AutoencoderKL`) in Flax linen, NHWC.

Reproduces the CompVis latent-diffusion first-stage model
(`ldm/modules/diffusionmodules/model.py` `Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`,
`Downsample`, `Upsample` and `ldm/models/autoencoder.py` `AutoencoderKL`) as used by
baofff/U-ViT `libs/autoencoder.py` (`FrozenAutoencoderKL`), which is numerically the same network
as diffusers `AutoencoderKL` (used by DiT with `stabilityai/sd-vae-ft-{ema,mse}`). Facts from
`shared/research/dit_uvit.md` (B7, A7 and Part C item 17).

Parameter names follow the CompVis layout (`down_{i}_block_{j}`, `mid_attn_1`, `up_{i}_upsample`,
...); `jaxee.convert.vae_rules` maps both the CompVis and the diffusers state dicts onto it. The
decoder's `up_{i}` index is the CompVis level index (0 = full resolution), i.e. diffusers
`up_blocks.{L-1-i}`.

Latent scaling conventions:
- `encode_moments(x)` returns the `quant_conv` output: mean then logvar (2·embed_dim channels).
- `sample_latent(moments, rng)` draws `mean + exp(logvar/2)·ε` (logvar clamped to [-30, 20]) and
  multiplies by `scale_factor`, like U-ViT `FrozenAutoencoderKL.encode`.
- `decode(z_scaled)` divides by `scale_factor` first (U-ViT `FrozenAutoencoderKL.decode`).
- `decode_unscaled(z)` does not (diffusers `AutoencoderKL.decode(z).sample`; DiT divides by
  0.18215 itself before calling it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """CompVis `ddconfig` plus `embed_dim` and the latent scale factor.

  Attributes:
    ch: base channel count.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResnetBlocks per encoder level (the decoder has one more).
    z_channels: latent channels produced by the encoder (before `quant_conv`).
    in_channels: image channels in.
    out_ch: image channels out.
    embed_dim: latent channels after `quant_conv` (moments have 2·embed_dim).
    resolution: nominal image resolution; only used to place `attn_resolutions`.
    attn_resolutions: resolutions at which levels get attention blocks (SD: none).
    double_z: whether the encoder outputs 2·z_channels (mean and logvar).
    scale_factor: latent scale factor (SD: 0.18215).
    norm_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  in_channels: int = 3
  out_ch: int = 3
  embed_dim: int = 4
  resolution: int = 256
  attn_resolutions: tuple[int, ...] = ()
  double_z: bool = True
  scale_factor: float = 0.18215
  norm_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


def sd_kl_f8(scale_factor: float = 0.18215) -> VAEConfig:
  """The Stable-Diffusion KL-f8 VAE (U-ViT `autoencoder_kl.pth`, `sd-vae-ft-{ema,mse}`)."""
  return VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                   resolution=256, attn_resolutions=(), scale_factor=scale_factor)


def compvis_tiny() -> VAEConfig:
  """The `vae_compvis_tiny` fixture configuration (ch 32, ch_mult (1, 2), 1 res block)."""
  return VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                   resolution=16, attn_resolutions=())


def diffusers_tiny() -> VAEConfig:
  """The `vae_diffusers_tiny` fixture (block_out_channels (32, 64), layers_per_block 1)."""
  return config_from_diffusers({
      "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
      "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 16})


def config_from_diffusers(cfg: dict, scale_factor: Optional[float] = None) -> VAEConfig:
  """Converts a diffusers `AutoencoderKL` config dict into a `VAEConfig`.

  Args:
    cfg: the diffusers config (`config.json`); only DownEncoderBlock2D / UpDecoderBlock2D
      (attention-free levels) are supported, as in every SD VAE.
    scale_factor: overrides the config's `scaling_factor` (default 0.18215).

  Returns:
    The equivalent `VAEConfig`.
  """
  boc = tuple(int(c) for c in cfg["block_out_channels"])
  for t in list(cfg.get("down_block_types", [])) + list(cfg.get("up_block_types", [])):
    if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
      raise ValueError(f"unsupported diffusers block type {t!r}")
  ch = boc[0]
  if any(c % ch for c in boc):
    raise ValueError(f"block_out_channels {boc} are not multiples of {ch}")
  if scale_factor is None:
    scale_factor = float(cfg.get("scaling_factor", 0.18215))
  latent = int(cfg.get("latent_channels", 4))
  sample_size = cfg.get("sample_size", 256)
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  return VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in boc),
                   num_res_blocks=int(cfg.get("layers_per_block", 1)), z_channels=latent,
                   in_channels=int(cfg.get("in_channels", 3)),
                   out_ch=int(cfg.get("out_channels", 3)), embed_dim=latent,
                   resolution=int(sample_size), attn_resolutions=(),
                   scale_factor=scale_factor, norm_groups=int(cfg.get("norm_num_groups", 32)))


def _norm(cfg: VAEConfig, dtype: Dtype, name: str) -> nn.GroupNorm:
  # torch GroupNorm: contiguous channel groups, biased two-pass variance.
  return nn.GroupNorm(num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, use_fast_variance=False,
                      dtype=dtype, name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """CompVis `ResnetBlock` without time embedding (dropout 0)."""
  cfg: VAEConfig
  out_channels: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(_norm(self.cfg, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.swish(_norm(self.cfg, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """CompVis `AttnBlock`: single-head spatial self-attention, 1×1 q/k/v/proj_out, residual."""
  cfg: VAEConfig
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = _norm(self.cfg, self.dtype, "norm")(x)
    q = nn.Dense(c, dtype=self.dtype, name="q")(h).reshape(b, hh * ww, c)
    k = nn.Dense(c, dtype=self.dtype, name="k")(h).reshape(b, hh * ww, c)
    v = nn.Dense(c, dtype=self.dtype, name="v")(h).reshape(b, hh * ww, c)
    w = jnp.einsum("bic,bjc->bij", q, k) * (float(c) ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h)
    return x + h


class Encoder(nn.Module):
  """CompVis `Encoder`: image (B, H, W, in_channels) → (B, H/f, W/f, 2·z_channels)."""
  cfg: VAEConfig
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    h = _conv(cfg.ch, 3, self.dtype, "conv_in")(x)
    curr_res = cfg.resolution
    for i in range(cfg.num_levels):
      block_out = cfg.ch * cfg.ch_mult[i]
      for j in range(cfg.num_res_blocks):
        h = ResnetBlock(cfg, block_out, self.dtype, name=f"down_{i}_block_{j}")(h)
        if curr_res in cfg.attn_resolutions:
          h = AttnBlock(cfg, self.dtype, name=f"down_{i}_attn_{j}")(h)
      if i != cfg.num_levels - 1:
        # torch.nn.functional.pad(x, (0, 1, 0, 1)) then a VALID stride-2 3×3 conv.
        h = _conv(block_out, 3, self.dtype, f"down_{i}_downsample", stride=2,
                  padding=((0, 1), (0, 1)))(h)
        curr_res //= 2
    block_in = h.shape[-1]
    h = ResnetBlock(cfg, block_in, self.dtype, name="mid_block_1")(h)
    h = AttnBlock(cfg, self.dtype, name="mid_attn_1")(h)
    h = ResnetBlock(cfg, block_in, self.dtype, name="mid_block_2")(h)
    h = nn.swish(_norm(cfg, self.dtype, "norm_out")(h))
    out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    return _conv(out, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """CompVis `Decoder`: latent (B, h, w, z_channels) → image (B, h·f, w·f, out_ch)."""
  cfg: VAEConfig
  dtype: Dtype = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.cfg
    block_in = cfg.ch * cfg.ch_mult[-1]
    curr_res = cfg.resolution // cfg.downsample_factor
    h = _conv(block_in, 3, self.dtype, "conv_in")(z)
    h = ResnetBlock(cfg, block_in, self.dtype, name="mid_block_1")(h)
    h = AttnBlock(cfg, self.dtype, name="mid_attn_1")(h)
    h = ResnetBlock(cfg, block_in, self.dtype, name="mid_block_2")(h)
    for i in reversed(range(cfg.num_levels)):
      block_out = cfg.ch * cfg.ch_mult[i]
      for j in range(cfg.num_res_blocks + 1):
        h = ResnetBlock(cfg, block_out, self.dtype, name=f"up_{i}_block_{j}")(h)
        if curr_res in cfg.attn_resolutions:
          h = AttnBlock(cfg, self.dtype, name=f"up_{i}_attn_{j}")(h)
      if i != 0:
        # Nearest-neighbour 2× upsampling, then a 3×3 conv.
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv(block_out, 3, self.dtype, f"up_{i}_upsample")(h)
        curr_res *= 2
    h = nn.swish(_norm(cfg, self.dtype, "norm_out")(h))
    return _conv(cfg.out_ch, 3, self.dtype, "conv_out")(h)


def sample_from_moments(moments: jax.Array, rng: jax.Array,
                        scale_factor: float = 0.18215) -> jax.Array:
  """Draws a scaled latent from `quant_conv` moments (U-ViT `FrozenAutoencoderKL.sample`).

  Args:
    moments: (..., 2·C) mean then logvar, channels last.
    rng: PRNG key for the Gaussian noise.
    scale_factor: multiplies the sample.

  Returns:
    `scale_factor · (mean + exp(0.5·clip(logvar, -30, 20)) · ε)`, shape (..., C).
  """
  mean, logvar = jnp.split(moments, 2, axis=-1)
  logvar = jnp.clip(logvar, -30.0, 20.0)
  std = jnp.exp(0.5 * logvar)
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return (mean + std * noise) * scale_factor


class AutoencoderKL(nn.Module):
  """KL-regularised autoencoder (`encoder`, `quant_conv`, `post_quant_conv`, `decoder`).

  Attributes:
    config: the `VAEConfig`.
    dtype: computation dtype (params stay float32); None means float32.
  """
  config: VAEConfig
  dtype: Dtype = None

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    self.quant_conv = nn.Conv(2 * cfg.embed_dim, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1), dtype=self.dtype)

  def encode_moments(self, x: jax.Array) -> jax.Array:
    """Image (B, H, W, in_channels) in [-1, 1] → moments (B, H/f, W/f, 2·embed_dim).

    Args:
      x: NHWC images.

    Returns:
      `quant_conv(encoder(x))`: mean in the first embed_dim channels, logvar (unclamped) in
      the rest.
    """
    return self.quant_conv(self.encoder(x))

  def decode_unscaled(self, z: jax.Array) -> jax.Array:
    """Decodes an unscaled latent, like diffusers `AutoencoderKL.decode(z).sample`.

    Args:
      z: (B, h, w, embed_dim) latent in the VAE's own scale.

    Returns:
      (B, h·f, w·f, out_ch) images (nominally in [-1, 1], not clamped).
    """
    return self.decoder(self.post_quant_conv(z))

  def decode(self, z_scaled: jax.Array) -> jax.Array:
    """Decodes a diffusion-scale latent, like U-ViT `FrozenAutoencoderKL.decode`.

    Args:
      z_scaled: (B, h, w, embed_dim) latent multiplied by `scale_factor` (what the diffusion
        model produces).

    Returns:
      `decode_unscaled(z_scaled / scale_factor)`.
    """
    return self.decode_unscaled(z_scaled / self.config.scale_factor)

  def sample_latent(self, moments: jax.Array, rng: jax.Array) -> jax.Array:
    """Scaled latent sample from moments; see `sample_from_moments`."""
    return sample_from_moments(moments, rng, self.config.scale_factor)

  def encode(self, x: jax.Array, rng: jax.Array) -> jax.Array:
    """U-ViT `FrozenAutoencoderKL.encode`: a scaled latent sample for images x."""
    return self.sample_latent(self.encode_moments(x), rng)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """Reconstruction: decodes the posterior mean (or a sample when `rng` is given)."""
    moments = self.encode_moments(x)
    if rng is None:
      z = jnp.split(moments, 2, axis=-1)[0]
    else:
      z = sample_from_moments(moments, rng, 1.0)
    return self.decode_unscaled(z)


def init_params(config: VAEConfig, rng: Optional[jax.Array] = None,
                image_size: Optional[int] = None) -> Any:
  """Randomly initialised params for `AutoencoderKL(config)` (the inner `params` tree)."""
  if rng is None:
    rng = jax.random.PRNGKey(0)
  size = image_size or config.downsample_factor * 2
  x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  return AutoencoderKL(config).init(rng, x)["params"]


def param_shapes(config: VAEConfig) -> Any:
  """Param shapes (`jax.ShapeDtypeStruct` tree) without allocating anything."""
  size = config.downsample_factor * 2
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return jax.eval_shape(
      lambda r, xx: AutoencoderKL(config).init(r, xx), jax.random.PRNGKey(0), x)["params"]


__all__: Sequence[str] = (
    "VAEConfig", "AutoencoderKL", "Encoder", "Decoder", "ResnetBlock", "AttnBlock",
    "sd_kl_f8", "compvis_tiny", "diffusers_tiny", "config_from_diffusers",
    "sample_from_moments", "init_params", "param_shapes")
