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

Both are the backbone contract's cache semantics (`jaxee/models/backbone.py`): block-output
caching is granularity `'block'` (a reused unit's value replaces the stream, `enter` is free),
branch caching is granularity `'branch'` (the backbone's `enter` computes the gates / the U-ViT
skip fusion every step, `apply` re-gates the value). U-ViT units are ordered in-blocks, mid block,
out-blocks (L2C's 29 for U-ViT-H). Row 0 is forced to ones (empty cache). The cache lives in the
sampler's carry (the BoundPlan's `init_cache`: the contract's per-segment stacked values);
caches refresh only where computed, so staleness can span several steps.

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
CACHE_MODES = ("block_output", "branch")


def num_units(model: Any, unit: str) -> int:
  """Columns of a mask with `unit` ('block' or 'branch') units for this model."""
  if unit not in UNITS:
    raise ValueError(f"unit must be in {UNITS}, got {unit!r}")
  return bb_lib.as_backbone(model, unit).num_units


def granularity(unit: str, cache_mode: str) -> str:
  """The contract granularity a (unit, cache_mode) pair runs at."""
  return "block" if (unit, cache_mode) == ("block", "block_output") else "branch"


@plan_lib.pytree_plan(data=("mask",), static=("unit", "cache_mode"))
class MaskPlan:
  """A (steps × units) compute mask with a cache.

  Attributes:
    mask: (num_nfe, units) binary array, 1 = compute (a traced leaf inside `jaxee.sample`).
    unit: 'block' or 'branch' (static).
    cache_mode: 'block_output' or 'branch' (static).
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
    if self.unit == "branch" and self.cache_mode != "branch":
      raise ValueError("unit='branch' needs cache_mode='branch' (a block output is not per branch)")
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
    """The plan with TABM rectification applied (`mask_tools.rectify`).

    Only for block units with block-output caching, where it leaves the output unchanged (with
    branch caching the residual stream still carries a skipped block's input, so block b's
    output is not dead when block b+1 is skipped). Extra readers of a unit's output (U-ViT long
    skips) come from the backbone (`Backbone.skip_consumers`).
    """
    if self.unit != "block" or self.cache_mode != "block_output":
      raise ValueError("rectification is defined for unit='block', cache_mode='block_output'")
    consumers = bb_lib.as_backbone(model, "block").skip_consumers()
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
    net, init_cache = _make_runner(bb, params, m, blocks, flops)

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
