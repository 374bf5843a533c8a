"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023) in Flax.

Reproduces baofff/U-ViT `libs/uvit.py` (`UViT`, `Block`, `Attention`) numerically: tokens
[label?, time, patches] with a learned position embedding, depth//2 in-blocks whose outputs are
pushed on a stack, one mid block, depth//2 out-blocks that pop the stack (LIFO) and first apply
`skip_linear` to `concat[x, skip]` (current stream first), pre-LN attention and MLP (LayerNorm eps
1e-5 with affine, exact-erf GELU, no qkv bias by default), final LN, `decoder_pred`, drop the extra
tokens, unpatchify, optional 3×3 conv. See `shared/research/dit_uvit.md` Part B. Inputs and
outputs are NHWC; `t` is what the original network receives (999·t continuous, 1000·t discrete;
DuoDiff's linear chain: the integer t, divided by 1000 inside when `normalize_timesteps`).

In-/out-block params are stacked under `params['in_blocks']` / `params['out_blocks']`.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxee.models import layers

Dtype = Any
LN_EPS = 1e-5
_trunc02 = nn.initializers.truncated_normal(0.02)


class UViTBlock(nn.Module):
  """U-ViT `Block`: optional skip_linear([x, skip]), then x + attn(norm1 x), x + mlp(norm2 x)."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  skip: bool = False
  dtype: Dtype = None
  attn_impl: str = "auto"

  def setup(self):
    self.norm1 = layers.layer_norm(LN_EPS, affine=True, dtype=self.dtype)
    self.attn = layers.Attention(self.dim, self.num_heads, self.qkv_bias, dtype=self.dtype,
                                 impl=self.attn_impl)
    self.norm2 = layers.layer_norm(LN_EPS, affine=True, dtype=self.dtype)
    self.mlp = layers.Mlp(int(self.dim * self.mlp_ratio), self.dim, approximate_gelu=False,
                          dtype=self.dtype)
    if self.skip:
      self.skip_linear = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_trunc02)

  def merge_skip(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    """The out-block's long-skip fusion `skip_linear(concat[x, skip])` (current stream first).

    The result keeps the stream's dtype: with a low-precision compute `dtype` the layers run in
    it while the residual stream stays float32 (as in the other residual additions)."""
    return self.skip_linear(jnp.concatenate([x, skip], axis=-1)).astype(x.dtype)

  def attn_branch(self, x: jax.Array) -> jax.Array:
    return self.attn(self.norm1(x))

  def mlp_branch(self, x: jax.Array) -> jax.Array:
    return self.mlp(self.norm2(x))

  def body(self, x: jax.Array) -> jax.Array:
    """The block after the skip fusion: the two pre-LN residual branches."""
    x = x + self.attn_branch(x)
    return x + self.mlp_branch(x)

  def __call__(self, x: jax.Array, skip: Optional[jax.Array] = None) -> jax.Array:
    if self.skip:
      x = self.merge_skip(x, skip)
    return self.body(x)


class UViT(nn.Module):
  """U-ViT backbone with the official constructor's keyword surface (`dit_uvit.md` B1–B3)."""
  img_size: int = 32
  patch_size: int = 2
  in_chans: int = 3
  embed_dim: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  mlp_time_embed: bool = False
  num_classes: int = -1
  conv: bool = True
  default_schedule: str = "vp_continuous"
  # DuoDiff's `normalize_timesteps` (its CIFAR-10/CelebA configs): the forward divides the time it
  # is given by 1000 (`timesteps.float() / 1000`) before the sinusoid, so the chain's integer
  # t in {0..999} reaches the embedding as t/1000. False: t as given (every other setting).
  normalize_timesteps: bool = False
  cfg_null_class: Optional[int] = None  # set by presets whose label table has a null row
  dtype: Dtype = None  # compute dtype (None: the params' float32); params stay float32
  attn_impl: str = "auto"
  remat: bool = False  # rematerialise each block in the backward pass (`layers.block_fn`)

  family = "uvit"
  learn_sigma = False

  @property
  def out_channels(self) -> int:
    return self.in_chans

  @property
  def null_class(self) -> Optional[int]:
    """The CFG null label (`dataset.K` = num_classes − 1 for the 1001-row ImageNet tables)."""
    return self.cfg_null_class

  @property
  def extras(self) -> int:
    return 2 if self.num_classes > 0 else 1

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def num_in_blocks(self) -> int:
    return self.depth // 2

  def backbone(self, granularity: str = "block"):
    """This model behind the unit contract (`jaxee.models.backbone`, `uvit_units.UViTBackbone`)."""
    from jaxee.models import uvit_units  # pylint: disable=g-import-not-at-top
    return uvit_units.UViTBackbone(self, granularity)

  def block_module(self, skip: bool) -> UViTBlock:
    """An unbound block: `block_module(skip).apply({'params': p_i}, x[, skip])`."""
    return UViTBlock(self.embed_dim, self.num_heads, self.mlp_ratio, self.qkv_bias, skip,
                     self.dtype, self.attn_impl, parent=None)

  def setup(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
    d = self.embed_dim
    self.patch_embed = layers.PatchEmbed(d, self.patch_size, dtype=self.dtype)
    if self.mlp_time_embed:
      self.time_embed_0 = nn.Dense(4 * d, dtype=self.dtype, kernel_init=_trunc02)
      self.time_embed_2 = nn.Dense(d, dtype=self.dtype, kernel_init=_trunc02)
    if self.num_classes > 0:
      self.label_emb = nn.Embed(self.num_classes, d, embedding_init=nn.initializers.normal(1.0))
    self.pos_embed = self.param("pos_embed", _trunc02, (1, self.extras + self.num_patches, d))
    n = self.extras + self.num_patches
    tokens = jnp.zeros((1, n, d), jnp.float32)
    self.in_blocks = layers.stacked_block_params(
        self, "in_blocks", self.block_module(False), self.num_in_blocks, tokens)
    self.mid_block = (nn.remat(UViTBlock) if self.remat else UViTBlock)(d, self.num_heads, self.mlp_ratio, self.qkv_bias, False, self.dtype,
                               self.attn_impl)
    self.out_blocks = layers.stacked_block_params(
        self, "out_blocks", self.block_module(True), self.num_in_blocks, tokens, tokens)
    self.norm = layers.layer_norm(LN_EPS, affine=True, dtype=self.dtype)
    self.decoder_pred = nn.Dense(self.patch_size ** 2 * self.in_chans, dtype=self.dtype,
                                 kernel_init=_trunc02)
    if self.conv:
      self.final_layer = nn.Conv(self.in_chans, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)

  def embed(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None) -> jax.Array:
    """Tokens [label?, time, patches] + position embedding, (B, extras + L, D)."""
    b, h, w, c = x.shape
    if (h, w, c) != (self.img_size, self.img_size, self.in_chans):
      raise ValueError(f"U-ViT expects input (B, {self.img_size}, {self.img_size}, "
                       f"{self.in_chans}) NHWC, got {x.shape}")
    patches = self.patch_embed(x)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    if self.normalize_timesteps:
      t = t.astype(jnp.float32) / 1000.0
    time_token = layers.timestep_embedding(t, self.embed_dim).astype(patches.dtype)
    if self.mlp_time_embed:
      time_token = self.time_embed_2(nn.silu(self.time_embed_0(time_token)))
    parts = [time_token[:, None, :], patches]
    if self.num_classes > 0:
      if y is None:
        if self.null_class is None:
          raise ValueError("this U-ViT is class-conditional without a null class: labels required")
        y = jnp.full((b,), self.null_class, jnp.int32)
      parts.insert(0, self.label_emb(jnp.asarray(y))[:, None, :])
    elif y is not None:
      raise ValueError("this U-ViT is unconditional (num_classes <= 0) but labels were given")
    return jnp.concatenate(parts, axis=1) + self.pos_embed

  def mid(self, tokens: jax.Array) -> jax.Array:
    return self.mid_block(tokens)

  def head(self, tokens: jax.Array) -> jax.Array:
    """Final LN → decoder_pred → drop extras → unpatchify → optional conv; (B, H, W, C)."""
    out = self.decoder_pred(self.norm(tokens))[:, self.extras:]
    out = layers.unpatchify(out, self.patch_size, self.in_chans)
    out = self.final_layer(out) if self.conv else out
    return out.astype(jnp.float32)  # float32 predictions whatever the compute dtype

  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None) -> jax.Array:
    tokens = self.embed(x, t, y)
    in_block = layers.block_fn(self.block_module(False), remat=self.remat)

    def push(h, p):
      h = in_block(p, h)
      return h, h

    tokens, skips = jax.lax.scan(push, tokens, self.in_blocks)
    tokens = self.mid(tokens)
    out_block = layers.block_fn(self.block_module(True), remat=self.remat)

    def pop(h, p_and_skip):
      p, skip = p_and_skip
      return out_block(p, h, skip), None

    # out_blocks[i] consumes the output of in_blocks[n-1-i] (LIFO stack).
    tokens = jax.lax.scan(pop, tokens, (self.out_blocks, skips[::-1]))[0]
    return self.head(tokens)
