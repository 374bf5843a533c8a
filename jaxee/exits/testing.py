"""Random backbones and reference forwards for tests and benchmarks of the exit runners.

DiT's adaLN modulations and final layer are zero-initialised (adaLN-Zero, DiT `initialize_weights`),
which makes every block an identity at init; `random_params` perturbs all leaves with Gaussian
noise so that each block, gate and head changes the output and a runner that skips the wrong block
is caught by an equality test.

`ReferencePlan(plan)` binds the same per-NFE tables as `plan` but computes EVERY block at every
NFE and then selects (ASE, DuoDiff) or masks (block masks) with `jnp.where`: the reference the
really-skipping runners must match, NFE by NFE and through whole sampler runs.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

import numpy as np

from jaxee import models
from jaxee.exits import ase as ase_lib
from jaxee.exits import duodiff as duodiff_lib
from jaxee.exits import masks as masks_lib
from jaxee.exits import ops
from jaxee.exits import plan as plan_lib


def random_params(model: Any, rng, scale: float = 0.05, x_shape: Optional[tuple] = None):
  """Initialises `model` and adds N(0, scale²) noise to every leaf."""
  k_init, k_noise = jax.random.split(rng)
  if model.family == "dit":
    shape = x_shape or (1, model.input_size, model.input_size, model.in_channels)
    y = jnp.zeros((shape[0],), jnp.int32)
  else:
    shape = x_shape or (1, model.img_size, model.img_size, model.in_chans)
    y = jnp.zeros((shape[0],), jnp.int32) if model.num_classes > 0 else None
  params = jax.jit(model.init)(k_init, jnp.zeros(shape), jnp.zeros((shape[0],)), y)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(k_noise, len(leaves))
  leaves = [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@functools.lru_cache(maxsize=16)
def _tiny(family: str, seed: int, depth: int, overrides: tuple):
  if family == "dit":
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth,
               num_heads=4, num_classes=10)
  else:
    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=depth, num_heads=4)
  cfg.update(overrides)
  model = models.create(family, **cfg)
  return model, random_params(model, jax.random.PRNGKey(seed))


def tiny_dit(rng=None, depth: int = 4, **overrides):
  """A tiny class-conditional DiT (8×8×4 input, width 32) and perturbed params.

  `rng` is an int seed or a key (default seed 0); models with int seeds are cached, so tests
  share one init compile.
  """
  if rng is None or isinstance(rng, int):
    return _tiny("dit", rng or 0, depth, tuple(sorted(overrides.items())))
  model = _tiny("dit", 0, depth, tuple(sorted(overrides.items())))[0]
  return model, random_params(model, rng)


def tiny_uvit(rng=None, depth: int = 6, **overrides):
  """A tiny unconditional U-ViT (8×8×3, patch 2, width 32; depth 6 = 3 in, mid, 3 out).

  `rng` as in `tiny_dit` (default seed 1).
  """
  if rng is None or isinstance(rng, int):
    return _tiny("uvit", 1 if rng is None else rng, depth, tuple(sorted(overrides.items())))
  model = _tiny("uvit", 1, depth, tuple(sorted(overrides.items())))[0]
  return model, random_params(model, rng)


def example_inputs(model: Any, batch: int = 2, rng=None):
  """(x, y) for a model; y is None for unconditional models."""
  rng = jax.random.PRNGKey(2) if rng is None else rng
  if model.family == "dit":
    shape = (batch, model.input_size, model.input_size, model.in_channels)
    y = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
  else:
    shape = (batch, model.img_size, model.img_size, model.in_chans)
    y = (jnp.arange(batch, dtype=jnp.int32) % model.num_classes
         if model.num_classes > 0 else None)
  return jax.random.normal(rng, shape), y


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
  m = plan.mask
  bm = np.repeat(m, 2, axis=1) if plan.unit == "block" else m
  return bm.reshape(num_nfe, -1, 2)


class ReferencePlan:
  """The compute-everything-then-select reference of an ASE, DuoDiff or mask plan."""

  def __init__(self, plan: Any):
    if not isinstance(plan, (ase_lib.ASEPlan, duodiff_lib.DuoDiffPlan, masks_lib.MaskPlan)):
      raise TypeError(f"no reference for {type(plan).__name__}")
    self.plan = plan

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    plan = self.plan
    bound = plan.bind(model, params, nfe_times)  # same tables, same validation
    blocks, flops = bound.info["blocks_per_nfe"], bound.info["flops_per_nfe"]

    def stats(nfe_index):
      return plan_lib.stats_from_tables(nfe_index, blocks, flops)

    if isinstance(plan, ase_lib.ASEPlan):
      depths = jnp.asarray(plan.depths(model, nfe_times))

      def net(x, t_net, y, nfe_index, cache):
        out = reference_prefix(model, params, x, t_net, y, depths[nfe_index])
        return out, cache, stats(nfe_index)
      return plan_lib.BoundPlan(net, plan_lib.no_cache, bound.info)

    if isinstance(plan, duodiff_lib.DuoDiffPlan):
      deep_p, shallow_p = plan.resolve_params(params)
      flags = jnp.asarray(plan.shallow_flags(model, nfe_times))

      def net(x, t_net, y, nfe_index, cache):
        out_s = plan.shallow_model.apply({"params": shallow_p}, x, t_net, y)
        out_d = model.apply({"params": deep_p}, x, t_net, y)
        return jnp.where(flags[nfe_index], out_s, out_d), cache, stats(nfe_index)
      return plan_lib.BoundPlan(net, plan_lib.no_cache, bound.info)

    rows = jnp.asarray(block_mask_rows(plan, len(nfe_times)))
    num_units = rows.shape[1]

    def init_cache(x_batch, y=None):
      shape = jax.eval_shape(
          lambda xx, yy: ops.embed(model, params, xx, jnp.zeros((xx.shape[0],)), yy)[0],
          jax.ShapeDtypeStruct(x_batch.shape, jnp.float32), y)
      lead = () if plan.cache_mode == "block_output" else (2,)
      return [jnp.zeros(lead + shape.shape, shape.dtype) for _ in range(num_units)]

    def net(x, t_net, y, nfe_index, cache):
      out, cache = reference_masked(model, params, x, t_net, y, rows[nfe_index], cache,
                                    plan.cache_mode)
      return out, cache, stats(nfe_index)
    return plan_lib.BoundPlan(net, init_cache, bound.info)


def plan_from_spec(spec: str, model: Any, params: Any, nfe_times, rng=None):
  """A plan from a short spec string, with random extras (for benchmarks and plots).

  Specs:
    'full': the full network (`plan.FullPlan`).
    'ase:NAME[:switch]': ASE paper table NAME (e.g. 'D3-DiT'), rescaled to the model's depth
      (`ase.scale_schedule`) when it differs; ':switch' picks the `lax.switch` runner (default: the loop runner). NAME may also
      be ten comma-separated block counts.
    'duodiff:T_S[:SHALLOW_DEPTH]': DuoDiff with t_switch T_S and a random shallow copy of the
      model with SHALLOW_DEPTH blocks (default 3; U-ViT: `depth` of the shallow U-ViT).
    'mask:P[:branch]': a rotating mask that skips a fraction P of the units at every NFE after
      the first (`mask_tools.keep_fraction_mask(1 − P)`); block units with block-output caching,
      or ':branch' for L2C attention/MLP units with branch caching.
    'deediff:NOISE[:CLEAN]': `deediff.benchmark_plan` with the batch exiting at layer NOISE at
      τ = 1 and CLEAN at τ = 0 (default: the full depth).

  Args:
    spec: the spec string.
    model: backbone.
    params: its params.
    nfe_times: the sampler's network times (mask plans need the number of NFEs).
    rng: key for random extras (shallow model, DeeDiff heads).

  Returns:
    (plan, params to pass to `jaxee.sample` with it).
  """
  rng = jax.random.PRNGKey(11) if rng is None else rng
  kind, _, arg = spec.partition(":")
  parts = arg.split(":") if arg else []
  if kind == "full":
    return plan_lib.FullPlan(), params
  if kind == "ase":
    if not parts:
      raise ValueError("ase spec needs a schedule: ase:D3-DiT")
    runner = parts[1] if len(parts) > 1 else "loop"
    if "," in parts[0]:
      return ase_lib.ASEPlan(tuple(int(v) for v in parts[0].split(",")), runner=runner), params
    key = parts[0] if parts[0] in ase_lib.ASE_TABLES else f"{parts[0]}-DiT"
    family = "dit" if key.endswith("-DiT") else "uvit"
    cap = ase_lib.capacity(model)
    depth = cap if cap != ase_lib.REFERENCE_DEPTH[family] else None
    return ase_lib.ase_plan(parts[0], depth=depth, runner=runner), params
  if kind == "duodiff":
    if not parts:
      raise ValueError("duodiff spec needs t_switch: duodiff:300[:3]")
    shallow_depth = int(parts[1]) if len(parts) > 1 else 3
    shallow = model.clone(depth=shallow_depth, parent=None)
    if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):  # shapes only (plots)
      shallow_params = jax.eval_shape(lambda k: random_params(shallow, k), rng)
    else:
      shallow_params = random_params(shallow, rng)
    plan = duodiff_lib.DuoDiffPlan(shallow, t_switch=float(parts[0]))
    return plan, plan.pack(params, shallow_params)
  if kind == "mask":
    if not parts:
      raise ValueError("mask spec needs the skipped fraction: mask:0.5")
    skipped = float(parts[0])
    unit = "branch" if len(parts) > 1 and parts[1] == "branch" else "block"
    cache_mode = "branch" if unit == "branch" else "block_output"
    units = masks_lib.num_units(model, unit)
    mask = masks_lib.keep_fraction_mask(len(nfe_times), units, 1.0 - skipped)
    return masks_lib.MaskPlan(mask, unit, cache_mode, {"spec": spec}), params
  if kind == "deediff":
    from jaxee.exits import deediff  # pylint: disable=g-import-not-at-top
    kw = {}
    if parts:
      kw["exit_layer_at_noise"] = float(parts[0])
    if len(parts) > 1:
      kw["exit_layer_at_clean"] = float(parts[1])
    plan, _ = deediff.benchmark_plan(model, params, rng, **kw)
    return plan, params
  raise ValueError(f"unknown plan spec {spec!r}: use full, ase:..., duodiff:..., mask:..., "
                   "deediff:...")


def assert_outputs_close(actual, desired, tol: float = 1e-6) -> None:
  """max |actual − desired| ≤ tol · max(1, max |desired|): 1e-6 at the output's own scale.

  Whole sampler runs of random tiny models reach values of O(10–100); fused and unfused float32
  programs then differ by a few ulps of that scale, which an absolute 1e-6 would flag.
  """
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  if actual.shape != desired.shape:
    raise AssertionError(f"shapes differ: {actual.shape} vs {desired.shape}")
  scale = max(1.0, float(np.max(np.abs(desired))))
  err = float(np.max(np.abs(actual - desired)))
  if not err <= tol * scale:
    raise AssertionError(f"max |difference| {err:.3g} > {tol:g} × scale {scale:.3g}")
