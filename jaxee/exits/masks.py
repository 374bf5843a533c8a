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

U-ViT units are ordered in-blocks, mid block, out-blocks (L2C's 29 for U-ViT-H). Row 0 is forced
to ones (empty cache). The cache lives in the sampler's carry (the BoundPlan's `init_cache`);
caches refresh only where computed, so staleness can span several steps.

Runner (`research/jax_style.md` §4.3 (c)): one `lax.scan` over the stacked blocks with
`lax.cond(mask[nfe_index, b], compute_and_refresh, reuse)`; the mask row is batch-shared, so the
predicate is a scalar and only the taken branch executes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.exits import mask_tools
from jaxee.exits import ops
from jaxee.exits import plan as plan_lib
from jaxee.exits.mask_tools import (keep_fraction_mask, load_mask_file, prefix_mask,  # noqa: F401
                                    random_mask, rectify, uvit_skip_consumers)

UNITS = ("block", "branch")
CACHE_MODES = ("block_output", "branch")


def num_units(model: Any, unit: str) -> int:
  n = flops_lib.num_blocks(model)
  return n if unit == "block" else 2 * n


@dataclasses.dataclass(frozen=True, eq=False)
class MaskPlan:
  """A (steps × units) compute mask with a cache.

  Attributes:
    mask: (num_nfe, units) binary array, 1 = compute.
    unit: 'block' or 'branch'.
    cache_mode: 'block_output' or 'branch'.
    metadata: free-form dict saved with the plan (arch, sampler, steps, ...).
  """
  mask: np.ndarray
  unit: str = "block"
  cache_mode: str = "block_output"
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.unit not in UNITS or self.cache_mode not in CACHE_MODES:
      raise ValueError(f"unit must be in {UNITS} and cache_mode in {CACHE_MODES}")
    if self.unit == "branch" and self.cache_mode != "branch":
      raise ValueError("unit='branch' needs cache_mode='branch' (a block output is not per branch)")
    m = np.asarray(self.mask)
    if m.ndim != 2 or not m.size:
      raise ValueError(f"mask must be a non-empty (steps × units) array, got shape {m.shape}")
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
      raise ValueError("mask entries must be 0/1 (or bool); threshold scores first")
    object.__setattr__(self, "mask", mask_tools.force_first_row(m))

  def rectified(self, model: Any) -> "MaskPlan":
    """The plan with TABM rectification applied (`mask_tools.rectify`).

    Only for block units with block-output caching, where it leaves the output unchanged (with
    branch caching the residual stream still carries a skipped block's input, so block b's
    output is not dead when block b+1 is skipped).
    """
    if self.unit != "block" or self.cache_mode != "block_output":
      raise ValueError("rectification is defined for unit='block', cache_mode='block_output'")
    consumers = uvit_skip_consumers(model.num_in_blocks) if model.family == "uvit" else None
    return dataclasses.replace(self, mask=rectify(self.mask, consumers))

  def save(self, path: str, **extra) -> None:
    """Writes the plan (`mask_tools.save_mask_plan`) with unit/cache mode in the metadata."""
    meta = dict(self.metadata, unit=self.unit, cache_mode=self.cache_mode,
                steps=int(self.mask.shape[0]), **extra)
    mask_tools.save_mask_plan(path, self.mask, meta)

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Validates shapes and returns the bound cached runner."""
    times = plan_lib.check_nfe_times(nfe_times)
    units = num_units(model, self.unit)
    if self.mask.shape != (len(times), units):
      raise ValueError(f"mask has shape {self.mask.shape}, expected ({len(times)}, {units}) "
                       f"for {len(times)} NFEs and {self.unit} units of this model")
    branch_mask = (np.repeat(self.mask, 2, axis=1) if self.unit == "block" else self.mask)
    branch_mask = branch_mask.reshape(len(times), -1, 2)
    blocks, flops = _tables(model, branch_mask, self.cache_mode)
    net, init_cache = _make_runner(model, params, branch_mask, self.cache_mode, blocks, flops)
    info = plan_lib.make_info(model, blocks, flops, plan=f"mask:{self.unit}:{self.cache_mode}",
                              kept_fraction=float(self.mask.mean()))
    return plan_lib.BoundPlan(net, init_cache, info)


def load_mask_plan(path: str) -> MaskPlan:
  """Reads a plan file written by `MaskPlan.save`."""
  mask, meta = load_mask_file(path)
  unit = meta.pop("unit", "block")
  cache_mode = meta.pop("cache_mode", "block_output")
  return MaskPlan(mask, unit, cache_mode, meta)


def _tables(model: Any, bm: np.ndarray, cache_mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Blocks (mean of attn/MLP units) and FLOPs per NFE; bm is (T, L, 2) bool."""
  fa, fm = flops_lib.attn_flops(model), flops_lib.mlp_flops(model)
  flops = (flops_lib.embed_flops(model) + flops_lib.head_flops(model)
           + bm[..., 0].sum(1) * fa + bm[..., 1].sum(1) * fm)
  block_any = bm.any(axis=2)
  if model.family == "dit":
    per = block_any if cache_mode == "block_output" else np.ones_like(block_any)
    flops = flops + per.sum(1) * flops_lib.modulation_flops(model)
  else:
    out = block_any[:, model.num_in_blocks + 1:]
    per = out if cache_mode == "block_output" else np.ones_like(out)
    flops = flops + per.sum(1) * flops_lib.skip_flops(model)
  return bm.mean(axis=2).sum(axis=1).astype(np.float64), flops


def _make_runner(model: Any, params: Any, bm: np.ndarray, cache_mode: str, blocks, flops):
  """(net, init_cache) for a (T, L, 2) branch mask."""
  b = ops.Blocks(model)
  mask_j = jnp.asarray(bm)
  if model.family == "dit":
    segments = [("dit", params["blocks"], 0)]
  else:
    n = model.num_in_blocks
    segments = [("in", params["in_blocks"], 0), ("mid", ops.stack_one(params["mid_block"]), n),
                ("out", params["out_blocks"], n + 1)]

  def init_cache(x_batch, y=None):
    x_batch = jnp.asarray(x_batch) if not hasattr(x_batch, "shape") else x_batch
    shape = jax.eval_shape(
        lambda x, yy: ops.embed(model, params, x, jnp.zeros((x.shape[0],)), yy)[0],
        jax.ShapeDtypeStruct(x_batch.shape, jnp.float32), y)
    cache = {}
    for name, stack, _ in segments:
      lead = (ops.stack_len(stack),)
      if cache_mode == "block_output":
        cache[name] = jnp.zeros(lead + shape.shape, shape.dtype)
      else:
        cache[name] = jnp.zeros(lead + (2,) + shape.shape, shape.dtype)
    return cache

  # Params are indexed INSIDE the branch that uses them (`ops.take(stack, i)` in the taken
  # branch), so a skipped unit does not even slice its params out of the stack; a scan over the
  # stacked params would dynamic-slice (copy) every block's weights before the cond.
  def block_output_step(kind, stack, i, h, skip, cached, m, ctx):
    def compute(_):
      p = ops.take(stack, i)
      if kind == "dit":
        return b.dit(p, h, ctx)
      if kind == "out":
        return b.uvit_out(p, h, skip)
      return b.uvit_in(p, h)
    return jax.lax.cond(m.any(), compute, lambda _: cached, None)

  def branch_step(kind, stack, i, h, skip, cached, m, ctx):
    p_outer = ops.take(stack, i)  # only the leaves used out here (adaLN, skip_linear) survive DCE
    if kind == "dit":
      mod = b.dit_modulation(p_outer, ctx)
      attn = lambda hh: b.dit_attn(ops.take(stack, i), hh, mod)  # noqa: E731
      mlp = lambda hh: b.dit_mlp(ops.take(stack, i), hh, mod)  # noqa: E731
      g_attn, g_mlp = mod[2][:, None, :], mod[5][:, None, :]
    else:
      is_out = kind == "out"
      if is_out:
        h = b.uvit_merge(p_outer, h, skip)
      attn = lambda hh: b.uvit_attn(ops.take(stack, i), hh, is_out)  # noqa: E731
      mlp = lambda hh: b.uvit_mlp(ops.take(stack, i), hh, is_out)  # noqa: E731
      g_attn = g_mlp = 1.0
    a = jax.lax.cond(m[0], attn, lambda _: cached[0], h)
    h = h + g_attn * a
    f = jax.lax.cond(m[1], mlp, lambda _: cached[1], h)
    h = h + g_mlp * f
    return h, jnp.stack([a, f])

  def run_segment(kind, stack, offset, h, skips, cache, row, ctx):
    num = ops.stack_len(stack)
    rows = jax.lax.dynamic_slice_in_dim(row, offset, num, 0)
    skip_xs = skips[::-1] if kind == "out" else jnp.zeros((num,))

    def body(hh, xs):
      i, cached, m, skip = xs
      if cache_mode == "block_output":
        new = block_output_step(kind, stack, i, hh, skip, cached, m, ctx)
        return new, new
      new, fresh = branch_step(kind, stack, i, hh, skip, cached, m, ctx)
      return new, (fresh, new) if kind == "in" else fresh

    # ys: the new cache; in block-output mode it is also each block's output (the U-ViT skips);
    # in branch mode the in-blocks also emit their outputs.
    h, ys = jax.lax.scan(body, h, (jnp.arange(num), cache, rows, skip_xs))
    if cache_mode == "block_output":
      return h, ys, ys
    return (h, ys[0], ys[1]) if kind == "in" else (h, ys, None)

  def net(x, t_net, y, nfe_index, cache):
    tokens, ctx = ops.embed(model, params, x, t_net, y)
    row = mask_j[nfe_index]
    h, skips, new_cache = tokens, None, {}
    for kind, stack, offset in segments:
      h, new_cache[kind], outs = run_segment(kind, stack, offset, h, skips, cache[kind], row, ctx)
      if kind == "in":
        skips = outs
    out = ops.head(model, params, h, ctx)
    return out, new_cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

  return net, init_cache
