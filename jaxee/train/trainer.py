"""The training loop: build state, resume, step over the input, log, checkpoint, export.

`train(config, workdir)` runs one experiment (config schema: `jaxee/train/launch.py`):

1. builds the backbone (`config.model`), its initial params (`config.init` or random) and the
   method's setup: `'baseline'` is the backbone's own loss (`objectives.diffusion.
   make_diffusion_loss`: DiT's hybrid ε-MSE + VLB with learned σ, U-ViT's ε-MSE), any other
   method comes from
   `jaxee.train.methods.build_method(config, model, params, rng)`;
2. builds the optimizer (`optim.make_optimizer`, frozen groups from the method and
   `config.optim.frozen_patterns`), the data loader (`jaxee.data`, this process's rows of
   every global batch) and the parallel step (`config.train.parallel`);
3. restores the workdir's latest checkpoint (state, loader position, host state) or starts at
   step 0 (`checkpoint.TrainCheckpointer`: a corrupt latest step is a loud error unless
   `config.train.ckpt_fallback`);
4. loops: batch -> placement -> step; every `log_every` steps it reads the metrics (the only
   host sync), writes `metrics.jsonl` and TensorBoard scalars (process 0) and updates the tqdm
   bar; every `ckpt_every` steps and at the end it checkpoints. Before any log or save it checks
   the sticky `healthy` flag of the state (`jaxee.train.step`): a non-finite loss or gradient
   raises `NonFiniteLossError` naming the step, and nothing from the bad step on is saved;
5. exports the EMA weights (process 0): the baseline as a converted checkpoint in
   `WORKDIR/export` (loadable by `jaxee-sample --config.ckpt=WORKDIR/export`), a method
   through its own `export(workdir, params)`.

A method setup (`methods.MethodSetup`) must have `params`, `loss_fn`, `frozen_patterns` and
`export(workdir, params)`; optional hooks the loop uses when present: `extras` (initial
`TrainState.extras`), `on_log(step, metrics) -> dict | None` (host-side updates of the extras,
e.g. ASE's plateau switch; called at every log step), `host_state() -> dict` and
`load_host_state(dict)` (checkpointed as JSON with the state).

No silent restarts (`jaxee.train.workdir`): a workdir with evidence of past progress but no
usable checkpoint is refused; a resume whose config differs from the saved `config.json` logs a
warning and a `{"step": N, "event": "config_changed", "changes": ...}` line in `metrics.jsonl`
(`read_metrics` skips such event lines unless asked).

Resume is exact: the state holds the base RNG (step keys are `fold_in(rng, step)`), the loader
position is saved with it, and on restart `metrics.jsonl` / TensorBoard are cut back to the
restored step, so an interrupted and resumed run logs the same sequence as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Dict

from absl import logging
import jax
import numpy as np
import tqdm

from jaxee import atomic_io
from jaxee.train import checkpoint as ckpt_lib
from jaxee.train import config_base
from jaxee.train import optim
from jaxee.train import state as state_lib
from jaxee.train import step as step_lib
from jaxee.train import workdir as workdir_lib

PyTree = Any
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EXPORT_DIR = "export"


class NonFiniteLossError(FloatingPointError):
  """A training step produced a non-finite loss or gradient; the run stops, nothing is saved."""


def is_main_process() -> bool:
  return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# Metrics.


class MetricWriter:
  """`metrics.jsonl` (one JSON object per log step) and TensorBoard scalars, process 0 only.

  On resume from step `start_step` the lines and events of steps > `start_step` (written by the
  interrupted run after its last checkpoint) are dropped, so the file reads as one run.
  """

  def __init__(self, workdir: pathlib.Path, *, start_step: int, enabled: bool,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = workdir / METRICS_FILE
    self._file = None
    self._tb = None
    if not enabled:
      return
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a kill -9
          continue
        if int(record.get("step", 0)) <= start_step:
          kept.append(line)
      atomic_io.atomic_write_text(self.path, "".join(l + "\n" for l in kept))
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tb"),
                               purge_step=start_step + 1 if start_step > 0 else None)

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in sorted(scalars.items())}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"train/{k}", float(v), int(step))
      self._tb.flush()

  def write_event(self, step: int, event: str, **fields) -> None:
    """An event line (not a metric): `{"step", "event", **fields}`."""
    if not self.enabled:
      return
    self._file.write(json.dumps({"step": int(step), "event": event, **fields}, default=str)
                     + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: os.PathLike | str, events: bool = False) -> list:
  """The records of `WORKDIR/metrics.jsonl` (for tools and tests); event lines with `events`."""
  path = pathlib.Path(workdir) / METRICS_FILE
  records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [r for r in records if events or "event" not in r]


# ------------------------------------------------------------------------------------------------
# Building blocks.


def _cfg(section, name, default=None):
  return optim.config_get(section, name, default)


def build_model(config):
  """The backbone of `config.model`: `arch` + `overrides`, then `compute_dtype` / `remat`."""
  from jaxee import models  # pylint: disable=g-import-not-at-top
  overrides = dict(_cfg(config.model, "overrides", {}) or {})
  return models.with_runtime(models.create(config.model.arch, **overrides),
                             compute_dtype=_cfg(config.model, "compute_dtype", None),
                             remat=_cfg(config.model, "remat", None))


def init_params(config, model, rng) -> PyTree:
  """Initial backbone params (host NumPy): `config.init` if set, else random (`rng`).

  `config.init` may be a converted checkpoint directory (`python -m jaxee.convert`), a jaxee
  training workdir (its latest checkpoint's EMA weights) or a PyTorch/safetensors file
  (converted on the fly for `config.model`).
  """
  from jaxee.convert import backbone_rules  # pylint: disable=g-import-not-at-top
  source = str(_cfg(config, "init", "") or "")
  if not source:
    inputs = backbone_rules.example_inputs(model)
    params = jax.jit(lambda k: model.init(k, *inputs)["params"])(rng)
    return jax.tree.map(np.asarray, jax.device_get(params))
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"config.init: {path} does not exist")
  from jaxee import convert  # pylint: disable=g-import-not-at-top
  from jaxee import models  # pylint: disable=g-import-not-at-top
  if path.is_dir() and (path / "checkpoints").is_dir():
    params = _params_from_workdir(path, model)
  elif path.is_dir() and (path / "config.json").is_file() and (path / "params").is_dir():
    loaded_model, params = convert.load_converted(path)
    want, got = models.model_config(model), models.model_config(loaded_model)
    if want != got:
      diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got)
              if want.get(k) != got.get(k)}
      raise ValueError(f"config.init {path} holds a different backbone than config.model: "
                       f"(checkpoint, config) = {diff}")
  else:
    params = convert.from_torch(path, config.model.arch,
                                **dict(_cfg(config.model, "overrides", {}) or {}))
  logging.info("initial params from %s", path)
  return jax.tree.map(np.asarray, params)


def _params_from_workdir(path: pathlib.Path, model) -> PyTree:
  """EMA params of the latest checkpoint of another jaxee training run."""
  from jaxee.convert import backbone_rules  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             *backbone_rules.example_inputs(model))["params"])
  mgr = ckpt_lib.TrainCheckpointer(path / "checkpoints", async_save=False)
  try:
    step = mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.init: {path} has no checkpoint")
    meta = mgr.read_meta(step)
    flat = mgr.restore_flat(step, meta)
  finally:
    mgr.close()
  prefix = "ema_params."
  sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  try:
    return ckpt_lib.unflatten_state(template, sub)
  except ValueError as e:
    raise ValueError(f"config.init {path} (step {step}): its EMA params do not fit "
                     f"config.model: {e}") from e


class BaselineSetup:
  """Method 'baseline': the backbone's own training loss on all its params."""

  def __init__(self, config, model, params):
    from jaxee.train.objectives import (  # pylint: disable=g-import-not-at-top
        diffusion as diffusion_obj)
    loss_cfg = _cfg(config, "loss", None)
    self.model = model
    self.params = params
    self.frozen_patterns = ()
    self.loss_fn = diffusion_obj.make_diffusion_loss(
        model, schedule=_cfg(loss_cfg, "schedule", None),
        label_dropout=_cfg(loss_cfg, "label_dropout", None))

  def export(self, workdir, params) -> None:
    from jaxee import convert  # pylint: disable=g-import-not-at-top
    out = convert.save_converted(pathlib.Path(workdir) / EXPORT_DIR, self.model, params,
                                 extra={"source": "jaxee.train baseline (EMA)"}, overwrite=True)
    logging.info("exported EMA weights to %s", out)


def build_setup(config, model, params, rng):
  """The method's `MethodSetup` ('baseline' here; others from `jaxee.train.methods`)."""
  if config.method == "baseline":
    return BaselineSetup(config, model, params)
  try:
    from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"config.method={config.method!r} needs jaxee.train.methods."
                      f"build_method, which could not be imported: {e}") from e
  return methods.build_method(config, model, params, rng)


def optimizer_config(config, setup) -> Dict[str, Any]:
  """`config.optim` as a dict, with the method's frozen groups and `num_steps` filled in."""
  opt = dict(config.optim.to_dict() if hasattr(config.optim, "to_dict") else config.optim)
  patterns = list(opt.get("frozen_patterns") or ())
  for p in getattr(setup, "frozen_patterns", None) or ():
    if p not in patterns:
      patterns.append(p)
  opt["frozen_patterns"] = patterns
  if not opt.get("num_steps"):
    opt["num_steps"] = int(config.train.num_steps)
  return opt


def make_loader(config):
  """This process's `DataLoader` over `config.data` (seeded by `config.train.seed`)."""
  from jaxee import data as data_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  options = dict(_cfg(d, "options", {}) or {})
  source = data_lib.get_source(d.source, split=_cfg(d, "split", "train"),
                               data_dir=_cfg(d, "data_dir", None),
                               image_size=_cfg(d, "image_size", None), **options)
  return data_lib.DataLoader(source, int(d.batch_size), seed=int(config.train.seed),
                             shuffle=bool(_cfg(d, "shuffle", True)),
                             prefetch=int(_cfg(d, "prefetch", 0)),
                             num_threads=int(_cfg(d, "num_threads", 0)))


def _check_batch(model, batch) -> None:
  """A clear error when the data does not fit the backbone (before any compilation)."""
  from jaxee.convert import backbone_rules  # pylint: disable=g-import-not-at-top
  want = tuple(backbone_rules.example_inputs(model)[0].shape[1:])
  got = tuple(np.shape(batch["image"])[1:])
  if want != got:
    raise ValueError(f"data images are {got} (H, W, C) but the backbone expects {want}: "
                     f"adjust config.data (image_size, options.channels) or config.model")


def validate_config(config) -> None:
  """Fails early, with the field name, on a malformed training config."""
  if config.method not in config_base.METHODS:
    raise ValueError(f"config.method={config.method!r}; expected one of {config_base.METHODS}")
  t = config.train
  if t.parallel not in step_lib.KINDS:
    raise ValueError(f"config.train.parallel={t.parallel!r}; expected one of {step_lib.KINDS}")
  for name in ("num_steps", "log_every"):
    if int(t[name]) <= 0:
      raise ValueError(f"config.train.{name} must be > 0, got {t[name]}")
  if int(t.ckpt_every) < 0 or int(t.keep) < 1:
    raise ValueError(f"config.train.ckpt_every must be >= 0 and keep >= 1, got "
                     f"{t.ckpt_every}, {t.keep}")
  if not 0.0 <= float(t.ema_decay) <= 1.0:
    raise ValueError(f"config.train.ema_decay must be in [0, 1], got {t.ema_decay}")
  workdir_lib.check_optim(config.optim)
  if config.method == "masks":
    return
  batch = int(config.data.batch_size)
  devices = jax.local_device_count() if t.parallel == "pmap" else jax.device_count()
  per = batch // jax.process_count() if t.parallel == "pmap" else batch
  if batch <= 0 or batch % jax.process_count() or per % devices:
    raise ValueError(f"config.data.batch_size={batch} (global) must split evenly over "
                     f"{jax.process_count()} process(es) and {devices} device(s)")


# ------------------------------------------------------------------------------------------------
# The loop.


def _host_state(setup) -> Dict[str, Any]:
  fn = getattr(setup, "host_state", None)
  return dict(fn()) if callable(fn) else {}


def _describe_nonfinite(pending, ps) -> str:
  for step, metrics in pending:
    m = ps.host_metrics(metrics)
    if not m.get("finite", 1.0):
      return f"step {step}: loss={m.get('loss')}, grad_norm={m.get('grad_norm')}"
  return "an earlier step"


def train(config, workdir: os.PathLike | str, *, model=None, params=None) -> Dict[str, Any]:
  """Runs (or resumes) training; returns a summary dict (final step, last metrics, timings).

  Args:
    config: the experiment ConfigDict (schema in `jaxee/train/launch.py`).
    workdir: output directory (checkpoints, metrics, TensorBoard, export); shared by all
      processes of a multi-host run.
    model, params: optionally the backbone and its initial params (else built from config).

  Raises:
    NonFiniteLossError: a step produced a non-finite loss/gradient (nothing saved after it).
    checkpoint.CorruptCheckpointError: the latest checkpoint is damaged (no fallback set).
  """
  validate_config(config)
  workdir = pathlib.Path(workdir).absolute()
  main = is_main_process()
  workdir_lib.check_workdir(workdir, create=main)
  t = config.train
  seed = int(t.seed)
  init_key, method_key, state_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  model = model if model is not None else build_model(config)
  if params is None:
    params = init_params(config, model, init_key)
  setup = build_setup(config, model, params, method_key)
  opt_cfg = optimizer_config(config, setup)
  tx = optim.make_optimizer(opt_cfg, setup.params)
  schedule = optim.make_schedule(opt_cfg)
  frozen = optim.frozen_paths(setup.params, opt_cfg["frozen_patterns"])
  logging.info("method=%s parallel=%s devices=%d processes=%d frozen leaves=%d",
               config.method, t.parallel, jax.device_count(), jax.process_count(), len(frozen))

  host_state = state_lib.create_train_state(setup.params, tx, state_key,
                                            extras=getattr(setup, "extras", None))
  host_state = jax.tree.map(np.asarray, jax.device_get(host_state))
  checkpointer = ckpt_lib.TrainCheckpointer(
      workdir / "checkpoints", keep=int(t.keep), async_save=bool(_cfg(t, "async_checkpoint", True)),
      fallback=bool(_cfg(t, "ckpt_fallback", False)))
  loader = make_loader(config)
  ps = step_lib.make_train_step(t.parallel, loss_fn=setup.loss_fn, tx=tx,
                                ema_decay=float(t.ema_decay),
                                ema_warmup=_cfg(t, "ema_warmup", None))
  restored = checkpointer.restore_latest(ps.restore_template(host_state))  # onto the layout
  start = 0
  if restored is None:
    workdir_lib.refuse_silent_restart(workdir, ckpt_every=int(t.ckpt_every),
                                      num_steps=int(t.num_steps))
  if restored is not None:
    restored_state, meta = restored
    start = int(meta["step"])
    loader.restore(meta["loader"])
    load_host = getattr(setup, "load_host_state", None)
    if callable(load_host) and meta.get("host"):
      load_host(meta["host"])
    logging.info("resumed from step %d (loader %s)", start, meta["loader"])
  epoch, index = loader.state()["epoch"], loader.state()["index"]
  lo = loader.process_index * loader.local_batch_size
  first = loader.global_indices(epoch, index)[0][lo:lo + loader.local_batch_size]
  logging.info("input: process %d/%d reads rows %d:%d of each global batch of %d; next batch "
               "records %s", loader.process_index, loader.process_count, lo,
               lo + loader.local_batch_size, loader.global_batch_size,
               ",".join(str(int(i)) for i in first))
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  changes = workdir_lib.config_changes(workdir, config_json) if start > 0 else None
  if changes:
    logging.warning("resuming step %d with a config that differs from %s: %s", start,
                    workdir / CONFIG_FILE, "; ".join(f"{k}: {a!r} -> {b!r}"
                                                     for k, (a, b) in changes.items()))
  if main:
    atomic_io.atomic_write_text(workdir / CONFIG_FILE, config_json)

  if restored is None:
    state, rng = ps.place_state(host_state), ps.place_rng(host_state.rng)
  else:  # the saved base key (not a changed config's seed) keeps the resume exact
    state, rng = ps.adopt_restored(restored_state)
  del host_state, restored
  num_steps = int(t.num_steps)
  log_every, ckpt_every = int(t.log_every), int(t.ckpt_every)
  sleep_s = float(_cfg(t, "debug_step_sleep_s", 0.0))
  writer = MetricWriter(workdir, start_step=start, enabled=main,
                        tensorboard=bool(_cfg(t, "tensorboard", True)))
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=f"train {config.method}",
                  disable=not (main and bool(_cfg(t, "progress", True))), dynamic_ncols=True,
                  mininterval=1.0)
  if changes:
    writer.write_event(start, "config_changed", changes=changes)
  summary: Dict[str, Any] = {"start_step": start, "metrics": {}, "config_changes": changes or {}}
  pending = []  # (step, device metrics) since the last host check, to name a bad step.

  def check_healthy(metrics, step):
    m = ps.host_metrics(metrics)
    if not m["healthy"]:
      last = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at {_describe_nonfinite(pending, ps)} (state kept at "
          f"step {int(ckpt_lib.to_host(ps.canonical_state(state).step))}, the last good one). "
          f"Training stopped; nothing was saved after the bad step; the latest checkpoint is "
          f"step {last}. Lower the learning rate, enable optim.grad_clip_norm or check the data.")
    pending.clear()
    return m

  def save(step):
    checkpointer.save(step, ps.canonical_state(state), loader_state=loader.state(),
                      host_state=_host_state(setup))

  try:
    metrics = None
    t_log, n_log = time.perf_counter(), 0
    for step in range(start + 1, num_steps + 1):
      batch = next(loader)
      if step == start + 1:
        _check_batch(model, batch)
      state, metrics = ps(state, ps.place_batch(batch), rng)
      pending.append((step, metrics))
      n_log += 1
      bar.update(1)
      if sleep_s:
        time.sleep(sleep_s)
      is_log = step % log_every == 0 or step == num_steps
      is_ckpt = (ckpt_every and step % ckpt_every == 0) or step == num_steps
      if is_log or is_ckpt:
        m = check_healthy(metrics, step)
      if is_log:
        now = time.perf_counter()
        m["steps_per_sec"] = n_log / max(now - t_log, 1e-9)
        m["lr"] = float(schedule(step - 1)) if callable(schedule) else float(schedule)
        t_log, n_log = now, 0
        writer.write(step, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        summary["metrics"] = m
        on_log = getattr(setup, "on_log", None)
        if callable(on_log):
          updates = on_log(step, m)
          if updates:
            unknown = sorted(set(updates) - set(state.extras))
            if unknown:
              raise ValueError(f"{config.method}: on_log may only update existing state "
                               f"extras, not add {unknown} (set them in setup.extras)")
            updates = {k: np.asarray(v, np.dtype(state.extras[k].dtype))
                       for k, v in updates.items()}
            state = state.replace(extras={**state.extras, **ps.place_replicated(updates)})
      if is_ckpt:
        save(step)
    if start >= num_steps:
      logging.info("workdir already at step %d >= num_steps %d: nothing to train", start,
                   num_steps)
    elif metrics is not None:
      check_healthy(metrics, num_steps)
    checkpointer.wait()
    final = ps.canonical_state(state)  # on device; only what is needed comes to the host
    summary.update(step=int(ckpt_lib.to_host(final.step)),
                   checkpoint_steps=checkpointer.all_steps())
  finally:
    bar.close()
    writer.close()
    loader.close()
    checkpointer.close()

  export = getattr(setup, "export", None)
  if callable(export) and bool(_cfg(t, "export", True)):
    weights = final.ema_params if bool(_cfg(t, "export_ema", True)) else final.params
    if jax.process_count() > 1:
      logging.warning("export skipped in a multi-process run: rerun the same command in one "
                      "process to export from the final checkpoint")
    elif main:
      export(workdir, ckpt_lib.to_host(weights))
  summary["workdir"] = str(workdir)
  return summary
