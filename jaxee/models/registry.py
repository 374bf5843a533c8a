"""Model registry: `create(arch, **overrides)` for every DiT config and released U-ViT config.

Arch names:
- `dit_{s,b,l,xl}_{2,4,8}`: the 12 configs of DiT `DiT_models` (`dit_uvit.md` A1); `dit`: the
  generic constructor (give `depth`, `hidden_size`, `patch_size`, `num_heads`).
- `uvit`: the generic U-ViT constructor (official keyword names).
- U-ViT presets, one per released config (`dit_uvit.md` B1, B6): `uvit_s2_cifar10`,
  `uvit_s4_celeba64`, `uvit_m4_imagenet64`, `uvit_l4_imagenet64`, `uvit_l2_imagenet256`,
  `uvit_h2_imagenet256`, `uvit_l4_imagenet512`, `uvit_h4_imagenet512`.

- `unet`: the generic DDPM U-Net (diffusers `UNet2DModel` `config.json` keys as overrides);
  presets for the released DDPM checkpoints: `unet_ddpm_cifar10` (`google/ddpm-cifar10-32`),
  `unet_ddpm_church256`, `unet_ddpm_bedroom256` (`google/ddpm-{church,bedroom}-256`).

Overrides use the original constructors' keyword names (`input_size`, `num_classes`, `img_size`,
`conv`, ...); an unknown keyword is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from jaxee.models.dit import DIT_CONFIGS, DiT
from jaxee.models.unet import UNet, config_from_diffusers
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


# The released DDPM checkpoints' `config.json` (diffusers `UNet2DModel`): attention at 16².
_DDPM_COMMON = dict(in_channels=3, out_channels=3, center_input_sample=False,
                    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
                    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=0,
                    act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
                    default_schedule="linear_discrete")
_DDPM_256 = dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "unet_ddpm_cifar10": dict(
        _DDPM_COMMON, sample_size=32, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "unet_ddpm_church256": dict(_DDPM_COMMON, **_DDPM_256),
    "unet_ddpm_bedroom256": dict(_DDPM_COMMON, **_DDPM_256),
}


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def list_archs() -> list[str]:
  return sorted(DIT_CONFIGS) + ["dit", "uvit", "unet"] + sorted(UVIT_PRESETS) + sorted(
      UNET_PRESETS)


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
  if arch == "unet":
    return UNet, {}
  if arch in UNET_PRESETS:
    return UNet, dict(UNET_PRESETS[arch])
  raise ValueError(f"unknown arch {arch!r}; known: {', '.join(list_archs())}")


def create(arch: str, **overrides: Any):
  """Builds a backbone module by arch name, with the original constructor's keyword overrides."""
  cls, kwargs = _kwargs_for(arch)
  unknown = sorted(set(overrides) - _fields(cls))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for arch {arch!r}; valid: "
                     f"{sorted(_fields(cls))}")
  kwargs.update(overrides)
  model = cls(**kwargs)
  if cls is UNet:
    model.validate()
  return model


def unet_config_json(src: Any, arch: str = "unet") -> dict[str, Any]:
  """`UNet` overrides from a diffusers `config.json` (a path or an already-loaded dict)."""
  if _kwargs_for(arch)[0] is not UNet:
    raise ValueError(f"a diffusers config.json applies to the U-Net archs, not {arch!r}")
  if isinstance(src, (str, os.PathLike)):
    with open(src, encoding="utf-8") as f:
      src = json.load(f)
  name = src.get("_class_name", "UNet2DModel")
  if name != "UNet2DModel":
    raise ValueError(f"config.json is for {name!r}, not UNet2DModel")
  return config_from_diffusers(src)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def with_runtime(model, *, compute_dtype: Any = None, remat: Any = None):
  """`model` with its runtime options changed (None: keep the model's own value).

  These options change how the network is computed, never its params or architecture:

  * `compute_dtype`: 'float32' | 'bfloat16' | 'float16' (or a dtype): the dtype the layers
    compute in (the Flax `dtype` field). Params stay float32 (`param_dtype`) and are cast per
    layer; the residual stream and the predictions stay float32 (each family's `head` casts).
  * `remat`: rematerialise every block's activations in the backward pass (DiT, U-ViT only).
  """
  changes = {}
  if compute_dtype is not None:
    name = compute_dtype if isinstance(compute_dtype, str) else jnp.dtype(compute_dtype).name
    if name not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype {compute_dtype!r} is not one of {list(COMPUTE_DTYPES)}")
    changes["dtype"] = None if name == "float32" else jnp.dtype(name)
  if remat is not None:
    if "remat" not in _fields(type(model)):
      raise ValueError(f"remat is not an option of {type(model).__name__} (DiT and U-ViT only)")
    changes["remat"] = bool(remat)
  return model.clone(**changes) if changes else model


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
  classes = {"DiT": DiT, "UViT": UViT, "UNet": UNet}
  if name not in classes:
    raise ValueError(f"model config has unknown class {name!r}; expected one of {list(classes)}")
  config.pop("dtype", None)
  unknown = sorted(set(config) - _fields(classes[name]))
  if unknown:
    raise ValueError(f"model config has unknown field(s) {unknown} for {name}")
  return classes[name](**config)
