"""Shared helpers of the config files in `configs/` (the one module they import).

Every config file does `from jaxee import configs_common as common` (config files are loaded by
path through absl `config_flags` or `importlib`, and import the installed package like any other
code), so they work both under `jaxee-train --config=configs/x.py:arg` and from tests.

Training configs (ASE, DeeDiff, DuoDiff, TABM masks): the schema and every default come from
`jaxee/train/config_base.py` (`base_config()` and the method-section builders re-exported
here); this module adds the papers' backbones and data (`research/ee_methods.md` §5), the
DuoDiff/DeeDiff optimizer recipe, the tiny `runlocal` shrink and `finish(c)`, which validates
the config (`jaxee.train.methods.validate`) so that a bad setting fails when the file is loaded.
Sampling configs (`configs/sample_*.py`): `sample_base_config()`, the shared field set checked
by `jaxee.sharded.run.validate_config`.

Loading a config initialises no JAX backend.
"""
from __future__ import annotations

from typing import Any, Optional

from ml_collections import config_dict

from jaxee.train import config_base

SET_ME = "SET_ME"

# The method sections (the schema; one default per field).
ase_section = config_base.ase_section
ASE_DEFAULTS = config_base.ASE_DEFAULTS
deediff_section = config_base.deediff_section
DEEDIFF_RECIPES = config_base.DEEDIFF_RECIPES
duodiff_section = config_base.duodiff_section
masks_section = config_base.masks_section
parse_arg = config_base.parse_arg
tiny_runlocal = config_base.tiny_runlocal

# The backbones of the papers' settings (`jaxee.models` preset names + overrides).
# DuoDiff/DeeDiff (`razvanmatisan/duodiff` configs, §3.1) train U-ViTs on the linear β chain of
# 1000 steps with t ∈ {0..999} ('linear_discrete'); "13 layers" = depth 12 here (6 + mid + 6).
DUODIFF_BACKBONES = {
    "cifar10": dict(arch="uvit_s2_cifar10", overrides=dict(default_schedule="linear_discrete")),
    "celeba": dict(arch="uvit_s4_celeba64", overrides=dict(default_schedule="linear_discrete")),
    "imagenet64": dict(arch="uvit_m4_imagenet64",
                       overrides=dict(default_schedule="linear_discrete")),
    "imagenet256": dict(arch="uvit_l2_imagenet256",
                        overrides=dict(default_schedule="linear_discrete")),
}
# DuoDiff/DeeDiff data (§6.3): CIFAR-10 without flip, CelebA with DuoDiff's crop/resize order,
# ImageNet as the Kaggle 256 subset (a local folder) or pre-extracted VAE moments.
DUODIFF_DATA = {
    "cifar10": dict(source="cifar10", image_size=32, options=dict(random_flip=False)),
    "celeba": dict(source="celeba64", image_size=64,
                   options=dict(recipe="duodiff", random_flip=False)),
    "imagenet64": dict(source=f"folder:{SET_ME}/imagenet-256-kaggle", image_size=64,
                       options=dict(random_flip=False)),
    "imagenet256": dict(source=f"latents:{SET_ME}/imagenet256_moments", image_size=32,
                        options=dict()),
}


def parse(arg: Optional[str], choices: Optional[dict] = None, **defaults: Any):
  """`config_base.parse_arg` plus bare choice words: 'D4,runlocal' → schedule='D4', runlocal.

  Args:
    arg: the `:arg` text.
    choices: {key: allowed values}; a bare token equal to one value sets that key.
    **defaults: accepted keys and defaults.

  Returns:
    ConfigDict of values; a value of a `choices` key outside its set is an error.
  """
  choices = choices or {}
  tokens = []
  for token in filter(None, (s.strip() for s in (arg or "").split(","))):
    key = next((k for k, vals in choices.items() if token in vals), None)
    if key is None and "=" not in token and token not in defaults and len(choices) == 1:
      key = next(iter(choices))      # a bare unknown word: report it as a bad choice
    tokens.append(f"{key}={token}" if key is not None and "=" not in token else token)
  out = config_base.parse_arg(",".join(tokens), **defaults)
  for key, vals in choices.items():
    if out[key] not in vals:
      raise ValueError(f"unknown {key} {out[key]!r}; choose from {tuple(vals)}")
  return out


def base(method: str) -> config_dict.ConfigDict:
  """The shared schema with `method` set."""
  c = config_base.base_config()
  c.method = method
  return c


def set_model(c, arch: str, **overrides) -> None:
  c.model.arch = arch
  c.model.overrides = config_dict.ConfigDict(overrides)


def set_data(c, source: str, batch_size: int, image_size: int, **options) -> None:
  c.data.source = source
  c.data.batch_size = batch_size
  c.data.image_size = image_size
  c.data.options = config_dict.ConfigDict(options)


def duodiff_recipe(c, num_steps: int) -> None:
  """The DuoDiff/DeeDiff optimizer (§2.5, §3.2): AdamW 2e-4, betas (0.99, 0.999), wd 0.03,
  1500 warm-up steps then cosine to 0, clip 1.0, no EMA, seed 1."""
  c.optim.lr = 2e-4
  c.optim.b1, c.optim.b2 = 0.99, 0.999
  c.optim.weight_decay = 0.03
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 1500
  c.optim.grad_clip_norm = 1.0
  c.train.ema_decay = 0.0
  c.train.num_steps = num_steps
  c.train.seed = 1


def runlocal(c, *, family: str = "dit", depth: int = 4, num_classes: int = 10,
             **model_kw) -> config_dict.ConfigDict:
  """The tiny CI shrink: digits at 8x8, a width-32 backbone, 3 steps, a checkpoint at the end."""
  config_base.tiny_runlocal(c)
  if family == "dit":
    set_model(c, "dit", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth,
              num_heads=2, num_classes=num_classes, **model_kw)
  elif family == "unet":  # unconditional; `depth` and `num_classes` do not apply
    from jaxee import testing  # pylint: disable=g-import-not-at-top
    set_model(c, "unet", **dict(testing.TINY_UNET, in_channels=1, out_channels=1, **model_kw))
  else:
    set_model(c, "uvit", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=depth,
              num_heads=2, num_classes=num_classes, **model_kw)
  c.init = ""
  c.train.num_steps = 3
  c.train.ckpt_every = 0
  c.train.keep = 1
  c.train.log_every = 1
  c.train.tensorboard = False
  c.train.async_checkpoint = False
  return c


def finish(c) -> config_dict.ConfigDict:
  """Validates the config for its method (`jaxee.train.methods.validate`) and returns it."""
  from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  methods.validate(c)
  return c


def sample_base_config() -> config_dict.ConfigDict:
  """Fields shared by every sampling config (values are DiT-XL/2-256 FID-50K)."""
  c = config_dict.ConfigDict()
  c.ckpt = "SET_ME: converted dir or DiT-XL-2-256x256.pt"
  c.arch = "dit_xl_2"
  c.model_overrides = config_dict.ConfigDict({"input_size": 32, "num_classes": 1000})
  c.vae_ckpt = config_dict.placeholder(str)
  c.vae_ckpt = "SET_ME: converted dir or sd-vae-ft-ema diffusion_pytorch_model.bin"
  c.vae_kind = "auto"  # layout of a torch VAE file: 'auto' | 'compvis' | 'diffusers'
  c.sampler = "ddpm"
  c.steps = 250
  c.schedule = config_dict.placeholder(str)  # None: the model family's default
  c.guidance = config_dict.placeholder(float)
  c.guidance = 1.5
  c.labels = "random"
  c.num_samples = 50_000
  c.batch_size = 32
  c.shard_size = 1000
  c.seed = 0
  c.plan = config_dict.placeholder(str)
  c.plan_options = config_dict.ConfigDict({
      "depth": config_dict.placeholder(int),  # ASE: rescale the table to this depth
      "runner": "loop",  # ASE runner: 'loop' (one while body) | 'switch' (a branch per depth)
      "rectify": False,  # mask plans: TABM rectification
      "shallow_ckpt": config_dict.placeholder(str),  # DuoDiff shallow model
      "shallow_arch": config_dict.placeholder(str),
      "shallow_depth": config_dict.placeholder(int),
      "t_switch": 300.0,
      "rule": "threshold",  # DuoDiff: 'threshold' (DDPM loop) | 'lagged' (DDIM loop)
      "heads": config_dict.placeholder(str),  # DeeDiff: workdir or deediff_heads.npz
      "threshold": config_dict.placeholder(float),  # DeeDiff θ (default: the file's)
      "mode": "batched",  # DeeDiff runner: 'batched' (real exit) | 'exact' (reference)
      "min_fraction": 1.0,  # DeeDiff batched: stop once this fraction has exited
  })
  c.sampler_options = config_dict.ConfigDict()
  c.uint8 = "dit_fid"
  c.out_dir = "runs/sample_dit_xl_2_256"
  c.merge = False
  c.force = False
  c.progress = True
  c.multi_device = True  # split each batch over the local devices (processes: by shard)
  c.compute_dtype = config_dict.placeholder(str)  # None: float32; 'bfloat16': bf16 compute
  c.grid_nrow = 8
  return c
