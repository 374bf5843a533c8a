"""DeepCache: reuse a U-Net's high-level up-path feature across steps (training-free baseline).

DeepCache (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024, §3):
adjacent denoising steps have very similar high-level features, and a U-Net's skip branches let
the shallow part of the network run without the deep part. With branch m and interval N
("uniform 1:N"), the full U-Net runs at every N-th step and the output of up block U_{m+1} (the
feature that, concatenated with D_m's skip, enters U_m) is cached; at the other N − 1 steps only
D_1..D_m and U_m..U_1 run, U_m reading the cached feature instead of U_{m+1}'s fresh output.

Here, on the backbone contract (`jaxee/models/backbone.py`, 'block' granularity: every ResBlock
and AttnBlock is a unit), a branch is a pair (a, r) from `Backbone.cache_branches()` (the U-Net's
are in `jaxee/models/unet_units.py`): the full step caches the stream after unit r's `enter`
(after the upsampler when r starts a level, as DeepCache caches U_{m+1}'s upsampled output); a
cached step runs units 0..a−1, skips units a..r−1 and the `enter` of r entirely, restores the
cached stream and runs r..U−1. Branch points are per ResBlock/AttnBlock, a finer grid than the
paper's per-block branches (DeepCache's code also picks a layer inside a block); branch index 0
is the shallowest (the most work skipped: only `conv_in`, the last up ResNet and the head run).

Runner. NFE k is full iff k mod N = 0 (NFE 0 always: the cache starts empty). Per unit two scalar
`lax.cond`s (skip its `enter`; skip its `compute`+`apply`) and, at unit r, a `lax.switch`
(nothing / store the stream / restore it): only the taken branch runs, nothing is computed and
masked. `DeepCachePlan` is a pytree whose interval and branch index are both traced leaves: the
U-Net's stream is one flat buffer of constant shape (`unet_units.py`), so the cache has one shape
for every branch and a sweep over N or the branch never recompiles.

FLOPs per sample: full steps cost `full_flops`; cached steps save Σ_{u=a}^{r−1} unit_flops[u] +
enter_flops[r]. Families without skip branches (DiT, U-ViT) refuse the plan at `check`/`bind`
with the contract's NotImplementedError.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib


def branches(model: Any) -> np.ndarray:
  """(K, 2) int32 table of the model's DeepCache branch points (a, r), shallowest first."""
  pairs = bb_lib.as_backbone(model, "block").cache_branches()
  if not pairs:
    raise NotImplementedError(f"{type(model).__name__} has no DeepCache branch point")
  return np.asarray(pairs, np.int32).reshape(-1, 2)


@plan_lib.pytree_plan(data=("interval", "branch"))
class DeepCachePlan:
  """Full network every `interval`-th NFE, the shallow branch reusing the cache in between.

  Attributes:
    interval: N ≥ 1 (N = 1: every NFE is full); a traced int32 leaf.
    branch: index into `branches(model)` (0 = shallowest); a traced int32 leaf.
    metadata: free-form dict (dropped when the plan is flattened).
  """
  interval: Any = 2
  branch: Any = 0
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if plan_lib.is_traced((self.interval, self.branch)):
      return
    for name in ("interval", "branch"):
      v = np.asarray(getattr(self, name))
      if v.ndim or not np.issubdtype(v.dtype, np.integer) and not float(v).is_integer():
        raise ValueError(f"DeepCache {name} must be an integer, got {getattr(self, name)!r}")
      object.__setattr__(self, name, np.int32(v))
    if self.interval < 1:
      raise ValueError(f"DeepCache interval N must be >= 1, got {int(self.interval)}")
    if self.branch < 0:
      raise ValueError(f"DeepCache branch must be >= 0, got {int(self.branch)}")

  @property
  def spec(self) -> str:
    """The plan as a spec string (`exits.spec.parse_plan` reads it back; a DeepCache plan is
    two integers, so the spec is its file format)."""
    return f"deepcache:{int(self.interval)}:branch={int(self.branch)}"

  def check(self, model: Any, nfe_times) -> None:
    """Host validation: the model has branch points and `branch` indexes one of them."""
    plan_lib.check_nfe_times(nfe_times)
    table = branches(model)
    if plan_lib.is_traced(self.branch):
      return
    if not 0 <= int(self.branch) < len(table):
      raise ValueError(f"DeepCache branch {int(self.branch)} out of range: this model has "
                       f"{len(table)} branch points (0..{len(table) - 1}, 0 = shallowest)")

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """The runner (see the module docstring); works with traced interval and branch."""
    times = plan_lib.check_nfe_times(nfe_times)
    self.check(model, times)
    bb = bb_lib.as_backbone(model, "block")
    table = branches(model)
    n = len(times)
    blocks, flops = tables(bb, table, self.interval, self.branch, n)
    net, init_cache = _make_runner(bb, params, table, self.interval, self.branch, blocks, flops)

    def info():
      hb, hf = tables(bb, table, int(self.interval), int(self.branch), n)
      a, r = (int(v) for v in table[int(self.branch)])
      return plan_lib.make_info(model, hb, hf, plan=self.spec,
                                interval=int(self.interval), branch=int(self.branch),
                                skipped_units=(a, r), num_branches=len(table))
    return plan_lib.BoundPlan(net, init_cache, plan_lib.host_info(self, info))


def full_steps(interval, num_nfe: int, xp=jnp):
  """(num_nfe,) bool: NFE k runs the full network iff k mod N = 0."""
  return xp.arange(num_nfe) % xp.maximum(xp.asarray(interval), 1) == 0


def tables(bb: bb_lib.Backbone, table: np.ndarray, interval, branch, num_nfe: int):
  """(blocks, FLOPs) per NFE; NumPy float64 for concrete ints, else jnp float32."""
  concrete = not plan_lib.is_traced((interval, branch)) and not isinstance(
      interval, jax.Array)
  xp = np if concrete else jnp
  a, r = xp.asarray(table)[branch]
  unit_f, enter_f = xp.asarray(bb.unit_flops), xp.asarray(bb.enter_flops)
  csum = xp.concatenate([xp.zeros(1), xp.cumsum(unit_f)])
  saved = csum[r] - csum[a] + enter_f[r]
  full = full_steps(interval, num_nfe, xp)
  per_block = bb.num_units // bb.num_blocks
  flops = xp.where(full, bb.full_flops, bb.full_flops - saved)
  blocks = xp.where(full, bb.num_blocks, bb.num_blocks - (r - a) / per_block)
  dtype = np.float64 if xp is np else jnp.float32
  return blocks.astype(dtype), flops.astype(dtype)


def _make_runner(bb: bb_lib.Backbone, params: Any, table: np.ndarray, interval, branch,
                 blocks, flops):
  """(net, init_cache): the cache is the stream `state['h']` after unit r's `enter`."""
  pair = jnp.asarray(table)[branch]

  def init_cache(x_batch, y=None):
    def h(xx, yy):
      return bb.embed(params, xx, jnp.zeros((xx.shape[0],), jnp.float32), yy)["h"]
    y_spec = None if y is None else jax.ShapeDtypeStruct(jnp.shape(y), jnp.int32)
    shape = jax.eval_shape(h, jax.ShapeDtypeStruct(jnp.shape(x_batch), jnp.float32), y_spec)
    return jnp.zeros(shape.shape, shape.dtype)

  def net(x, t_net, y, nfe_index, cache):
    full = jnp.asarray(nfe_index) % jnp.maximum(jnp.asarray(interval), 1) == 0
    a, r = pair[0], pair[1]
    state = bb.embed(params, x, t_net, y)

    def keep(st, c):
      return st, c

    def store(st, c):
      return st, st["h"].astype(c.dtype)

    def load(st, c):
      return dict(st, h=c.astype(st["h"].dtype)), c

    def unit(ref, carry):
      st, c = carry
      i = ref.index
      in_span = jnp.logical_and(jnp.logical_not(full), i >= a)
      st = jax.lax.cond(jnp.logical_and(in_span, i <= r), lambda s: s,
                        lambda s: bb.enter(params, ref, s), st)
      op = jnp.where(i == r, jnp.where(full, 1, 2), 0)
      st, c = jax.lax.switch(op, (keep, store, load), st, c)

      def run(s):
        return bb.apply(params, ref, s, bb.compute(params, ref, s))
      st = jax.lax.cond(jnp.logical_and(in_span, i < r), lambda s: s, run, st)
      return st, c

    state, cache = bb_lib.for_units(bb, (state, cache), unit)
    return bb.head(params, state), cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

  return net, init_cache
