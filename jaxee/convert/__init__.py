"""Safe conversion of PyTorch checkpoints (DiT, U-ViT, DDPM U-Net, SD VAE, FID Inception).

    params = convert.from_torch(path_or_state_dict, arch, **overrides)

reads `.pt/.pth/.bin` (torch zip and legacy pickle, through a restricted unpickler that only
rebuilds tensors and plain containers) and `.safetensors` without PyTorch, picks the EMA weights of
a training checkpoint by default, and converts strictly: every missing key, unexpected key and
shape mismatch is reported in one `CheckpointError`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Union

from jaxee import models
from jaxee.convert.backbone_rules import params_from_state_dict
from jaxee.convert.errors import CheckpointError
from jaxee.convert.orbax_io import load_converted, save_converted
from jaxee.convert.torch_reader import load_state_dict, read_safetensors, read_torch_file

Source = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def from_torch(src: Source, arch: str, *, prefer: str = "ema", config_json: Any = None,
               **overrides: Any) -> dict[str, Any]:
  """Converts a DiT / U-ViT / U-Net checkpoint into params for `models.create(arch, **overrides)`.

  Args:
    src: a checkpoint path (`.pt`, `.pth`, `.bin`, `.safetensors`, a U-ViT `<step>.ckpt/`
      directory) or an already-loaded flat/nested state dict.
    arch: a `jaxee.models` arch name.
    prefer: which weights of a training checkpoint to take (`'ema'` or `'model'`).
    config_json: U-Net only: a diffusers `config.json` (path or dict) whose keys become
      overrides (explicit `overrides` win).
    **overrides: the original constructors' keyword overrides (`input_size`, `num_classes`, ...).

  Returns:
    The params pytree for `model.apply({'params': params}, x, t, y)`.
  """
  if config_json is not None:
    overrides = {**models.unet_config_json(config_json, arch), **overrides}
  model = models.create(arch, **overrides)
  name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "state dict"
  return params_from_state_dict(load_state_dict(src, prefer=prefer), model, source=name)


__all__ = ["CheckpointError", "from_torch", "load_converted", "load_state_dict",
           "params_from_state_dict", "read_safetensors", "read_torch_file", "save_converted"]
