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
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.exits import ops
from jaxee.exits import plan as plan_lib

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
# Depth the tables refer to: DiT-XL/2 blocks; U-ViT out-blocks.
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
  """Largest schedule entry the model supports (DiT blocks; U-ViT out-blocks)."""
  return model.depth if model.family == "dit" else model.num_in_blocks


@dataclasses.dataclass(frozen=True)
class ASEPlan:
  """A 10-interval dropping schedule.

  Attributes:
    schedule: blocks run per interval [0, 0.1) → [0.9, 1.0] (U-ViT: out-blocks whose attention
      and MLP run).
    name: table name or 'custom'.
    family: 'dit' / 'uvit' when the schedule is family-specific (checked at bind time).
    time_schedule: time convention for τ (default: the model's `default_schedule`).
    speedup: the paper's reported speed-up (metadata).
    runner: 'loop' (default; one `fori_loop` with the depth as trip count) or 'switch'
      (`lax.switch` over one fixed-length loop per distinct depth).
  """
  schedule: tuple[int, ...]
  name: str = "custom"
  family: Optional[str] = None
  time_schedule: Optional[str] = None
  speedup: Optional[float] = None
  runner: str = "loop"

  def __post_init__(self):
    sched = tuple(int(n) for n in self.schedule)
    object.__setattr__(self, "schedule", sched)
    if len(sched) != NUM_INTERVALS:
      raise ValueError(f"an ASE schedule has {NUM_INTERVALS} entries, got {len(sched)}")
    if min(sched) < 0:
      raise ValueError(f"negative block count in schedule {sched}")
    if self.runner not in RUNNERS:
      raise ValueError(f"unknown ASE runner {self.runner!r}; choose from {RUNNERS}")

  def scaled(self, to_depth: int, from_depth: Optional[int] = None) -> "ASEPlan":
    """The plan rescaled to `to_depth` (see `scale_schedule`)."""
    from_depth = from_depth or REFERENCE_DEPTH.get(self.family or "dit")
    return dataclasses.replace(self, schedule=scale_schedule(self.schedule, from_depth, to_depth),
                               name=f"{self.name}@{to_depth}")

  def validate(self, model: Any) -> None:
    if self.family is not None and self.family != model.family:
      raise ValueError(f"ASE schedule {self.name} is for {self.family}, model is {model.family}")
    cap = capacity(model)
    if max(self.schedule) > cap:
      what = "blocks" if model.family == "dit" else "out-blocks"
      raise ValueError(f"ASE schedule {self.name} {self.schedule} runs up to "
                       f"{max(self.schedule)} {what} but the model has {cap}; rescale it with "
                       f"plan.scaled({cap}) or ase_plan(name, depth={cap})")

  def depths(self, model: Any, nfe_times) -> np.ndarray:
    """Blocks run (U-ViT: out-blocks) at each NFE, on the host."""
    times = plan_lib.check_nfe_times(nfe_times)
    tau = plan_lib.model_time_to_unit(times.astype(np.float64),
                                      plan_lib.time_schedule(model, self.time_schedule))
    return np.asarray(self.schedule, np.int32)[interval_index(tau)]

  def depth_for_time(self, model: Any, t_net) -> jax.Array:
    """Traced per-sample depth for network times `t_net` (for `ase_forward_masked`)."""
    tau = plan_lib.model_time_to_unit(jnp.asarray(t_net, jnp.float32),
                                      plan_lib.time_schedule(model, self.time_schedule))
    idx = jnp.clip(jnp.floor(NUM_INTERVALS * tau + 1e-6), 0, NUM_INTERVALS - 1).astype(jnp.int32)
    return jnp.asarray(self.schedule, jnp.int32)[idx]

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Compiles the schedule for `nfe_times` and returns the bound runner."""
    self.validate(model)
    depths = self.depths(model, nfe_times)
    blocks, flops = _tables(model, depths)
    distinct = sorted(set(int(d) for d in depths))
    which = np.asarray([distinct.index(int(d)) for d in depths], np.int32)
    run = _make_runner(model, params, distinct, which, self.runner)

    def net(x, t_net, y, nfe_index, cache):
      out = run(x, t_net, y, nfe_index)
      return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

    info = plan_lib.make_info(model, blocks, flops, plan=f"ase:{self.name}", depths=depths,
                              distinct_depths=distinct, paper_speedup=self.speedup)
    return plan_lib.BoundPlan(net, plan_lib.no_cache, info)


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
  family = "dit" if key.endswith("-DiT") else "uvit"
  plan = ASEPlan(ASE_TABLES[key], name=key, family=family, speedup=ASE_SPEEDUPS[key], **kwargs)
  if depth is not None and depth != REFERENCE_DEPTH[family]:
    plan = plan.scaled(depth)
  return plan


def _tables(model: Any, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Blocks and FLOPs executed per NFE."""
  base = flops_lib.embed_flops(model) + flops_lib.head_flops(model)
  if model.family == "dit":
    return depths.astype(np.float64), base + depths * flops_lib.block_flops(model)
  n_in = model.num_in_blocks
  fixed = (n_in + 1) * flops_lib.block_flops(model)
  flops = (base + fixed + depths * flops_lib.block_flops(model, "out_block")
           + (n_in - depths) * flops_lib.block_flops(model, "skip"))
  return (n_in + 1 + depths).astype(np.float64), flops


def _make_runner(model: Any, params: Any, distinct: list[int], which: np.ndarray, runner: str):
  """`run(x, t_net, y, nfe_index) -> out` choosing the depth from the host table.

  Both runners index the stacked params dynamically (`ops.take` inside the loop, a dynamic-slice
  per block, as the full forward's `lax.scan` does), so no branch copies a slice of the params.
  """
  b = ops.Blocks(model)
  which_j = jnp.asarray(which)
  depth_j = jnp.asarray(np.asarray(distinct, np.int32)[which])

  if model.family == "dit":
    stack = params["blocks"]

    def blocks_range(start, stop, h, c):
      # Static bounds lower to a scan, a traced bound to a while loop with that trip count.
      return jax.lax.fori_loop(start, stop, lambda i, hh: b.dit(ops.take(stack, i), hh, c), h)

    def prefix(n):
      return lambda h, c: blocks_range(0, n, h, c)

    def loop(h, c, n):
      return blocks_range(0, n, h, c)
  else:
    stack = params["out_blocks"]
    n_out = model.num_in_blocks

    def full_range(start, stop, h, skips):
      def body(i, hh):
        return b.uvit_out(ops.take(stack, i), hh, skips[i])
      return jax.lax.fori_loop(start, stop, body, h)

    def merge_range(start, stop, h, skips):
      def body(i, hh):
        return b.uvit_merge(ops.take(stack, i), hh, skips[i])
      return jax.lax.fori_loop(start, stop, body, h)

    def prefix(n):
      return lambda h, skips: merge_range(n, n_out, full_range(0, n, h, skips), skips)

    def loop(h, skips, n):
      return merge_range(n, n_out, full_range(0, n, h, skips), skips)

  def run(x, t_net, y, nfe_index):
    tokens, ctx = ops.embed(model, params, x, t_net, y)
    if model.family == "uvit":
      tokens, skips = b.scan_uvit_in(params["in_blocks"], tokens)
      tokens = b.uvit_in(params["mid_block"], tokens)
      ctx_run = skips[::-1]  # out-block i consumes the output of in-block n−1−i (LIFO)
    else:
      ctx_run = ctx
    if runner == "loop":
      tokens = loop(tokens, ctx_run, depth_j[nfe_index])
    elif len(distinct) == 1:
      tokens = prefix(distinct[0])(tokens, ctx_run)
    else:
      tokens = jax.lax.switch(which_j[nfe_index], [prefix(n) for n in distinct], tokens, ctx_run)
    return ops.head(model, params, tokens, ctx)

  return run


def ase_forward_masked(model: Any, params: Any, x, t, y, depths_per_sample) -> jax.Array:
  """Training-time forward with per-sample depths (`research/ee_methods.md` §1.4).

  Every block runs for every sample; sample i keeps `where(l < n_i, block(x), x)`, so its output
  equals the n_i-block network and gradients reach only its first n_i blocks (U-ViT: all
  in-blocks and the mid block, the first n_i out-blocks' attention+MLP, every `skip_linear`).

  Args:
    model: backbone.
    params: backbone params.
    x: (B, H, W, C) input.
    t: (B,) network times.
    y: labels or None.
    depths_per_sample: (B,) int blocks (U-ViT: out-blocks) to run per sample.

  Returns:
    (B, H, W, C_out).
  """
  b = ops.Blocks(model)
  n = jnp.asarray(depths_per_sample, jnp.int32)
  tokens, ctx = ops.embed(model, params, x, t, y)

  def keep(l, new, old):
    return jnp.where((l < n)[:, None, None], new, old)

  if model.family == "dit":
    def body(h, lp):
      l, p = lp
      return keep(l, b.dit(p, h, ctx), h), None
    stack = params["blocks"]
    tokens = jax.lax.scan(body, tokens, (jnp.arange(ops.stack_len(stack)), stack))[0]
  else:
    tokens, skips = b.scan_uvit_in(params["in_blocks"], tokens)
    tokens = b.uvit_in(params["mid_block"], tokens)

    def body(h, lps):
      l, p, skip = lps
      merged = b.uvit_merge(p, h, skip)
      return keep(l, b.uvit_body(p, merged, True), merged), None
    stack = params["out_blocks"]
    tokens = jax.lax.scan(body, tokens, (jnp.arange(ops.stack_len(stack)), stack,
                                         skips[::-1]))[0]
  return ops.head(model, params, tokens, ctx)
