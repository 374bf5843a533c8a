"""Shared training-config defaults and the `:arg` parser used by every `configs/*.py` file.

`base_config()` returns the full schema documented in `jaxee/main.py` with its defaults, so an
experiment file only sets what differs; `parse_arg('runlocal,parallel=pmap', runlocal=False,
parallel='shard_map')` reads the config-string argument (big_vision `configs/common.py`
`parse_arg` style: types from the defaults, a bare key means True, unknown keys are errors).
This module imports no JAX, so loading a config never initialises a backend (which must wait
for `jax.distributed.initialize()` in multi-host runs).
"""
from __future__ import annotations

from typing import Any

from ml_collections import config_dict

METHODS = ("baseline", "ase", "deediff", "duodiff", "masks")
PARALLEL_KINDS = ("shard_map", "pmap", "jit")


def parse_arg(arg: str | None, **defaults: Any) -> config_dict.ConfigDict:
  """Parses `'k=v,flag'` against `defaults` (the known keys and their types).

  Args:
    arg: the text after `:` in `--config=file.py:arg` (None or '' gives the defaults).
    **defaults: every accepted key with its default value (bool, int, float or str).

  Returns:
    A ConfigDict of the parsed values.

  Raises:
    ValueError: an unknown key or a value that does not parse as the default's type.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
  return config_dict.ConfigDict(out)


def base_config() -> config_dict.ConfigDict:
  """Every shared field with its default (see `jaxee/main.py` for the meaning of each)."""
  c = config_dict.ConfigDict()
  c.method = "baseline"
  c.model = config_dict.ConfigDict({"arch": "dit", "overrides": config_dict.ConfigDict()})
  c.init = ""

  c.data = config_dict.ConfigDict()
  c.data.source = "digits"
  c.data.split = "train"
  c.data.batch_size = 256          # global, over all processes and devices
  c.data.image_size = 16
  c.data.data_dir = config_dict.placeholder(str)
  c.data.shuffle = True
  c.data.prefetch = 2
  c.data.num_threads = 0
  c.data.options = config_dict.ConfigDict()   # source-specific (digits: channels, ...)

  c.loss = config_dict.ConfigDict()            # method 'baseline' (and methods reusing it)
  c.loss.schedule = config_dict.placeholder(str)        # default: the backbone's own
  c.loss.label_dropout = config_dict.placeholder(float)  # default: the backbone's CFG rate

  c.optim = config_dict.ConfigDict()           # fields of jaxee/train/optim.py make_optimizer
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.min_lr_ratio = 0.0
  c.optim.grad_clip_norm = 0.0
  c.optim.frozen_patterns = ()

  c.train = config_dict.ConfigDict()
  c.train.num_steps = 100_000
  c.train.log_every = 100
  c.train.ckpt_every = 5_000
  c.train.keep = 3
  c.train.ema_decay = 0.9999
  c.train.ema_warmup = "none"
  c.train.parallel = "shard_map"
  c.train.seed = 0
  c.train.ckpt_fallback = False
  c.train.async_checkpoint = True
  c.train.progress = True
  c.train.tensorboard = True
  c.train.export = True
  c.train.export_ema = True
  c.train.multihost = False
  c.train.debug_step_sleep_s = 0.0
  return c


def tiny_runlocal(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The shared `runlocal` shrink: digits at 8x8, a depth-2 width-32 DiT, 12 steps of 16."""
  c.model.arch = "dit"
  c.model.overrides = config_dict.ConfigDict(dict(
      input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
      num_classes=10))
  c.data.source = "digits"
  c.data.image_size = 8
  c.data.options = config_dict.ConfigDict({"channels": 1})
  c.data.batch_size = 16
  c.data.prefetch = 0
  c.optim.lr = 1e-3
  c.train.num_steps = 12
  c.train.log_every = 1
  c.train.ckpt_every = 4
  c.train.keep = 2
  c.train.ema_decay = 0.9
  c.train.progress = False
  return c
