"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023) in Flax.

Reproduces facebookresearch/DiT `models.py` (`DiT`, `DiTBlock`, `FinalLayer`, `TimestepEmbedder`,
`LabelEmbedder`) for all 12 configs, numerically: adaLN-Zero blocks with the modulation chunk
order (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), LayerNorm eps 1e-6 without
affine, tanh GELU, fused qkv with bias, MAE sin-cos position embedding (a constant), label table
with the null class `num_classes` for classifier-free guidance. See `shared/research/dit_uvit.md`
Part A. Inputs and outputs are NHWC; `t` is what the original network receives (the original
1000-step chain index, possibly fractional).

Block params are stacked under `params['blocks']` with a leading depth axis, so any subset of
blocks can be run by the exit runners (`jaxee/exits/`).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxee.models import layers

Dtype = Any

# name: (depth, hidden_size, patch_size, num_heads) — DiT `DiT_models`.
DIT_CONFIGS = {
    "dit_xl_2": (28, 1152, 2, 16), "dit_xl_4": (28, 1152, 4, 16), "dit_xl_8": (28, 1152, 8, 16),
    "dit_l_2": (24, 1024, 2, 16), "dit_l_4": (24, 1024, 4, 16), "dit_l_8": (24, 1024, 8, 16),
    "dit_b_2": (12, 768, 2, 12), "dit_b_4": (12, 768, 4, 12), "dit_b_8": (12, 768, 8, 12),
    "dit_s_2": (12, 384, 2, 6), "dit_s_4": (12, 384, 4, 6), "dit_s_8": (12, 384, 8, 6),
}

FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size
LN_EPS = 1e-6


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block (DiT `DiTBlock`).

  Besides `__call__`, exposes the two residual branches *before* their gates
  (`attn_branch`, `mlp_branch`) and the six modulation vectors, which Learning-to-Cache style
  runners cache and reuse.
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = None
  attn_impl: str = "auto"

  def setup(self):
    d = self.hidden_size
    self.norm1 = layers.layer_norm(LN_EPS, affine=False, dtype=self.dtype)
    self.attn = layers.Attention(d, self.num_heads, qkv_bias=True, dtype=self.dtype,
                                 impl=self.attn_impl)
    self.norm2 = layers.layer_norm(LN_EPS, affine=False, dtype=self.dtype)
    self.mlp = layers.Mlp(int(d * self.mlp_ratio), d, approximate_gelu=True, dtype=self.dtype)
    self.adaLN_modulation = nn.Dense(6 * d, dtype=self.dtype, kernel_init=nn.initializers.zeros)

  def modulation(self, c: jax.Array) -> tuple[jax.Array, ...]:
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D)."""
    return tuple(jnp.split(self.adaLN_modulation(nn.silu(c)), 6, axis=-1))

  def modulated_input(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """modulate(norm1(x), shift_msa, scale_msa): the attention branch's input (TeaCache's
    "timestep-modulated input", read from the first block)."""
    mod = self.modulation(c)
    return layers.modulate(self.norm1(x), mod[0], mod[1])

  def attn_branch(self, x: jax.Array, mod: tuple[jax.Array, ...]) -> jax.Array:
    return self.attn(layers.modulate(self.norm1(x), mod[0], mod[1]))

  def mlp_branch(self, x: jax.Array, mod: tuple[jax.Array, ...]) -> jax.Array:
    return self.mlp(layers.modulate(self.norm2(x), mod[3], mod[4]))

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = self.modulation(c)
    x = x + mod[2][:, None, :] * self.attn_branch(x, mod)
    return x + mod[5][:, None, :] * self.mlp_branch(x, mod)


class TimestepEmbedder(nn.Module):
  """DiT `TimestepEmbedder`: 256-d sinusoid → Linear → SiLU → Linear (`mlp.0`, `mlp.2`)."""
  hidden_size: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = nn.Dense(self.hidden_size, dtype=self.dtype, name="mlp_0",
                 kernel_init=nn.initializers.normal(0.02))(layers.timestep_embedding(t, FREQ_DIM))
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="mlp_2",
                    kernel_init=nn.initializers.normal(0.02))(nn.silu(h))


class LabelEmbedder(nn.Module):
  """DiT `LabelEmbedder` at eval time (label dropout is done by the training step, with its key)."""
  num_rows: int
  hidden_size: int

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    return nn.Embed(self.num_rows, self.hidden_size, name="embedding_table",
                    embedding_init=nn.initializers.normal(0.02))(y)


class FinalLayer(nn.Module):
  """DiT `FinalLayer`: adaLN (shift, scale — shift first), LN without affine, Linear."""
  hidden_size: int
  out_dim: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = nn.Dense(2 * self.hidden_size, dtype=self.dtype, name="adaLN_modulation",
                   kernel_init=nn.initializers.zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = layers.modulate(layers.layer_norm(LN_EPS, affine=False, dtype=self.dtype)(x), shift, scale)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="linear",
                    kernel_init=nn.initializers.zeros)(x)


class DiT(nn.Module):
  """DiT backbone with the original constructor's keyword surface (`dit_uvit.md` A1–A5)."""
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  dtype: Dtype = None  # compute dtype (None: the params' float32); params stay float32
  attn_impl: str = "auto"
  remat: bool = False  # rematerialise each block in the backward pass (`layers.block_fn`)

  family = "dit"
  default_schedule = "linear_discrete"

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def null_class(self) -> Optional[int]:
    """The label that selects the unconditional embedding (exists iff class dropout > 0)."""
    return self.num_classes if self.class_dropout_prob > 0 else None

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  def backbone(self, granularity: str = "block"):
    """This model behind the unit contract (`jaxee.models.backbone`, `dit_units.DiTBackbone`)."""
    from jaxee.models import dit_units  # pylint: disable=g-import-not-at-top
    return dit_units.DiTBackbone(self, granularity)

  def block_module(self) -> DiTBlock:
    """An unbound block module: `block_module().apply({'params': p_i}, tokens, c)`."""
    return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype,
                    self.attn_impl, parent=None)

  def setup(self):
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} is not divisible by patch_size "
                       f"{self.patch_size}")
    d = self.hidden_size
    self.x_embedder = layers.PatchEmbed(d, self.patch_size, dtype=self.dtype)
    self.t_embedder = TimestepEmbedder(d, dtype=self.dtype)
    self.y_embedder = LabelEmbedder(self.num_classes + int(self.class_dropout_prob > 0), d)
    example = (jnp.zeros((1, self.num_tokens, d), jnp.float32), jnp.zeros((1, d), jnp.float32))
    self.blocks = layers.stacked_block_params(self, "blocks", self.block_module(), self.depth,
                                              *example)
    self.final_layer = FinalLayer(d, self.patch_size ** 2 * self.out_channels, dtype=self.dtype)

  def pos_embed(self) -> jax.Array:
    grid = self.input_size // self.patch_size
    return jnp.asarray(layers.sincos_pos_embed_2d(self.hidden_size, grid))[None]

  def embed(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Patch tokens + position embedding, and the conditioning c = t_emb + y_emb."""
    b, h, w, ch = x.shape
    if (h, w, ch) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f"DiT expects input (B, {self.input_size}, {self.input_size}, "
                       f"{self.in_channels}) NHWC, got {x.shape}")
    tokens = self.x_embedder(x) + self.pos_embed()
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    t_emb = self.t_embedder(t)
    if y is None:
      if self.null_class is None:
        raise ValueError("this DiT has no null class (class_dropout_prob=0): labels are required")
      y = jnp.full((b,), self.null_class, jnp.int32)
    return tokens, t_emb + self.y_embedder(jnp.asarray(y))

  def head(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    """FinalLayer (shift first) + unpatchify → (B, H, W, out_channels)."""
    out = self.final_layer(tokens, c).astype(jnp.float32)  # whatever the compute dtype
    return layers.unpatchify(out, self.patch_size, self.out_channels)

  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None) -> jax.Array:
    tokens, c = self.embed(x, t, y)
    tokens = layers.scan_blocks(self.block_module(), self.blocks, tokens, c, remat=self.remat)
    return self.head(tokens, c)
