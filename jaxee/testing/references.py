"""Compute-everything reference forwards: what the really-skipping runners must equal.

Two kinds, so that a runner is checked against code that shares nothing with it:

* family-specific references for DiT and U-ViT (`reference_prefix`, `reference_masked`),
  written block by block over the modules' own methods (`family_ops`), independent of the backbone
  contract the runners use;
* `ReferencePlan(plan)`: binds the same per-NFE tables as `plan` but computes EVERY block at
  every NFE and then selects (ASE, DuoDiff) or masks (block masks) with `jnp.where` — using the
  family-specific references for DiT/U-ViT and the contract-level ones (`contract_prefix`,
  `contract_masked`) for any other backbone (e.g. the toy backbone of the tests).
"""
from __future__ import annotations

import dataclasses

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import ase as ase_lib
from jaxee.exits import duodiff as duodiff_lib
from jaxee.exits import masks as masks_lib
from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib
from jaxee.testing import family_ops as ops


def reference_prefix(model: Any, params: Any, x, t, y, n):
  """Every block computed, then the state after n blocks selected (ASE reference).

  DiT: the head reads the state after the first n blocks. U-ViT: in-blocks and mid always run;
  every out-block is computed in full and out-block l keeps its full output if l < n, otherwise
  only its skip fusion. `n` may be traced.
  """
  b = ops.Blocks(model)
  tokens, ctx = ops.embed(model, params, x, t, y)
  n = jnp.asarray(n, jnp.int32)
  if model.family == "dit":
    states = [tokens]
    for l in range(model.depth):
      states.append(b.dit(ops.take(params["blocks"], l), states[-1], ctx))
    return ops.head(model, params, jnp.stack(states)[n], ctx)
  skips = []
  h = tokens
  for l in range(model.num_in_blocks):
    h = b.uvit_in(ops.take(params["in_blocks"], l), h)
    skips.append(h)
  h = b.uvit_in(params["mid_block"], h)
  for l in range(model.num_in_blocks):
    p = ops.take(params["out_blocks"], l)
    merged = b.uvit_merge(p, h, skips.pop())
    full = b.uvit_body(p, merged, True)
    h = jnp.where(l < n, full, merged)
  return ops.head(model, params, h, ctx)


def _unit_params(model: Any, params: Any) -> list[tuple[str, Any]]:
  if model.family == "dit":
    return [("dit", ops.take(params["blocks"], i)) for i in range(model.depth)]
  n = model.num_in_blocks
  return ([("in", ops.take(params["in_blocks"], i)) for i in range(n)]
          + [("mid", params["mid_block"])]
          + [("out", ops.take(params["out_blocks"], i)) for i in range(n)])


def reference_masked(model: Any, params: Any, x, t, y, row, cache: list, cache_mode: str):
  """One NFE of a masked plan, computed block by block with `where` (every block runs).

  Args:
    model, params: backbone.
    x, t, y: network inputs.
    row: (L, 2) bool (may be traced), compute flags for (attention, MLP) per block in unit
      order (U-ViT: in, mid, out).
    cache: list of per-block cached values (block output (B, N, D), or stacked [attn, mlp]
      branch outputs (2, B, N, D)).
    cache_mode: 'block_output' or 'branch'.

  Returns:
    (out, new cache list).
  """
  b = ops.Blocks(model)
  tokens, ctx = ops.embed(model, params, x, t, y)
  new_cache = []
  h, skips = tokens, []
  for l, (kind, p) in enumerate(_unit_params(model, params)):
    ma, mm = row[l, 0], row[l, 1]
    if cache_mode == "block_output":
      if kind == "dit":
        full = b.dit(p, h, ctx)
      elif kind == "out":
        full = b.uvit_out(p, h, skips.pop())
      else:
        full = b.uvit_in(p, h)
      h = jnp.where(ma | mm, full, cache[l])
      new_cache.append(h)
    else:
      if kind == "dit":
        mod = b.dit_modulation(p, ctx)
        a = jnp.where(ma, b.dit_attn(p, h, mod), cache[l][0])
        h = h + mod[2][:, None] * a
        f = jnp.where(mm, b.dit_mlp(p, h, mod), cache[l][1])
        h = h + mod[5][:, None] * f
      else:
        if kind == "out":
          h = b.uvit_merge(p, h, skips.pop())
        a = jnp.where(ma, b.uvit_attn(p, h, kind == "out"), cache[l][0])
        h = h + a
        f = jnp.where(mm, b.uvit_mlp(p, h, kind == "out"), cache[l][1])
        h = h + f
      new_cache.append(jnp.stack([a, f]))
    if kind == "in":
      skips.append(h)
  return ops.head(model, params, h, ctx), new_cache


def block_mask_rows(plan: masks_lib.MaskPlan, num_nfe: int) -> np.ndarray:
  """A mask plan's (T, L, 2) per-branch compute table."""
  m = jnp.asarray(plan.mask)
  bm = jnp.repeat(m, 2, axis=1) if plan.unit == "block" else m
  return bm.reshape(num_nfe, -1, 2).astype(bool)


def contract_prefix(model: Any, params: Any, x, t, y, n):
  """ASE reference on any backbone: every unit runs; tail unit l keeps run(x) if l < n else
  drop(x) (`jnp.where`, unrolled in Python: no runner code is shared)."""
  bb = bb_lib.as_backbone(model)
  limit = bb.tail_start + jnp.asarray(n, jnp.int32)
  state = bb.embed(params, x, t, y)
  for ref in bb.refs():
    ran = bb.run_unit(params, ref, state)
    if ref.index >= bb.tail_start:
      ran = jax.tree.map(lambda a, b: jnp.where(ref.index < limit, a, b), ran,
                         bb.drop(params, ref, state))
    state = ran
  return bb.head(params, state)


def mask_granularity(plan) -> str:
  return "block" if plan.cache_mode == "block_output" else "branch"


def contract_masked(model: Any, params: Any, x, t, y, row, cache: list, granularity: str):
  """One NFE of a masked plan on any backbone: value = where(m, compute, cached) per unit."""
  bb = bb_lib.as_backbone(model, granularity)
  state = bb.embed(params, x, t, y)
  new_cache = []
  for ref in bb.refs():
    state = bb.enter(params, ref, state)
    value = jnp.where(row[ref.index], bb.compute(params, ref, state), cache[ref.index])
    state = bb.apply(params, ref, state, value)
    new_cache.append(value)
  return bb.head(params, state), new_cache


def contract_depth_masked(model: Any, params: Any, x, t, y, limit, row, cache: list,
                          granularity: str):
  """One NFE of a depth + cache composition, every unit computed, selected with `where`."""
  bb = bb_lib.as_backbone(model, granularity)
  state = bb.embed(params, x, t, y)
  new_cache = []
  for ref in bb.refs():
    alive = ref.index < limit
    entered = bb.enter(params, ref, state)
    value = jnp.where(row[ref.index], bb.compute(params, ref, entered), cache[ref.index])
    kept = bb.apply(params, ref, entered, value)
    state = jax.tree.map(lambda a, b: jnp.where(alive, a, b), kept, bb.drop(params, ref, state))
    new_cache.append(jnp.where(alive, value, cache[ref.index]))
  return bb.head(params, state), new_cache


def _composed_reference(plan, model, params, nfe_times, bound):
  """Reference of a `ComposedPlan`: shallow/deep with `where`, then depth/cache with `where`."""
  from jaxee.exits import composition as compose_lib  # pylint: disable=g-import-not-at-top
  times = np.asarray(nfe_times, np.float32)
  if plan.phase is not None:
    deep_p, shallow_p = plan.phase.resolve_params(params)
    flags = jnp.asarray(plan.phase.shallow_flags(model, times))
  else:
    deep_p, shallow_p, flags = params, None, jnp.zeros(len(times), bool)
  first_deep = jnp.argmin(flags)
  gran = "block"
  if plan.cache is not None:
    gran = plan.cache.granularity
    m = jnp.asarray(plan.cache.unit_mask(jnp))
    if plan.phase is not None:
      m = m.at[first_deep].set(True)
  bb = bb_lib.as_backbone(model, gran)
  per = bb.num_units // bb.num_blocks
  if plan.depth is not None:
    limit = bb.tail_start + jnp.asarray(plan.depth.depths(model, times)) * per
  else:
    limit = jnp.full(len(times), bb.num_units)
  if plan.cache is None:
    m = jnp.ones((len(times), bb.num_units), bool)
  del compose_lib

  def init_cache(x_batch, y=None):
    shapes = bb_lib.value_shapes(bb, deep_p, x_batch.shape, y)
    return [jnp.zeros(s.shape[1:], s.dtype) for s in shapes for _ in range(s.shape[0])]

  def net(x, t_net, y, nfe_index, cache):
    out, new_cache = contract_depth_masked(model, deep_p, x, t_net, y, limit[nfe_index],
                                           m[nfe_index], cache, gran)
    if plan.phase is not None:
      out_s = plan.phase.shallow_model.apply({"params": shallow_p}, x, t_net, y)
      use_s = flags[nfe_index]
      out = jnp.where(use_s, out_s, out)
      new_cache = [jnp.where(use_s, c_old, c_new) for c_old, c_new in zip(cache, new_cache)]
    stats = bound.net(x, t_net, y, nfe_index, bound.init_cache(x, y))[2]
    return out, new_cache, stats
  return plan_lib.BoundPlan(net, init_cache, bound.info)


def _deediff_cached_reference(plan, model, params, nfe_times, bound):
  """DeeDiff (min_fraction 1) + block-output cache, every unit and every exit computed.

  Per sample the first exit k with u_k ≤ θ (else the backbone head); the batch's runner stops
  after K = max_b k_b units, so only units < K refresh their cache entry.
  """
  from jaxee.exits import deediff as dd  # pylint: disable=g-import-not-at-top
  from jaxee.exits import deediff_heads as heads_lib  # pylint: disable=g-import-not-at-top
  exit_plan = plan.exit
  bb = bb_lib.as_backbone(model, "block")
  m = jnp.asarray(plan.cache.unit_mask(jnp))
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, exit_plan.uem)
  hp, up = exit_plan.ee_params["heads"], exit_plan.ee_params["uems"]

  def init_cache(x_batch, y=None):
    shapes = bb_lib.value_shapes(bb, params, x_batch.shape, y)
    return [jnp.zeros(s.shape[1:], s.dtype) for s in shapes for _ in range(s.shape[0])]

  def net(x, t_net, y, nfe_index, cache):
    row = m[nfe_index]
    state = bb.embed(params, x, t_net, y)
    t_emb = heads_lib.time_features(model, t_net)
    outs, us, values = [], [], []
    for ref in bb.refs():
      i = ref.index
      outs.append(head.apply({"params": bb_lib.take(hp, i)}, state["h"], bb.exit_context(state)))
      us.append(probe.apply({"params": bb_lib.take(up, i)}, state["h"], t_emb))
      value = jnp.where(row[i], bb.compute(params, ref, state), cache[i])
      state = bb.apply(params, ref, state, value)
      values.append(value)
    final = bb.head(params, state)
    k = dd.first_exit(jnp.stack(us), jnp.asarray(exit_plan.threshold, jnp.float32))
    out = dd.select_exit(final, jnp.stack(outs), k)
    ran = jnp.max(k)
    new_cache = [jnp.where(i < ran, v, c) for i, (v, c) in enumerate(zip(values, cache))]
    real = bound.net(x, t_net, y, nfe_index, bound.init_cache(x, y))[2]
    return out, new_cache, real
  return plan_lib.BoundPlan(net, init_cache, None)


def _independent(model: Any) -> bool:
  """DiT and U-ViT have family-specific references that share no code with the contract."""
  return model.family in ("dit", "uvit")


@plan_lib.pytree_plan(data=("plan",))
class ReferencePlan:
  """The compute-everything-then-select reference of an ASE, DuoDiff or mask plan.

  A pytree wrapping the plan (so it goes through `jaxee.sample` like any plan). Its stats are the
  wrapped runner's (tables only: the runner's outputs are unused and dead-code eliminated).
  """
  plan: Any

  def __post_init__(self):
    from jaxee.exits import composition as compose_lib  # pylint: disable=g-import-not-at-top
    if not isinstance(self.plan, (ase_lib.ASEPlan, duodiff_lib.DuoDiffPlan, masks_lib.MaskPlan,
                                  compose_lib.ComposedPlan)):
      raise TypeError(f"no reference for {type(self.plan).__name__}")

  def check(self, model: Any, nfe_times) -> None:
    self.plan.check(model, nfe_times)

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    plan = self.plan
    if isinstance(plan, masks_lib.MaskPlan) and plan.cache_mode == "unit_output":
      if plan.unit != "block":
        raise TypeError("no shared reference for unit_output branch masks "
                        "(tests/test_masks_branch.py has its own)")
      plan = dataclasses.replace(plan, cache_mode="block_output")  # the same at block units
    bound = plan.bind(model, params, nfe_times)  # same tables, same validation
    from jaxee.exits import composition as compose_lib  # pylint: disable=g-import-not-at-top
    if isinstance(plan, compose_lib.ComposedPlan):
      if plan.exit is not None:
        return _deediff_cached_reference(plan, model, params, nfe_times, bound)
      return _composed_reference(plan, model, params, nfe_times, bound)

    def stats(x, t_net, y, nfe_index, cache_like):
      return bound.net(x, t_net, y, nfe_index, cache_like)[2]

    if isinstance(plan, ase_lib.ASEPlan):
      depths = jnp.asarray(plan.depths(model, nfe_times))

      ref_fn = reference_prefix if _independent(model) else contract_prefix

      def net(x, t_net, y, nfe_index, cache):
        out = ref_fn(model, params, x, t_net, y, depths[nfe_index])
        return out, cache, stats(x, t_net, y, nfe_index, cache)
      return plan_lib.BoundPlan(net, plan_lib.no_cache, bound.info)

    if isinstance(plan, duodiff_lib.DuoDiffPlan):
      deep_p, shallow_p = plan.resolve_params(params)
      flags = jnp.asarray(plan.shallow_flags(model, nfe_times))

      def net(x, t_net, y, nfe_index, cache):
        out_s = plan.shallow_model.apply({"params": shallow_p}, x, t_net, y)
        out_d = model.apply({"params": deep_p}, x, t_net, y)
        return jnp.where(flags[nfe_index], out_s, out_d), cache, stats(x, t_net, y, nfe_index,
                                                                        cache)
      return plan_lib.BoundPlan(net, plan_lib.no_cache, bound.info)

    rows = jnp.asarray(block_mask_rows(plan, len(nfe_times)))
    num_units = rows.shape[1]
    if not _independent(model):
      gran = mask_granularity(plan)
      flat = rows[..., 0] if gran == "block" else rows.reshape(rows.shape[0], -1)

      def init_cache_c(x_batch, y=None):
        shapes = bb_lib.value_shapes(bb_lib.as_backbone(model, gran), params, x_batch.shape, y)
        return [jnp.zeros(s.shape[1:], s.dtype) for s in shapes for _ in range(s.shape[0])]

      def net_c(x, t_net, y, nfe_index, cache):
        out, new_cache = contract_masked(model, params, x, t_net, y, flat[nfe_index], cache,
                                         gran)
        return out, new_cache, bound.net(x, t_net, y, nfe_index, bound.init_cache(x, y))[2]
      return plan_lib.BoundPlan(net_c, init_cache_c, bound.info)

    def init_cache(x_batch, y=None):
      shape = jax.eval_shape(
          lambda xx, yy: ops.embed(model, params, xx, jnp.zeros((xx.shape[0],)), yy)[0],
          jax.ShapeDtypeStruct(x_batch.shape, jnp.float32), y)
      lead = () if plan.cache_mode == "block_output" else (2,)
      return [jnp.zeros(lead + shape.shape, shape.dtype) for _ in range(num_units)]

    def net(x, t_net, y, nfe_index, cache):
      out, new_cache = reference_masked(model, params, x, t_net, y, rows[nfe_index], cache,
                                        plan.cache_mode)
      real_cache = bound.init_cache(x, y)
      return out, new_cache, bound.net(x, t_net, y, nfe_index, real_cache)[2]
    return plan_lib.BoundPlan(net, init_cache, bound.info)
