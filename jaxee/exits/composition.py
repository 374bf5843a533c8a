"""Composed plans: a depth schedule with a cache, and a shallow phase in front of either.

    plan = exits.compose(exits.ase_plan('D3-DiT', depth=12), exits.MaskPlan(mask))
    plan = exits.compose(exits.DuoDiffPlan(shallow, shallow_p, t_switch=300), ase_or_mask)

What composes (each piece keeps its own semantics, `research/ee_methods.md`):

* **depth + cache** (ASE + TABM/L2C): units after the depth limit are dropped exactly as ASE
  drops them (`Backbone.drop`: a U-ViT out-block still fuses its skip); units before it follow
  the mask: computed and cached, or their cached value reused (`Backbone.enter`/`apply`). A
  dropped unit's cache entry is left as it was (stale until it runs again). FLOPs per NFE =
  embed + head + Σ_{u<limit} (m_u ? unit_u : enter_u) + Σ_{u≥limit} drop_u.
* **phase + X** (DuoDiff + ASE, a cache, or both): the shallow model runs the NFEs DuoDiff gives it
  (a scalar `lax.cond`, as `DuoDiffPlan`), the deep model runs X on the rest. X's cache is
  carried untouched through the shallow NFEs, and the first deep NFE computes every unit (its
  mask row is forced to ones, as row 0 is for a mask alone).

* **exit + cache** (DeeDiff + a block-output mask): the batched while-loop runner reuses a
  block's cached output where the mask is 0 (`DeeDiffPlan.bind(..., unit_mask=...)`); the blocks
  after the batch's exit are not run and keep their stale cache entries.

Refused, with the reason: two plans of one kind (two depth schedules, masks or phases);
DeeDiff with ASE or DuoDiff (two rules deciding the depth / the model); DeeDiff with a branch
cache (its exits sit between blocks) or with the exact / per-device runner.

Runner: per segment, one `fori_loop` over the groups before the limit (each unit a scalar
`lax.cond` between compute and the cached value) and one over the dropped groups — traced trip
counts, so the schedule and the mask are traced leaves and never recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import ase as ase_lib
from jaxee.exits import duodiff as duodiff_lib
from jaxee.exits import masks as masks_lib
from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib


@plan_lib.pytree_plan(data=("phase", "depth", "cache", "exit"))
class ComposedPlan:
  """A DuoDiff phase, an ASE depth schedule and a mask cache (any two or three of them), or a
  DeeDiff exit with a block-output cache."""
  phase: Optional[duodiff_lib.DuoDiffPlan] = None
  depth: Optional[ase_lib.ASEPlan] = None
  cache: Optional[masks_lib.MaskPlan] = None
  exit: Any = None

  @property
  def parts(self) -> list:
    return [p for p in (self.phase, self.depth, self.cache, self.exit) if p is not None]

  @property
  def name(self) -> str:
    names = []
    if self.phase is not None:
      names.append(f"duodiff:{self.phase.t_switch}")
    if self.depth is not None:
      names.append(f"ase:{self.depth.name}")
    if self.cache is not None:
      names.append(f"mask:{self.cache.unit}:{self.cache.cache_mode}")
    if self.exit is not None:
      names.append(self.exit.name)
    return "+".join(names)

  def check(self, model: Any, nfe_times) -> None:
    for part in self.parts:
      part.check(model, nfe_times)

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    times = plan_lib.check_nfe_times(nfe_times)
    if self.exit is not None:
      return self.exit.bind(model, params, times, unit_mask=self.cache.unit_mask(jnp))
    if self.phase is not None:
      deep_p, _ = self.phase.resolve_params(params)
      flags = self.phase.shallow_flags(model, times)
    else:
      deep_p, flags = params, None
    inner = self._bind_inner(model, deep_p, times, flags)
    if self.phase is None:
      return inner
    return _with_phase(self.phase, model, params, times, flags, inner, self.name)

  def _bind_inner(self, model, params, times, flags) -> plan_lib.BoundPlan:
    cache = self.cache
    if cache is not None and flags is not None:
      # The first deep NFE starts from an empty cache: compute every unit there.
      first_deep = jnp.argmin(jnp.asarray(flags)) if plan_lib.is_traced(flags) else int(
          np.argmin(np.asarray(flags)))
      m = jnp.asarray(cache.mask)
      cache = dataclasses.replace(cache, mask=m.at[first_deep].set(jnp.ones_like(m[0])))
    if self.depth is None:
      return cache.bind(model, params, times)
    if cache is None:
      return self.depth.bind(model, params, times)
    return _bind_depth_cache(self.depth, cache, model, params, times, self.name)


def compose(*plans) -> ComposedPlan:
  """Composes plans of different kinds (see the module docstring); refuses what makes no sense."""
  from jaxee.exits import deediff as deediff_lib  # pylint: disable=g-import-not-at-top
  slots = {"phase": None, "depth": None, "cache": None}
  kinds = ((duodiff_lib.DuoDiffPlan, "phase", "DuoDiff phases"),
           (ase_lib.ASEPlan, "depth", "depth schedules (ASE)"),
           (masks_lib.MaskPlan, "cache", "masks"))
  flat = []
  for p in plans:
    flat.extend(p.parts if isinstance(p, ComposedPlan) else [p])
  exits = [p for p in flat if isinstance(p, deediff_lib.DeeDiffPlan)]
  if exits:
    others = [q for q in flat if q is not exits[0]]
    names = [type(q).__name__ for q in others]
    if len(exits) > 1 or len(others) != 1 or not isinstance(others[0], masks_lib.MaskPlan):
      raise ValueError(f"DeeDiff decides the depth itself; it composes only with one mask "
                       f"(a block-output cache), not with {names}")
    mask = others[0]
    if mask.granularity != "block":
      raise ValueError("DeeDiff exits between blocks: compose it with a block-output mask "
                       "(unit='block', cache_mode='block_output')")
    if exits[0].mode != "batched" or exits[0].mesh is not None:
      raise ValueError("DeeDiff with a cache needs the batched runner on one device")
    return ComposedPlan(cache=mask, exit=exits[0])
  for p in flat:
    if isinstance(p, masks_lib.MaskPlan) and p.cache_mode == "unit_output" and p.unit != "block":
      raise ValueError("composition runs block-output and L2C branch caches; a per-unit output "
                       "replacement mask (unit='branch', cache_mode='unit_output') runs alone")
    for cls, slot, what in kinds:
      if isinstance(p, cls):
        if slots[slot] is not None:
          raise ValueError(f"two {what} cannot be composed: one decides {slot} per NFE")
        slots[slot] = p
        break
    else:
      raise TypeError(f"cannot compose a {type(p).__name__}; composable: DuoDiffPlan, ASEPlan, "
                      "MaskPlan")
  if sum(v is not None for v in slots.values()) < 2:
    raise ValueError("compose needs at least two plans of different kinds")
  return ComposedPlan(**slots)


def depth_cache_tables(bb, limit, m):
  """(blocks, FLOPs) per NFE for per-NFE unit limits (T,) and a (T, U) bool mask."""
  xp = np if isinstance(m, np.ndarray) and isinstance(limit, np.ndarray) else jnp
  idx = xp.arange(bb.num_units)[None, :]
  alive = idx < xp.asarray(limit)[:, None]
  unit_f, enter_f, drop_f = (xp.asarray(a) for a in (bb.unit_flops, bb.enter_flops,
                                                      bb.drop_flops))
  per_unit = xp.where(alive, xp.where(m, unit_f, enter_f), drop_f)
  flops = bb.embed_flops + bb.head_flops + per_unit.sum(axis=1)
  blocks = (alive & m).sum(axis=1) / (bb.num_units // bb.num_blocks)
  return blocks.astype(xp.float32 if xp is jnp else np.float64), flops


def _bind_depth_cache(depth, cache, model, params, times, name) -> plan_lib.BoundPlan:
  if not plan_lib.is_traced(depth):
    depth.validate(model)
  bb = bb_lib.as_backbone(model, cache.granularity)
  per = bb.num_units // bb.num_blocks
  depths = depth.depths(model, times)
  limit = bb.tail_start + depths * per
  m = cache.unit_mask(np if not plan_lib.is_traced(cache) else jnp)
  blocks, flops = depth_cache_tables(bb, limit, m)
  m_j, limit_j = jnp.asarray(m), jnp.asarray(limit, jnp.int32)

  def init_cache(x_batch, y=None):
    return bb_lib.zeros_cache(bb, params, jnp.shape(x_batch), y)

  def net(x, t_net, y, nfe_index, cache_in):
    row, lim = m_j[nfe_index], limit_j[nfe_index]
    state = bb.embed(params, x, t_net, y)

    def cached_unit(ref, carry):
      st, c = carry
      st = bb.enter(params, ref, st)
      value = jax.lax.cond(row[ref.index], lambda s: bb.compute(params, ref, s),
                           lambda s: bb_lib.cache_get(bb, c, ref), st)
      return bb.apply(params, ref, st, value), bb_lib.cache_set(bb, c, ref, value)

    carry = (state, tuple(cache_in))
    for seg in bb.segments:
      n_sub = len(seg.pattern)
      cut = jnp.clip(lim - seg.start, 0, seg.size) // n_sub

      def run_group(g, cr, seg=seg, n_sub=n_sub):
        for s in range(n_sub):
          cr = cached_unit(bb_lib.UnitRef(seg, g, s), cr)
        return cr

      def drop_group(g, cr, seg=seg, n_sub=n_sub):
        st, c = cr
        for s in range(n_sub):
          st = bb.drop(params, bb_lib.UnitRef(seg, g, s), st)
        return st, c

      carry = jax.lax.fori_loop(0, cut, run_group, carry)
      carry = jax.lax.fori_loop(cut, seg.groups, drop_group, carry)
    state, new_cache = carry
    return bb.head(params, state), new_cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

  def info():
    return plan_lib.make_info(model, blocks, flops, plan=name, depths=np.asarray(depths),
                              kept_fraction=float(np.mean(np.asarray(cache.mask))))
  traced = plan_lib.is_traced(depth) or plan_lib.is_traced(cache)
  return plan_lib.BoundPlan(net, init_cache, None if traced else info())


def _with_phase(phase, model, params, times, flags, inner, name) -> plan_lib.BoundPlan:
  """Shallow model where `flags`, the inner (deep) plan elsewhere; the cache passes through."""
  deep_p, shallow_p = phase.resolve_params(params)
  del deep_p
  shallow = plan_lib.full_forward(phase.shallow_model, shallow_p)
  sb = bb_lib.as_backbone(phase.shallow_model)
  flags_j = jnp.asarray(flags)

  def net(x, t_net, y, nfe_index, cache):
    def run_shallow(c):
      out = shallow(x, t_net, y)
      return out, c, {"blocks": jnp.float32(sb.num_blocks), "flops": jnp.float32(sb.full_flops)}

    def run_deep(c):
      out, c, st = inner.net(x, t_net, y, nfe_index, c)
      return out, c, {"blocks": jnp.float32(st["blocks"]), "flops": jnp.float32(st["flops"])}
    return jax.lax.cond(flags_j[nfe_index], run_shallow, run_deep, cache)

  info = None
  if inner.info is not None and not plan_lib.is_traced(flags):
    blocks = np.where(flags, sb.num_blocks, inner.info["blocks_per_nfe"])
    flops = np.where(flags, sb.full_flops, inner.info["flops_per_nfe"])
    info = plan_lib.make_info(model, blocks, flops, plan=name, shallow_flags=flags)
  return plan_lib.BoundPlan(net, inner.init_cache, info)
