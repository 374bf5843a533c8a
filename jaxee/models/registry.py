"""Model registry: `create(arch, **overrides)` for every DiT config and released U-ViT config.

Arch names:
- `dit_{s,b,l,xl}_{2,4,8}`: the 12 configs of DiT `DiT_models` (`dit_uvit.md` A1); `dit`: the
  generic constructor (give `depth`, `hidden_size`, `patch_size`, `num_heads`).
- `uvit`: the generic U-ViT constructor (official keyword names).
- U-ViT presets, one per released config (`dit_uvit.md` B1, B6): `uvit_s2_cifar10`,
  `uvit_s4_celeba64`, `uvit_m4_imagenet64`, `uvit_l4_imagenet64`, `uvit_l2_imagenet256`,
  `uvit_h2_imagenet256`, `uvit_l4_imagenet512`, `uvit_h4_imagenet512`.

Overrides use the original constructors' keyword names (`input_size`, `num_classes`, `img_size`,
`conv`, ...); an unknown keyword is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxee.models.dit import DIT_CONFIGS, DiT
from jaxee.models.uvit import UViT

_UVIT_COMMON = dict(mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)

# The released U-ViT configs (`configs/*.py` → `config.nnet`), with the time convention and the
# CFG null label used by their eval scripts.
UVIT_PRESETS: dict[str, dict[str, Any]] = {
    "uvit_s2_cifar10": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12,
                            num_heads=8, num_classes=-1, conv=True,
                            default_schedule="vp_continuous"),
    "uvit_s4_celeba64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12,
                             num_heads=8, num_classes=-1, conv=True,
                             default_schedule="vp_continuous"),
    "uvit_m4_imagenet64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16,
                               num_heads=12, num_classes=1000, conv=True,
                               default_schedule="vp_continuous"),
    "uvit_l4_imagenet64": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=1024, depth=20,
                               num_heads=16, num_classes=1000, conv=True,
                               default_schedule="vp_continuous"),
    "uvit_l2_imagenet256": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20,
                                num_heads=16, num_classes=1001, conv=True, cfg_null_class=1000,
                                default_schedule="vp_continuous"),
    "uvit_h2_imagenet256": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28,
                                num_heads=16, num_classes=1001, conv=False, cfg_null_class=1000,
                                default_schedule="sd_discrete"),
    "uvit_l4_imagenet512": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20,
                                num_heads=16, num_classes=1001, conv=True, cfg_null_class=1000,
                                default_schedule="vp_continuous"),
    "uvit_h4_imagenet512": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28,
                                num_heads=16, num_classes=1001, conv=False, cfg_null_class=1000,
                                default_schedule="sd_discrete"),
}
for _preset in UVIT_PRESETS.values():
  for _k, _v in _UVIT_COMMON.items():
    _preset.setdefault(_k, _v)


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def list_archs() -> list[str]:
  return sorted(DIT_CONFIGS) + ["dit", "uvit"] + sorted(UVIT_PRESETS)


def _kwargs_for(arch: str) -> tuple[type, dict[str, Any]]:
  if arch in DIT_CONFIGS:
    depth, hidden, patch, heads = DIT_CONFIGS[arch]
    return DiT, dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
  if arch == "dit":
    return DiT, {}
  if arch == "uvit":
    return UViT, {}
  if arch in UVIT_PRESETS:
    return UViT, dict(UVIT_PRESETS[arch])
  raise ValueError(f"unknown arch {arch!r}; known: {', '.join(list_archs())}")


def create(arch: str, **overrides: Any):
  """Builds a backbone module by arch name, with the original constructor's keyword overrides."""
  cls, kwargs = _kwargs_for(arch)
  unknown = sorted(set(overrides) - _fields(cls))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for arch {arch!r}; valid: "
                     f"{sorted(_fields(cls))}")
  kwargs.update(overrides)
  return cls(**kwargs)


def model_config(model) -> dict[str, Any]:
  """The JSON-serialisable constructor arguments of a backbone (`from_config` inverts it)."""
  cls = type(model)
  out = {"class": cls.__name__}
  for name in sorted(_fields(cls)):
    value = getattr(model, name)
    if name == "dtype":
      value = None if value is None else str(value)
    out[name] = value
  return out


def from_config(config: dict[str, Any]):
  """Rebuilds a backbone from `model_config(model)` (e.g. the JSON written by the converter)."""
  config = dict(config)
  name = config.pop("class", None)
  classes = {"DiT": DiT, "UViT": UViT}
  if name not in classes:
    raise ValueError(f"model config has unknown class {name!r}; expected one of {list(classes)}")
  config.pop("dtype", None)
  unknown = sorted(set(config) - _fields(classes[name]))
  if unknown:
    raise ValueError(f"model config has unknown field(s) {unknown} for {name}")
  return classes[name](**config)
