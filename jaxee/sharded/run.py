r"""The sampling engine behind `jaxee-sample`: many samples in resumable shards.

    jaxee-sample --config=configs/sample_dit.py --config.ckpt=ckpt/dit_xl_2_256 \
        --config.vae_ckpt=ckpt/sd_vae_ft_ema --config.out_dir=runs/dit_fid50k
    jaxee-sample --config=configs/sample_dit.py:runlocal --config.plan=ase:D3-DiT \
        --config.plan_options.depth=3

`run_sampling(config)` does the same from Python (the command line is `jaxee/cli/sample.py`,
also `python -m jaxee.cli.sample`). The per-shard layout follows DiT `sample_ddp.py` (a fixed
global seed, each worker's noise derived from it); here shard k's keys are
`fold_in(key(seed), k)`. The output directory holds `shards/shard_{k:05d}.npz` (`images`: uint8
NHWC when decoded or in pixel space, else `latents`: float32 NHWC; `labels`: int32, -1 when
unconditional; `index`: global sample numbers), `grid.png` (the first shard), `config.json`,
`throughput.json`, `manifest.json` and, with `merge=True`, `samples.npz`.

Resume: the randomness of shard k is a pure function of (seed, k) (`fold_in`), every file is
written atomically (temp file + `os.replace`), so re-running the same command skips the shards
already present and ends with byte-identical output. A shard that exists but cannot be read is
recomputed, and so is one whose content is not what that shard must be (its recorded SHA-256,
`index`, shape and dtype; see `jaxee.sharded.shards`). `config.json` is written only once the
first shard has been computed, so a run that fails on bad input leaves nothing behind. A run
refuses an `out_dir` whose `config.json` differs in a key that changes the samples (a mask plan
file counts by its SHA-256) unless `force=True`; `provenance.json` records which config made
which shard. One process at a time owns an out_dir (a lock file); non-finite samples stop the
run with an error naming the shard and batch, before anything of that shard is written.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxee import convert
from jaxee import models
from jaxee import sampling as sampling_lib
from jaxee import validation
from jaxee.convert import vae_rules
from jaxee.diffusion import samplers as samplers_lib
from jaxee.eval import images as images_lib
from jaxee.models import vae as vae_lib
from jaxee.sharded import shards as shards_lib
from jaxee.sharded.shards import (ConfigMismatchError, read_shard, sample_config_diff,  # noqa: F401
                                  shard_counts, write_json, write_npz)

__all__ = ["ConfigMismatchError", "ShardSampler", "load_backbone", "load_vae", "make_plan",
           "parse_labels", "read_shard", "run_sampling", "sample_config_diff", "shard_counts",
           "validate_config", "write_json", "write_npz"]

SAMPLERS = samplers_lib.SAMPLERS
# The schedule each sampler integrates (`jaxee/diffusion/samplers.py`).
# The schedule kind each sampler runs on (one source: the sampler registry).
SAMPLER_SCHEDULES = {n: samplers_lib.get_sampler(n).schedule for n in SAMPLERS}
VAE_KINDS = ("auto", "compvis", "diffusers")
UINT8_CONVENTIONS = ("dit_fid", "save_image")
PLACEHOLDER = "SET_ME"


def parse_labels(spec: Any) -> Any:
  """`'random'` → 'random'; `'none'`/None → None; `'1,2,3'` or a sequence → list of ints."""
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "")):
    return None
  if isinstance(spec, str):
    if spec.strip().lower() == "random":
      return "random"
    try:
      return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
      raise ValueError(f"config.labels must be 'random', 'none' or comma-separated ints, "
                       f"got {spec!r}") from None
  labels = list(spec)
  if any(isinstance(v, bool) or float(v) != int(v) for v in labels):
    raise ValueError(f"config.labels must be whole class numbers, got {spec!r}")
  return [int(v) for v in labels]


def validate_config(config) -> None:
  """Checks a sampling config; raises one ValueError listing every problem."""
  problems = []
  if config.sampler not in SAMPLERS:
    problems.append(f"unknown sampler {config.sampler!r}; choose from {SAMPLERS}")
  if int(config.steps) < 1:
    problems.append(f"steps must be >= 1, got {config.steps}")
  if config.get("guidance") is not None and not math.isfinite(float(config.guidance)):
    problems.append(f"guidance must be a finite number (or None), got {config.guidance}")
  elif config.get("guidance") is not None and float(config.guidance) < 0:
    problems.append(f"guidance must be >= 0 (or None), got {config.guidance}")
  for key in ("num_samples", "batch_size", "shard_size"):
    if int(config[key]) < 1:
      problems.append(f"{key} must be >= 1, got {config[key]}")
  if int(config.batch_size) > int(config.shard_size):
    problems.append(f"batch_size ({config.batch_size}) must be <= shard_size "
                    f"({config.shard_size})")
  if config.get("schedule") and config.sampler in SAMPLERS and (
      config.schedule != SAMPLER_SCHEDULES[config.sampler]):
    problems.append(f"sampler {config.sampler!r} runs on the "
                    f"{SAMPLER_SCHEDULES[config.sampler]!r} schedule, not {config.schedule!r}")
  if config.get("vae_kind", "auto") not in VAE_KINDS:
    problems.append(f"vae_kind must be one of {VAE_KINDS}, got {config.vae_kind!r}")
  if config.get("uint8", "dit_fid") not in UINT8_CONVENTIONS:
    problems.append(f"uint8 must be one of {UINT8_CONVENTIONS}, got {config.uint8!r}")
  try:
    labels = parse_labels(config.labels)
    if isinstance(labels, list) and (not labels or min(labels) < 0):
      problems.append(f"labels list must be non-empty and >= 0, got {config.labels!r}")
  except ValueError as e:
    problems.append(str(e))
  allowed = (samplers_lib.get_sampler(config.sampler).options
             if config.sampler in SAMPLERS else ())
  unknown = sorted(set(dict(config.get("sampler_options") or {})) - set(allowed))
  if unknown and config.sampler in SAMPLERS:
    problems.append(f"sampler {config.sampler!r} takes no option(s) {unknown}; it takes {allowed}")
  if not str(config.out_dir):
    problems.append("out_dir must be set")
  if config.get("compute_dtype") not in (None, *models.COMPUTE_DTYPES):
    problems.append(f"compute_dtype must be one of {models.COMPUTE_DTYPES} (or None), got "
                    f"{config.compute_dtype!r}")
  if problems:
    raise ValueError("invalid sampling config:\n  " + "\n  ".join(problems))


def make_plan(config, model, params=None) -> Any:
  """The exit plan for `config.plan` in the one spec language (`jaxee.exits.spec`; None: full).

  Specs: none/full; `ase:TABLE|COUNTS[:switch]` or a bare ASE table name (`plan_options.depth`
  rescales it, `plan_options.runner` picks the runner); `mask:PATH`, `file:PATH` or `PATH.npz`
  (a saved plan; `plan_options.rectify` applies TABM rectification); `mask:skip=F[:branch]`;
  `duodiff[:T_SWITCH]` (the shallow model from `plan_options.shallow_ckpt`: a converted dir, or
  a torch file of `shallow_arch` (default `arch`) with `model_overrides` and depth
  `shallow_depth`; rule `plan_options.rule`); `deediff:WORKDIR` (heads/UEMs of a DeeDiff
  training run, its workdir or `deediff_heads.npz`; θ from the file unless
  `plan_options.threshold`; `plan_options.mode` batched|exact, `plan_options.min_fraction`);
  several joined with '+' compose (`jaxee.exits.compose`).
  """
  from jaxee.exits import spec as spec_lib  # pylint: disable=g-import-not-at-top
  spec = config.get("plan")
  opts = dict(config.get("plan_options") or {})

  def load_shallow(arg):
    overrides = dict(config.get("model_overrides") or {})
    if opts.get("shallow_depth"):
      overrides["depth"] = int(opts["shallow_depth"])
    return _load_model(arg or opts.get("shallow_ckpt"),
                       opts.get("shallow_arch") or config.get("arch"), overrides,
                       "plan_options.shallow_ckpt")

  times = None
  if model is not None and spec and any(k in str(spec) for k in ("skip=", "keep=", "fora:")):
    times = sampling_lib.nfe_times(model, config.sampler, int(config.steps),
                                   config.get("schedule") or None,
                                   **dict(config.get("sampler_options") or {}))
  return spec_lib.parse_plan(spec, model, params=params, nfe_times=times, options=opts,
                             load_shallow=load_shallow)


def _check_path(path: str, what: str) -> pathlib.Path:
  if not path or str(path).startswith(PLACEHOLDER):
    raise ValueError(f"config.{what} is not set ({path!r}); pass --config.{what}=PATH")
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"config.{what}: {p} does not exist")
  return p


def _load_model(ckpt, arch, overrides: dict, what: str) -> tuple[Any, Any]:
  """`(model, params)` from a converted Orbax dir or a torch/safetensors file (with `arch`)."""
  path = _check_path(ckpt, what)
  if path.is_dir() and (path / "config.json").is_file():
    if overrides:
      logging.warning("overrides %s ignored: %s is a converted checkpoint", overrides, path)
    model, params = convert.load_converted(path)
    if isinstance(model, vae_lib.AutoencoderKL):
      raise ValueError(f"config.{what} {path} is a converted VAE, not a DiT/U-ViT backbone")
    return model, params
  if not arch:
    raise ValueError(f"an arch is needed to convert config.{what}={path} on the fly")
  return models.create(arch, **overrides), convert.from_torch(path, arch, **overrides)


def load_backbone(config) -> tuple[Any, Any]:
  """`(model, params)` of `config.ckpt` (converted dir, or a `.pt` converted with `arch`)."""
  return _load_model(config.ckpt, config.get("arch"), dict(config.get("model_overrides") or {}),
                     "ckpt")


def load_vae(config) -> tuple[Optional[vae_lib.AutoencoderKL], Any]:
  """`(vae, params)` from `config.vae_ckpt` (converted dir, or a torch/safetensors file in
  layout `config.vae_kind`), or `(None, None)`."""
  spec = config.get("vae_ckpt")
  if spec is None or str(spec).lower() in ("", "none"):
    return None, None
  path = _check_path(spec, "vae_ckpt")
  if path.is_dir() and (path / "config.json").is_file():
    vae, params = convert.load_converted(path)
    if not isinstance(vae, vae_lib.AutoencoderKL):
      raise ValueError(f"config.vae_ckpt {path} is a converted backbone, not a VAE")
    return vae, params
  vae_config, params = vae_rules.load_vae(path, layout=config.get("vae_kind") or "auto")
  return vae_lib.AutoencoderKL(vae_config), params


def _sample_space(model) -> tuple[int, int, int]:
  """(num real classes or 0, spatial size, channels) of a backbone (any family: the contract's
  `input_shape`, `validation.num_real_classes`)."""
  from jaxee.models import backbone as bb_lib  # pylint: disable=g-import-not-at-top
  size, _, channels = bb_lib.as_backbone(model, "block").input_shape
  return validation.num_real_classes(model), size, channels


def _effective_guidance(model, guidance: Optional[float]) -> Optional[float]:
  """None where the scale is a no-op (DiT 1.0 = conditional, U-ViT 0.0), saving half the NFEs."""
  if guidance is None:
    return None
  neutral = 1.0 if model.family == "dit" else 0.0
  return None if float(guidance) == neutral else float(guidance)


class ShardSampler:
  """Draws shard k from (seed, k): start noise, labels and sampler noise per batch, then decodes."""

  def __init__(self, config, model, params, vae=None, vae_params=None, plan=None):
    self.config, self.model, self.plan, self.vae = config, model, plan, vae
    self.batch = int(config.batch_size)
    self.labels = parse_labels(config.labels)
    self.num_classes, self.size, self.channels = _sample_space(model)
    if self.num_classes <= 0 and self.labels is not None:
      if self.labels != "random":
        raise ValueError("config.labels lists classes but the model is unconditional")
      self.labels = None
    if isinstance(self.labels, list) and max(self.labels) >= self.num_classes:
      raise ValueError(f"labels {self.labels} out of range for {self.num_classes} classes")
    self.guidance = _effective_guidance(model, config.get("guidance"))
    if self.labels is None:
      self.guidance = None
    self.options = dict(config.get("sampler_options") or {})
    self.schedule = config.get("schedule") or None
    schedule_name = self.schedule or model.default_schedule
    if schedule_name != SAMPLER_SCHEDULES[config.sampler]:
      raise ValueError(f"sampler {config.sampler!r} runs on the "
                       f"{SAMPLER_SCHEDULES[config.sampler]!r} schedule but this model defaults to "
                       f"{schedule_name!r}; pick a matching sampler or set config.schedule")
    validation.check_sample_args(model, num=None, labels=None, guidance=None,
                                 sampler=config.sampler, steps=config.steps,
                                 schedule=self.schedule)
    self.plan_info = self._bind_plan_once(params)
    self.mesh = None
    if config.get("multi_device", True) and jax.local_device_count() > 1:
      self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    self._shapes_seen = set()
    self.params = self._replicate(params)
    self.vae_params = self._replicate(vae_params) if vae is not None else None
    self.decode = None
    if vae is not None:
      if vae.config.embed_dim != self.channels:
        raise ValueError(f"VAE latent channels {vae.config.embed_dim} != model channels "
                         f"{self.channels}")
      self.decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    self.kind = "images" if (vae is not None or self.channels == 3) else "latents"
    self.sample_shape = (self.size, self.size, self.channels)
    if self.decode is not None:
      z = jax.ShapeDtypeStruct((1, *self.sample_shape), jnp.float32)
      self.sample_shape = tuple(jax.eval_shape(self.decode, self.vae_params, z).shape[1:])
    self.dit_fid = config.get("uint8", "dit_fid") == "dit_fid"

  def _bind_plan_once(self, params) -> dict:
    """Binds the plan to the NFE grid once on the host and returns its `info`.

    A plan that does not fit the model or the grid thus fails before anything is written.
    """
    if self.plan is None:
      return {}
    nfe_times = sampling_lib.nfe_times(self.model, self.config.sampler, int(self.config.steps),
                                       self.schedule, **self.options)
    if hasattr(self.plan, "check"):
      self.plan.check(self.model, nfe_times)
    return dict(getattr(self.plan.bind(self.model, params, nfe_times), "info", None) or {})

  def _replicate(self, tree):
    if self.mesh is None:
      return tree
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(tree, replicated)

  def _split(self, x):
    """Shards the batch axis over the devices; a batch that does not divide is replicated."""
    if self.mesh is None:
      return x
    if x.shape[0] % self.mesh.size:
      spec = jax.sharding.PartitionSpec()
    else:
      spec = jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def _batch_labels(self, key, start: int, n: int):
    if self.labels is None:
      return None
    if self.labels == "random":
      return jax.random.randint(key, (n,), 0, self.num_classes, jnp.int32)
    idx = (start + np.arange(n)) % len(self.labels)
    return jnp.asarray(np.asarray(self.labels, np.int32)[idx])

  def sample_batch(self, key, start: int, n: int,
                   where: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """`n` final samples (uint8 images or float latents) and their labels (-1: none).

    Args:
      key: the batch's PRNG key (start noise, labels and sampler noise are split from it).
      start: global index of the batch's first sample (cycles a label list).
      n: batch size.
      where: names the batch in a non-finite error (e.g. 'shard 3, batch 0').

    Returns:
      `(samples, labels)` as host arrays.

    Raises:
      validation.NonFiniteError: the samples hold NaN/Inf.
    """
    k_noise, k_label, k_sample = jax.random.split(key, 3)
    shape = (n, self.size, self.size, self.channels)
    x_T = self._split(jax.random.normal(k_noise, shape, jnp.float32))
    labels = self._batch_labels(k_label, start, n)
    labels = None if labels is None else self._split(labels)
    x = sampling_lib.sample(self.model, self.params, k_sample, sampler=self.config.sampler,
                            steps=int(self.config.steps), labels=labels, guidance=self.guidance,
                            plan=self.plan, x_T=x_T, schedule=self.schedule,
                            check_finite=False, **self.options)  # checked below, named
    if self.decode is not None:
      x = self.decode(self.vae_params, x)
    x = np.asarray(jax.device_get(x), np.float32)
    validation.check_finite(x, f"the samples of {where} (samples {start}..{start + n - 1})")
    out = images_lib.to_uint8(x, dit_fid=self.dit_fid) if self.kind == "images" else x
    y = np.full((n,), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    return out, y

  def shard(self, k: int, count: int, timer: list) -> dict[str, np.ndarray]:
    """Shard k: batches of `batch_size` (the last one smaller), batch b keyed by (seed, k, b).

    Args:
      k: shard number.
      count: samples in the shard.
      timer: gets one `(seconds, images, compiled)` per batch; `compiled` marks the first call
        of each batch shape in this run.

    Returns:
      The shard's arrays (`images` or `latents`, `labels`, `index`).
    """
    key = jax.random.fold_in(jax.random.key(int(self.config.seed)), k)
    start0 = k * int(self.config.shard_size)
    xs, ys = [], []
    for b, offset in enumerate(range(0, count, self.batch)):
      n = min(self.batch, count - offset)
      compiled = n not in self._shapes_seen
      self._shapes_seen.add(n)
      t0 = time.perf_counter()
      x, y = self.sample_batch(jax.random.fold_in(key, b), start0 + offset, n,
                               where=f"shard {k}, batch {b}")
      timer.append((time.perf_counter() - t0, n, compiled))
      xs.append(x)
      ys.append(y)
    return {self.kind: np.concatenate(xs), "labels": np.concatenate(ys),
            "index": np.arange(start0, start0 + count, dtype=np.int64)}


def _throughput(timer: list, config, n_done: int, n_skipped: int, plan_info: dict) -> dict:
  """images/s over the batches that did not compile; compile_s = their excess time."""
  steady = [(t, n) for t, n, compiled in timer if not compiled]
  firsts = [(t, n) for t, n, compiled in timer if compiled]
  steady_s = sum(t for t, _ in steady)
  steady_n = sum(n for _, n in steady)
  rate = steady_n / steady_s if steady_s > 0 else None
  compile_s = sum(max(t - (n / rate if rate else 0.0), 0.0) for t, n in firsts)
  return {
      "images_per_s": rate,
      "compile_s": compile_s if firsts else None,
      "compile_s_is_upper_bound": bool(firsts) and rate is None,
      "first_batch_s": timer[0][0] if timer else None,
      "timed_batches": len(steady), "timed_images": steady_n,
      "shards_computed": n_done, "shards_skipped": n_skipped,
      "sampler": config.sampler, "steps": int(config.steps), "batch_size": int(config.batch_size),
      "plan": config.get("plan") or None, "plan_ideal_saving": plan_info.get("ideal_saving"),
      "device": jax.devices()[0].device_kind, "num_devices": jax.local_device_count(),
  }


def run_sampling(config, *, on_shard: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Samples `config.num_samples` into `config.out_dir`, resuming from the shards present.

  Args:
    config: a sampling config (see `configs/sample_dit.py`).
    on_shard: called as `on_shard(k, arrays)` after shard k is written (tests, progress hooks).

  Returns:
    The throughput record (also in `throughput.json`) plus `out_dir` and `manifest`.

  Raises:
    ValueError: on an invalid config; `ConfigMismatchError` when out_dir holds another run.
  """
  validate_config(config)
  saved = json.loads(config.to_json_best_effort())
  from jaxee.exits import spec as spec_lib  # pylint: disable=g-import-not-at-top
  plan_files = [p for p in spec_lib.referenced_files(config.get("plan")) if p.is_file()]
  if plan_files:
    saved["plan_file_sha256"] = shards_lib.sha256(plan_files[0])
  out = pathlib.Path(config.out_dir).expanduser().absolute()
  with shards_lib.claim_out_dir(out, None if jax.process_count() == 1 else jax.process_index()):
    return _run_claimed(config, out, saved, on_shard)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _run_claimed(config, out: pathlib.Path, saved: dict, on_shard) -> dict:
  """`run_sampling` once `out` is claimed: resume, sample the missing shards, write manifest.

  With P > 1 processes, process p samples and writes the shards k ≡ p (mod P) on its local
  devices; process 0 alone cleans the out_dir first and writes provenance and the manifest last.
  """
  nproc, rank = jax.process_count(), jax.process_index()
  old_config = shards_lib.prepare_out_dir(out, saved, bool(config.get("force", False)),
                                          clean=rank == 0)
  _barrier("jaxee_sample_prepared")
  model, params = load_backbone(config)
  model = models.with_runtime(model, compute_dtype=config.get("compute_dtype"))
  vae, vae_params = load_vae(config)
  sampler = ShardSampler(config, model, params, vae, vae_params, make_plan(config, model, params))
  counts = shard_counts(int(config.num_samples), int(config.shard_size))
  provenance = shards_lib.Provenance(out, None if nproc == 1 else rank)
  timer, n_done, n_skipped, config_written, written = [], 0, 0, False, []
  grid_path = out / "grid.png"
  mine = [(k, c) for k, c in enumerate(counts) if k % nproc == rank]
  bar = tqdm.tqdm(total=sum(c for _, c in mine), unit="img", desc="sampling",
                  dynamic_ncols=True, disable=not config.get("progress", True))
  for k, count in mine:
    path = out / "shards" / f"shard_{k:05d}.npz"
    arrays = read_shard(path, count, start=k * int(config.shard_size), kind=sampler.kind,
                        sample_shape=sampler.sample_shape, digest=provenance.digest(path.name))
    if arrays is None:
      arrays = sampler.shard(k, count, timer)
      if not config_written:  # first write of this run: the config that owns these shards
        write_json(out / "config.json", saved)
        config_written = True
      write_npz(path, arrays)
      provenance.record(path.name, shards_lib.sha256(path), saved)
      n_done += 1
      written.append(k)
    else:
      digest = shards_lib.sha256(path) if provenance.digest(path.name) is None else None
      if digest is not None:  # kept on content checks alone: sign it for the next resume
        provenance.record(path.name, digest, old_config)
      n_skipped += 1
    if k == 0 and (n_done or not grid_path.exists()):
      data = arrays.get("images", arrays.get("latents"))
      if data.dtype != np.uint8:  # latent preview: first 3 channels, roughly unit scale
        data = images_lib.to_uint8(np.clip(data[..., :3] / 2.0, -1, 1))
      images_lib.save_grid(grid_path, data, nrow=int(config.get("grid_nrow", 8)))
    bar.update(count)
    if on_shard is not None:
      on_shard(k, arrays)
  bar.close()
  stats = _throughput(timer, config, n_done, n_skipped, sampler.plan_info)
  stats.update(process=rank, process_count=nproc, shards_written=written)
  _barrier("jaxee_sample_shards_written")  # every process's shards are on disk
  if rank == 0:
    if not (out / "config.json").exists():  # a forced reuse of shards that had none
      write_json(out / "config.json", saved)
    if timer:  # a resume that computed nothing keeps the previous run's numbers
      write_json(out / "throughput.json", stats)
    if nproc > 1:
      provenance = shards_lib.merge_provenance_parts(out)
    manifest = shards_lib.write_manifest(out, counts, bool(config.get("merge", False)),
                                         sampler.kind, provenance)
  _barrier("jaxee_sample_manifest_written")
  if rank != 0:
    manifest = json.loads((out / "manifest.json").read_text())
  return {**stats, "out_dir": str(out), "manifest": manifest}

