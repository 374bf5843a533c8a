"""Method dispatch for training: `build_method(config, model, params, rng) -> MethodSetup`.

`jaxee.train.trainer` calls `build_method` for `config.method` in {'ase', 'deediff', 'duodiff'}
('baseline' is the trainer's own; 'masks' is not gradient training: `jaxee-train` runs
`jaxee.train.objectives.masks.run`). Each setup wires one objective of
`jaxee/train/objectives/` with its recipe (`research/ee_methods.md` §1.7, §2.4–2.5, §3.2):

* 'ase' (`config.ase`): ASE fine-tuning of the whole backbone with per-sample truncation at the
  schedule depth (a paper table `config.ase.schedule`, ten counts `custom_schedule`, or a
  searched plan file `schedule_file` from `jaxee-search`), the hybrid loss with learned σ
  (DiT) or L_simple (U-ViT, no σ output; `config.ase.loss`), graded λ(t) = 1 + γ·(dropped
  fraction) re-weighting until a cycle of C steps ends or a plateau test fires, optionally the
  time embedder frozen (`t_embedder/.*`, `train_dit.sh`).
  Export: the EMA weights (`WORKDIR/export`, a converted checkpoint) and `ase_plan.json`.
* 'deediff' (`config.deediff`): heads + UEMs on top of the backbone; params
  `{'backbone', 'deediff'}`; `freeze_backbone` (the public recipe) freezes `backbone/.*`.
  Export: the backbone (`WORKDIR/export`) and `deediff_heads.npz` (heads, UEMs, θ, UEM kind).
* 'duodiff' (`config.duodiff`): the shallow backbone (`shallow_layers`, 3 by default, same arch
  otherwise) trained with plain ε-MSE, from scratch or from the deep model's first blocks
  (`init='deep'`, `config.init` then being the deep checkpoint). Export: the shallow weights
  (`WORKDIR/export`) and `duodiff.json` (t_s, rule) for `exits.duodiff.DuoDiffPlan`.

Config fields are read directly (`config.ase.lambda_mode`): the schema and the one default of
every field are in `jaxee/train/config_base.py` (`ase_section`, `deediff_section`,
`duodiff_section`, `masks_section`); there are no fallback values here. `validate(config)`
checks the method section against that schema (a missing or unknown field is an error naming
it) and every value (and the model), and raises one `ValueError` listing every problem; config
files call it from `get_config` (through `jaxee/configs_common.py` `finish`), and
`build_method` calls it again. It initialises no JAX backend.

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
from jaxee.exits import io as plan_io
from jaxee.models.backbone import as_backbone
from jaxee.train import config_base

METHODS = config_base.METHODS
EXPORT_DIR = "export"
ASE_PLAN_FILE = plan_io.ASE_PLAN_FILE
DUODIFF_FILE = "duodiff.json"
DEEDIFF_FILE = plan_io.DEEDIFF_FILE


def _field(config, path: str):
  """`config.<path>` ('model.arch'); a missing field is a ValueError naming it."""
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError) as e:
      raise ValueError(f"invalid config: config.{path} is missing (the schema and its "
                       "defaults: jaxee.train.config_base)") from e
  return node


# ------------------------------------------------------------------------------------------------
# Validation.


def _model_of(config, problems: list):
  from jaxee import models  # pylint: disable=g-import-not-at-top
  arch, overrides = _field(config, "model.arch"), _field(config, "model.overrides")
  try:
    return models.create(arch, **dict(overrides or {}))
  except (ValueError, TypeError) as e:
    problems.append(f"config.model: {e}")
    return None


def _ase_schedule(a, model):
  """The ASEPlan of `config.ase` for `model` (errors propagate)."""
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if a.time_schedule:
    kwargs["time_schedule"] = a.time_schedule
  if a.custom_schedule and a.schedule_file:
    raise ValueError("set config.ase.custom_schedule or config.ase.schedule_file, not both")
  if a.custom_schedule:
    return ase_lib.ASEPlan(tuple(int(v) for v in a.custom_schedule), name="custom", **kwargs)
  if a.schedule_file:
    return _ase_schedule_file(a.schedule_file, **kwargs)
  depth = ase_lib.capacity(model) if a.scale_to_model else None
  return ase_lib.ase_plan(a.schedule, depth=depth, **kwargs)


def _ase_schedule_file(path, **kwargs):
  """The ASE schedule of a plan file: a searched one (`jaxee-search`, family 'ase' or the depth
  part of 'ase+mask') or an exported `ase_plan.json`; the file's table replaces the paper's."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import io as plan_io  # pylint: disable=g-import-not-at-top
  try:
    plan = plan_io.load_plan(path)
  except FileNotFoundError as e:
    raise ValueError(f"config.ase.schedule_file: {e}") from None
  plan = getattr(plan, "depth", plan)
  if not isinstance(plan, ase_lib.ASEPlan):
    raise ValueError(f"config.ase.schedule_file {path} holds no ASE depth schedule "
                     f"({type(plan).__name__}); search one with jaxee-search --family=ase")
  return dataclasses.replace(plan, **kwargs) if kwargs else plan


def _validate_ase(config, model, p: list) -> None:
  from jaxee.train.objectives import ase as ase_obj  # pylint: disable=g-import-not-at-top
  a = config.ase
  if model is not None:
    try:
      _ase_schedule(a, model).validate(model)
    except ValueError as e:
      p.append(f"config.ase: {e}")
  if a.lambda_mode not in ase_obj.LAMBDA_MODES:
    p.append(f"config.ase.lambda_mode {a.lambda_mode!r} unknown; choose from "
             f"{ase_obj.LAMBDA_MODES}")
  if float(a.lambda_boost) < 0.0:
    p.append(f"config.ase.lambda_boost must be >= 0 (γ of λ = 1 + γ·dropped fraction), got "
             f"{a.lambda_boost}")
  if a.loss not in ase_obj.LOSS_KINDS:
    p.append(f"config.ase.loss {a.loss!r} unknown; choose from {ase_obj.LOSS_KINDS}")
  elif model is not None:
    try:
      ase_obj.resolve_loss(a.loss, model, _field(config, "loss.schedule"))
    except ValueError as e:
      p.append(f"config.ase.loss: {e}")
  if a.lambda_mode == "cycle" and int(a.cycle_length) <= 0:
    p.append("config.ase.cycle_length must be > 0 with lambda_mode='cycle'")
  for name in ("plateau_window", "plateau_patience"):
    if int(a[name]) < 1:
      p.append(f"config.ase.{name} must be >= 1, got {a[name]}")
  if float(a.plateau_rel_tol) < 0:
    p.append(f"config.ase.plateau_rel_tol must be >= 0, got {a.plateau_rel_tol}")


def _validate_deediff(config, model, p: list) -> None:
  from jaxee.exits import deediff_heads  # pylint: disable=g-import-not-at-top
  from jaxee.train.objectives import deediff as deediff_obj  # pylint: disable=g-import-not-at-top
  d = config.deediff
  theta = float(d.threshold)
  if not 0.0 <= theta <= 1.0:
    p.append(f"config.deediff.threshold θ must be in [0, 1], got {theta}")
  if d.variant not in deediff_obj.VARIANTS:
    p.append(f"config.deediff.variant {d.variant!r} unknown; choose from "
             f"{deediff_obj.VARIANTS}")
  if d.uem not in deediff_heads.UEM_KINDS:
    p.append(f"config.deediff.uem {d.uem!r} unknown; choose from {deediff_heads.UEM_KINDS}")
  if d.layout not in deediff_heads.LAYOUTS:
    p.append(f"config.deediff.layout {d.layout!r} unknown; choose from "
             f"{deediff_heads.LAYOUTS}")
  for name in ("lam", "beta"):
    if float(d[name]) < 0:
      p.append(f"config.deediff.{name} must be >= 0, got {d[name]}")


def _validate_duodiff(config, model, p: list) -> None:
  from jaxee.train.objectives import duodiff as duodiff_obj  # pylint: disable=g-import-not-at-top
  d = config.duodiff
  t_s = float(d.t_switch)
  if not 0 <= t_s <= 1000:
    p.append(f"config.duodiff.t_switch t_s must be in [0, 1000] (steps of the 1000-step "
             f"chain from the noise end), got {t_s}")
  if d.rule not in ("threshold", "lagged"):
    p.append(f"config.duodiff.rule {d.rule!r} unknown; choose 'threshold' or 'lagged'")
  if d.init not in ("deep", "scratch"):
    p.append(f"config.duodiff.init {d.init!r} unknown; choose 'deep' or 'scratch'")
  if model is not None:
    try:
      duodiff_obj.shallow_depth(model, int(d.shallow_layers))
    except ValueError as e:
      p.append(f"config.duodiff.shallow_layers: {e}")


def _validate_masks(config, model, p: list) -> None:
  del model
  from jaxee.train.objectives import masks as masks_obj  # pylint: disable=g-import-not-at-top
  m = config.get("masks")
  if m is None:
    p.append("method 'masks' needs a config.masks section "
             "(jaxee.train.config_base.masks_section)")
    return
  try:
    masks_obj.options_from_config(m)   # fields over `masks_obj.DEFAULTS` (= masks_section)
  except ValueError as e:
    p.append(str(e))


_VALIDATORS = {"ase": _validate_ase, "deediff": _validate_deediff,
               "duodiff": _validate_duodiff, "masks": _validate_masks}


def validate(config) -> None:
  """Checks `config` for its method; raises one ValueError listing every problem.

  Checks: a known method and model (arch and overrides); the method section against the
  schema (`config_base.check_section`: no field missing, none unknown; 'masks' through
  `objectives.masks.options_from_config`); and per method: ASE schedule name,
  depth (deeper than the model → error, unless `scale_to_model`), λ mode; DeeDiff θ ∈ [0, 1],
  variant, UEM; DuoDiff t_s ∈ [0, 1000], shallow layer count, init; masks options
  (`objectives.masks.validate_options`). Also the shared optimizer / EMA values.
  """
  problems: list = []
  method = _field(config, "method")
  if method not in METHODS:
    raise ValueError(f"invalid config: method {method!r} unknown; choose from {METHODS}")
  model = _model_of(config, problems)
  schema_problems = (config_base.check_section(config, method)
                     if method in ("ase", "deediff", "duodiff") else [])
  problems.extend(schema_problems)
  if method in _VALIDATORS and not schema_problems:
    _VALIDATORS[method](config, model, problems)
  lr, ema_decay = _field(config, "optim.lr"), _field(config, "train.ema_decay")
  if float(lr) <= 0:
    problems.append(f"config.optim.lr must be > 0, got {lr}")
  if not 0.0 <= float(ema_decay) <= 1.0:
    problems.append(f"config.train.ema_decay must be in [0, 1], got {ema_decay}")
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
  return _field(config, "loss.schedule"), _field(config, "loss.label_dropout")


def _build_ase(config, model, params, rng) -> MethodSetup:
  del rng
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jaxee.train.objectives import ase as ase_obj  # pylint: disable=g-import-not-at-top
  a = config.ase
  plan = _ase_schedule(a, model)
  schedule, label_dropout = _loss_section(config)
  mode = a.lambda_mode
  loss_fn = ase_obj.make_ase_loss(
      model, plan, boost=float(a.lambda_boost), lambda_mode=mode,
      cycle_length=int(a.cycle_length), cycle_repeat=bool(a.cycle_repeat), loss=a.loss,
      schedule=schedule, label_dropout=label_dropout)
  lam = ase_obj.ase_lambda_table(plan, model, float(a.lambda_boost))
  logging.info("ASE %s (%s loss): boosted λ per interval %s", plan.name,
               ase_obj.resolve_loss(a.loss, model, schedule), np.round(lam, 3).tolist())
  if float(a.lambda_boost) > 0 and np.ptp(lam) == 0:
    logging.warning("ASE schedule %s is constant over t on this model, so λ(t) is a constant "
                    "%.3g (no time re-weighting)", tuple(plan.schedule), float(lam[0]))
  frozen = []
  if a.freeze_time_embedder:
    pattern = as_backbone(model).time_embedder_pattern
    if pattern:
      frozen.append(pattern)
  setup = MethodSetup("ase", model, params, loss_fn, tuple(frozen))
  if mode == "plateau":
    log_every = int(_field(config, "train.log_every"))
    window = max(1, int(a.plateau_window) // log_every)
    patience = int(a.plateau_patience)
    rel_tol = float(a.plateau_rel_tol)
    setup.extras = {"ase_boost": np.float32(1.0)}
    setup.host = {"ase_plateau": ase_obj.plateau_init()}

    def on_log(step, metrics):
      del step
      old = setup.host["ase_plateau"]
      new = ase_obj.plateau_update(old, metrics["loss"], window=window, patience=patience,
                                  rel_tol=rel_tol)
      setup.host = {"ase_plateau": new}
      if new["boost"] != old["boost"]:
        return {"ase_boost": np.float32(new["boost"])}
      return None
    setup.on_log = on_log

  def exporter(workdir, weights):
    _export_weights(workdir, model, weights, f"jaxee ASE fine-tuning ({plan.name}, EMA)")
    return plan_io.save_ase_plan(pathlib.Path(workdir) / ASE_PLAN_FILE, plan, model.family)
  setup.exporter = exporter
  return setup


def load_ase_export(workdir):
  """(model, params, ASEPlan) from an ASE training workdir's export."""
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  plan = plan_io.load_ase_plan(pathlib.Path(workdir) / ASE_PLAN_FILE)
  model, params = convert.load_converted(pathlib.Path(workdir) / EXPORT_DIR)
  return model, params, plan


def _build_deediff(config, model, params, rng) -> MethodSetup:
  from jaxee.train.objectives import deediff as deediff_obj  # pylint: disable=g-import-not-at-top
  d = config.deediff
  uem = d.uem
  freeze = bool(d.freeze_backbone)
  schedule, label_dropout = _loss_section(config)
  layout = d.layout
  train_params = deediff_obj.init_deediff_train_params(
      model, params, rng, uem=uem, heads_from_backbone=bool(d.heads_from_backbone),
      layout=layout)
  loss_fn = deediff_obj.make_deediff_loss(
      model, schedule, lam=float(d.lam), beta=float(d.beta), variant=d.variant,
      train_backbone=not freeze, uem=uem, unweighted_head_loss=bool(d.unweighted_head_loss),
      label_dropout=label_dropout, layout=layout)
  threshold = float(d.threshold)

  def exporter(workdir, weights):
    _export_weights(workdir, model, weights["backbone"], "jaxee DeeDiff backbone")
    return plan_io.save_deediff_heads(pathlib.Path(workdir) / DEEDIFF_FILE, weights["deediff"],
                                      threshold=threshold, uem=uem, layout=layout)

  return MethodSetup("deediff", model, train_params, loss_fn,
                     ("backbone/.*",) if freeze else (), exporter=exporter)


def load_deediff_export(workdir):
  """(model, backbone params, ee_params, meta) from a DeeDiff training workdir's export."""
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  model, params = convert.load_converted(pathlib.Path(workdir) / EXPORT_DIR)
  ee, meta = load_deediff_heads(workdir)
  return model, params, ee, meta


def load_deediff_heads(path) -> Tuple[Dict[str, Any], dict]:
  """(ee_params, meta) from a DeeDiff workdir or its heads file (`jaxee.exits.io`)."""
  return plan_io.load_deediff_heads(path)


def _build_duodiff(config, model, params, rng) -> MethodSetup:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxee.train.objectives import duodiff as duodiff_obj  # pylint: disable=g-import-not-at-top
  from jaxee import models  # pylint: disable=g-import-not-at-top
  from jaxee.convert import backbone_rules  # pylint: disable=g-import-not-at-top
  d = config.duodiff
  overrides = dict(config.model.overrides or {})
  overrides["depth"] = duodiff_obj.shallow_depth(model, int(d.shallow_layers))
  shallow = models.create(config.model.arch, **overrides)
  if d.init == "deep":
    shallow_params = duodiff_obj.init_shallow_from_deep(params, model, shallow)
  else:
    inputs = backbone_rules.example_inputs(shallow)
    shallow_params = jax.tree.map(np.asarray, jax.device_get(
        jax.jit(lambda k: shallow.init(k, *inputs)["params"])(rng)))
  schedule, label_dropout = _loss_section(config)
  loss_fn = duodiff_obj.make_duodiff_loss(shallow, schedule=schedule, label_dropout=label_dropout)
  t_switch, rule = float(d.t_switch), d.rule

  def exporter(workdir, weights):
    _export_weights(workdir, shallow, weights, "jaxee DuoDiff shallow backbone (EMA)")
    path = pathlib.Path(workdir) / DUODIFF_FILE
    spec = {"t_switch": t_switch, "rule": rule,
            "shallow_layers": int(d.shallow_layers),
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
    config: the experiment config (`jaxee/train/launch.py` schema plus the method section).
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
                     "gradient training: run it through jaxee-train (objectives.masks.run)")
  if method == "baseline":
    from jaxee.train.objectives import (  # pylint: disable=g-import-not-at-top
        diffusion as diffusion_obj)
    schedule, label_dropout = _loss_section(config)
    return MethodSetup("baseline", model, params,
                       diffusion_obj.make_diffusion_loss(model, schedule=schedule,
                                                         label_dropout=label_dropout))
  return _BUILDERS[method](config, model, params, rng)
