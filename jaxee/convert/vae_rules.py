"""PyTorch → Flax conversion for the KL-f8 VAE, from the CompVis and the diffusers layouts.

Maps the state dicts of CompVis latent-diffusion `ldm.models.autoencoder.AutoencoderKL` (as saved
by baofff/U-ViT `assets/stable-diffusion/autoencoder_kl*.pth`, keys `encoder.down.{i}.block.{j}`,
`encoder.mid.attn_1.q`, `decoder.up.{i}.upsample.conv`, ...) and of diffusers
`models/autoencoders/autoencoder_kl.py` `AutoencoderKL` (`diffusion_pytorch_model.{bin,safetensors}`
of `stabilityai/sd-vae-ft-{ema,mse}`, keys `encoder.down_blocks.{i}.resnets.{j}`,
`encoder.mid_block.attentions.0.to_q`, `decoder.up_blocks.{k}.upsamplers.0.conv`, ...) onto the
param tree of `jaxee.models.vae.AutoencoderKL`. Facts: `shared/research/dit_uvit.md` B7 and C-17.

Layout correspondences (L = number of levels):
- diffusers `down_blocks.i.resnets.j` = CompVis `down.i.block.j`; `conv_shortcut` = `nin_shortcut`;
  `downsamplers.0.conv` = `downsample.conv`.
- diffusers `decoder.up_blocks.k` = CompVis `decoder.up.{L-1-k}` (reversed order).
- diffusers `mid_block.resnets.{0,1}` = `mid.block_{1,2}`; `mid_block.attentions.0.{group_norm,
  to_q,to_k,to_v,to_out.0}` = `mid.attn_1.{norm,q,k,v,proj_out}` (pre-0.14 files: `query`, `key`,
  `value`, `proj_attn`). Attention projections are Linear (out, in) in diffusers and 1×1 convs
  (out, in, 1, 1) in CompVis and some old diffusers files; both shapes are accepted.
- diffusers `conv_norm_out` = CompVis `norm_out`.

Weight transforms: Conv OIHW → HWIO, Linear (out, in) → (in, out), GroupNorm `weight` → `scale`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from jaxee.convert.errors import CheckpointError
from jaxee.models import vae as vae_lib

_CONV, _DENSE, _NORM = "conv", "dense", "norm"


def detect_layout(keys: Sequence[str]) -> str:
  """Returns 'compvis' or 'diffusers' from the state-dict key names.

  Raises:
    CheckpointError: when the keys match neither (or both) layouts.
  """
  keys = list(keys)
  diffusers = any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks."))
                  for k in keys)
  compvis = any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in keys)
  if diffusers == compvis:
    what = "both" if diffusers else "neither"
    raise CheckpointError(
        f"cannot detect the VAE layout: keys match {what} of the CompVis "
        "(encoder.down.*, decoder.up.*) and diffusers (encoder.down_blocks.*, "
        "decoder.up_blocks.*) layouts")
  return "diffusers" if diffusers else "compvis"


def _level_indices(keys: Sequence[str], pattern: str) -> list[int]:
  return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def infer_config(sd: Mapping[str, Any], layout: str = "auto",
                 scale_factor: float = 0.18215) -> vae_lib.VAEConfig:
  """Infers a `VAEConfig` from state-dict shapes.

  `resolution` cannot be read from weights; it is set to 256 and, for levels that carry attention
  blocks, `attn_resolutions` is expressed relative to it (only which levels have attention
  matters). `norm_groups` is assumed to be 32.

  Args:
    sd: flat state dict (name → array).
    layout: 'auto', 'compvis' or 'diffusers'.
    scale_factor: the latent scale factor to record in the config.

  Returns:
    The inferred config.

  Raises:
    CheckpointError: when a key needed for inference is missing.
  """
  keys = list(sd)
  if layout == "auto":
    layout = detect_layout(keys)
  if layout == "compvis":
    down, blk, attn = r"encoder\.down\.(\d+)\.", "block", "attn"
  else:
    down, blk, attn = r"encoder\.down_blocks\.(\d+)\.", "resnets", "attentions"
  levels = _level_indices(keys, down)
  prefix = "encoder.down." if layout == "compvis" else "encoder.down_blocks."
  needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
            "decoder.conv_out.weight", "post_quant_conv.weight"]
  needed += [f"{prefix}{i}.{blk}.0.conv1.weight" for i in levels]
  missing = [k for k in needed if k not in sd]
  if missing or not levels:
    raise CheckpointError("cannot infer the VAE config; missing keys:\n  " +
                          "\n  ".join(missing or [f"{prefix}0.{blk}.0.conv1.weight"]))
  shape = lambda k: tuple(np.shape(sd[k]))
  ch = shape("encoder.conv_in.weight")[0]
  ch_mult = tuple(shape(f"{prefix}{i}.{blk}.0.conv1.weight")[0] // ch for i in levels)
  num_res_blocks = len(_level_indices(keys, rf"{re.escape(prefix)}0\.{blk}\.(\d+)\."))
  z_channels = shape("decoder.conv_in.weight")[1]
  resolution = 256
  attn_res = tuple(resolution // 2 ** i for i in levels
                   if any(k.startswith(f"{prefix}{i}.{attn}.") for k in keys))
  return vae_lib.VAEConfig(
      ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
      in_channels=shape("encoder.conv_in.weight")[1], out_ch=shape("decoder.conv_out.weight")[0],
      embed_dim=shape("post_quant_conv.weight")[1], resolution=resolution,
      attn_resolutions=attn_res, double_z=shape("encoder.conv_out.weight")[0] == 2 * z_channels,
      scale_factor=scale_factor)


def _resnet(torch_prefix: str, flax_path: tuple, shortcut_name: str, has_shortcut: bool):
  names = [("norm1", _NORM), ("conv1", _CONV), ("norm2", _NORM), ("conv2", _CONV)]
  rules = [(f"{torch_prefix}.{n}", flax_path + (n,), kind) for n, kind in names]
  if has_shortcut:
    rules.append((f"{torch_prefix}.{shortcut_name}", flax_path + ("nin_shortcut",), _CONV))
  return rules


def _attn(torch_prefix: str, flax_path: tuple, names: Sequence[str]):
  flax_names = ("norm", "q", "k", "v", "proj_out")
  kinds = (_NORM, _DENSE, _DENSE, _DENSE, _DENSE)
  return [(f"{torch_prefix}.{t}", flax_path + (f,), kind)
          for t, f, kind in zip(names, flax_names, kinds)]


def module_rules(cfg: vae_lib.VAEConfig, layout: str,
                 attn_names: Optional[Sequence[str]] = None) -> list[tuple[str, tuple, str]]:
  """Lists (torch module prefix, Flax module path, kind) for every parameterised module.

  Args:
    cfg: the VAE config.
    layout: 'compvis' or 'diffusers'.
    attn_names: torch names of the attention (norm, q, k, v, out) submodules; defaults to the
      layout's current names.

  Returns:
    The rules, in module order.
  """
  cv = layout == "compvis"
  if attn_names is None:
    attn_names = (("norm", "q", "k", "v", "proj_out") if cv else
                  ("group_norm", "to_q", "to_k", "to_v", "to_out.0"))
  sc = "nin_shortcut" if cv else "conv_shortcut"
  n_lv = cfg.num_levels
  rules = [("encoder.conv_in", ("encoder", "conv_in"), _CONV)]
  # Encoder levels.
  block_in, res = cfg.ch, cfg.resolution
  for i in range(n_lv):
    block_out = cfg.ch * cfg.ch_mult[i]
    lv = f"encoder.down.{i}" if cv else f"encoder.down_blocks.{i}"
    for j in range(cfg.num_res_blocks):
      t = f"{lv}.block.{j}" if cv else f"{lv}.resnets.{j}"
      rules += _resnet(t, ("encoder", f"down_{i}_block_{j}"), sc, block_in != block_out)
      block_in = block_out
      if res in cfg.attn_resolutions:
        t = f"{lv}.attn.{j}" if cv else f"{lv}.attentions.{j}"
        rules += _attn(t, ("encoder", f"down_{i}_attn_{j}"), attn_names)
    if i != n_lv - 1:
      t = f"{lv}.downsample.conv" if cv else f"{lv}.downsamplers.0.conv"
      rules.append((t, ("encoder", f"down_{i}_downsample"), _CONV))
      res //= 2
  # Mid blocks (encoder and decoder).
  for part in ("encoder", "decoder"):
    mid = f"{part}.mid" if cv else f"{part}.mid_block"
    for n in (1, 2):
      t = f"{mid}.block_{n}" if cv else f"{mid}.resnets.{n - 1}"
      rules += _resnet(t, (part, f"mid_block_{n}"), sc, False)
    t = f"{mid}.attn_1" if cv else f"{mid}.attentions.0"
    rules += _attn(t, (part, "mid_attn_1"), attn_names)
    if part == "encoder":
      rules.append(("encoder.norm_out" if cv else "encoder.conv_norm_out",
                    ("encoder", "norm_out"), _NORM))
      rules.append(("encoder.conv_out", ("encoder", "conv_out"), _CONV))
      rules.append(("quant_conv", ("quant_conv",), _CONV))
      rules.append(("post_quant_conv", ("post_quant_conv",), _CONV))
      rules.append(("decoder.conv_in", ("decoder", "conv_in"), _CONV))
  # Decoder levels (CompVis index i; diffusers up_blocks are in reverse order).
  block_in, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // cfg.downsample_factor
  for i in reversed(range(n_lv)):
    block_out = cfg.ch * cfg.ch_mult[i]
    lv = f"decoder.up.{i}" if cv else f"decoder.up_blocks.{n_lv - 1 - i}"
    for j in range(cfg.num_res_blocks + 1):
      t = f"{lv}.block.{j}" if cv else f"{lv}.resnets.{j}"
      rules += _resnet(t, ("decoder", f"up_{i}_block_{j}"), sc, block_in != block_out)
      block_in = block_out
      if res in cfg.attn_resolutions:
        t = f"{lv}.attn.{j}" if cv else f"{lv}.attentions.{j}"
        rules += _attn(t, ("decoder", f"up_{i}_attn_{j}"), attn_names)
    if i != 0:
      t = f"{lv}.upsample.conv" if cv else f"{lv}.upsamplers.0.conv"
      rules.append((t, ("decoder", f"up_{i}_upsample"), _CONV))
      res *= 2
  rules.append(("decoder.norm_out" if cv else "decoder.conv_norm_out",
                ("decoder", "norm_out"), _NORM))
  rules.append(("decoder.conv_out", ("decoder", "conv_out"), _CONV))
  return rules


def _convert(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
  """Applies the layout transform for a weight (bias passes through)."""
  if leaf == "bias":
    return value
  if kind == _CONV:
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
  if kind == _DENSE:
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    return np.transpose(value) if value.ndim == 2 else value
  return value


def _torch_shape(kind: str, leaf: str, flax_shape: tuple) -> str:
  """Describes the torch shape a Flax param shape corresponds to (for error messages)."""
  if leaf != "bias" and kind == _CONV:
    h, w, i, o = flax_shape
    return str((o, i, h, w))
  if leaf != "bias" and kind == _DENSE:
    i, o = flax_shape
    return f"{(o, i)} or {(o, i, 1, 1)}"
  return str(tuple(flax_shape))


def vae_params_from_state_dict(sd: Mapping[str, Any], layout: str = "auto",
                               config: Optional[vae_lib.VAEConfig] = None, *,
                               prefix: str = "", ignore_prefixes: Sequence[str] = (),
                               dtype: Any = np.float32) -> dict:
  """Converts a CompVis- or diffusers-layout VAE state dict to `AutoencoderKL` params.

  Strict: every expected key must be present with the right shape and no other key may be
  present; all offenders are reported together in one `CheckpointError`.

  Args:
    sd: flat mapping name → array (NumPy, or anything `np.asarray` accepts), e.g. from
      `jaxee.convert.torch_reader.load_state_dict`.
    layout: 'auto' (detect from key names), 'compvis' or 'diffusers'.
    config: the `VAEConfig`; None infers it from the shapes (`infer_config`).
    prefix: when given (e.g. 'first_stage_model.' in a full LDM checkpoint or 'vae.'), only keys
      starting with it are used, with it stripped; other keys are ignored.
    ignore_prefixes: key prefixes (after stripping `prefix`) to drop silently, e.g. ('loss.',)
      for LDM training checkpoints that carry the LPIPS/discriminator weights.
    dtype: dtype of the returned arrays (None keeps the checkpoint's).

  Returns:
    The nested param dict for `AutoencoderKL(config).apply({'params': params}, ...)`.

  Raises:
    CheckpointError: unknown layout, or missing / unexpected / wrongly shaped keys.
  """
  if prefix:
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore_prefixes)}
  if layout == "auto":
    layout = detect_layout(list(sd))
  if layout not in ("compvis", "diffusers"):
    raise ValueError(f"layout must be 'auto', 'compvis' or 'diffusers', got {layout!r}")
  if config is None:
    config = infer_config(sd, layout)
  attn_names = None
  if layout == "diffusers" and any(
      re.search(r"\.attentions\.\d+\.query\.weight$", k) for k in sd):
    attn_names = ("group_norm", "query", "key", "value", "proj_attn")
  rules = module_rules(config, layout, attn_names)
  expected_shapes = traverse_util.flatten_dict(vae_lib.param_shapes(config))

  missing, mismatched, flat = [], [], {}
  expected_keys = set()
  for torch_prefix, flax_path, kind in rules:
    w_leaf = "scale" if kind == _NORM else "kernel"
    for t_leaf, f_leaf in (("weight", w_leaf), ("bias", "bias")):
      key = f"{torch_prefix}.{t_leaf}"
      path = flax_path + (f_leaf,)
      expected_keys.add(key)
      want = tuple(expected_shapes[path].shape)
      if key not in sd:
        missing.append(key)
        continue
      value = np.asarray(sd[key])
      converted = _convert(kind, t_leaf, value)
      if tuple(converted.shape) != want:
        mismatched.append(f"{key}: got {tuple(value.shape)}, expected "
                          f"{_torch_shape(kind, t_leaf, want)}")
        continue
      flat[path] = converted.astype(dtype) if dtype is not None else converted
  unexpected = sorted(k for k in sd if k not in expected_keys)
  if missing or unexpected or mismatched:
    lines = [f"VAE state dict ({layout} layout) does not match the config {config}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines += [f"  {k}" for k in items]
    raise CheckpointError("\n".join(lines))
  return traverse_util.unflatten_dict(flat)


def load_vae(path_or_mapping: Any, layout: str = "auto",
             config: Optional[vae_lib.VAEConfig] = None,
             **kwargs) -> tuple[vae_lib.VAEConfig, dict]:
  """Reads a VAE checkpoint file (or mapping) and converts it.

  Args:
    path_or_mapping: a .pt/.pth/.bin/.ckpt/.safetensors path or a loaded state dict.
    layout: 'auto', 'compvis' or 'diffusers'.
    config: the config, or None to infer it from shapes.
    **kwargs: forwarded to `vae_params_from_state_dict` (prefix, ignore_prefixes, dtype).

  Returns:
    (config, params).
  """
  from jaxee.convert.torch_reader import load_state_dict  # pylint: disable=g-import-not-at-top
  sd = load_state_dict(path_or_mapping)
  prefix = kwargs.get("prefix", "")
  if config is None:
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd
    config = infer_config(sub, layout)
  return config, vae_params_from_state_dict(sd, layout, config, **kwargs)
