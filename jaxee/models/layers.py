"""Layers shared by the DiT and U-ViT backbones.

Reproduces, numerically, the building blocks of facebookresearch/DiT `models.py` (timm
`Attention`, `Mlp`, `PatchEmbed`, `TimestepEmbedder`, adaLN `modulate`, MAE 2-D sin-cos position
embedding) and baofff/U-ViT `libs/uvit.py` (`timestep_embedding`, `Attention`, `Mlp`). All facts come
from `shared/research/dit_uvit.md` (sections A3, A4, B3 and Part C).
"""
from __future__ import annotations

import functools
import importlib.resources
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@functools.lru_cache(maxsize=None)
def _torch_frequency_tables() -> dict[int, np.ndarray]:
  """Frequency tables exported once from torch 2.14 (CPU, fp32) for common widths."""
  path = importlib.resources.files("jaxee.models") / "assets" / "timestep_freqs.npz"
  with path.open("rb") as f, np.load(f) as data:
    return {int(k.split("_")[1]): data[k].astype(np.float32) for k in data.files}


@functools.lru_cache(maxsize=None)
def timestep_frequencies(half: int, max_period: float = 10000.0) -> np.ndarray:
  """Returns `exp(-ln(max_period) * k / half)` for k < half, as torch computes it in fp32 on CPU.

  The originals compute this table with torch on the CPU in float32 (`dit_uvit.md` C-2): a 1-ulp
  difference in a frequency moves `t * freq` by up to 6e-5 at t = 999, which alone causes ~5e-5
  output error. For the widths used by the released models (and the fixtures) we ship the table
  exported from torch; for other widths we reproduce torch's fp32 argument arithmetic and round a
  correctly-rounded exp, which differs from torch's vectorised exp in at most a few entries by 1 ulp.
  """
  if max_period == 10000.0:
    tables = _torch_frequency_tables()
    if half in tables:
      return tables[half]
  args = (np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period))) / np.float32(half)
  return np.exp(args.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding `[cos(t·f), sin(t·f)]` (cos first), float32.

  Reproduces DiT `TimestepEmbedder.timestep_embedding` and U-ViT `timestep_embedding`: t is cast
  to float32, multiplied by the fp32 frequency table, cos then sin; odd `dim` gets a zero column.
  """
  half = dim // 2
  freqs = jnp.asarray(timestep_frequencies(half, max_period))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """MAE 2-D sin-cos position embedding, (grid_size², embed_dim) float32.

  Computed in float64 and rounded once, as DiT `get_2d_sincos_pos_embed` does. Channel layout for
  token n = i·G + j (row i, column j), Q = D/4, ω_k = 10000^(−k/Q): [sin(jω), cos(jω), sin(iω),
  cos(iω)] — the column half comes first (`dit_uvit.md` A4.2).
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
  quarter = embed_dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64), indexing="ij")
  col_args = cols.reshape(-1)[:, None] * omega[None]
  row_args = rows.reshape(-1)[:, None] * omega[None]
  table = np.concatenate([np.sin(col_args), np.cos(col_args), np.sin(row_args), np.cos(row_args)],
                         axis=1)
  return table.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation `x·(1 + scale) + shift`, with (B, D) vectors broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(eps: float, affine: bool, dtype: Dtype = None, name: Optional[str] = None):
  """A PyTorch-equivalent LayerNorm (centred variance, given eps, optional affine)."""
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False,
                      dtype=dtype, name=name)


ATTN_IMPLS = ("auto", "xla", "fused")


def resolve_attn_impl(impl: str, dtype) -> str:
  """The attention path a layer takes: 'xla' (explicit einsums, exact in fp32) or 'fused'
  (`jax.nn.dot_product_attention`, which XLA lowers to cuDNN flash attention on GPUs for bf16 /
  fp16 operands).

  'auto' (the default) is 'fused' on a GPU backend with bf16/fp16 operands and 'xla' everywhere
  else — so fp32 and every CPU run keep the exact path the parity fixtures check.
  """
  if impl not in ATTN_IMPLS:
    raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "fused" if low and jax.default_backend() == "gpu" else "xla"


class Attention(nn.Module):
  """Multi-head self-attention with one fused `qkv` projection (timm / U-ViT `Attention`).

  The 3D output rows of `qkv` are [q | k | v], each head-major with head_dim fastest; scores are
  scaled by head_dim^-0.5 and softmaxed over keys; heads are merged back as (H, Dh) then `proj`.
  """
  dim: int
  num_heads: int
  qkv_bias: bool
  dtype: Dtype = None
  impl: str = "auto"  # `ATTN_IMPLS`; see `resolve_attn_impl`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    head_dim = self.dim // self.num_heads
    qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
    if resolve_attn_impl(self.impl, q.dtype) == "fused":
      out = jax.nn.dot_product_attention(q, k, v)
    else:
      # Head-major (B, H, N, Dh) operands: the same products and sums as the (B, N, H, Dh)
      # einsums (equal to float rounding; the parity fixtures hold), but XLA's CPU dot runs plain batched
      # matmuls instead of strided ones — 5.6× faster attention at DiT-S/2, batch 16.
      qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q * (head_dim ** -0.5), k, v))
      scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh)
      weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh).transpose(0, 2, 1, 3)
    out = out.reshape(b, n, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """timm `Mlp`: fc1 → GELU → fc2 (DiT: tanh GELU; U-ViT: exact erf GELU)."""
  hidden: int
  out: int
  approximate_gelu: bool
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    return nn.Dense(self.out, dtype=self.dtype, name="fc2")(x)


class PatchEmbed(nn.Module):
  """timm `PatchEmbed`: a VALID conv with kernel = stride = patch, tokens in row-major order."""
  dim: int
  patch_size: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="proj")(x)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d)


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, G·G, p·p·C) tokens → (B, G·p, G·p, C) NHWC; last dim laid out (p_row, p_col, c)."""
  b, n, _ = x.shape
  g = int(round(math.sqrt(n)))
  if g * g != n:
    raise ValueError(f"unpatchify needs a square token grid, got {n} tokens")
  x = x.reshape(b, g, g, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch_size, g * patch_size, channels)



def stacked_block_params(module: nn.Module, name: str, block: nn.Module, depth: int,
                         *example_args: jax.Array) -> Any:
  """Declares `depth` copies of `block`'s params as one param subtree with a leading depth axis.

  `block` must be an unbound module (`parent=None`). Each copy is initialised with its own key
  (`jax.vmap` over `block.init`), so the result equals `depth` independent initialisations.
  """
  def init(rng):
    keys = jax.random.split(rng, depth)
    return jax.vmap(lambda k: block.init(k, *example_args)["params"])(keys)
  return module.param(name, init)


def block_fn(block: nn.Module, method: str = "__call__", remat: bool = False):
  """`f(params, *args)` = `block.apply({'params': params}, *args, method=method)`.

  With `remat=True` the call is wrapped in `jax.checkpoint` (activation rematerialisation,
  Chen et al. 2016 "Training deep nets with sublinear memory cost"): the backward pass keeps
  only the block's inputs and recomputes its internals, so training memory grows with the depth
  by one token tensor per block instead of all the block's activations. The values and
  gradients are those of the plain call; only the schedule of the computation changes.
  """
  def f(p, *args):
    return block.apply({"params": p}, *args, method=method)
  return jax.checkpoint(f) if remat else f


def scan_blocks(block: nn.Module, params: Any, x: jax.Array, *broadcast: Any,
                remat: bool = False) -> jax.Array:
  """Runs every block of a stacked param tree in order with `lax.scan` (one compiled body);
  `remat`: rematerialise each block's activations in the backward pass (`block_fn`)."""
  fn = block_fn(block, remat=remat)

  def body(h, p):
    return fn(p, h, *broadcast), None
  return jax.lax.scan(body, x, params)[0]
