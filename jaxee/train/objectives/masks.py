"""TABM: per-timestep block-mask optimisation along the teacher's own sampling trajectory.

Timestep-Aware Block Masking (arXiv 2603.19939, as summarised in `research/ee_methods.md` §4.7,
§5.5; no code was released). The backbone is frozen; for every network evaluation (NFE) k of a
fixed sampler a score vector s_k ∈ [0, 1]^L over the L transformer blocks is optimised so that the
block-masked network with a feature cache reproduces the full network at that step:

    L_k(s) = ‖x_end − x_end^orig‖₂ + λ₁·w(k)·Σ_b s_b + λ₂·w(k)·Σ_b s_b(1 − s_b)

Readings fixed here (documented choices):

* **x_end** is the hidden state after the last transformer block, before the head (the step's
  final feature, `ee_methods.md` §4.7 "final block hidden state"; the head is not needed for the
  loss): the contract's `Backbone.final_feature(state)` (tokens for DiT/U-ViT, the
  full-resolution map after the last up ResBlock for the U-Net, whose stream buffer is wider).
  `loss_target='output'` uses the network output (ε, σ) instead. ‖·‖₂ is the per-sample L2 norm
  over tokens (U-Net: pixels) × channels (computed as sqrt(Σd² + 1e-12) so its gradient is
  finite at 0), averaged over the calibration batch; `loss_norm='mse'` uses the mean square instead.
* **Trajectory**: the teacher (full network, with the configured sampler, step count and CFG)
  samples `num_samples` trajectories from Gaussian noise — no data. Every NFE's network input
  (the CFG-doubled batch when guided) is recorded through `jaxee.sample` itself, so the inputs
  are exactly those the sampler feeds the network.
* **w(k)** (Eq. 9–10): δ(k) per sample, averaged over the batch, in `delta_direction`: 'next'
  (default, the paper's reading: its t−1 is the next step executed) δ(k) = ‖x^orig_end,k −
  x^orig_end,k+1‖ / ‖x^orig_end,k‖, the last NFE falling back to its previous pair; 'previous'
  (jaxee's earlier reading) δ(k) = ‖x^orig_end,k − x^orig_end,k−1‖ / ‖x^orig_end,k‖
  (`masks_teacher.relative_changes`). r = δ / max δ over the optimised NFEs 1..N−1; w = 2.0 if
  r < 0.1, 1.5 if r < 0.5, else 1.0 (`w_thresholds`, `w_values`). Steps whose feature barely
  changes get a larger sparsity weight. NFE 0 is never optimised.
* **Units** (`unit`): 'block' (one score per transformer block) or 'branch' (the paper's DiT
  granularity, §3.2: MHA and MLP sub-layers scored separately, columns 2ℓ = attention of block
  ℓ, 2ℓ+1 = its MLP). Both are output replacement; the plan's cache mode is
  `exits.masks.default_cache_mode(unit)` ('block_output' / 'unit_output').
* **Mixing and cache** (output replacement, as the `MaskPlan` runner, both written once against
  the backbone contract `jaxee/models/backbone.py`): unit u outputs m_u·f_u + (1 − m_u)·cache_u
  (at 'branch' the unit's output stream, the state completed by the contract's `settle`); a
  U-ViT in-block's mixed output is also its long skip. NFE 0 computes everything (empty cache).
  Steps are optimised in sampling order; after step k the scores are binarised (s >
  `threshold`, default 0.5) and the cache is refreshed with the unit outputs of the binarised
  network at step k where s > 0.5 (Eq. 4; NFE 0, the paper's t = T−1, refreshes every unit), so
  a cached feature can be several steps old, exactly as at inference.
* **Random mask sampling** (`sampling`): 'bernoulli' (default) draws m_b ~ Bernoulli(s_b) and
  uses the straight-through estimator (forward m, backward ∂m/∂s = 1), so the optimisation sees
  the binary network the sampler will run; 'concrete' uses the binary-concrete (Gumbel-sigmoid)
  relaxation m = σ((logit s + logistic noise)/τ), `temperature` τ; 'relaxed' mixes with s
  itself (no noise).
* **Gradients confined to the current step**: the recorded input x_k, the cache and the target
  are constants; only s_k is differentiated, so memory is one forward+backward of the backbone.
  Each step has its own Adam state (`lr`, `iters_per_step`); scores start at `init_score` and
  are clipped to [0, 1] after every update.
* **Result**: rows stacked in NFE order (row 0 ones), rectified with TABM's rule
  (`exits.mask_tools.rectify`, U-ViT skip consumers respected) and written atomically as a
  `MaskPlan` file (`unit`, `cache_mode` as above) whose metadata records the sampler, steps,
  guidance, model config, unit, δ (and its direction), w and the raw scores. Sample with
  `jaxee.sample(model, params, rng, sampler=..., steps=..., plan=load_mask_plan(path))`.

Progress is saved after every step (`masks_progress.npz`); a restarted run with the same options
replays the finished rows to rebuild the cache and continues. The masked forward, the mask
sampling and the teacher recording are in `jaxee/train/objectives/masks_teacher.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxee import atomic_io
from jaxee.diffusion import samplers as samplers_lib
from jaxee.exits import mask_tools
from jaxee.exits import masks as masks_lib
from jaxee.models import registry
from jaxee.train.objectives import masks_teacher as teacher
from jaxee.train.objectives.masks_teacher import (  # noqa: F401
    Trajectory, record_teacher, run_blocks, sample_gates)

SAMPLING_MODES = teacher.SAMPLING_MODES
DELTA_DIRECTIONS = teacher.DELTA_DIRECTIONS
UNITS = masks_lib.UNITS
LOSS_TARGETS = ("x_end", "output")
LOSS_NORMS = ("l2", "mse")
PROGRESS_FILE = "masks_progress.npz"
METRICS_FILE = "masks_metrics.jsonl"

DEFAULTS = dict(
    sampler="ddim", steps=50, sampler_options={}, schedule=None, guidance=None,
    labels="random", num_samples=8, lambda1=1e-3, lambda2=1e-3, w_thresholds=(0.1, 0.5),
    w_values=(2.0, 1.5, 1.0), iters_per_step=100, lr=1e-2, init_score=0.9,
    sampling="bernoulli", temperature=0.5, threshold=0.5, rectify=True, loss_target="x_end",
    loss_norm="l2", output="mask_plan.npz", seed=0, unit="block", delta_direction="next")


@dataclasses.dataclass(frozen=True)
class MaskOptOptions:
  """The TABM options (`config.masks`); see `DEFAULTS` and the module docstring."""
  sampler: str
  steps: int
  sampler_options: tuple
  schedule: Optional[str]
  guidance: Optional[float]
  labels: Any
  num_samples: int
  lambda1: float
  lambda2: float
  w_thresholds: tuple
  w_values: tuple
  iters_per_step: int
  lr: float
  init_score: float
  sampling: str
  temperature: float
  threshold: float
  rectify: bool
  loss_target: str
  loss_norm: str
  output: str
  seed: int
  unit: str
  delta_direction: str

  def fingerprint(self, model) -> str:
    """Hash of everything that changes the result (used to refuse a foreign progress file)."""
    blob = json.dumps([dataclasses.asdict(self), registry.model_config(model)], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def options_from_config(masks_config) -> MaskOptOptions:
  """Merges `config.masks` (ConfigDict or dict) over `DEFAULTS` and validates the result."""
  given = dict(masks_config.to_dict() if hasattr(masks_config, "to_dict") else masks_config or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.masks field(s) {unknown}; valid: {sorted(DEFAULTS)}")
  o = dict(DEFAULTS, **{k: v for k, v in given.items() if v is not None or k in (
      "guidance", "schedule", "labels")})
  o["sampler_options"] = tuple(sorted(dict(o["sampler_options"] or {}).items()))
  o["w_thresholds"] = tuple(float(v) for v in o["w_thresholds"])
  o["w_values"] = tuple(float(v) for v in o["w_values"])
  if isinstance(o["labels"], (list, tuple)):
    o["labels"] = tuple(int(v) for v in o["labels"])
  opts = MaskOptOptions(**o)
  problems = validate_options(opts)
  if problems:
    raise ValueError("invalid config.masks:\n  " + "\n  ".join(problems))
  return opts


def validate_options(o: MaskOptOptions) -> list:
  """Every problem with the options, as messages (empty when valid)."""
  p = []
  if o.sampler not in samplers_lib.SAMPLERS:
    p.append(f"masks.sampler {o.sampler!r} unknown; choose from {samplers_lib.SAMPLERS}")
  if int(o.steps) < 1:
    p.append(f"masks.steps must be >= 1, got {o.steps}")
  if int(o.num_samples) < 1:
    p.append(f"masks.num_samples must be >= 1, got {o.num_samples}")
  if o.lambda1 < 0 or o.lambda2 < 0:
    p.append(f"masks.lambda1/lambda2 must be >= 0, got {o.lambda1}, {o.lambda2}")
  th = list(o.w_thresholds)
  if not th or any(not 0 < v <= 1 for v in th) or th != sorted(th):
    p.append(f"masks.w_thresholds must be increasing values in (0, 1], got {o.w_thresholds}")
  if len(o.w_values) != len(th) + 1:
    p.append(f"masks.w_values needs len(w_thresholds) + 1 = {len(th) + 1} entries, "
             f"got {len(o.w_values)}")
  if int(o.iters_per_step) < 1 or o.lr <= 0:
    p.append(f"masks.iters_per_step must be >= 1 and lr > 0, got {o.iters_per_step}, {o.lr}")
  if not 0 <= o.init_score <= 1:
    p.append(f"masks.init_score must be in [0, 1], got {o.init_score}")
  if not 0 <= o.threshold <= 1:
    p.append(f"masks.threshold θ must be in [0, 1], got {o.threshold}")
  if o.sampling not in SAMPLING_MODES:
    p.append(f"masks.sampling {o.sampling!r} unknown; choose from {SAMPLING_MODES}")
  if o.sampling == "concrete" and o.temperature <= 0:
    p.append(f"masks.temperature must be > 0, got {o.temperature}")
  if o.loss_target not in LOSS_TARGETS:
    p.append(f"masks.loss_target {o.loss_target!r} unknown; choose from {LOSS_TARGETS}")
  if o.loss_norm not in LOSS_NORMS:
    p.append(f"masks.loss_norm {o.loss_norm!r} unknown; choose from {LOSS_NORMS}")
  if o.guidance is not None and o.guidance < 0:
    p.append(f"masks.guidance must be >= 0 or None, got {o.guidance}")
  if o.unit not in UNITS:
    p.append(f"masks.unit {o.unit!r} unknown; choose from {UNITS}")
  if o.delta_direction not in DELTA_DIRECTIONS:
    p.append(f"masks.delta_direction {o.delta_direction!r} unknown; choose from "
             f"{DELTA_DIRECTIONS}")
  if not str(o.output).endswith(".npz"):
    p.append(f"masks.output must be a .npz file name, got {o.output!r}")
  return p


def time_weights(delta: np.ndarray, thresholds=(0.1, 0.5), values=(2.0, 1.5, 1.0)) -> np.ndarray:
  """w per NFE from the relative feature change δ (entry 0, which has no δ, gets values[-1]).

  r = δ / max δ over NFEs 1..N−1; w = values[i] for the first threshold i with r < thresholds[i],
  else values[-1].
  """
  delta = np.asarray(delta, np.float64)
  w = np.full(delta.shape, values[-1], np.float64)
  if len(delta) < 2:
    return w
  top = float(np.max(delta[1:]))
  r = delta[1:] / top if top > 0 else np.zeros_like(delta[1:])
  idx = np.searchsorted(np.asarray(thresholds), r, side="right")
  w[1:] = np.asarray(values, np.float64)[idx]
  return w


# ------------------------------------------------------------------------------------------------
# Per-step optimisation.


@dataclasses.dataclass(frozen=True)
class _StepStatics:
  """The options that shape the compiled step functions (the rest are traced arguments)."""
  iters_per_step: int
  lr: float
  sampling: str
  temperature: float
  threshold: float
  loss_target: str
  loss_norm: str
  unit: str = "block"

  @classmethod
  def of(cls, opts: MaskOptOptions) -> "_StepStatics":
    return cls(int(opts.iters_per_step), float(opts.lr), opts.sampling, float(opts.temperature),
               float(opts.threshold), opts.loss_target, opts.loss_norm, opts.unit)


@functools.lru_cache(maxsize=16)
def make_step_fns(model, st: _StepStatics):
  """(optimise_step, refresh), jitted once per (model, statics); params are arguments.

  optimise_step(params, scores0, x, t, y, cache, w, lambdas, key) -> (scores, losses (iters,),
  reconstruction (iters,), reconstruction of the binarised scores ()), `lambdas` = (λ₁, λ₂);
  refresh(params, x, t, y, cache, row) -> the unit outputs of the `row`-masked network at this
  step (the new cache).
  """
  tx = optax.adam(st.lr)
  bb = teacher.unit_backbone(model, st.unit)

  def features(params, state, gates=None, cache=None):
    state, values = teacher.run_units(bb, params, state, gates, cache, st.unit)
    out = bb.final_feature(state) if st.loss_target == "x_end" else bb.head(params, state)
    return out, values

  def reconstruction(pred, target):
    d = (pred - target).reshape(pred.shape[0], -1)
    if st.loss_norm == "l2":
      return jnp.mean(jnp.sqrt(jnp.sum(d * d, axis=1) + 1e-12))
    return jnp.mean(d * d)

  def optimise_step(params, scores0, x, t, y, cache, w, lambdas, key):
    state = bb.embed(params, x, t, y)
    target = jax.lax.stop_gradient(features(params, state, None, cache)[0])

    def loss(s, k):
      gates = sample_gates(s, k, st.sampling, st.temperature)
      rec = reconstruction(features(params, state, gates, cache)[0], target)
      reg = lambdas[0] * w * jnp.sum(s) + lambdas[1] * w * jnp.sum(s * (1 - s))
      return rec + reg, rec

    def body(carry, i):
      s, opt_state = carry
      (value, rec), grad = jax.value_and_grad(loss, has_aux=True)(s, jax.random.fold_in(key, i))
      updates, opt_state = tx.update(grad, opt_state, s)
      s = jnp.clip(optax.apply_updates(s, updates), 0.0, 1.0)
      return (s, opt_state), (value, rec)

    (s, _), (values, recs) = jax.lax.scan(body, (scores0, tx.init(scores0)),
                                          jnp.arange(st.iters_per_step))
    binary = (s > st.threshold).astype(s.dtype)
    rec_binary = reconstruction(features(params, state, binary, cache)[0], target)
    return s, values, recs, rec_binary

  def refresh(params, x, t, y, cache, row):
    state = bb.embed(params, x, t, y)
    return teacher.run_units(bb, params, state, row.astype(jnp.float32), cache, st.unit)[1]

  return jax.jit(optimise_step), jax.jit(refresh)


def _load_progress(path: str, fingerprint: str, shape) -> tuple:
  """(scores, rows_done) from a progress file of the same run, else (None, 0)."""
  if not os.path.exists(path):
    return None, 0
  with np.load(path, allow_pickle=False) as data:
    if str(data["fingerprint"]) != fingerprint:
      raise ValueError(f"{path} belongs to a run with different options or model; remove it or "
                       "use another workdir")
    scores = np.asarray(data["scores"], np.float32)
    if scores.shape != tuple(shape):
      raise ValueError(f"{path} holds scores of shape {scores.shape}, expected {tuple(shape)}")
    return scores, int(data["rows_done"])


def optimise_masks(model, params, traj: Trajectory, opts: MaskOptOptions, rng, *,
                   workdir: Optional[str] = None) -> dict:
  """Optimises every NFE's scores in sampling order (see the module docstring).

  Args:
    model: the frozen backbone.
    params: its params (never modified).
    traj: `record_teacher` output.
    opts: options.
    rng: key for the mask sampling.
    workdir: where progress and per-step metrics go (None: nowhere, no resume).

  Returns:
    dict with `scores` (N, L) float32 (row 0 ones), `mask` (N, L) bool before rectification,
    `w` (N,), `delta` (N,).
  """
  n_nfe = traj.x.shape[0]
  n_units = masks_lib.num_units(model, opts.unit)
  w = time_weights(traj.delta, opts.w_thresholds, opts.w_values)
  optimise_step, refresh = make_step_fns(model, _StepStatics.of(opts))
  lambdas = jnp.asarray([opts.lambda1, opts.lambda2], jnp.float32)
  y = None if traj.y is None else jnp.asarray(traj.y)
  t_vec = lambda k: jnp.full((traj.x.shape[1],), traj.t[k], jnp.float32)  # noqa: E731
  ones = jnp.ones((n_units,), jnp.float32)

  scores = np.ones((n_nfe, n_units), np.float32)
  start = 1
  progress = metrics_path = None
  fingerprint = opts.fingerprint(model)
  if workdir is not None:
    progress = os.path.join(workdir, PROGRESS_FILE)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    saved, done = _load_progress(progress, fingerprint, scores.shape)
    if saved is not None:
      scores, start = saved, max(done, 1)
      logging.info("TABM: resuming after %d of %d NFEs", start, n_nfe)

  cache = teacher.zeros_unit_cache(model, params, traj.x.shape[1:], y, opts.unit)
  cache = refresh(params, jnp.asarray(traj.x[0]), t_vec(0), y, cache, ones)
  for k in range(1, start):     # replay finished rows (binary masks) to rebuild the cache
    row = jnp.asarray(scores[k] > opts.threshold)
    cache = refresh(params, jnp.asarray(traj.x[k]), t_vec(k), y, cache, row)

  for k in range(start, n_nfe):
    t0 = time.time()
    s, values, recs, rec_bin = optimise_step(
        params, ones * opts.init_score, jnp.asarray(traj.x[k]), t_vec(k), y, cache,
        jnp.float32(w[k]), lambdas, jax.random.fold_in(rng, k))
    scores[k] = np.asarray(s)
    row = jnp.asarray(scores[k] > opts.threshold)
    cache = refresh(params, jnp.asarray(traj.x[k]), t_vec(k), y, cache, row)
    record = {"nfe": k, "t": float(traj.t[k]), "delta": float(traj.delta[k]), "w": float(w[k]),
              "loss_first": float(values[0]), "loss_last": float(values[-1]),
              "rec_last": float(recs[-1]), "rec_binary": float(rec_bin),
              "kept": int(np.sum(scores[k] > opts.threshold)), "units": n_units,
              "seconds": round(time.time() - t0, 3)}
    logging.info("TABM NFE %d/%d: %s", k, n_nfe - 1, record)
    if workdir is not None:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      atomic_io.atomic_write(progress, lambda f: np.savez(
          f, scores=scores, rows_done=np.int64(k + 1), fingerprint=np.array(fingerprint)))
  mask = scores > opts.threshold
  mask[0] = True
  return {"scores": scores, "mask": mask, "w": w, "delta": traj.delta}


def build_plan(model, result: dict, opts: MaskOptOptions) -> masks_lib.MaskPlan:
  """The (rectified) `MaskPlan` with the run's facts in its metadata."""
  raw = result["mask"]
  plan = masks_lib.MaskPlan(raw, opts.unit, masks_lib.default_cache_mode(opts.unit))
  if opts.rectify:
    plan = plan.rectified(model)
  meta = {
      "method": "tabm", "model": registry.model_config(model), "sampler": opts.sampler,
      "sampler_steps": int(opts.steps), "sampler_options": dict(opts.sampler_options),
      "schedule": opts.schedule, "guidance": opts.guidance, "lambda1": opts.lambda1,
      "lambda2": opts.lambda2, "w_thresholds": list(opts.w_thresholds),
      "w_values": list(opts.w_values), "threshold": opts.threshold,
      "rectified": bool(opts.rectify), "sampling": opts.sampling,
      "iters_per_step": int(opts.iters_per_step), "lr": opts.lr,
      "num_samples": int(opts.num_samples), "loss_target": opts.loss_target,
      "loss_norm": opts.loss_norm, "seed": int(opts.seed), "delta_direction": opts.delta_direction,
      "kept_fraction_raw": float(np.mean(raw)), "kept_fraction": float(np.mean(plan.mask)),
      "delta": [float(v) for v in result["delta"]], "w": [float(v) for v in result["w"]],
      "scores": np.round(result["scores"], 6).tolist(),
  }
  return dataclasses.replace(plan, metadata=meta)


def run(config, workdir: str, model, params) -> str:
  """`method='masks'` entry point (`jaxee.cli.train` dispatches here): optimise and save the plan.

  Args:
    config: the run config; reads `config.masks` (see `DEFAULTS`) and, when `config.masks.seed`
      is absent, `config.train.seed`.
    workdir: output directory (plan file, progress, per-step metrics).
    model: the frozen backbone.
    params: its params (e.g. the converted checkpoint; EMA weights for sampling).

  Returns:
    The path of the written plan file.
  """
  masks_cfg = config.get("masks") if hasattr(config, "get") else config["masks"]
  masks_dict = dict(masks_cfg.to_dict() if hasattr(masks_cfg, "to_dict") else masks_cfg or {})
  if masks_dict.get("seed") is None:
    train = config.get("train") if hasattr(config, "get") else None
    masks_dict["seed"] = int(train.get("seed", 0)) if train is not None else 0
  opts = options_from_config(masks_dict)
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.PRNGKey(opts.seed)
  k_teacher, k_masks = jax.random.split(rng)
  t0 = time.time()
  traj = record_teacher(model, params, opts, k_teacher)
  logging.info("TABM: teacher trajectory of %d NFEs recorded in %.1fs", traj.x.shape[0],
               time.time() - t0)
  result = optimise_masks(model, params, traj, opts, k_masks, workdir=workdir)
  plan = build_plan(model, result, opts)
  path = os.path.join(workdir, opts.output)
  plan.save(path)
  logging.info("TABM: wrote %s (kept %.3f of blocks, %.3f before rectification)", path,
               plan.metadata["kept_fraction"], plan.metadata["kept_fraction_raw"])
  return path


__all__ = ["DEFAULTS", "MaskOptOptions", "Trajectory", "build_plan", "make_step_fns",
           "mask_tools", "optimise_masks", "options_from_config", "record_teacher", "run",
           "run_blocks", "sample_gates", "time_weights", "validate_options"]
