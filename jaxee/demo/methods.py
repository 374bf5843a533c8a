"""The demo's training stages for one backbone: baseline, ASE, DeeDiff, DuoDiff, TABM masks.

Each stage is a real run of the library's entry points in its own work directory under
`OUT/<arch>/<stage>/` — `jaxee.train.trainer.train(config, workdir)` for gradient training (so
the stage leaves `config.json`, `metrics.jsonl`, a checkpoint and the method's export, exactly as
`jaxee-train` would) and `jaxee.train.objectives.masks.run` for the mask optimisation —
and the sampling variants are rebuilt from those exports with the loaders of `jaxee.train.methods`:

* 'full': the trained backbone (EMA), no plan;
* 'ase': the ASE fine-tuned backbone with its schedule (`ASEPlan`);
* 'ase_no_finetune': the same schedule on the un-tuned backbone (the ablation showing what the
  fine-tuning buys);
* 'deediff': the paper recipe — backbone, heads and per-element UEMs trained jointly, exits at
  layers 1..N — with the real batched exit (`DeeDiffPlan(mode='batched')`); θ is calibrated here
  (`calibrate_threshold`); 'deediff_backbone' is the jointly trained backbone without exits;
* 'deediff_exact': the same heads and θ with the papers' "simulated" exit (`mode='exact'`: every
  block runs, each sample takes its own first exit) — the per-sample quality reference, whose
  mean exit index is the layer ratio the papers report, at no real saving;
* 'duodiff': the shallow + deep pair switching at t_s (`DuoDiffPlan`, params packed);
* 'masks': the rectified TABM block mask with a block-output cache (`MaskPlan`).

DeeDiff's θ. The UEM outputs of a small model trained for a few hundred steps have no fixed scale,
so a fixed θ could mean "never exit" or "always exit". `calibrate_threshold` instead picks θ from
the run: it records the full network's own sampling trajectory (DDIM + CFG from Gaussian noise,
`teacher_trajectory`; no data), evaluates every UEM at every recorded NFE input, simulates the
batched runner's stop rule (the loop stops once `min_fraction` of the batch has u ≤ θ at or
before the current layer) and takes the θ whose mean executed-block fraction is closest to
`deediff_target_ratio`. Sampling with exits then drifts from the teacher's trajectory, so
`refine_threshold` closes the loop: it samples a calibration batch (not the evaluation noise) with
the real batched runner, shifts the target by the measured − predicted gap and recalibrates, a
few times, keeping the θ whose measured fraction is closest to the target. The evaluation run's
own fraction is measured again and reported beside the prediction.
"""
from __future__ import annotations

import dataclasses
import pathlib
import resource
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxee import convert
from jaxee.demo import setup as demo_setup
from jaxee.eval import flops as flops_lib
from jaxee.exits import deediff as deediff_lib
from jaxee.exits import deediff_heads
from jaxee.exits import masks as masks_lib

Log = Callable[[str], None]


@dataclasses.dataclass
class Variant:
  """One way of sampling a backbone: the params handed to `jaxee.sample` and the plan."""
  name: str
  method: str
  params: Any
  plan: Any = None
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ArchResult:
  """The trained backbone of one arch, its variants and the stage timings."""
  arch: str
  model: Any
  variants: list
  stages: dict


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


class StageClock:
  """Wall and CPU seconds of named stages."""

  def __init__(self):
    self.stages: dict = {}

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    self.stages[name] = {"wall_s": round(time.perf_counter() - w0, 2),
                         "cpu_s": round(cpu_seconds() - c0, 2)}
    return out


def nfe_times(model: Any, sampler: str, steps: int) -> np.ndarray:
  """The network time of each NFE of `sampler` with `steps` steps (`jaxee.sampling.nfe_times`)."""
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  return sampling.nfe_times(model, sampler, steps)


def _train(config, workdir: pathlib.Path, model, params) -> dict:
  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  return trainer.train(config, workdir, model=model, params=params)


def train_backbone(arch: str, scale, seed: int, root: pathlib.Path, log: Log):
  """Stage 'backbone': the backbone's own loss from random init; returns (model, EMA params)."""
  model = demo_setup.create_model(arch, scale)
  steps, lr = ((scale.unet_steps, scale.unet_lr) if arch == "unet"
               else (scale.backbone_steps, scale.backbone_lr))
  config = demo_setup.stage_config("baseline", arch, scale, seed, num_steps=steps, lr=lr)
  summary = _train(config, root / "backbone", None, None)
  log(f"[{arch}] backbone: {steps} steps, final loss "
      f"{summary['metrics'].get('loss', float('nan')):.4f}")
  loaded_model, params = convert.load_converted(root / "backbone" / "export")
  if loaded_model != model:
    raise RuntimeError(f"exported backbone config differs from the demo's: {loaded_model}")
  return model, params


def train_ase(arch, scale, seed, root, model, params, log: Log):
  """Stage 'ase': ASE fine-tuning from the backbone; returns (params, plan)."""
  from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  config = demo_setup.stage_config("ase", arch, scale, seed, num_steps=scale.ase_steps,
                                   lr=scale.ase_lr,
                                   section=demo_setup.ase_section(arch, scale))
  summary = _train(config, root / "ase", model, params)
  _, tuned, plan = methods.load_ase_export(root / "ase")
  log(f"[{arch}] ase: schedule {plan.name} {list(plan.schedule)}, {scale.ase_steps} steps, "
      f"final loss {summary['metrics'].get('loss', float('nan')):.4f}")
  return tuned, plan


def train_deediff(arch, scale, seed, root, model, params, log: Log):
  """Stage 'deediff': the paper recipe, backbone + heads + UEMs trained jointly from the backbone.

  Returns (jointly trained backbone params, ee_params, meta with 'uem' and 'layout').
  """
  from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  config = demo_setup.stage_config("deediff", arch, scale, seed,
                                   num_steps=scale.deediff_steps, lr=scale.deediff_lr,
                                   section=demo_setup.deediff_section())
  config.optim.b1, config.optim.b2 = demo_setup.deediff_betas()
  summary = _train(config, root / "deediff", model, params)
  _, joint, ee, meta = methods.load_deediff_export(root / "deediff")
  log(f"[{arch}] deediff: {scale.deediff_steps} steps (joint, UEM '{meta['uem']}', exits "
      f"{meta.get('layout', 'inputs')}), final loss "
      f"{summary['metrics'].get('loss', float('nan')):.4f}")
  meta = dict(meta, layout=meta.get("layout", "inputs"))
  return joint, jax.tree.map(jnp.asarray, ee), meta


def train_duodiff(arch, scale, seed, root, model, params, log: Log):
  """Stage 'duodiff': the shallow backbone; returns a `DuoDiffPlan` without params and them."""
  from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  config = demo_setup.stage_config("duodiff", arch, scale, seed,
                                   num_steps=scale.duodiff_steps, lr=scale.duodiff_lr,
                                   section=demo_setup.duodiff_section(arch, scale))
  summary = _train(config, root / "duodiff", model, params)
  plan = methods.load_duodiff_plan(root / "duodiff")
  shallow = plan.shallow_params
  log(f"[{arch}] duodiff: shallow {flops_lib.num_blocks(plan.shallow_model)} of "
      f"{flops_lib.num_blocks(model)} blocks, t_s={plan.t_switch:g}, {scale.duodiff_steps} "
      f"steps, final loss {summary['metrics'].get('loss', float('nan')):.4f}")
  return dataclasses.replace(plan, shallow_params=None), shallow


def optimise_masks(arch, scale, seed, root, model, params, log: Log, unit=None,
                   stage: str = "masks"):
  """Stage 'masks': TABM mask optimisation along the teacher's DDIM trajectory."""
  from jaxee.train.objectives import masks as masks_obj  # pylint: disable=g-import-not-at-top
  config = demo_setup.stage_config("masks", arch, scale, seed, num_steps=1, lr=1.0,
                                   section=demo_setup.masks_section(arch, scale, seed, unit))
  path = masks_obj.run(config, str(root / stage), model, params)
  plan = masks_lib.load_mask_plan(path)
  log(f"[{arch}] masks: kept {plan.metadata['kept_fraction']:.3f} of {plan.unit} evaluations "
      f"({plan.metadata['kept_fraction_raw']:.3f} before rectification)")
  return plan


def teacher_trajectory(arch: str, model, params, scale, seed: int, num: int):
  """The full network's own DDIM(+CFG) sampling run, every NFE input recorded (no data).

  `jaxee.train.objectives.masks_teacher.record_teacher` with the demo's sampler settings (`num`
  samples; the network sees 2·num rows under CFG, as the DeeDiff runner will).
  """
  from jaxee.train.objectives import masks as masks_obj  # pylint: disable=g-import-not-at-top
  opts = masks_obj.options_from_config(
      dict(demo_setup.masks_section(arch, scale, seed), num_samples=int(num)))
  return masks_obj.record_teacher(model, params, opts, jax.random.PRNGKey(seed + 17))


def exit_uncertainties(model, params, ee, uem: str, traj, layout: str = "inputs") -> np.ndarray:
  """u (NFE, L, B_net): every UEM at every NFE input of a recorded teacher trajectory.

  Row k is the exit taken after k blocks. With the paper's exits 1..N (`layout='outputs'`)
  there is no exit after 0 blocks: row 0 is +inf (never exits).

  Args:
    model: backbone.
    params: backbone params.
    ee: heads/UEMs.
    uem: UEM kind.
    traj: `teacher_trajectory(...)` (`x` (NFE, B_net, H, W, C), `t` (NFE,), `y` (B_net,)).
    layout: the heads' layout ('inputs' | 'outputs').

  Returns:
    float64 array (NFE, L, B_net).
  """
  y = None if traj.y is None else jnp.asarray(traj.y, jnp.int32)

  @jax.jit
  def one(x, t):
    t_net = jnp.full((x.shape[0],), t, jnp.float32)
    return deediff_lib.forward_all_exits(model, params, ee, x, t_net, y, uem, layout)[2]

  u = np.stack([np.asarray(one(jnp.asarray(x), jnp.float32(t)), np.float64)
                for x, t in zip(traj.x, traj.t)])
  if layout == "outputs":
    u = np.concatenate([np.full_like(u[:, :1], np.inf), u], axis=1)
  return u


def batched_exit_depths(u: np.ndarray, threshold: float, min_fraction: float) -> np.ndarray:
  """Blocks the batched DeeDiff runner executes per NFE for u (NFE, L, B).

  The runner tests exit k before block k (k = 0..L−1) and stops at the first k where at least
  `min_fraction` of the batch has exited (u_j ≤ θ for some j ≤ k); k blocks have then run.
  With no such k, all L blocks run.
  """
  num = u.shape[1]
  exited = np.cumsum(u <= threshold, axis=1) > 0          # (NFE, L, B)
  enough = exited.mean(axis=2) >= min_fraction - 1e-12    # (NFE, L)
  return np.where(enough.any(axis=1), np.argmax(enough, axis=1), num).astype(np.float64)


def calibrate_threshold(u: np.ndarray, target_ratio: float, min_fraction: float) -> dict:
  """θ whose simulated mean executed-block fraction is closest to `target_ratio`.

  Candidates are the midpoints between sorted distinct u values (every distinct exit pattern),
  subsampled to at most 512; ties go to the smaller θ (fewer exits).
  """
  num = u.shape[1]
  values = np.unique(np.round(u.ravel(), 6))
  mids = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]])
  if len(mids) > 512:
    mids = mids[np.linspace(0, len(mids) - 1, 512).round().astype(int)]
  best = None
  for theta in mids:
    ratio = float(batched_exit_depths(u, theta, min_fraction).mean() / num)
    err = abs(ratio - target_ratio)
    if best is None or err < best["error"] - 1e-12:
      best = {"threshold": float(theta), "predicted_ratio": ratio, "error": err}
  best["target_ratio"] = float(target_ratio)
  best["min_fraction"] = float(min_fraction)
  return best


def measured_exit_ratio(model, params, ee, uem: str, threshold: float, scale, seed: int,
                        arch: str, layout: str = "inputs") -> float:
  """Mean executed-block fraction of the real batched runner at θ, in a calibration run.

  Samples `deediff_calib_samples` digits with the demo's sampler settings from start noise
  that is *not* the evaluation noise (`seed + 29` vs `seed + 1000`) and reads the runner's own
  per-NFE `blocks` statistics.
  """
  from jaxee.demo import evaluate as demo_eval  # pylint: disable=g-import-not-at-top
  plan = deediff_lib.DeeDiffPlan(ee, threshold=threshold, mode="batched",
                                 min_fraction=scale.deediff_min_fraction, uem=uem, layout=layout)
  x_T, labels = demo_eval.eval_inputs(model, scale.deediff_calib_samples, seed + 29)
  call = demo_eval.make_sampler(model, Variant("calib", "deediff", params, plan), x_T, labels,
                                scale.sample_steps, scale.arch_value("guidance", arch))
  _, stats = jax.block_until_ready(call())
  return float(np.mean(np.asarray(stats["blocks"], np.float64)) / flops_lib.num_blocks(model))


def refine_threshold(model, params, ee, uem: str, u: np.ndarray, cal: dict, scale, seed: int,
                     arch: str, log: Log, layout: str = "inputs") -> dict:
  """Closes the loop on θ: sampling *with* exits drifts from the teacher trajectory.

  The open-loop θ of `calibrate_threshold` is exact on the full model's trajectory, but once
  samples exit early their trajectory (and the UEMs' inputs) change, and with
  `min_fraction = 1` the slowest of hundreds of rows decides the depth, so the measured fraction
  is usually higher than predicted. Each iteration measures the real runner
  (`measured_exit_ratio`), shifts the open-loop target by the measured − predicted gap and
  recalibrates on the recorded u; when that proposes a θ already tried, it bisects θ between the
  closest measured θ on either side of the target instead (the measured fraction falls as θ
  rises). The θ whose *measured* fraction is closest to the target wins.
  """
  target = cal["target_ratio"]
  tried = []
  current = cal
  for it in range(scale.deediff_refine_iters + 1):
    measured = measured_exit_ratio(model, params, ee, uem, current["threshold"], scale, seed,
                                   arch, layout)
    tried.append({"threshold": current["threshold"], "predicted_ratio": current["predicted_ratio"],
                  "measured_ratio": measured})
    log(f"[{arch}] deediff: θ = {current['threshold']:.4f} measured executed-block fraction "
        f"{measured:.3f} (predicted {current['predicted_ratio']:.3f})")
    if it == scale.deediff_refine_iters or abs(measured - target) < 0.02:
      break
    shifted = float(np.clip(current["predicted_ratio"] - (measured - target), 0.0, 1.0))
    nxt = calibrate_threshold(u, shifted, scale.deediff_min_fraction)
    if any(abs(nxt["threshold"] - t["threshold"]) < 1e-12 for t in tried):
      nxt = _bisected_threshold(u, tried, target, scale.deediff_min_fraction)
      if nxt is None:
        break
    current = nxt
  best = min(tried, key=lambda t: abs(t["measured_ratio"] - target))
  return dict(cal, threshold=best["threshold"], predicted_ratio=best["predicted_ratio"],
              calibration_measured_ratio=best["measured_ratio"], refinement=tried,
              open_loop_threshold=cal["threshold"])


def _bisected_threshold(u: np.ndarray, tried: list, target: float, min_fraction: float):
  """The midpoint θ between the largest tried θ that measured ≥ target (too few exits) and the
  smallest that measured < target (too many), with its open-loop prediction; None if no gap."""
  lo = max((t["threshold"] for t in tried if t["measured_ratio"] >= target), default=0.0)
  hi = min((t["threshold"] for t in tried if t["measured_ratio"] < target), default=None)
  if hi is None or hi - lo < 1e-6:
    return None
  mid = 0.5 * (lo + hi)
  ratio = float(batched_exit_depths(u, mid, min_fraction).mean() / u.shape[1])
  return {"threshold": mid, "predicted_ratio": ratio}


def build_variants(arch: str, scale, seed: int, root: pathlib.Path, log: Log) -> ArchResult:
  """Runs every stage of `scale.methods_for(arch)` and returns the sampling variants.

  Args:
    arch: 'dit' or 'uvit'.
    scale: the demo scale.
    seed: run seed.
    root: `OUT/<arch>`.
    log: progress printer.

  Returns:
    The `ArchResult`.
  """
  from jaxee.exits import deediff as dd  # pylint: disable=g-import-not-at-top
  clock = StageClock()
  model, params = clock.run("backbone", lambda: train_backbone(arch, scale, seed, root, log))
  variants = [Variant("full", "full", params, None, {})]
  wanted = scale.methods_for(arch)
  times = nfe_times(model, "ddim", scale.sample_steps)
  if "ase" in wanted:
    tuned, plan = clock.run("ase", lambda: train_ase(arch, scale, seed, root, model, params, log))
    facts = {"schedule": list(plan.schedule), "table": plan.name}
    variants.append(Variant("ase", "ase", tuned, plan, facts))
    variants.append(Variant("ase_no_finetune", "ase", params, plan, dict(facts, ablation=True)))
  if "deediff" in wanted:
    joint, ee, meta = clock.run(
        "deediff", lambda: train_deediff(arch, scale, seed, root, model, params, log))
    uem, layout = meta["uem"], meta["layout"]

    def calibrate():
      traj = teacher_trajectory(arch, model, joint, scale, seed, scale.deediff_calib_samples)
      u = exit_uncertainties(model, joint, ee, uem, traj, layout)
      return u, calibrate_threshold(u, scale.deediff_target_ratio, scale.deediff_min_fraction)
    u, cal = clock.run("deediff_calibration", calibrate)
    log(f"[{arch}] deediff: θ = {cal['threshold']:.4f} (predicted executed-block fraction "
        f"{cal['predicted_ratio']:.3f}, target {cal['target_ratio']})")
    if scale.deediff_refine_iters > 0:
      cal = clock.run("deediff_refinement", lambda: refine_threshold(
          model, joint, ee, uem, u, cal, scale, seed, arch, log, layout))
    plan = dd.DeeDiffPlan(ee, threshold=cal["threshold"], mode="batched",
                          min_fraction=scale.deediff_min_fraction, uem=uem, layout=layout)
    stacked = u[:, 1:] if layout == "outputs" else u     # the rows of real exits
    info = dict(cal, uem=uem, layout=layout, joint=True,
                num_exits=deediff_heads.num_exits(model, layout=layout),
                u_mean_per_nfe_layer=np.round(stacked.mean(axis=2), 4).tolist())
    variants.append(Variant("deediff", "deediff", joint, plan, info))
    # The papers' "simulated" exit: every block runs, each sample takes its own first exit.
    exact = dd.DeeDiffPlan(ee, threshold=cal["threshold"], mode="exact", uem=uem, layout=layout)
    variants.append(Variant("deediff_exact", "deediff", joint, exact,
                            dict(threshold=cal["threshold"], uem=uem, reference=True)))
    # The jointly trained backbone without exits: what the joint training did to the network.
    variants.append(Variant("deediff_backbone", "full", joint, None, {"joint": True}))
  if "duodiff" in wanted:
    plan, shallow = clock.run("duodiff",
                              lambda: train_duodiff(arch, scale, seed, root, model, params, log))
    info = {"t_switch": plan.t_switch, "rule": plan.rule,
            "shallow_blocks": flops_lib.num_blocks(plan.shallow_model),
            "shallow_nfes": int(plan.shallow_flags(model, times).sum())}
    variants.append(Variant("duodiff", "duodiff", plan.pack(params, shallow), plan, info))
  if "masks" in wanted:
    plan = clock.run("masks", lambda: optimise_masks(arch, scale, seed, root, model, params, log))
    info = {"kept_fraction": plan.metadata["kept_fraction"],
            "kept_fraction_raw": plan.metadata["kept_fraction_raw"],
            "mask": np.asarray(plan.mask, int).tolist(), "unit": plan.unit,
            "cache_mode": plan.cache_mode}
    variants.append(Variant("masks", "masks", params, plan, info))
    for unit in dict(scale.masks_extra_units).get(arch, ()):
      extra = clock.run(f"masks_{unit}", lambda u=unit: optimise_masks(
          arch, scale, seed, root, model, params, log, unit=u, stage=f"masks_{u}"))
      variants.append(Variant(f"masks_{unit}", "masks", params, extra, {
          "kept_fraction": extra.metadata["kept_fraction"],
          "kept_fraction_raw": extra.metadata["kept_fraction_raw"], "unit": extra.unit,
          "cache_mode": extra.cache_mode}))
  from jaxee.demo import beyond  # pylint: disable=g-import-not-at-top
  variants += beyond.beyond_variants(arch, scale, seed, root, model, params, variants, times,
                                     clock, log)
  return ArchResult(arch, model, variants, clock.stages)
