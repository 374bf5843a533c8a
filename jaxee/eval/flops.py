"""Analytic FLOPs of the DiT and U-ViT backbones, per piece, per sample.

Counts follow the forward passes of facebookresearch/DiT `models.py` and baofff/U-ViT
`libs/uvit.py` as ported in `jaxee/models/`: every matrix product of shape (m×k)·(k×n) costs
2·m·k·n FLOPs (one multiply-add = 2 FLOPs), attention included (QKᵀ and AV each cost 2·N²·D).
Normalisations, activations, softmax, adds and the adaLN `modulate` are element-wise and are not
counted (they are O(N·D), below 1 % of a block). The numbers are per sample (batch 1).

The exit runners (`jaxee/exits/`) use these counts for the `flops` stat of every network call and
for `ideal_saving` = 1 − plan FLOPs / full FLOPs, where both include the embedding and the head
(which always run), so that the ideal saving is directly comparable with a wall-clock saving.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _mm(m: int, k: int, n: int) -> float:
  """FLOPs of an (m×k)·(k×n) product."""
  return 2.0 * m * k * n


def num_tokens(model: Any) -> int:
  """Sequence length the blocks see (U-ViT includes the time/label tokens)."""
  if model.family == "dit":
    return (model.input_size // model.patch_size) ** 2
  return model.extras + model.num_patches


def width(model: Any) -> int:
  return model.hidden_size if model.family == "dit" else model.embed_dim


def attn_flops(model: Any) -> float:
  """One attention branch: fused qkv, QKᵀ, AV and the output projection."""
  n, d = num_tokens(model), width(model)
  return _mm(n, d, 3 * d) + 2 * _mm(n, d, n) + _mm(n, d, d)


def mlp_flops(model: Any) -> float:
  """One MLP branch: fc1 (D→rD) and fc2 (rD→D)."""
  n, d = num_tokens(model), width(model)
  hidden = int(d * model.mlp_ratio)
  return 2 * _mm(n, d, hidden)


def modulation_flops(model: Any) -> float:
  """DiT adaLN modulation of one block (SiLU → Linear(D→6D) on the conditioning); 0 for U-ViT."""
  if model.family != "dit":
    return 0.0
  d = width(model)
  return _mm(1, d, 6 * d)


def skip_flops(model: Any) -> float:
  """U-ViT out-block long-skip fusion `skip_linear` (2D→D); 0 for DiT."""
  if model.family != "uvit":
    return 0.0
  n, d = num_tokens(model), width(model)
  return _mm(n, 2 * d, d)


def block_flops(model: Any, kind: str = "block") -> float:
  """FLOPs of one transformer block.

  Args:
    model: a DiT or U-ViT module.
    kind: 'block' (a DiT block, or a U-ViT in-/mid-block), 'out_block' (a U-ViT out-block,
      including `skip_linear`), 'body' (attention + MLP only), 'attn', 'mlp', 'modulation',
      'skip'.

  Returns:
    FLOPs per sample.
  """
  body = attn_flops(model) + mlp_flops(model)
  table = {
      "block": body + modulation_flops(model),
      "out_block": body + skip_flops(model),
      "body": body,
      "attn": attn_flops(model),
      "mlp": mlp_flops(model),
      "modulation": modulation_flops(model),
      "skip": skip_flops(model),
  }
  if kind not in table:
    raise ValueError(f"unknown block part {kind!r}; choose from {sorted(table)}")
  return table[kind]


def embed_flops(model: Any) -> float:
  """Patch embedding plus the time (and, for DiT, label-free) conditioning MLPs."""
  d = width(model)
  if model.family == "dit":
    n = num_tokens(model)
    patch = _mm(n, model.patch_size ** 2 * model.in_channels, d)
    return patch + _mm(1, 256, d) + _mm(1, d, d)
  patch = _mm(model.num_patches, model.patch_size ** 2 * model.in_chans, d)
  time = _mm(1, d, 4 * d) + _mm(1, 4 * d, d) if model.mlp_time_embed else 0.0
  return patch + time


def head_flops(model: Any) -> float:
  """The backbone head: DiT `FinalLayer` (adaLN + Linear) or U-ViT norm/decoder_pred/conv."""
  d = width(model)
  if model.family == "dit":
    n = num_tokens(model)
    return _mm(1, d, 2 * d) + _mm(n, d, model.patch_size ** 2 * model.out_channels)
  c = model.in_chans
  out = _mm(num_tokens(model), d, model.patch_size ** 2 * c)
  if model.conv:
    out += _mm(model.img_size ** 2, 9 * c, c)
  return out


def num_blocks(model: Any) -> int:
  """Total blocks (U-ViT: in + mid + out; U-Net: ResNet and attention blocks)."""
  if model.family == "dit":
    return model.depth
  if model.family == "uvit":
    return 2 * model.num_in_blocks + 1
  from jaxee.models import backbone  # pylint: disable=g-import-not-at-top
  return backbone.as_backbone(model, "block").num_units


def full_block_flops(model: Any) -> float:
  """All blocks of the backbone."""
  if model.family == "dit":
    return model.depth * block_flops(model)
  n_in = model.num_in_blocks
  return (n_in + 1) * block_flops(model) + n_in * block_flops(model, "out_block")


def conv_flops(out_size: int, kernel: int, c_in: int, c_out: int) -> float:
  """A k×k conv producing an out_size² map: an (HW × k²C_in)·(k²C_in × C_out) product."""
  return _mm(out_size * out_size, kernel * kernel * c_in, c_out)


def spatial_attn_flops(tokens: int, channels: int) -> float:
  """U-Net attention over N pixels of C channels: q, k, v, out projections, QKᵀ and AV."""
  return 4 * _mm(tokens, channels, channels) + 2 * _mm(tokens, channels, tokens)


def backbone_flops(model: Any) -> float:
  """One full forward pass per sample: embedding + all blocks + head."""
  if model.family == "unet":  # per-unit formulas in `jaxee/models/unet_units.py`
    return model.backbone("block").full_flops
  return embed_flops(model) + full_block_flops(model) + head_flops(model)


def summary(model: Any) -> dict[str, float]:
  """A dict of the per-piece counts, in FLOPs per sample (for logs and benchmarks).

  DiT/U-ViT: embed, one block / attention / MLP / skip fusion, head, all blocks, total. The
  U-Net (per-unit formulas in `jaxee/models/unet_units.py`): embed (time MLP + conv_in), all
  ResBlocks, all attention blocks, the down/upsamplers, head (conv_out), all units, total.
  """
  if model.family == "unet":
    bb = model.backbone("block")
    kinds = np.array([u.kind for u in bb.specs])
    body = bb.unit_flops - bb.enter_flops
    return {
        "embed": float(bb.embed_flops),
        "res": float(body[kinds == "res"].sum()),
        "attn": float(body[kinds == "attn"].sum()),
        "resample": float(bb.enter_flops.sum()),
        "head": float(bb.head_flops),
        "blocks": float(bb.unit_flops.sum()),
        "total": float(bb.full_flops),
    }
  return {
      "embed": embed_flops(model),
      "block": block_flops(model),
      "attn": attn_flops(model),
      "mlp": mlp_flops(model),
      "skip": skip_flops(model),
      "head": head_flops(model),
      "blocks": full_block_flops(model),
      "total": backbone_flops(model),
  }
