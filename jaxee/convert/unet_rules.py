"""diffusers `UNet2DModel` state dict → jaxee `UNet` params (strict, all-or-nothing).

The Flax param tree mirrors the diffusers module names (`jaxee/models/unet.py`), so a key maps by
the rules of `backbone_rules` (a numeric child index joins its parent: `down_blocks.1.resnets.0`
→ `down_blocks_1/resnets_0`, `attentions.0.to_out.0` → `attentions_0/to_out_0`; Linear `weight`
(out, in) → `kernel` (in, out), Conv2d OIHW → HWIO, GroupNorm `weight` → `scale`). Files written
before diffusers 0.14 (the released `google/ddpm-*` checkpoints among them) name the attention
projections `query`, `key`, `value`, `proj_attn` (diffusers `_convert_deprecated_attention_blocks`
renames them on load); both spellings are accepted, and 1×1-conv-shaped (C, C, 1, 1) projections
are accepted as Linear.

Every missing key, unexpected key and shape mismatch is collected into one `CheckpointError`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jaxee.convert import backbone_rules

# The Flax leaf for a torch leaf, and the weight transposes, are the DiT/U-ViT ones.
_flax_leaf_for = backbone_rules._flax_leaf_for  # pylint: disable=protected-access
_convert_leaf = backbone_rules._convert_leaf  # pylint: disable=protected-access
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|"
                      r"to_out)_(\d+)$")
_OLD_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def canonical_key(key: str) -> str:
  """The current diffusers name of a (possibly pre-0.14) `UNet2DModel` key."""
  m = _OLD_RE.match(key)
  if m:
    return f"{m.group(1)}.{_OLD_ATTN[m.group(2)]}.{m.group(3)}"
  return key


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model, *,
                           source: str = "state dict") -> dict[str, Any]:
  """Converts a flat `UNet2DModel` state dict into params for `model` (a `jaxee` UNet).

  Raises:
    CheckpointError: listing every missing key, unexpected key and shape mismatch at once.
  """
  expected = backbone_rules.param_shapes(model)
  filled: dict[tuple[str, ...], np.ndarray] = {}
  origin: dict[tuple[str, ...], str] = {}
  problems: list[str] = []
  unexpected: list[str] = []
  mismatched: set[tuple[str, ...]] = set()
  for key in sorted(state_dict):
    value = np.asarray(state_dict[key])
    module_path, index, torch_leaf = backbone_rules.torch_key_to_path(canonical_key(key))
    leaf = _flax_leaf_for(module_path, torch_leaf, expected)
    path = module_path + (leaf,) if leaf else None
    if index is not None or path is None or path not in expected:
      unexpected.append(key)
      continue
    if path in origin:
      problems.append(f"duplicate: {key} and {origin[path]} both map to {'/'.join(path)}")
      continue
    torch_shape = value.shape
    if leaf == "kernel" and value.ndim == 4 and len(expected[path]) == 2 and \
        value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # a 1×1-conv attention projection used as Linear
    value = _convert_leaf(value, leaf).astype(np.float32)
    if value.shape != expected[path]:
      problems.append(f"shape mismatch: {key} {torch_shape} (as {value.shape}) → "
                      f"{'/'.join(path)} wants {expected[path]}")
      mismatched.add(path)
      continue
    filled[path], origin[path] = value, key
  # A path with a shape mismatch is reported there, not again as missing.
  missing = ["/".join(p) for p in expected if p not in filled and p not in mismatched]
  backbone_rules.raise_mismatch(source, f"{type(model).__name__} ({model_summary(model)})",
                                [_torch_name(m) for m in missing], unexpected, problems,
                                state_dict, "diffusers UNet2DModel layout")
  return backbone_rules.nest(filled)


def _torch_name(flax_path: str) -> str:
  """`down_blocks_1/resnets_0/conv1/kernel` → `down_blocks.1.resnets.0.conv1.weight`."""
  parts = flax_path.split("/")
  leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  mods = [_INDEXED.sub(r"\1.\2", p) for p in parts[:-1]]
  return ".".join(mods + [leaf])


def model_summary(model) -> str:
  return (f"block_out_channels={list(model.block_out_channels)}, "
          f"layers_per_block={model.layers_per_block}, "
          f"down={list(model.down_block_types)}, up={list(model.up_block_types)}")
