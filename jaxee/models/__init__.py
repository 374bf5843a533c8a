"""Backbones: DiT, U-ViT and the DDPM U-Net (exact ports of the originals) and the SD VAE.

`create(arch, **overrides)` builds a module; `module.apply({'params': p}, x, t, y)` is the exact
original forward on NHWC arrays.
"""
from jaxee.models.dit import DiT, DiTBlock
from jaxee.models.registry import (COMPUTE_DTYPES, UNET_PRESETS, UVIT_PRESETS, create,
                                   from_config, list_archs, model_config, unet_config_json,
                                   with_runtime)
from jaxee.models.unet import UNet
from jaxee.models.uvit import UViT, UViTBlock

__all__ = ["DiT", "DiTBlock", "UNet", "UNET_PRESETS", "UViT", "UViTBlock", "UVIT_PRESETS",
           "COMPUTE_DTYPES", "create", "from_config", "list_archs", "model_config",
           "unet_config_json", "with_runtime"]
