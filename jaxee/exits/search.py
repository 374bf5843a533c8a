"""Plan search under a compute budget (project issue 14): the plan that drifts least from the
full model on a calibration set, among plans at most `budget` of the full model's FLOPs.

    result = search_plan(model, params, sampler='ddim', steps=20, guidance=3.0, budget=0.6,
                         family='ase', calibration=Calibration(num=16, seed=0))
    result.save('plan.json')            # then jaxee-sample --config.plan=search:plan.json

Plan families (`docs/methods/search.md`):

* `'ase'`: an ASE schedule (`ase.ASEPlan`, Moon et al. ICML'24 Table 5 form): units run
  per interval τ ∈ [0.1i, 0.1(i+1)); with `monotone=True` non-increasing toward noise
  (n_i ≥ n_{i+1}, the shape of every paper table). Intervals the sampler's NFE grid never
  visits cost nothing; they are set to the next noisier interval's depth (the last one to
  `min_depth`), so they never block a monotone move and the file stays a valid table for other
  step counts.
* `'mask'`: a (NFE × units) compute mask with a cache (`masks.MaskPlan`, TABM / L2C form);
  `unit='block'` (block-output cache) or `'branch'` (attention and MLP, branch cache).
* `'ase+mask'`: both, composed (`composition.compose`: mask before the depth limit, drop after).

Objective: the mean squared difference between the plan's final samples and the full model's
(`jaxee.sample` with `plan=None`) from the same start noise x_T, labels, per-step noise and
guidance, averaged over the calibration set and every element. Final samples are what FID and
every downstream use see, and they integrate the drift of the x₀-predictions along the
trajectory; the per-step predictions are not exposed by the sampler API, so they are not used.

FLOPs: the plans' own host tables (`BoundPlan.info['flops_per_nfe']`, from the backbone
contract's per-unit counts), mean over NFEs / `full_flops`; with guidance both halves of the
batch run the same plan, so the fraction is unchanged. A target measured speed-up S is converted
through FLOPs (`budget = 1/S`): an ideal bound, since a measured speed-up is lower by the
unskippable overhead (sampler, embedding, dispatch); the log records the conversion.

Method (deterministic: no randomness beyond the calibration's seed; ties go to the earlier
move): greedy from the full plan. Each round evaluates the current plan and every single move
(one interval's depth − 1; one mask entry at one NFE ≥ 1 set to 0) that saves FLOPs, and takes
the move with the smallest objective increase per FLOP saved; when it is a mask move, the next
best mask moves are taken with it, up to max(`moves_per_round`, half the moves still needed at
the median saving), stopping as soon as the budget is met (few rounds far from the budget,
single moves near it). Then
`refine_rounds` rounds of swaps at the budget (ASE: −1 at one interval, +1 at another; masks: a
dropped entry moved to the previous or next NFE of its unit), each accepted only if it lowers the
objective.

Evaluation: candidates are stacked into one plan pytree (leaves gain a leading axis) and mapped
with `lax.map` over the sampling program `jaxee.sample` runs (`sampling.sampling_program`), in
fixed-size chunks (padded with the current plan), inside one jitted function: `lax.map` keeps
each candidate's scalar `lax.cond`s / `fori_loop` trip counts real (no `vmap` turning them into
selects), and a new candidate is new leaf data, never a recompile (`eval_trace_count()`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee import atomic_io
from jaxee import validation
from jaxee.exits import ase as ase_lib
from jaxee.exits import composition
from jaxee.exits import io as io_lib
from jaxee.exits import masks as masks_lib
from jaxee.models.backbone import as_backbone

FAMILIES = ("ase", "mask", "ase+mask")
OBJECTIVE = "mean squared difference of final samples to the full model's (same x_T, labels)"
_EVAL_TRACES = collections.Counter()


def eval_trace_count() -> int:
  """How many times the candidate evaluator has been traced (compile counting in tests)."""
  return sum(_EVAL_TRACES.values())


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The calibration set: `num` start noises from `seed` and their labels.

  Attributes:
    num: samples (tens are enough: the objective is an average over them).
    seed: PRNG seed of the start noise x_T and of the sampler's per-step noise.
    labels: class labels (length `num`); default `arange(num) % num_classes` for a
      class-conditional model (balanced over its real classes), None for an unconditional one.
  """
  num: int = 16
  seed: int = 0
  labels: Optional[Sequence[int]] = None

  def arrays(self, model: Any):
    """(x_T, labels, rng) of the set."""
    if int(self.num) < 1:
      raise ValueError(f"calibration num must be >= 1, got {self.num}")
    key_x, key_run = jax.random.split(jax.random.PRNGKey(int(self.seed)))
    shape = (int(self.num),) + tuple(as_backbone(model).input_shape)
    x_T = jax.random.normal(key_x, shape, jnp.float32)
    classes = validation.num_real_classes(model)
    if self.labels is not None:
      labels = jnp.asarray(np.asarray(self.labels, np.int32))
      if labels.shape != (int(self.num),):
        raise ValueError(f"calibration labels must have length {self.num}, got {labels.shape}")
    else:
      labels = jnp.arange(int(self.num), dtype=jnp.int32) % classes if classes > 0 else None
    return x_T, labels, key_run


@dataclasses.dataclass
class SearchResult:
  """The searched plan, its FLOP fraction, its objective and the search log.

  `meta` holds the settings (family, budget, sampler, calibration, ...), whether the budget was
  met, the number of candidates evaluated and the evaluator traces; `save` writes it all.
  """
  plan: Any
  flops_fraction: float
  objective: float
  log: list
  meta: dict

  def save(self, path) -> str:
    """Writes the plan file (atomically) with the log and the met budget in its metadata.

    ASE plans: `.json` (the `save_ase_plan` layout plus a `search` entry); masks and ase+mask:
    `.npz` (`MaskPlan.save` layout; ase+mask adds `ase_schedule`). `exits.io.load_plan`,
    the `file:`/`search:` plan specs and `jaxee-sample` read both.
    """
    path = pathlib.Path(path)
    record = dict(self.meta, flops_fraction=self.flops_fraction, objective=self.objective,
                  log=self.log)
    if isinstance(self.plan, ase_lib.ASEPlan):
      if path.suffix != ".json":
        raise ValueError(f"an ASE plan file is .json, got {path}")
      return io_lib.save_ase_plan(path, self.plan, self.plan.family, search=record)
    if path.suffix != ".npz":
      raise ValueError(f"a mask plan file is .npz, got {path}")
    mask_plan = self.plan if isinstance(self.plan, masks_lib.MaskPlan) else self.plan.cache
    extra = {"search": record}
    if isinstance(self.plan, composition.ComposedPlan):
      extra.update(ase_schedule=list(self.plan.depth.table), ase_family=self.plan.depth.family)
    mask_plan.save(str(path), **extra)
    return str(path)


class _Space:
  """Plans of one family as host states (schedule tuple, mask array), moves and swaps."""

  def __init__(self, model, params, times, family, unit, monotone, min_depth, cache_mode=None):
    if family not in FAMILIES:
      raise ValueError(f"unknown plan family {family!r}; choose from {FAMILIES}")
    self.model, self.params, self.times = model, params, times
    self.use_ase, self.use_mask = family != "mask", family != "ase"
    self.monotone, self.min_depth = bool(monotone), int(min_depth)
    self.unit = unit
    self.cache_mode = cache_mode or masks_lib.cache_mode_for(unit)
    if family != "mask" and unit == "branch" and masks_lib.output_replacement(self.cache_mode):
      raise ValueError("a branch mask with cache_mode='unit_output' runs alone; use "
                       "family='mask'")
    self._flops = {}
    if self.use_ase:
      self.cap = ase_lib.capacity(model)
      if not 1 <= self.min_depth <= self.cap:
        raise ValueError(f"min_depth must be in [1, {self.cap}], got {min_depth}")
      idx = ase_lib.ASEPlan((self.cap,) * ase_lib.NUM_INTERVALS).intervals(model, times)
      self.used = np.isin(np.arange(ase_lib.NUM_INTERVALS), idx)
    if self.use_mask:
      self.shape = (len(times), masks_lib.num_units(model, unit))

  def start(self):
    sched = self.normalize((self.cap,) * 10) if self.use_ase else None
    mask = np.ones(self.shape, bool) if self.use_mask else None
    return sched, mask

  def normalize(self, sched):
    """Unvisited intervals take the next noisier interval's depth (`min_depth` at the end)."""
    s = list(sched)
    for i in reversed(range(len(s))):
      if not self.used[i]:
        s[i] = s[i + 1] if i + 1 < len(s) else self.min_depth
    return tuple(s)

  def plan(self, state):
    sched, mask = state
    ase_plan = None if sched is None else ase_lib.ASEPlan(
        sched, name="search", family=self.model.family)
    mask_plan = None if mask is None else masks_lib.MaskPlan(mask, self.unit, self.cache_mode)
    if ase_plan is None or mask_plan is None:
      return ase_plan or mask_plan
    return composition.compose(ase_plan, mask_plan)

  @staticmethod
  def key(state):
    sched, mask = state
    return (sched, None if mask is None else np.packbits(mask).tobytes())

  def flops(self, state) -> float:
    """FLOP fraction of the full model, from the plans' own host tables (`ase.tables`,
    `masks.tables`, `composition.depth_cache_tables`: what `bind(...).info` reports)."""
    k = self.key(state)
    if k not in self._flops:
      sched, mask = state
      depths = None if sched is None else ase_lib.ASEPlan(sched).depths(self.model, self.times)
      if mask is None:
        bb = as_backbone(self.model)
        flops = ase_lib.tables(bb, depths)[1]
      else:
        plan = masks_lib.MaskPlan(mask, self.unit, self.cache_mode)
        bb = as_backbone(self.model, plan.granularity)
        m = plan.unit_mask(np)
        if depths is None:
          flops = masks_lib.tables(bb, m)[1]
        else:
          limit = bb.tail_start + depths * (bb.num_units // bb.num_blocks)
          flops = composition.depth_cache_tables(bb, limit, m)[1]
      self._flops[k] = float(np.mean(flops) / bb.full_flops)
    return self._flops[k]

  def _valid(self, sched) -> bool:
    if min(sched) < self.min_depth or max(sched) > self.cap:
      return False
    return not self.monotone or all(a >= b for a, b in zip(sched, sched[1:]))

  def moves(self, state):
    """[(description, state)]: every single reduction."""
    sched, mask = state
    out = []
    if sched is not None:
      for i in np.flatnonzero(self.used):
        s = list(sched)
        s[i] -= 1
        s = self.normalize(s)
        if self._valid(s):
          out.append((("depth", int(i)), (s, mask)))
    if mask is not None:
      for t, u in zip(*np.nonzero(mask)):
        if t == 0:
          continue
        m = mask.copy()
        m[t, u] = False
        out.append((("mask", int(t), int(u)), (sched, m)))
    return out

  def swaps(self, state):
    """[(description, state)]: budget-neutral-ish exchanges (see the module docstring)."""
    sched, mask = state
    out = []
    if sched is not None:
      used = np.flatnonzero(self.used)
      for i in used:
        for j in used:
          if i == j:
            continue
          s = list(sched)
          s[i] -= 1
          s[j] += 1
          s = self.normalize(s)
          if self._valid(s):
            out.append((("swap", int(i), int(j)), (s, mask)))
    if mask is not None:
      steps, units = mask.shape
      for t, u in zip(*np.nonzero(~mask)):
        for t2, u2 in ((t - 1, u), (t + 1, u)):
          if 1 <= t2 < steps and 0 <= u2 < units and mask[t2, u2]:
            m = mask.copy()
            m[t, u], m[t2, u2] = True, False
            out.append((("shift", int(t), int(u), int(t2), int(u2)), (sched, m)))
    return out


@functools.lru_cache(maxsize=16)
def _evaluator(fn):
  """A jitted `evaluate(params, plans, rng, x_T, labels, scale, ref) -> (K,) objectives`."""

  def evaluate(params, plans, rng, x_T, labels, scale, ref):
    _EVAL_TRACES[id(fn)] += 1  # trace-time only

    def one(plan):
      x, _, _ = fn(params, plan, rng, x_T, labels, scale, None)
      err = jnp.mean(jnp.square(x.astype(jnp.float32) - ref))
      return jnp.where(jnp.isfinite(err), err, jnp.inf)

    return jax.lax.map(one, plans)

  return jax.jit(evaluate)


def plan_suffix(family: str) -> str:
  """The plan file suffix of a family: '.json' for 'ase', '.npz' for the mask families."""
  return ".json" if family == "ase" else ".npz"


def _stack(plans):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *plans)


def search_plan(model, params, *, sampler: str = "ddim", steps: int = 20,
                guidance: Optional[float] = None, budget: Optional[float] = 0.7,
                speedup: Optional[float] = None, family: str = "ase",
                calibration: Optional[Calibration] = None, unit: str = "block",
                monotone: bool = True, min_depth: int = 1, seed: Optional[int] = None,
                moves_per_round: Optional[int] = None, refine_rounds: int = 2,
                chunk: int = 16, max_rounds: int = 10_000, out: Optional[str] = None,
                cache_mode: Optional[str] = None, **sampler_options) -> SearchResult:
  """Searches a plan of `family` within `budget` of the full model's FLOPs.

  Args:
    model, params: the backbone and its params.
    sampler, steps, guidance, **sampler_options: the sampling setting, as for `jaxee.sample`
      (a mask plan is specific to its NFE count; an ASE schedule is not).
    budget: the largest FLOP fraction of the full model allowed (in (0, 1]).
    speedup: a target speed-up S > 1 instead of `budget`; converted to `budget = 1/S` (an ideal
      FLOP bound; see the module docstring).
    family: 'ase' | 'mask' | 'ase+mask'.
    calibration: the calibration set (default `Calibration()`; `seed` overrides its seed).
    unit: mask units, 'block' (block-output cache) or 'branch' (branch cache).
    cache_mode: the mask's cache (`masks.CACHE_MODES`; default by `unit` as above), e.g.
      'unit_output' with `unit='branch'` for TABM's per-sub-layer output replacement.
    monotone: ASE depths non-increasing toward noise.
    min_depth: smallest ASE depth (droppable units run).
    seed: the calibration seed (overrides `calibration.seed` when given).
    moves_per_round: fewest mask moves taken per greedy round when the budget is not yet met
      (default max(1, units // 2); more far from the budget, see the module docstring).
    refine_rounds: swap rounds after the greedy phase (0: none).
    chunk: most candidates per compiled call (capped at 1 + the first round's moves; one
      program for the whole search).
    max_rounds: safety bound on greedy rounds.
    out: when given, the plan file to write (`SearchResult.save`; its suffix is checked before
      the search starts); `meta['plan_file']` is its path.

  Returns:
    A `SearchResult`; `meta['budget_met']` is False only when no move saves FLOPs any more.
  """
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  started = time.time()
  if speedup is not None:
    if not float(speedup) > 1.0:
      raise ValueError(f"speedup must be > 1 (full time / plan time), got {speedup}")
    budget = 1.0 / float(speedup)
  if budget is None or not 0.0 < float(budget) <= 1.0:
    raise ValueError(f"budget must be a FLOP fraction in (0, 1], got {budget}")
  budget = float(budget)
  if unit not in masks_lib.UNITS:
    raise ValueError(f"unit must be in {masks_lib.UNITS}, got {unit!r}")
  if int(chunk) < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  if family not in FAMILIES:
    raise ValueError(f"unknown plan family {family!r}; choose from {FAMILIES}")
  if out is not None and pathlib.Path(out).suffix != plan_suffix(family):
    raise ValueError(f"a {family} plan file is {plan_suffix(family)}, got {out}")
  calibration = calibration or Calibration()
  if seed is not None:
    calibration = dataclasses.replace(calibration, seed=int(seed))
  x_T, labels, rng = calibration.arrays(model)
  ref = sampling.sample(model, params, rng, sampler=sampler, steps=steps, labels=labels,
                        guidance=guidance, x_T=x_T, **sampler_options)
  fn, times = sampling.sampling_program(model, sampler, steps, guided=guidance is not None,
                                        **sampler_options)
  space = _Space(model, params, times, family, unit, monotone, min_depth, cache_mode)
  state = space.start()
  space.plan(state).check(model, times)
  chunk = min(int(chunk), 1 + len(space.moves(state)))  # one shape for the whole search
  evaluate = _evaluator(fn)
  scale = jnp.float32(0.0 if guidance is None else guidance)
  counts = {"candidates": 0}

  def objectives(states):
    plans = [space.plan(s) for s in states]
    n = len(plans)
    plans += [plans[0]] * (-n % chunk)
    out = []
    for k in range(0, len(plans), chunk):
      out.append(np.asarray(evaluate(params, _stack(plans[k:k + chunk]), rng, x_T, labels,
                                     scale, ref)))
    counts["candidates"] += n
    return np.concatenate(out)[:n].astype(np.float64)

  per_round = int(moves_per_round or max(1, (space.shape[1] // 2) if space.use_mask else 1))
  flops = space.flops(state)
  objective = float(objectives([state])[0])
  log = [{"round": 0, "phase": "start", "flops_fraction": flops, "objective": objective}]
  rounds = 0
  while flops > budget + 1e-12 and rounds < max_rounds:
    rounds += 1
    cands = [(d, s) for d, s in space.moves(state) if space.flops(s) < flops - 1e-12]
    if not cands:
      break
    objs = objectives([state] + [s for _, s in cands])
    objective, cur = float(objs[0]), objs[1:]
    if log[-1]["objective"] is None:  # the previous round took several moves at once
      log[-1]["objective"] = objective
    saved = np.array([flops - space.flops(s) for _, s in cands])
    order = np.argsort((cur - objective) / saved, kind="stable")
    best_desc, new = cands[order[0]]
    taken = [best_desc]
    if best_desc[0] == "mask":
      # Far from the budget, take up to half the moves still needed (median saving) at once.
      need = int(np.ceil((flops - budget) / max(float(np.median(saved)), 1e-12)))
      limit = max(per_round, need // 2)
      for i in order[1:]:
        if len(taken) >= limit or space.flops(new) <= budget + 1e-12:
          break
        desc = cands[i][0]
        if desc[0] == "mask":
          m = new[1].copy()
          m[desc[1], desc[2]] = False
          new, taken = (new[0], m), taken + [desc]
    state, flops = new, space.flops(new)
    objective = float(cur[order[0]]) if len(taken) == 1 else float("nan")
    log.append({"round": rounds, "phase": "greedy", "moves": [list(d) for d in taken],
                "candidates": len(cands), "flops_fraction": flops,
                "objective": objective if np.isfinite(objective) else None})
  if not np.isfinite(objective):
    objective = float(objectives([state])[0])
    log[-1]["objective"] = objective
  for r in range(int(refine_rounds)):
    cands = [(d, s) for d, s in space.swaps(state) if space.flops(s) <= max(budget, flops) + 1e-12]
    if not cands:
      break
    objs = objectives([s for _, s in cands])
    i = int(np.argmin(objs))
    accepted = bool(objs[i] < objective)
    log.append({"round": rounds + r + 1, "phase": "refine", "moves": [list(cands[i][0])],
                "candidates": len(cands), "accepted": accepted,
                "flops_fraction": space.flops(cands[i][1]), "objective": float(objs[i])})
    if not accepted:
      break
    state, objective = cands[i][1], float(objs[i])
    flops = space.flops(state)
  plan = space.plan(state)
  meta = {
      "family": family, "unit": unit if space.use_mask else None,
      "monotone": monotone if space.use_ase else None, "budget": budget,
      "speedup_target": speedup, "budget_met": bool(flops <= budget + 1e-12),
      "budget_from": "speedup (FLOP fraction 1/S, ideal)" if speedup is not None else "flops",
      "sampler": sampler, "steps": int(steps), "guidance": guidance,
      "sampler_options": dict(sampler_options), "arch_family": model.family,
      "calibration": {"num": calibration.num, "seed": calibration.seed,
                      "labels": None if labels is None else np.asarray(labels).tolist()},
      "objective_definition": OBJECTIVE, "candidates_evaluated": counts["candidates"],
      "chunk": int(chunk), "seconds": round(time.time() - started, 3),
  }
  result = SearchResult(plan, float(flops), float(objective), log, meta)
  if out is not None:
    meta["plan_file"] = result.save(out)
  return result
