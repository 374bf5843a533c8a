"""Shared helpers of the method configs (ASE, DeeDiff, DuoDiff, TABM masks).

The schema and defaults come from `jaxee/train/config_base.py` (documented in `jaxee/main.py`);
this file adds the method sections with the papers' constants (`research/ee_methods.md` §5),
the paper backbones, the tiny `runlocal` shrink and `finish(c)`, which validates the config
(`jaxee.train.methods.validate`) so that a bad setting fails when the file is loaded.

Config files load this module by path (the `_common()` loader at the top of each file), so they
work both under `python -m jaxee.main --config=configs/x.py:arg` and from tests. Loading a config
initialises no JAX backend.
"""
from __future__ import annotations

from typing import Any, Optional

from ml_collections import config_dict

from jaxee.train import config_base

SET_ME = "SET_ME"

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


def ase_section(schedule: str, **kw) -> config_dict.ConfigDict:
  """`config.ase` (§5.1; λ(t) fields are jaxee's reading of Alg. 1, see `jaxee/losses.py`)."""
  a = config_dict.ConfigDict()
  a.schedule = schedule                      # table name, e.g. 'D3-DiT', 'D6-U-ViT'
  a.custom_schedule = config_dict.placeholder(tuple)   # 10 block counts instead of a name
  a.scale_to_model = False                   # rescale the table to the model's depth
  a.time_schedule = config_dict.placeholder(str)       # τ convention (default: the model's)
  a.lambda_boost = 2.0                       # λ on the dropped (noise-side) intervals
  a.lambda_mode = "plateau"                  # 'plateau' | 'cycle' | 'constant'
  a.cycle_length = 10_000                    # C, steps of the boosted phase ('cycle')
  a.cycle_repeat = False
  a.plateau_window = 1_000                   # steps per plateau comparison (>= log_every)
  a.plateau_patience = 3
  a.plateau_rel_tol = 1e-3
  a.freeze_time_embedder = True              # `train_dit.sh --freeze_time_embedder`
  a.update(kw)
  return a


def deediff_section(threshold: float, **kw) -> config_dict.ConfigDict:
  """`config.deediff` (§2.4–2.6, §5.2): λ = β = 1, MLP-probe UEM, frozen backbone."""
  d = config_dict.ConfigDict()
  d.threshold = threshold                    # θ, used at sampling time (exported)
  d.variant = "paper"                        # 'paper' | 'public' (duodiff trainer.py)
  d.uem = "token_mean"                       # 'token_mean' (mlp_probe_per_layer) | 'timestep_aware'
  d.lam = 1.0
  d.beta = 1.0
  d.freeze_backbone = True                   # `--load_backbone ... --freeze_backbone`
  d.heads_from_backbone = False
  d.unweighted_head_loss = False             # `--use_unweighted_loss`
  d.update(kw)
  return d


def duodiff_section(t_switch: float = 300.0, **kw) -> config_dict.ConfigDict:
  """`config.duodiff` (§3.2–3.3): 3-layer shallow U-ViT, t_s = 300 (README)."""
  d = config_dict.ConfigDict()
  d.shallow_layers = 3
  d.t_switch = float(t_switch)
  d.rule = "threshold"                       # 'threshold' (DDPM loop) | 'lagged' (DDIM loop)
  d.init = "scratch"                         # 'scratch' (the paper) | 'deep' (first blocks)
  d.update(kw)
  return d


def masks_section(**kw) -> config_dict.ConfigDict:
  """`config.masks` (TABM, §4.7, §5.5), defaults of `jaxee/train/masks_opt.py`."""
  from jaxee.train import masks_opt  # pylint: disable=g-import-not-at-top
  m = config_dict.ConfigDict()
  for key, value in masks_opt.DEFAULTS.items():
    if key == "seed":
      continue
    if key == "schedule":
      m[key] = config_dict.placeholder(str)
    elif key == "guidance":
      m[key] = config_dict.placeholder(float)
    elif key == "sampler_options":
      m[key] = config_dict.ConfigDict(dict(value))
    else:
      m[key] = value
  m.seed = config_dict.placeholder(int)      # default: train.seed
  for key, value in kw.items():
    m[key] = config_dict.ConfigDict(value) if isinstance(value, dict) else value
  return m


def runlocal(c, *, family: str = "dit", depth: int = 4, num_classes: int = 10,
             **model_kw) -> config_dict.ConfigDict:
  """The tiny CI shrink: digits at 8x8, a width-32 backbone, 3 steps, a checkpoint at the end."""
  config_base.tiny_runlocal(c)
  if family == "dit":
    set_model(c, "dit", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth,
              num_heads=2, num_classes=num_classes, **model_kw)
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
