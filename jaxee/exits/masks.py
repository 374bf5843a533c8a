"""Per-step compute masks with a feature cache: TABM block masking and Learning-to-Cache (L2C).

A plan is a (steps × units) binary table, row = NFE index, 1 = compute (`research/ee_methods.md`
§4.1–4.7, §5.4–5.5). Units and caches:

* `unit='block'`, `cache_mode='block_output'` (TABM, "x = s·f(x) + (1−s)·cache" with s binary): a
  skipped block outputs its cached output from the last step it ran; U-ViT: a skipped in-block also
  supplies that cached output as its long skip.
* `cache_mode='branch'` (L2C `DiTBlock.forward` / `uvit_router.Block._forward`): the cache holds
  each raw branch output *before* the adaLN gate; a reused branch is added to the current residual
  stream with the current step's gate, x ← x + gate(t_now)·cached (U-ViT: no gates;
  `skip_linear` is always computed). `unit='branch'` masks attention and MLP separately, columns
  interleaved as in L2C: 2ℓ = attention of block ℓ, 2ℓ+1 = its MLP; `unit='block'` with
  `cache_mode='branch'` reuses both branches together.
* `cache_mode='unit_output'` (TABM at the paper's MHA/MLP granularity, §3.2: "x = s·f(x) +
  (1−s)·cache" applied per sub-layer): output replacement per unit. A unit's output is the token
  stream after it (DiT attention unit: h + gate·attn(modulate(norm1(h)))); a skipped unit
  replaces the stream with its own cached output from the last step it ran, so the residual is
  not kept. `enter` still runs (DiT: the adaLN modulation, which the block's MLP unit reads; U-ViT
  out-blocks: the skip fusion) and is paid in the FLOP tables. U-ViT: a skipped in-block's MLP
  unit also supplies its cached output as the long skip (the contract's `Backbone.settle`).
  With `unit='block'` it is the same as 'block_output'. Rectification preserves the output
  exactly, as under block-output caching.

All are the backbone contract's cache semantics (`jaxee/models/backbone.py`): block-output
caching is granularity `'block'` (a reused unit's value replaces the stream, `enter` is free),
branch caching is granularity `'branch'` (the backbone's `enter` computes the gates / the U-ViT
skip fusion every step, `apply` re-gates the value), unit-output caching at `'branch'` stores
each unit's output stream and completes the state with `settle`. U-ViT units are ordered
in-blocks, mid block, out-blocks (L2C's 29 for U-ViT-H). Row 0 is forced to ones (empty cache).
The cache lives in the sampler's carry (the BoundPlan's `init_cache`: per-segment stacked values
or, for 'unit_output', output streams); caches refresh only where computed, so staleness can
span several steps.

Runner (`research/jax_style.md` §4.3 (c)): per segment one `lax.fori_loop` over the units with
`lax.cond(mask[nfe_index, unit], compute, reuse)`; the mask row is batch-shared, so the predicate
is a scalar and only the taken branch executes (the contract's `compute` slices the unit's params
out of the stack inside the branch). `MaskPlan` is a pytree whose mask is a traced leaf: a new
mask of the same shape never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import mask_tools
from jaxee.exits import plan as plan_lib
from jaxee.exits.mask_tools import (keep_fraction_mask, load_mask_file, prefix_mask,  # noqa: F401
                                    random_mask, rectify, uvit_skip_consumers)
from jaxee.models import backbone as bb_lib

UNITS = ("block", "branch")
CACHE_MODES = ("block_output", "branch", "unit_output")
OUTPUT_MODES = ("block_output", "unit_output")  # output replacement: rectification is exact


def num_units(model: Any, unit: str) -> int:
  """Columns of a mask with `unit` ('block' or 'branch') units for this model."""
  if unit not in UNITS:
    raise ValueError(f"unit must be in {UNITS}, got {unit!r}")
  return bb_lib.as_backbone(model, unit).num_units


def granularity(unit: str, cache_mode: str) -> str:
  """The contract granularity a (unit, cache_mode) pair runs at."""
  return "block" if unit == "block" and cache_mode in OUTPUT_MODES else "branch"


def output_replacement(cache_mode: str) -> bool:
  """True when a skipped unit replaces the stream with its cached output (rectifiable)."""
  return cache_mode in OUTPUT_MODES


def cache_mode_for(unit: str) -> str:
  """The plain mask's cache for `unit`: block outputs for blocks, L2C's branch cache for
  branches (the generated masks' and the search's default; TABM's is `default_cache_mode`)."""
  return "branch" if unit == "branch" else "block_output"


def default_cache_mode(unit: str) -> str:
  """TABM's output replacement at either unit granularity ('block_output' / 'unit_output')."""
  return "block_output" if unit == "block" else "unit_output"


@plan_lib.pytree_plan(data=("mask",), static=("unit", "cache_mode"))
class MaskPlan:
  """A (steps × units) compute mask with a cache.

  Attributes:
    mask: (num_nfe, units) binary array, 1 = compute (a traced leaf inside `jaxee.sample`).
    unit: 'block' or 'branch' (static).
    cache_mode: 'block_output', 'branch' (L2C) or 'unit_output' (TABM per unit) (static).
    metadata: free-form dict saved with the plan (arch, sampler, steps, ...); not part of the
      pytree, so it never causes a recompile (dropped when the plan is flattened).
  """
  mask: Any
  unit: str = "block"
  cache_mode: str = "block_output"
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.unit not in UNITS or self.cache_mode not in CACHE_MODES:
      raise ValueError(f"unit must be in {UNITS} and cache_mode in {CACHE_MODES}")
    if self.unit == "branch" and self.cache_mode == "block_output":
      raise ValueError("unit='branch' needs cache_mode='unit_output' or 'branch' (a block output "
                       "is not per branch)")
    if plan_lib.is_traced(self.mask):
      return  # validated by `check` on the host; `bind` forces row 0
    m = np.asarray(self.mask)
    if m.ndim != 2 or not m.size:
      raise ValueError(f"mask must be a non-empty (steps × units) array, got shape {m.shape}")
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
      raise ValueError("mask entries must be 0/1 (or bool); threshold scores first")
    object.__setattr__(self, "mask", mask_tools.force_first_row(m))

  @property
  def granularity(self) -> str:
    return granularity(self.unit, self.cache_mode)

  @property
  def _replaces_units(self) -> bool:
    """Output replacement of sub-block units (at 'block' the value runner is the same thing)."""
    return self.cache_mode == "unit_output" and self.granularity == "branch"

  def _check_shape(self, model: Any, num_nfe: int) -> None:
    units = num_units(model, self.unit)
    shape = tuple(jnp.shape(self.mask))
    if shape != (num_nfe, units):
      raise ValueError(f"mask has shape {shape}, expected ({num_nfe}, {units}) "
                       f"for {num_nfe} NFEs and {self.unit} units of this model")

  def check(self, model: Any, nfe_times) -> None:
    """Host validation before tracing: the shape is NFEs × units and the entries are 0/1."""
    times = plan_lib.check_nfe_times(nfe_times)
    self._check_shape(model, len(times))
    m = np.asarray(self.mask)
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
      raise ValueError("mask entries must be 0/1 (or bool); threshold scores first")

  def rectified(self, model: Any) -> "MaskPlan":
    """The plan with TABM rectification applied (`mask_tools.rectify`, paper Eq. 12).

    Only for output replacement ('block_output', 'unit_output'), where it leaves the output
    unchanged: unit b's output at a step is read only by unit b+1, by its own cache (refreshed
    before it is read again when the next step computes b) and by skip consumers. With L2C's
    branch caching the residual stream still carries a skipped unit's input, so unit b's output
    is not dead when unit b+1 is skipped. Extra readers (U-ViT long skips; at 'branch' an
    in-block's MLP unit → the out-block's attention unit) come from `Backbone.skip_consumers`.
    """
    if not output_replacement(self.cache_mode):
      raise ValueError("rectification is defined for output replacement (cache_mode "
                       f"{OUTPUT_MODES}), not cache_mode={self.cache_mode!r}")
    consumers = bb_lib.as_backbone(model, self.granularity).skip_consumers()
    return dataclasses.replace(self, mask=rectify(np.asarray(self.mask), consumers))

  def save(self, path: str, **extra) -> None:
    """Writes the plan (`mask_tools.save_mask_plan`) with unit/cache mode in the metadata."""
    mask = np.asarray(self.mask)
    meta = dict(self.metadata, unit=self.unit, cache_mode=self.cache_mode,
                steps=int(mask.shape[0]), **extra)
    mask_tools.save_mask_plan(path, mask, meta)

  def unit_mask(self, xp=jnp):
    """The (T, U) bool table at the contract granularity (block entries repeated per branch).

    `xp=np` for a host table (concrete masks only); row 0 is forced to ones either way.
    """
    m = xp.asarray(self.mask).astype(bool)
    m = m.at[0].set(True) if xp is jnp else mask_tools.force_first_row(m)
    if self.unit == "block" and self.granularity == "branch":
      m = xp.repeat(m, 2, axis=1)
    return m

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Validates the shape and returns the bound cached runner (works with a traced mask)."""
    times = plan_lib.check_nfe_times(nfe_times)
    self._check_shape(model, len(times))
    bb = bb_lib.as_backbone(model, self.granularity)
    m = self.unit_mask()
    blocks, flops = tables(bb, m)
    make = _make_output_runner if self._replaces_units else _make_runner
    net, init_cache = make(bb, params, m, blocks, flops)

    def info():
      hb, hf = tables(bb, self.unit_mask(np))
      return plan_lib.make_info(model, hb, hf, plan=f"mask:{self.unit}:{self.cache_mode}",
                                kept_fraction=float(np.mean(np.asarray(self.mask))))
    return plan_lib.BoundPlan(net, init_cache, plan_lib.host_info(self, info))


def load_mask_plan(path: str) -> MaskPlan:
  """Reads a plan file written by `MaskPlan.save`."""
  mask, meta = load_mask_file(path)
  unit = meta.pop("unit", "block")
  cache_mode = meta.pop("cache_mode", "block_output")
  return MaskPlan(mask, unit, cache_mode, meta)


def tables(bb: bb_lib.Backbone, m):
  """(blocks, FLOPs) per NFE for a (T, U) bool unit mask at `bb`'s granularity.

  FLOPs = embed + head + Σ_u (m_u ? unit_flops_u : enter_flops_u): a reused unit still pays its
  `enter` (DiT adaLN modulation / U-ViT skip fusion at branch granularity; nothing at block
  granularity). Blocks = Σ m over a block's units / units per block (the mean over the two
  branches of a block, summed over blocks). NumPy float64 for a host mask, else jnp.
  """
  xp = np if isinstance(m, np.ndarray) else jnp
  per_block = bb.num_units // bb.num_blocks
  unit_f, enter_f = xp.asarray(bb.unit_flops), xp.asarray(bb.enter_flops)
  flops = (bb.embed_flops + bb.head_flops + xp.sum(enter_f)
           + xp.sum(xp.where(m, unit_f - enter_f, 0.0), axis=1))
  blocks = xp.sum(m, axis=1) / per_block
  if xp is np:
    return blocks.astype(np.float64), flops.astype(np.float64)
  return blocks.astype(jnp.float32), flops.astype(jnp.float32)


def _make_runner(bb: bb_lib.Backbone, params: Any, m, blocks, flops):
  """(net, init_cache) for a (T, U) bool unit mask (host or traced)."""
  mask_j = jnp.asarray(m)

  def init_cache(x_batch, y=None):
    return bb_lib.zeros_cache(bb, params, jnp.shape(x_batch), y)

  def net(x, t_net, y, nfe_index, cache):
    row = mask_j[nfe_index]
    state = bb.embed(params, x, t_net, y)
    cache = tuple(cache)

    def unit(ref, carry):
      state, cache = carry
      state = bb.enter(params, ref, state)
      # Scalar predicate: only the taken branch runs; `compute` takes the unit's params inside.
      value = jax.lax.cond(row[ref.index], lambda st: bb.compute(params, ref, st),
                           lambda st: bb_lib.cache_get(bb, cache, ref), state)
      cache = bb_lib.cache_set(bb, cache, ref, value)
      return bb.apply(params, ref, state, value), cache

    state, cache = bb_lib.for_units(bb, (state, cache), unit)
    out = bb.head(params, state)
    return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

  return net, init_cache


# ------------------------------------------------------------------------------------------------
# Output replacement per unit (cache_mode='unit_output').


def output_shapes(bb: bb_lib.Backbone, params, x_shape, y=None):
  """Per-segment (segment.size, *stream shape) of the unit outputs (`state['h']` after a unit)."""
  def f(x, yy):
    st = bb.embed(params, x, jnp.zeros((x.shape[0],), jnp.float32), yy)
    outs = []
    for ref in bb.refs():
      st = bb.run_unit(params, ref, st)
      outs.append(st["h"])
    return outs
  y_spec = None if y is None else jax.ShapeDtypeStruct(jnp.shape(y), jnp.int32)
  outs = jax.eval_shape(f, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32), y_spec)
  shapes = []
  for seg in bb.segments:
    seg_outs = outs[seg.start:seg.stop]
    if len({(o.shape, o.dtype) for o in seg_outs}) != 1:
      raise ValueError(f"segment {seg.name!r}: unit outputs differ in shape "
                       f"{[o.shape for o in seg_outs]}; unit-output caching needs one shape")
    shapes.append(jax.ShapeDtypeStruct((seg.size,) + seg_outs[0].shape, seg_outs[0].dtype))
  return tuple(shapes)


def zeros_output_cache(bb: bb_lib.Backbone, params, x_shape, y=None):
  """A zero unit-output cache: one (segment.size, ...) array per segment."""
  return tuple(jnp.zeros(s.shape, s.dtype) for s in output_shapes(bb, params, x_shape, y))


def computed_output(bb: bb_lib.Backbone, params, ref, state):
  """Unit `ref`'s output stream, computed (`state` is the state after `enter`)."""
  return bb.apply(params, ref, state, bb.compute(params, ref, state))["h"]


def _make_output_runner(bb: bb_lib.Backbone, params: Any, m, blocks, flops):
  """(net, init_cache) with per-unit output replacement for a (T, U) bool unit mask.

  Per unit: `enter` (always), then `lax.cond(mask[nfe, u], compute+apply → output stream, cached
  output)` on a scalar predicate, the cache slot set to that output, `settle` to the next state.
  """
  mask_j = jnp.asarray(m)

  def init_cache(x_batch, y=None):
    return zeros_output_cache(bb, params, jnp.shape(x_batch), y)

  def net(x, t_net, y, nfe_index, cache):
    row = mask_j[nfe_index]
    state = bb.embed(params, x, t_net, y)

    def unit(ref, carry):
      state, cache = carry
      state = bb.enter(params, ref, state)
      out = jax.lax.cond(row[ref.index], lambda st: computed_output(bb, params, ref, st),
                         lambda st: bb_lib.cache_get(bb, cache, ref), state)
      cache = bb_lib.cache_set(bb, cache, ref, out)
      return bb.settle(params, ref, state, out), cache

    state, cache = bb_lib.for_units(bb, (state, tuple(cache)), unit)
    out = bb.head(params, state)
    return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

  return net, init_cache
