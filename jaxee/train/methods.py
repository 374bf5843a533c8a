"""Method dispatch for training: `build_method(config, model, params, rng) -> MethodSetup`.

`jaxee.train.trainer` calls `build_method` for `config.method` in {'ase', 'deediff', 'duodiff'}
('baseline' is the trainer's own; 'masks' is not gradient training: `jaxee.main` runs
`jaxee.train.masks_opt.run`). Each setup wires one objective of `jaxee/losses.py` /
`jaxee/train/deediff_loss.py` with its recipe (`research/ee_methods.md` §1.7, §2.4–2.5, §3.2):

* 'ase' (`config.ase`): ASE fine-tuning of the whole backbone with per-sample truncation at the
  schedule depth, the hybrid loss with learned σ, λ(t) re-weighting (cycle of C steps or a
  plateau test), optionally the time embedder frozen (`t_embedder/.*`, `train_dit.sh`).
  Export: the EMA weights (`WORKDIR/export`, a converted checkpoint) and `ase_plan.json`.
* 'deediff' (`config.deediff`): heads + UEMs on top of the backbone; params
  `{'backbone', 'deediff'}`; `freeze_backbone` (the public recipe) freezes `backbone/.*`.
  Export: the backbone (`WORKDIR/export`) and `deediff_heads.npz` (heads, UEMs, θ, UEM kind).
* 'duodiff' (`config.duodiff`): the shallow backbone (`shallow_layers`, 3 by default, same arch
  otherwise) trained with plain ε-MSE, from scratch or from the deep model's first blocks
  (`init='deep'`, `config.init` then being the deep checkpoint). Export: the shallow weights
  (`WORKDIR/export`) and `duodiff.json` (t_s, rule) for `exits.duodiff.DuoDiffPlan`.

`validate(config)` checks every method section (and the model) and raises one `ValueError`
listing every problem; config files call it from `get_config` (through `configs/common.py`),
and `build_method` calls it again. It initialises no JAX backend.

Trainer hooks used here (`jaxee/train/trainer.py`): `extras` (initial `TrainState.extras`),
`on_log(step, metrics)` (host updates of the extras; ASE's plateau test), `host_state()` /
`load_host_state(d)` (JSON state checkpointed with the run).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from jaxee import atomic_io
from jaxee.train import config_base
from jaxee.train import optim

METHODS = config_base.METHODS
EXPORT_DIR = "export"
ASE_PLAN_FILE = "ase_plan.json"
DUODIFF_FILE = "duodiff.json"
DEEDIFF_FILE = "deediff_heads.npz"


def _get(section, name, default=None):
  return optim.config_get(section, name, default)


def _section(config, name):
  if hasattr(config, "get"):
    return config.get(name)
  return getattr(config, name, None)


# ------------------------------------------------------------------------------------------------
# Validation.


def _model_of(config, problems: list):
  from jaxee import models  # pylint: disable=g-import-not-at-top
  m = _section(config, "model")
  if m is None:
    problems.append("config.model is missing")
    return None
  try:
    return models.create(_get(m, "arch"), **dict(_get(m, "overrides", {}) or {}))
  except (ValueError, TypeError) as e:
    problems.append(f"config.model: {e}")
    return None


def _ase_schedule(a, model):
  """The ASEPlan of `config.ase` for `model` (errors propagate)."""
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  name = _get(a, "schedule", "D3")
  custom = _get(a, "custom_schedule", None)
  kwargs = {}
  if _get(a, "time_schedule", None):
    kwargs["time_schedule"] = _get(a, "time_schedule")
  if custom:
    return ase_lib.ASEPlan(tuple(int(v) for v in custom), name="custom", **kwargs)
  depth = ase_lib.capacity(model) if _get(a, "scale_to_model", False) else None
  return ase_lib.ase_plan(name, depth=depth, **kwargs)


def _validate_ase(config, model, p: list) -> None:
  from jaxee import losses  # pylint: disable=g-import-not-at-top
  a = _section(config, "ase")
  if a is None:
    p.append("method 'ase' needs a config.ase section")
    return
  if model is not None:
    try:
      _ase_schedule(a, model).validate(model)
    except ValueError as e:
      p.append(f"config.ase: {e}")
  if _get(a, "lambda_mode", "cycle") not in losses.LAMBDA_MODES:
    p.append(f"config.ase.lambda_mode {_get(a, 'lambda_mode')!r} unknown; choose from "
             f"{losses.LAMBDA_MODES}")
  if float(_get(a, "lambda_boost", 2.0)) < 1.0:
    p.append(f"config.ase.lambda_boost must be >= 1 (λ on dropped intervals), got "
             f"{_get(a, 'lambda_boost')}")
  if _get(a, "lambda_mode", "cycle") == "cycle" and int(_get(a, "cycle_length", 0)) <= 0:
    p.append("config.ase.cycle_length must be > 0 with lambda_mode='cycle'")
  for name in ("plateau_window", "plateau_patience"):
    if int(_get(a, name, 1)) < 1:
      p.append(f"config.ase.{name} must be >= 1, got {_get(a, name)}")
  if float(_get(a, "plateau_rel_tol", 1e-3)) < 0:
    p.append(f"config.ase.plateau_rel_tol must be >= 0, got {_get(a, 'plateau_rel_tol')}")


def _validate_deediff(config, model, p: list) -> None:
  from jaxee.exits import deediff_heads  # pylint: disable=g-import-not-at-top
  from jaxee.train import deediff_loss  # pylint: disable=g-import-not-at-top
  d = _section(config, "deediff")
  if d is None:
    p.append("method 'deediff' needs a config.deediff section")
    return
  theta = float(_get(d, "threshold", 0.08))
  if not 0.0 <= theta <= 1.0:
    p.append(f"config.deediff.threshold θ must be in [0, 1], got {theta}")
  if _get(d, "variant", "paper") not in deediff_loss.VARIANTS:
    p.append(f"config.deediff.variant {_get(d, 'variant')!r} unknown; choose from "
             f"{deediff_loss.VARIANTS}")
  if _get(d, "uem", "token_mean") not in deediff_heads.UEM_KINDS:
    p.append(f"config.deediff.uem {_get(d, 'uem')!r} unknown; choose from "
             f"{deediff_heads.UEM_KINDS}")
  for name in ("lam", "beta"):
    if float(_get(d, name, 1.0)) < 0:
      p.append(f"config.deediff.{name} must be >= 0, got {_get(d, name)}")


def _validate_duodiff(config, model, p: list) -> None:
  from jaxee import losses  # pylint: disable=g-import-not-at-top
  d = _section(config, "duodiff")
  if d is None:
    p.append("method 'duodiff' needs a config.duodiff section")
    return
  t_s = float(_get(d, "t_switch", 300))
  if not 0 <= t_s <= 1000:
    p.append(f"config.duodiff.t_switch t_s must be in [0, 1000] (steps of the 1000-step "
             f"chain from the noise end), got {t_s}")
  if _get(d, "rule", "threshold") not in ("threshold", "lagged"):
    p.append(f"config.duodiff.rule {_get(d, 'rule')!r} unknown; choose 'threshold' or 'lagged'")
  if _get(d, "init", "deep") not in ("deep", "scratch"):
    p.append(f"config.duodiff.init {_get(d, 'init')!r} unknown; choose 'deep' or 'scratch'")
  if model is not None:
    try:
      losses.shallow_depth(model, int(_get(d, "shallow_layers", 3)))
    except ValueError as e:
      p.append(f"config.duodiff.shallow_layers: {e}")


def _validate_masks(config, model, p: list) -> None:
  del model
  from jaxee.train import masks_opt  # pylint: disable=g-import-not-at-top
  m = _section(config, "masks")
  if m is None:
    p.append("method 'masks' needs a config.masks section")
    return
  try:
    masks_opt.options_from_config(m)
  except ValueError as e:
    p.append(str(e))


_VALIDATORS = {"ase": _validate_ase, "deediff": _validate_deediff,
               "duodiff": _validate_duodiff, "masks": _validate_masks}


def validate(config) -> None:
  """Checks `config` for its method; raises one ValueError listing every problem.

  Checks: a known method and model (arch and overrides), and per method: ASE schedule name,
  depth (deeper than the model → error, unless `scale_to_model`), λ mode; DeeDiff θ ∈ [0, 1],
  variant, UEM; DuoDiff t_s ∈ [0, 1000], shallow layer count, init; masks options
  (`masks_opt.validate_options`). Also the shared optimizer / EMA values.
  """
  problems: list = []
  method = _get(config, "method")
  if method not in METHODS:
    raise ValueError(f"invalid config: method {method!r} unknown; choose from {METHODS}")
  model = _model_of(config, problems)
  if method in _VALIDATORS:
    _VALIDATORS[method](config, model, problems)
  o, t = _section(config, "optim"), _section(config, "train")
  if o is not None and float(_get(o, "lr", 1e-4)) <= 0:
    problems.append(f"config.optim.lr must be > 0, got {_get(o, 'lr')}")
  if t is not None and not 0.0 <= float(_get(t, "ema_decay", 0.9999)) <= 1.0:
    problems.append(f"config.train.ema_decay must be in [0, 1], got {_get(t, 'ema_decay')}")
  if problems:
    raise ValueError(f"invalid {method!r} config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------
# Setups.


@dataclasses.dataclass
class MethodSetup:
  """What the trainer needs from a method (see the module docstring for the hooks).

  Attributes:
    name: the method.
    model: the module whose params are trained (DuoDiff: the shallow backbone).
    params: the initial trainable pytree (frozen groups included).
    loss_fn: `loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)`.
    frozen_patterns: regexes of frozen parameter paths (`train/optim.py`).
    extras: initial `TrainState.extras`.
    on_log: `on_log(step, host_metrics) -> dict | None` (extras updates), or None.
    exporter: `exporter(workdir, params) -> path`, the method artefact writer.
    host: JSON-serialisable host state (checkpointed through `host_state()`).
  """
  name: str
  model: Any
  params: Any
  loss_fn: Callable
  frozen_patterns: tuple = ()
  extras: Dict[str, Any] = dataclasses.field(default_factory=dict)
  on_log: Optional[Callable] = None
  exporter: Optional[Callable] = None
  host: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def export(self, workdir, params) -> Optional[str]:
    """Writes the method's artefact from the final (EMA) params; returns its path."""
    return None if self.exporter is None else self.exporter(workdir, params)

  def host_state(self) -> Dict[str, Any]:
    return json.loads(json.dumps(self.host))

  def load_host_state(self, state: Dict[str, Any]) -> None:
    self.host = dict(state)


def _export_weights(workdir, model, params, source: str) -> pathlib.Path:
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  return convert.save_converted(pathlib.Path(workdir) / EXPORT_DIR, model, params,
                                extra={"source": source}, overwrite=True)


def _loss_section(config):
  loss = _section(config, "loss")
  return _get(loss, "schedule", None), _get(loss, "label_dropout", None)


def _build_ase(config, model, params, rng) -> MethodSetup:
  del rng
  from jaxee import losses  # pylint: disable=g-import-not-at-top
  a = config.ase
  plan = _ase_schedule(a, model)
  schedule, label_dropout = _loss_section(config)
  mode = _get(a, "lambda_mode", "cycle")
  loss_fn = losses.make_ase_loss(
      model, plan, boost=float(_get(a, "lambda_boost", 2.0)), lambda_mode=mode,
      cycle_length=int(_get(a, "cycle_length", 10_000)),
      cycle_repeat=bool(_get(a, "cycle_repeat", False)), schedule=schedule,
      label_dropout=label_dropout)
  frozen = []
  if _get(a, "freeze_time_embedder", False):
    if model.family == "dit":
      frozen.append("t_embedder/.*")
    elif getattr(model, "mlp_time_embed", False):
      frozen.append("time_embed_.*")
  setup = MethodSetup("ase", model, params, loss_fn, tuple(frozen))
  if mode == "plateau":
    log_every = int(_get(config.train, "log_every", 100))
    window = max(1, int(_get(a, "plateau_window", 1000)) // log_every)
    patience = int(_get(a, "plateau_patience", 3))
    rel_tol = float(_get(a, "plateau_rel_tol", 1e-3))
    setup.extras = {"ase_boost": np.float32(1.0)}
    setup.host = {"ase_plateau": losses.plateau_init()}

    def on_log(step, metrics):
      del step
      old = setup.host["ase_plateau"]
      new = losses.plateau_update(old, metrics["loss"], window=window, patience=patience,
                                  rel_tol=rel_tol)
      setup.host = {"ase_plateau": new}
      if new["boost"] != old["boost"]:
        return {"ase_boost": np.float32(new["boost"])}
      return None
    setup.on_log = on_log

  def exporter(workdir, weights):
    _export_weights(workdir, model, weights, f"jaxee ASE fine-tuning ({plan.name}, EMA)")
    path = pathlib.Path(workdir) / ASE_PLAN_FILE
    spec = {"name": plan.name, "schedule": list(plan.schedule), "family": model.family,
            "time_schedule": plan.time_schedule, "speedup": plan.speedup}
    atomic_io.atomic_write(path, lambda f: json.dump(spec, f, indent=2), mode="w")
    return str(path)
  setup.exporter = exporter
  return setup


def load_ase_export(workdir):
  """(model, params, ASEPlan) from an ASE training workdir's export."""
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  spec = json.loads((pathlib.Path(workdir) / ASE_PLAN_FILE).read_text())
  model, params = convert.load_converted(pathlib.Path(workdir) / EXPORT_DIR)
  plan = ase_lib.ASEPlan(tuple(spec["schedule"]), name=spec["name"], family=spec["family"],
                         time_schedule=spec.get("time_schedule"), speedup=spec.get("speedup"))
  return model, params, plan


def _build_deediff(config, model, params, rng) -> MethodSetup:
  from jaxee.train import deediff_loss  # pylint: disable=g-import-not-at-top
  d = config.deediff
  uem = _get(d, "uem", "token_mean")
  freeze = bool(_get(d, "freeze_backbone", True))
  schedule, label_dropout = _loss_section(config)
  train_params = deediff_loss.init_deediff_train_params(
      model, params, rng, uem=uem, heads_from_backbone=bool(_get(d, "heads_from_backbone", False)))
  loss_fn = deediff_loss.make_deediff_loss(
      model, schedule, lam=float(_get(d, "lam", 1.0)), beta=float(_get(d, "beta", 1.0)),
      variant=_get(d, "variant", "paper"), train_backbone=not freeze, uem=uem,
      unweighted_head_loss=bool(_get(d, "unweighted_head_loss", False)),
      label_dropout=label_dropout)
  threshold = float(_get(d, "threshold", 0.08))

  def exporter(workdir, weights):
    import jax  # pylint: disable=g-import-not-at-top
    _export_weights(workdir, model, weights["backbone"], "jaxee DeeDiff backbone")
    flat = {optim.param_path(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(weights["deediff"])[0]}
    meta = json.dumps({"threshold": threshold, "uem": uem})
    path = pathlib.Path(workdir) / DEEDIFF_FILE
    atomic_io.atomic_write(path, lambda f: np.savez(f, __meta__=np.array(meta), **flat))
    return str(path)

  return MethodSetup("deediff", model, train_params, loss_fn,
                     ("backbone/.*",) if freeze else (), exporter=exporter)


def load_deediff_export(workdir):
  """(model, backbone params, ee_params, meta) from a DeeDiff training workdir's export."""
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  model, params = convert.load_converted(pathlib.Path(workdir) / EXPORT_DIR)
  ee, meta = load_deediff_heads(workdir)
  return model, params, ee, meta


def load_deediff_heads(path) -> Tuple[Dict[str, Any], dict]:
  """(ee_params, meta) from a DeeDiff workdir or its `deediff_heads.npz` (no pickles read).

  `meta` holds the trained θ (`threshold`) and the UEM kind (`uem`).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / DEEDIFF_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no DeeDiff heads file at {path} (written by method 'deediff')")
  with np.load(path, allow_pickle=False) as data:
    if "__meta__" not in data.files:
      raise ValueError(f"{path} is not a DeeDiff heads file (no __meta__ entry)")
    meta = json.loads(str(data["__meta__"]))
    ee: Dict[str, Any] = {}
    for key in data.files:
      if key == "__meta__":
        continue
      node = ee
      *parents, leaf = key.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = data[key]
  return ee, meta


def _build_duodiff(config, model, params, rng) -> MethodSetup:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxee import losses  # pylint: disable=g-import-not-at-top
  from jaxee import models  # pylint: disable=g-import-not-at-top
  from jaxee.convert import backbone_rules  # pylint: disable=g-import-not-at-top
  d = config.duodiff
  overrides = dict(_get(config.model, "overrides", {}) or {})
  overrides["depth"] = losses.shallow_depth(model, int(_get(d, "shallow_layers", 3)))
  shallow = models.create(config.model.arch, **overrides)
  if _get(d, "init", "deep") == "deep":
    shallow_params = losses.init_shallow_from_deep(params, model, shallow)
  else:
    inputs = backbone_rules.example_inputs(shallow)
    shallow_params = jax.tree.map(np.asarray, jax.device_get(
        jax.jit(lambda k: shallow.init(k, *inputs)["params"])(rng)))
  schedule, label_dropout = _loss_section(config)
  loss_fn = losses.make_duodiff_loss(shallow, schedule=schedule, label_dropout=label_dropout)
  t_switch, rule = float(_get(d, "t_switch", 300)), _get(d, "rule", "threshold")

  def exporter(workdir, weights):
    _export_weights(workdir, shallow, weights, "jaxee DuoDiff shallow backbone (EMA)")
    path = pathlib.Path(workdir) / DUODIFF_FILE
    spec = {"t_switch": t_switch, "rule": rule,
            "shallow_layers": int(_get(d, "shallow_layers", 3)),
            "deep_model": models.model_config(model)}
    atomic_io.atomic_write(path, lambda f: json.dump(spec, f, indent=2), mode="w")
    return str(path)

  return MethodSetup("duodiff", shallow, shallow_params, loss_fn, (), exporter=exporter)


def load_duodiff_plan(workdir):
  """A `DuoDiffPlan` (shallow model and params, t_s, rule) from a DuoDiff workdir's export."""
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  from jaxee.exits import duodiff as duodiff_lib  # pylint: disable=g-import-not-at-top
  spec = json.loads((pathlib.Path(workdir) / DUODIFF_FILE).read_text())
  shallow, params = convert.load_converted(pathlib.Path(workdir) / EXPORT_DIR)
  return duodiff_lib.DuoDiffPlan(shallow, params, t_switch=spec["t_switch"], rule=spec["rule"])


_BUILDERS = {"ase": _build_ase, "deediff": _build_deediff, "duodiff": _build_duodiff}


def build_method(config, model, params, rng) -> MethodSetup:
  """The `MethodSetup` of `config.method` (validated first).

  Args:
    config: the experiment config (`jaxee/main.py` schema plus the method section).
    model: the backbone of `config.model` (DuoDiff: the deep model).
    params: its initial params (converted checkpoint or random init).
    rng: key for new parameters (DeeDiff heads, a from-scratch shallow DuoDiff model).

  Returns:
    The setup.
  """
  validate(config)
  method = config.method
  if method == "masks":
    raise ValueError("method 'masks' optimises masks along the teacher trajectory, not by "
                     "gradient training: run it through jaxee.main (masks_opt.run)")
  if method == "baseline":
    from jaxee import losses  # pylint: disable=g-import-not-at-top
    schedule, label_dropout = _loss_section(config)
    return MethodSetup("baseline", model, params,
                       losses.make_diffusion_loss(model, schedule=schedule,
                                                  label_dropout=label_dropout))
  return _BUILDERS[method](config, model, params, rng)
