"""The demo's rows beyond the papers: searched plans, training-free baselines, U-Net caches.

For one trained backbone and the paper methods' plans (`jaxee.demo.methods.build_variants`):

* `ase_searched`: `jaxee.exits.search.search_plan(family='ase')` at the FLOPs of the paper's ASE
  table rescaled to the demo depth (the `ase` row's schedule), on a calibration set that is not
  the evaluation noise, sampled on the *un-tuned* backbone — the training-free counterpart of
  `ase_no_finetune`, at equal FLOPs;
* `ase_searched_ft`: ASE fine-tuning (`config.ase.schedule_file`) with that searched schedule —
  the counterpart of `ase`;
* `masks_searched`: `search_plan(family='mask')` at the FLOPs of the learned TABM mask, same
  units and cache semantics;
* `fora`: FORA static caching (`exits.baselines.fora_plan`) with the interval whose FLOPs are
  closest to the TABM mask's;
* `teacache`: TeaCache (`exits.teacache.TeaCachePlan`, rule 'max') with the threshold whose
  *measured* FLOPs on a calibration batch are closest to the TABM mask's (bisection; a threshold
  sweep never recompiles);
* `deepcache` (U-Net): DeepCache (`exits.DeepCachePlan`) with the (interval, branch) whose FLOPs
  are closest to the TABM mask's.

FLOP fractions are the plans' own per-NFE host tables (`BoundPlan.info`) over the full model's,
or, for TeaCache (dynamic), the runner's measured per-NFE `flops` statistics.
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import numpy as np

from jaxee.demo import setup as demo_setup

Log = Callable[[str], None]


def flops_fraction(model, params, plan, times) -> float:
  """Mean FLOPs per NFE of a static plan / the full model's (host tables)."""
  info = plan.bind(model, params, times).info
  return float(np.mean(info["flops_per_nfe"]) / info["full_flops"])


def _search_kwargs(arch: str, scale, seed: int) -> dict:
  from jaxee.exits import search  # pylint: disable=g-import-not-at-top
  return dict(sampler="ddim", steps=int(scale.sample_steps),
              guidance=scale.arch_value("guidance", arch),
              calibration=search.Calibration(num=int(scale.search_samples), seed=seed + 41))


def search_ase(arch, scale, seed, root: pathlib.Path, model, params, paper_plan, times,
               log: Log):
  """The searched ASE schedule at the paper table's FLOPs; returns (plan, info, file)."""
  from jaxee.exits import search  # pylint: disable=g-import-not-at-top
  budget = flops_fraction(model, params, paper_plan, times)
  path = root / "search" / "ase_searched.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  res = search.search_plan(model, params, family="ase", budget=budget, monotone=True,
                           out=str(path), **_search_kwargs(arch, scale, seed))
  info = {"schedule": list(res.plan.schedule), "budget": budget,
          "flops_fraction": res.flops_fraction, "objective": res.objective,
          "budget_met": bool(res.meta.get("budget_met", True)),
          "paper_schedule": list(paper_plan.schedule)}
  log(f"[{arch}] search ase: {list(res.plan.schedule)} at {res.flops_fraction:.3f} of the FLOPs "
      f"(paper table {budget:.3f}), drift {res.objective:.3g}")
  return res.plan, info, path


def search_mask(arch, scale, seed, model, params, tabm_plan, budget: float, log: Log):
  """The searched mask at `budget` (the TABM mask's FLOP fraction), same unit and cache;
  returns (plan, info)."""
  from jaxee.exits import search  # pylint: disable=g-import-not-at-top
  res = search.search_plan(model, params, family="mask", budget=budget, unit=tabm_plan.unit,
                           cache_mode=tabm_plan.cache_mode, **_search_kwargs(arch, scale, seed))
  info = {"budget": budget, "flops_fraction": res.flops_fraction, "objective": res.objective,
          "unit": tabm_plan.unit, "cache_mode": tabm_plan.cache_mode,
          "kept_fraction": float(np.mean(np.asarray(res.plan.mask)))}
  log(f"[{arch}] search mask: {res.flops_fraction:.3f} of the FLOPs (TABM mask {budget:.3f}), "
      f"drift {res.objective:.3g}")
  return res.plan, info


def fora_matched(arch, model, params, target: float, times, log: Log):
  """FORA with the interval whose FLOP fraction is closest to `target`."""
  from jaxee.exits import baselines  # pylint: disable=g-import-not-at-top
  from jaxee.models import backbone as bb_lib  # pylint: disable=g-import-not-at-top
  unit = "branch" if _has_branches(bb_lib, model) else "block"
  best = None
  for k in range(2, 9):
    plan = baselines.fora_plan(model, len(times), k, unit)
    frac = flops_fraction(model, params, plan, times)
    if best is None or abs(frac - target) < abs(best[1] - target):
      best = (plan, frac, k)
  plan, frac, k = best
  log(f"[{arch}] fora: interval {k} ({unit} cache), {frac:.3f} of the FLOPs (target {target:.3f};"
      f" the closest FORA reaches)")
  return plan, {"interval": k, "unit": unit, "flops_fraction": frac, "target": target}


def _has_branches(bb_lib, model) -> bool:
  try:
    bb_lib.as_backbone(model, "branch")
  except NotImplementedError:
    return False
  return True


def teacache_matched(arch, scale, seed, model, params, target: float, log: Log):
  """TeaCache (rule 'max') with the threshold whose measured FLOP fraction is closest to `target`.

  Bisection over the threshold on a calibration batch as large as the evaluation's (rule 'max':
  the batch's largest change decides, so the batch size matters) from other noise: the fraction
  falls as the threshold rises. Every probe reuses one compiled sampler (the threshold is a
  traced leaf).
  """
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee.demo import evaluate as demo_eval  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import teacache  # pylint: disable=g-import-not-at-top
  x_T, labels = demo_eval.eval_inputs(model, int(scale.num_eval), seed + 43)
  full = flops_lib.backbone_flops(model)
  guidance = scale.arch_value("guidance", arch)

  def measured(threshold):
    _, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), x_T=x_T, labels=labels,
                            sampler="ddim", steps=scale.sample_steps, guidance=guidance,
                            plan=teacache.TeaCachePlan(float(threshold)), return_stats=True)
    return float(np.mean(np.asarray(stats["flops"], np.float64)) / full)

  lo, hi = 0.0, 2.0
  tried = [(lo, measured(lo)), (hi, measured(hi))]
  while tried[-1][1] > target and hi < 64.0:
    lo, hi = hi, hi * 4
    tried.append((hi, measured(hi)))
  for _ in range(int(scale.teacache_bisections)):
    mid = 0.5 * (lo + hi)
    frac = measured(mid)
    tried.append((mid, frac))
    if frac > target:
      lo = mid
    else:
      hi = mid
  threshold, frac = min(tried, key=lambda p: (abs(p[1] - target), p[0]))
  log(f"[{arch}] teacache: threshold {threshold:.4g}, {frac:.3f} of the FLOPs on the "
      f"calibration batch (target {target:.3f})")
  return teacache.TeaCachePlan(float(threshold)), {
      "threshold": threshold, "calibration_flops_fraction": frac, "target": target,
      "rule": "max"}


def deepcache_matched(arch, model, params, target: float, times, log: Log):
  """DeepCache with the (interval, branch) whose FLOP fraction is closest to `target`."""
  from jaxee.exits import deepcache  # pylint: disable=g-import-not-at-top
  best = None
  for n in (2, 3, 4, 5):
    for b in range(len(deepcache.branches(model))):
      plan = deepcache.DeepCachePlan(interval=n, branch=b)
      frac = flops_fraction(model, params, plan, times)
      if best is None or abs(frac - target) < abs(best[1] - target) - 1e-9:
        best = (plan, frac, n, b)
  plan, frac, n, b = best
  log(f"[{arch}] deepcache: interval {n}, branch {b}, {frac:.3f} of the FLOPs "
      f"(target {target:.3f})")
  return plan, {"interval": n, "branch": b, "flops_fraction": frac, "target": target}


def train_ase_searched(arch, scale, seed, root: pathlib.Path, model, params, schedule_file,
                       log: Log):
  """ASE fine-tuning with the searched schedule (`config.ase.schedule_file`)."""
  from jaxee.train import methods  # pylint: disable=g-import-not-at-top
  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  section = dict(demo_setup.ase_section(arch, scale), schedule_file=str(schedule_file))
  config = demo_setup.stage_config("ase", arch, scale, seed, num_steps=scale.ase_steps,
                                   lr=scale.ase_lr, section=section)
  config.train.seed = demo_setup.stage_seed(seed, "ase_searched", arch)
  summary = trainer.train(config, root / "ase_searched", model=model, params=params)
  _, tuned, plan = methods.load_ase_export(root / "ase_searched")
  log(f"[{arch}] ase_searched_ft: {list(plan.schedule)}, {scale.ase_steps} steps, final loss "
      f"{summary['metrics'].get('loss', float('nan')):.4f}")
  return tuned, plan


def beyond_variants(arch, scale, seed, root, model, params, variants: list, times, clock,
                    log: Log) -> list:
  """The rows of the module docstring that apply, appended after the paper methods' rows."""
  from jaxee.demo.methods import Variant  # pylint: disable=g-import-not-at-top
  by_name = {v.name: v for v in variants}
  out = []
  wanted = scale.methods_for(arch)
  if "search" in wanted and "ase" in by_name:
    plan, info, path = clock.run("search_ase", lambda: search_ase(
        arch, scale, seed, root, model, params, by_name["ase"].plan, times, log))
    out.append(Variant("ase_searched", "ase", params, plan, info))
    tuned, ft_plan = clock.run("ase_searched_ft", lambda: train_ase_searched(
        arch, scale, seed, root, model, params, path, log))
    out.append(Variant("ase_searched_ft", "ase", tuned, ft_plan, dict(info, finetuned=True)))
  tabm = by_name.get("masks")
  target = None if tabm is None else flops_fraction(model, params, tabm.plan, times)
  if "search" in wanted and tabm is not None:
    plan, info = clock.run("search_mask", lambda: search_mask(
        arch, scale, seed, model, params, tabm.plan, target, log))
    out.append(Variant("masks_searched", "masks", params, plan, info))
  if "fora" in wanted and target is not None:
    plan, info = fora_matched(arch, model, params, target, times, log)
    out.append(Variant("fora", "fora", params, plan, info))
  if "teacache" in wanted and target is not None:
    plan, info = clock.run("teacache_calibration", lambda: teacache_matched(
        arch, scale, seed, model, params, target, log))
    out.append(Variant("teacache", "teacache", params, plan, info))
  if "deepcache" in wanted and target is not None:
    plan, info = deepcache_matched(arch, model, params, target, times, log)
    out.append(Variant("deepcache", "deepcache", params, plan, info))
  return out


def searched_vs_paper(record: dict) -> list[str]:
  """Report lines: the searched ASE schedule against the paper table at equal FLOPs."""
  v = record["variants"]
  lines = []
  for ours, theirs, what in (("ase_searched", "ase_no_finetune", "without fine-tuning"),
                             ("ase_searched_ft", "ase", "with ASE fine-tuning")):
    if ours not in v or theirs not in v:
      continue
    a, b = v[ours], v[theirs]
    fa, fb = a["exits"]["flops_per_image"], b["exits"]["flops_per_image"]
    da, db = a["quality"]["frechet"], b["quality"]["frechet"]
    std = a["quality"].get(f"frechet_diff_std_vs_{theirs}")
    verdict = ("at least as good" if da <= db else
               ("within noise" if std is not None and da - db <= 2 * std else "worse"))
    why = ""
    if da > db and ours == "ase_searched":
      full = v["full"]["quality"]["frechet"]
      why = (f"; why: the search minimises drift from the full model's samples (full FD "
             f"{full:.2f}) on its calibration set, so it cannot aim below the full model's FD, "
             f"which the table's samples {'reach' if db < full else 'do not reach'} here")
    lines.append(f"- searched ASE schedule vs the paper's table {what}: FD {da:.2f} vs {db:.2f}"
                 f" ({verdict}{'' if std is None else f'; 2σ = {2 * std:.2f}'}), FLOPs "
                 f"{fa / fb:.3f}× the table's{why}")
  return lines
