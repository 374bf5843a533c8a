"""Baseline training: the backbone's own diffusion loss, every block, no skipping.

DiT's hybrid loss (ε-MSE + VLB with learned σ, `diffusion/gaussian_diffusion.py
training_losses`) or U-ViT's ε-MSE, with CFG label dropout, AdamW at DiT's constant 1e-4 and
an EMA of 0.9999 (DiT `train.py`). The default is a small class-conditional DiT trained from
scratch on scikit-learn's bundled digits (16x16, no download): the reference the skipping
methods are compared against on the demo data. This file also defines the full training-config
schema by example (documented in `jaxee/train/launch.py`).

    jaxee-train --config=configs/train_baseline.py --workdir=runs/baseline_digits
    jaxee-train --config=configs/train_baseline.py:runlocal --workdir=/tmp/baseline
    jaxee-train --config=configs/train_baseline.py:runlocal,parallel=pmap \
        --workdir=/tmp/baseline_pmap --config.train.num_steps=20

Args (`:arg`, comma-separated):
  runlocal: tiny DiT (depth 2, width 32) on 8x8 digits, 12 steps of 16, a checkpoint every 4
    steps: seconds on a laptop CPU (used by the kill/resume and multi-host checks).
  parallel: 'shard_map' (default), 'pmap' or 'jit'.
  steps: number of training steps (0: the setting's own).
"""
from ml_collections import config_dict

from jaxee import configs_common as common


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """The baseline config; see the module docstring for `arg`."""
  args = common.parse_arg(arg, runlocal=False, parallel="shard_map", steps=0)
  c = common.base("baseline")
  c.model.arch = "dit"
  c.model.overrides = config_dict.ConfigDict(dict(
      input_size=16, patch_size=2, in_channels=1, hidden_size=256, depth=8, num_heads=4,
      num_classes=10))
  c.data.source = "digits"
  c.data.image_size = 16
  c.data.options = config_dict.ConfigDict({"channels": 1})
  c.data.batch_size = 128
  c.optim.lr = 1e-4
  c.train.num_steps = 50_000
  c.train.log_every = 100
  c.train.ckpt_every = 2_500
  c.train.ema_decay = 0.9999
  if args.runlocal:
    common.tiny_runlocal(c)
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return c
