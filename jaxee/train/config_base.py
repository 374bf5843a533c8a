"""The training-config schema (the one source of defaults) and the `:arg` parser.

`base_config()` returns the full schema documented in `jaxee/train/launch.py` with its defaults,
so an experiment file only sets what differs; the method sections `config.ase`, `config.deediff`,
`config.duodiff` and `config.masks` come from `ase_section`, `deediff_section`,
`duodiff_section` and `masks_section` (or `method_section(method, **values)`), which define
every field that `jaxee.train.methods` and `jaxee.train.objectives.masks` read, each with
exactly one default (`schedule` and `threshold` have none: they are arguments). The training
code reads these fields directly; `check_section` (called by `methods.validate`) turns a missing or
unknown field into a ValueError naming it. `parse_arg('runlocal,parallel=pmap',
runlocal=False, parallel='shard_map')` reads the config-string argument (big_vision
`configs/common.py` `parse_arg` style: types from the defaults, a bare key means True, unknown
keys are errors). Shared helpers of the config files: `jaxee/configs_common.py`.

This module imports no JAX (`masks_section` imports `jaxee.train.objectives.masks` when
called), so loading a config never initialises a backend (which must wait for
`jax.distributed.initialize()` in multi-host runs).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

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
  """Every shared field with its default (see `jaxee/train/launch.py` for the meaning of each)."""
  c = config_dict.ConfigDict()
  c.method = "baseline"
  # compute_dtype / remat: None keeps the model's own (float32, no remat); see
  # `jaxee.models.with_runtime` and docs/SCALING.md.
  c.model = config_dict.ConfigDict({"arch": "dit", "overrides": config_dict.ConfigDict(),
                                    "compute_dtype": None, "remat": None})
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


# ------------------------------------------------------------------------------------------------
# Method sections: every field the training code reads, with its one default.


def _section(values: Dict[str, Any], overrides: Dict[str, Any], name: str):
  """A ConfigDict of `values` with `overrides` applied; an unknown override is an error."""
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f"unknown config.{name} field(s) {unknown}; valid: {sorted(values)}")
  section = config_dict.ConfigDict(values)
  for key, value in overrides.items():
    section[key] = config_dict.ConfigDict(value) if isinstance(value, dict) else value
  return section


# `config.ase` defaults other than the required `schedule`: the one place they are defined
# (`ase_section` below, and the keyword defaults of `objectives.ase.make_ase_loss`).
ASE_DEFAULTS: Dict[str, Any] = dict(
    custom_schedule=None,                  # 10 block counts instead of a name (tuple)
    schedule_file=None,                    # a plan file (`jaxee-search` output) instead (str)
    scale_to_model=False,                  # rescale the table to the model's depth
    time_schedule=None,                    # τ convention (None: the model's)
    loss="auto",                           # 'hybrid' | 'simple' | 'auto' (see below)
    lambda_boost=2.0,                      # γ of λ_i = 1 + γ·(1 − n_i/capacity)
    lambda_mode="plateau",                 # 'plateau' | 'cycle' | 'constant'
    cycle_length=10_000,                   # C, steps of the boosted phase ('cycle')
    cycle_repeat=False,
    plateau_window=1_000,                  # steps per plateau comparison (>= log_every)
    plateau_patience=3,
    plateau_rel_tol=1e-3,
    freeze_time_embedder=True,             # `train_dit.sh --freeze_time_embedder`
)


def ase_section(schedule: str, **overrides: Any) -> config_dict.ConfigDict:
  """`config.ase` (§5.1; the λ(t) fields are jaxee's reading of Alg. 1, `objectives/ase.py`).

  λ(t) during the boosted phase is λ_i = 1 + `lambda_boost`·(1 − n_i/capacity) on interval i
  (n_i blocks run out of the model's droppable `capacity`), 1 after it ('cycle': after C =
  `cycle_length` steps; 'plateau': once the loss plateaus; 'constant': never). `loss` states
  the diffusion loss: 'hybrid' (ε-MSE + VLB, needs a learned-σ model on the discrete chain:
  DiT), 'simple' (L_simple ε-MSE: a model without a σ output, e.g. U-ViT, for which the hybrid
  loss reduces to it) or 'auto' (whichever the model supports); a mismatch is a config error.
  """
  values = dict(schedule=schedule, **ASE_DEFAULTS)
  values["custom_schedule"] = config_dict.placeholder(tuple)
  values["schedule_file"] = config_dict.placeholder(str)
  values["time_schedule"] = config_dict.placeholder(str)
  return _section(values, overrides, "ase")


def deediff_section(threshold: float, **overrides: Any) -> config_dict.ConfigDict:
  """`config.deediff` (§2.4–2.6, §5.2): λ = β = 1, MLP-probe UEM, frozen backbone.

  The field defaults are the public re-implementation's heads (`razvanmatisan/duodiff`);
  `DEEDIFF_RECIPES` holds the overrides of the two named recipes of `configs/deediff_uvit.py`.
  """
  return _section(dict(
      threshold=float(threshold),            # θ, used at sampling time (exported)
      variant="paper",                       # loss: 'paper' | 'public' (duodiff trainer.py)
      uem="token_mean",                      # 'token_mean' (mlp_probe_per_layer) |
                                             # 'timestep_aware' | 'paper_map' (Eq. 8–9 map)
      layout="inputs",                       # 'inputs' (exits 0..L−1) | 'outputs' (1..L−1)
      lam=1.0,
      beta=1.0,
      freeze_backbone=True,                  # `--load_backbone ... --freeze_backbone`
      heads_from_backbone=False,
      unweighted_head_loss=False,            # `--use_unweighted_loss`
  ), overrides, "deediff")


# The two DeeDiff recipes (`configs/deediff_uvit.py`): `config.deediff` overrides and the AdamW
# betas. 'paper' = Tang et al. 2023 (§3.4, §4.1, §6.1; `research/paper_results.md` §2.3): the
# per-element UEM of Eq. 8–9, exits at layers 1..N, backbone + heads + UEMs trained jointly,
# λ = β = 1, AdamW lr 2e-4, wd 0.03, (β₁, β₂) = (0.99, 0.99). 'adadiff_public' = the public
# re-implementation (`razvanmatisan/duodiff`, `research/ee_methods.md` §2.1–2.5): token-mean MLP
# probe at the input of every block, frozen backbone, its exact loss, betas (0.99, 0.999).
DEEDIFF_RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": dict(section=dict(variant="paper", uem="paper_map", layout="outputs",
                               freeze_backbone=False, lam=1.0, beta=1.0),
                  betas=(0.99, 0.99)),
    "adadiff_public": dict(section=dict(variant="public", uem="token_mean", layout="inputs",
                                        freeze_backbone=True, lam=1.0, beta=1.0),
                           betas=(0.99, 0.999)),
}


def duodiff_section(t_switch: float = 300.0, **overrides: Any) -> config_dict.ConfigDict:
  """`config.duodiff` (§3.2–3.3): 3-layer shallow U-ViT, t_s = 300 (README)."""
  return _section(dict(
      shallow_layers=3,
      t_switch=float(t_switch),
      rule="threshold",                      # 'threshold' (DDPM loop) | 'lagged' (DDIM loop)
      init="scratch",                        # 'scratch' (the paper) | 'deep' (first blocks)
  ), overrides, "duodiff")


def masks_section(**overrides: Any) -> config_dict.ConfigDict:
  """`config.masks` (TABM, §4.7, §5.5): the defaults are `objectives.masks.DEFAULTS`."""
  from jaxee.train.objectives import masks as masks_obj  # pylint: disable=g-import-not-at-top
  values = {}
  for key, value in masks_obj.DEFAULTS.items():
    if key in ("schedule", "guidance", "seed"):   # optional (seed default: train.seed)
      values[key] = config_dict.placeholder({"schedule": str, "guidance": float,
                                             "seed": int}[key])
    elif key == "sampler_options":
      values[key] = config_dict.ConfigDict(dict(value))
    else:
      values[key] = value
  return _section(values, overrides, "masks")


SECTIONS: Dict[str, Callable[..., config_dict.ConfigDict]] = {
    "ase": ase_section, "deediff": deediff_section, "duodiff": duodiff_section,
    "masks": masks_section}
# Values for the builders' required arguments when only the field set is wanted.
_SCHEMA_ARGS = {"ase": dict(schedule="D3-DiT"), "deediff": dict(threshold=0.0)}


def method_section(method: str, **values: Any) -> config_dict.ConfigDict:
  """`config.<method>` with every schema default and `values` over them (e.g. from a dict)."""
  if method not in SECTIONS:
    raise ValueError(f"method {method!r} has no config section; sections: {sorted(SECTIONS)}")
  return SECTIONS[method](**values)


def section_fields(method: str) -> List[str]:
  """The field names of `config.<method>` (the schema)."""
  return sorted(SECTIONS[method](**_SCHEMA_ARGS.get(method, {})).keys())


def check_section(config, method: str) -> List[str]:
  """Problems with `config.<method>`: absent, or a field missing or unknown (empty: fine)."""
  section = config.get(method) if hasattr(config, "get") else getattr(config, method, None)
  if section is None:
    return [f"method {method!r} needs a config.{method} section "
            f"(jaxee.train.config_base.{method}_section)"]
  given = set(section.keys())
  wanted = set(section_fields(method))
  problems = []
  if wanted - given:
    problems.append(f"config.{method} is missing field(s) {sorted(wanted - given)} (build it "
                    f"with jaxee.train.config_base.{method}_section / method_section)")
  if given - wanted:
    problems.append(f"config.{method} has unknown field(s) {sorted(given - wanted)}; "
                    f"valid: {sorted(wanted)}")
  return problems
