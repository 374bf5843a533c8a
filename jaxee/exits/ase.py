"""ASE: "A Simple Early Exiting Framework for Accelerated Sampling in Diffusion Models" (ICML'24).

Reproduces the dropping schedules of the paper's Table 5 (D2/D3/D4/D7-DiT on DiT-XL/2, 28 blocks;
D1/D2/D3/D6-U-ViT on U-ViT with 6 out-blocks) and the sampling-time forward of
`ee-diffusion/DiT/drop_scheduler.py` (`build_forward_scheduler`, `get_early_exit_idx`):

* τ ∈ [0, 1] is the network time divided per `plan.model_time_to_unit` (τ → 1 is noise); the
  interval is i = min(⌊10τ⌋, 9), so interval 0 is [0, 0.1) and interval 9 is [0.9, 1.0]; the
  schedule's i-th entry is the number of blocks run (`research/ee_methods.md` §1.2, §1.6).
* DiT: only the first n blocks run, then the normal `final_layer(x, c)` (§1.3).
* U-ViT: n is the number of out-blocks whose attention and MLP run; in-blocks and the mid block
  always run; the dropped out-blocks are the LAST ones and still apply their `skip_linear`
  (`merge_skip`) so every encoder skip is consumed (paper Fig. 8, §1.5).

Runners (`research/jax_style.md` §4.3 (b)); the per-NFE depth is computed on the host from the
sampler's NFE times, and the run-time index is a scalar read from that table with the NFE index:

* `runner='loop'` (default): one `lax.fori_loop` whose trip count is the depth (a `while` with a
  runtime bound): one compiled body whatever the schedule, so a plan compiles about as fast as
  the full network.
* `runner='switch'`: `lax.switch(index_of_depth[nfe_index], branches)` with one branch per
  distinct depth n_k of the grid, each a fixed-length loop over blocks 0..n_k−1 (U-ViT: the
  first n_k out-blocks in full, then the skip fusion of the rest). XLA runs only the taken branch;
  compile time grows with the number of distinct depths (≤ 10): up to ≈ 2× the full sampler's
  on tiny models, which is why it is not the default. Per network evaluation both cost the same
  (`dit_s_2`, batch 8, CPU: D3 at depth 12 and 6 — 0.80 / 0.45 s switch, 0.78 / 0.47 s loop).

Both index the stacked params dynamically inside the loop (a dynamic-slice per block, as the full
forward's `lax.scan` does), so no branch copies a slice of the params.

Scaling a schedule to another depth (`scale_schedule`, `ase_plan(name, depth=...)`,
`ASEPlan.scaled`): each entry n becomes round-half-up(n · depth / 28) (U-ViT tables: / 6
out-blocks), clamped to [1, depth], so every interval keeps the fraction of blocks the paper ran;
e.g. D3-DiT on the 12-block DiT-S/2 runs 12 12 10 10 9 9 7 7 5 5.

Training (§1.4): `ase_forward_masked` runs every block for every sample and keeps
`where(l < n_i, block(x), x)` per sample, so gradients reach only the blocks sample i uses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib
from jaxee.models.backbone import as_backbone

# Blocks run per interval [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0] (ASE paper Table 5).
ASE_TABLES: dict[str, tuple[int, ...]] = {
    "D2-DiT": (28, 28, 25, 25, 22, 22, 19, 19, 16, 16),
    "D3-DiT": (28, 28, 24, 24, 20, 20, 16, 16, 12, 12),
    "D4-DiT": (28, 28, 26, 24, 20, 18, 12, 10, 8, 8),
    "D7-DiT": (28, 28, 24, 21, 18, 15, 10, 10, 8, 8),
    "D1-U-ViT": (6, 6, 4, 4, 2, 2, 2, 2, 1, 1),
    "D2-U-ViT": (5, 5, 4, 4, 2, 2, 1, 1, 1, 1),
    "D3-U-ViT": (3, 3, 2, 2, 2, 2, 1, 1, 1, 1),
    "D6-U-ViT": (2, 2, 2, 2, 1, 1, 1, 1, 1, 1),
}
# Sampling speed-ups reported in the paper for each schedule (metadata only).
ASE_SPEEDUPS: dict[str, float] = {
    "D2-DiT": 0.2343, "D3-DiT": 0.3046, "D4-DiT": 0.3456, "D7-DiT": 0.3892,
    "D1-U-ViT": 0.213, "D2-U-ViT": 0.248, "D3-U-ViT": 0.297, "D6-U-ViT": 0.326,
}
# The backbone family each table was written for, and the depth it refers to (DiT-XL/2 blocks;
# U-ViT out-blocks, the droppable tail): data about the paper's tables, checked against the model.
TABLE_FAMILY = {name: name.split("-", 1)[1].lower().replace("-", "")
                for name in ASE_TABLES}
REFERENCE_DEPTH = {"dit": 28, "uvit": 6}
RUNNERS = ("switch", "loop")
NUM_INTERVALS = 10


def interval_index(tau) -> np.ndarray:
  """min(⌊10τ⌋, 9), clamped at 0 (a 1e-9 guard absorbs float error at the bin edges)."""
  tau = np.asarray(tau, np.float64)
  return np.clip(np.floor(NUM_INTERVALS * tau + 1e-9), 0, NUM_INTERVALS - 1).astype(np.int32)


def scale_schedule(schedule: Sequence[int], from_depth: int, to_depth: int) -> tuple[int, ...]:
  """Rescales a schedule to another depth, keeping the fraction of blocks run.

  Rule: n' = max(1, min(to_depth, ⌊n·to_depth/from_depth + 1/2⌋)) (round half up).

  Args:
    schedule: blocks run per interval at `from_depth`.
    from_depth: depth the schedule was written for (28 for the DiT tables).
    to_depth: target depth.

  Returns:
    The rescaled schedule.
  """
  if from_depth <= 0 or to_depth <= 0:
    raise ValueError(f"depths must be positive, got {from_depth} -> {to_depth}")
  return tuple(max(1, min(to_depth, int(math.floor(n * to_depth / from_depth + 0.5))))
               for n in schedule)


def capacity(model: Any) -> int:
  """Largest schedule entry the model supports: the units after `Backbone.tail_start`."""
  bb = as_backbone(model)
  return bb.num_units - bb.tail_start


def _is_concrete(a) -> bool:
  """True for a host schedule (ints), False inside a trace."""
  return not plan_lib.is_traced(a)


@plan_lib.pytree_plan(data=("schedule",), static=("time_schedule", "runner", "switch_depths"))
class ASEPlan:
  """A 10-interval dropping schedule (a pytree: the table is a traced leaf).

  `name`, `family` and `speedup` are host metadata (not part of the compiled structure).

  Attributes:
    schedule: 10 ints, blocks run per interval [0, 0.1) → [0.9, 1.0] (counted from the
      backbone's `tail_start`: U-ViT out-blocks whose attention and MLP run).
    name: table name or 'custom'.
    family: the backbone family a paper table was written for (checked by `check`).
    time_schedule: time convention for τ (default: the model's `default_schedule`).
    speedup: the paper's reported speed-up (metadata).
    runner: 'loop' (default; `fori_loop`s whose trip count is the depth) or 'switch'
      (`lax.switch` over one fixed-length loop per distinct depth in `switch_depths`).
    switch_depths: the distinct depths the switch runner compiles (static; filled from the
      schedule when the runner is 'switch').
  """
  schedule: Any
  name: str = "custom"
  family: Optional[str] = None
  time_schedule: Optional[str] = None
  speedup: Optional[float] = None
  runner: str = "loop"
  switch_depths: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    if self.runner not in RUNNERS:
      raise ValueError(f"unknown ASE runner {self.runner!r}; choose from {RUNNERS}")
    if not _is_concrete(self.schedule):
      return
    sched = np.asarray(self.schedule)
    if sched.shape != (NUM_INTERVALS,):
      raise ValueError(f"an ASE schedule has {NUM_INTERVALS} entries, got {sched.size}")
    if not np.all(sched == np.round(sched)):
      raise ValueError(f"ASE schedule entries must be integers, got {sched.tolist()}")
    sched = tuple(int(n) for n in sched)
    if min(sched) < 0:
      raise ValueError(f"negative block count in schedule {sched}")
    object.__setattr__(self, "schedule", sched)  # a tuple of ints on the host, leaves in a trace
    if self.runner == "switch" and self.switch_depths is None:
      object.__setattr__(self, "switch_depths", tuple(sorted(set(sched))))

  @property
  def table(self) -> tuple[int, ...]:
    """The schedule as a tuple of ints (concrete plans only)."""
    return tuple(int(n) for n in np.asarray(self.schedule))

  def scaled(self, to_depth: int, from_depth: Optional[int] = None) -> "ASEPlan":
    """The plan rescaled to `to_depth` (see `scale_schedule`)."""
    from_depth = from_depth or REFERENCE_DEPTH.get(self.family or "dit")
    return dataclasses.replace(self, schedule=scale_schedule(self.table, from_depth, to_depth),
                               name=f"{self.name}@{to_depth}", switch_depths=None)

  def validate(self, model: Any) -> None:
    """Host check against the model (concrete plans)."""
    if self.family is not None and self.family != model.family:
      raise ValueError(f"ASE schedule {self.name} is for {self.family}, model is {model.family}")
    cap = capacity(model)
    if max(self.table) > cap:
      bb = as_backbone(model)
      what = "blocks" if not bb.tail_start else f"blocks after the first {bb.tail_start}"
      raise ValueError(f"ASE schedule {self.name} {self.table} runs up to "
                       f"{max(self.table)} blocks but the model has {cap} ({what} can be "
                       f"dropped); rescale it with plan.scaled({cap}) or "
                       f"ase_plan(name, depth={cap})")
    if self.switch_depths is not None and not set(self.table) <= set(self.switch_depths):
      raise ValueError(f"switch runner compiled for depths {self.switch_depths}, schedule "
                       f"has {sorted(set(self.table))}")

  def check(self, model: Any, nfe_times) -> None:
    plan_lib.check_nfe_times(nfe_times)
    self.validate(model)

  def intervals(self, model: Any, nfe_times) -> np.ndarray:
    """Interval index of each NFE (host, from the static time grid)."""
    times = plan_lib.check_nfe_times(nfe_times)
    tau = plan_lib.model_time_to_unit(times.astype(np.float64),
                                      plan_lib.time_schedule(model, self.time_schedule))
    return interval_index(tau)

  def depths(self, model: Any, nfe_times):
    """Droppable blocks run at each NFE (NumPy for concrete plans, traced otherwise)."""
    idx = self.intervals(model, nfe_times)
    if _is_concrete(self.schedule):
      return np.asarray(self.schedule, np.int32)[idx]
    return jnp.clip(jnp.asarray(self.schedule, jnp.int32)[idx], 0, capacity(model))

  def depth_for_time(self, model: Any, t_net) -> jax.Array:
    """Traced per-sample depth for network times `t_net` (for `ase_forward_masked`)."""
    tau = plan_lib.model_time_to_unit(jnp.asarray(t_net, jnp.float32),
                                      plan_lib.time_schedule(model, self.time_schedule))
    idx = jnp.clip(jnp.floor(NUM_INTERVALS * tau + 1e-6), 0, NUM_INTERVALS - 1).astype(jnp.int32)
    return jnp.asarray(self.schedule, jnp.int32)[idx]

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Compiles the schedule for `nfe_times` and returns the bound runner."""
    if not plan_lib.is_traced(self):
      self.validate(model)
    bb = as_backbone(model)
    depths = self.depths(model, nfe_times)
    blocks, flops = tables(bb, depths)
    run = _make_runner(bb, params, jnp.asarray(depths, jnp.int32), self.runner,
                       self.switch_depths)

    def net(x, t_net, y, nfe_index, cache):
      out = run(x, t_net, y, nfe_index)
      return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

    def info():
      return plan_lib.make_info(model, blocks, flops, plan=f"ase:{self.name}", depths=depths,
                                distinct_depths=sorted(set(int(d) for d in depths)),
                                paper_speedup=self.speedup)
    return plan_lib.BoundPlan(net, plan_lib.no_cache, plan_lib.host_info(self, info))


def ase_plan(name: str, depth: Optional[int] = None, **kwargs) -> ASEPlan:
  """A paper schedule by name ('D3-DiT', 'D6-U-ViT'; 'D3' alone means the DiT table).

  Args:
    name: table name.
    depth: rescale to this depth (DiT blocks / U-ViT out-blocks) when given.
    **kwargs: other `ASEPlan` fields (`time_schedule`, `runner`).

  Returns:
    The `ASEPlan`.
  """
  key = name if name in ASE_TABLES else f"{name}-DiT"
  if key not in ASE_TABLES:
    raise ValueError(f"unknown ASE schedule {name!r}; known: {sorted(ASE_TABLES)}")
  family = TABLE_FAMILY[key]
  plan = ASEPlan(ASE_TABLES[key], name=key, family=family, speedup=ASE_SPEEDUPS[key], **kwargs)
  if depth is not None and depth != REFERENCE_DEPTH[family]:
    plan = plan.scaled(depth)
  return plan


def tables(bb, depths):
  """Blocks and FLOPs executed per NFE for per-NFE depths (NumPy or traced).

  Units before `bb.tail_start` always run; of the tail, the first `depth` run and the rest are
  dropped (`bb.drop`, e.g. U-ViT's skip fusion), so FLOPs = embed + head + Σ run + Σ drop.
  """
  xp = np if isinstance(depths, np.ndarray) else jnp
  run_cum = np.concatenate([[0.0], np.cumsum(bb.unit_flops)])
  drop_cum = np.concatenate([[0.0], np.cumsum(bb.drop_flops)])
  upto = bb.tail_start + depths
  flops = (bb.embed_flops + bb.head_flops + xp.asarray(run_cum)[upto]
           + (drop_cum[-1] - xp.asarray(drop_cum)[upto]))
  return upto.astype(xp.float64 if xp is np else xp.float32), flops


def _make_runner(bb, params: Any, depth_per_nfe, runner: str, switch_depths):
  """`run(x, t_net, y, nfe_index) -> out` at the depth read from the per-NFE table.

  Per segment: units [0, limit) run and [limit, size) are dropped, where limit is the depth
  (plus `tail_start`) clipped to the segment. 'loop': two `fori_loop`s whose trip counts are
  traced (while loops; one compiled body whatever the schedule). 'switch': `lax.switch` over one
  static prefix per distinct depth. Params are indexed inside the loops (a dynamic-slice per
  block, as the full forward's `lax.scan` does).
  """

  def seg_range(seg, lo, hi, state, fn):
    def body(g, st):
      for s in range(len(seg.pattern)):
        st = fn(params, bb_lib.UnitRef(seg, g, s), st)
      return st
    return jax.lax.fori_loop(lo, hi, body, state)

  def at_depth(state, depth):
    limit = bb.tail_start + depth
    for seg in bb.segments:
      per = len(seg.pattern)
      if isinstance(limit, int):
        cut = min(max(limit - seg.start, 0), seg.size) // per
      else:
        cut = jnp.clip(limit - seg.start, 0, seg.size) // per
      state = seg_range(seg, 0, cut, state, bb.run_unit)
      state = seg_range(seg, cut, seg.groups, state, bb.drop)
    return state

  def run(x, t_net, y, nfe_index):
    state = bb.embed(params, x, t_net, y)
    if runner == "loop":
      state = at_depth(state, depth_per_nfe[nfe_index])
    else:
      depths = jnp.asarray(switch_depths, jnp.int32)
      which = jnp.argmax(depths == depth_per_nfe[nfe_index])
      branches = [functools.partial(lambda st, d: at_depth(st, d), d=int(d))
                  for d in switch_depths]
      state = branches[0](state) if len(branches) == 1 else jax.lax.switch(which, branches, state)
    return bb.head(params, state)

  return run


def ase_forward_masked(model: Any, params: Any, x, t, y, depths_per_sample) -> jax.Array:
  """Training-time forward with per-sample depths (`research/ee_methods.md` §1.4).

  Every unit runs for every sample; sample i keeps `where(l < n_i, run(x), drop(x))` per tail
  unit l, so its output equals the n_i-block network and gradients reach only the units sample
  i uses (U-ViT: all in-blocks and the mid block, the first n_i out-blocks' attention+MLP,
  every `skip_linear`).

  Args:
    model: backbone.
    params: backbone params.
    x: (B, H, W, C) input.
    t: (B,) network times.
    y: labels or None.
    depths_per_sample: (B,) int droppable blocks to run per sample.

  Returns:
    (B, H, W, C_out).
  """
  bb = as_backbone(model)
  limit = bb.tail_start + jnp.asarray(depths_per_sample, jnp.int32)

  def unit(ref, st):
    ran = bb.run_unit(params, ref, st)
    if ref.segment.stop <= bb.tail_start:
      return ran
    return bb_lib.select_state(ref.index < limit, ran, bb.drop(params, ref, st))

  return bb.head(params, bb_lib.for_units(bb, bb.embed(params, x, t, y), unit))
