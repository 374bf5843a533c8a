"""Adaptive step caching (TeaCache): skip the whole network when its input has barely changed.

TeaCache ("Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", Liu et al.,
CVPR 2025; the authors' `TeaCache4*` forwards) decides once per network evaluation (NFE):

    s_i   = the timestep-modulated input of evaluation i   (DiT: blocks[0]: modulate(norm1(x),
                                                           shift_msa, scale_msa))
    d_i   = mean|s_i − s_{i−1}| / mean|s_{i−1}|            (relative L1 change)
    A_i   = A_{i−1} + poly(d_i)                            (poly: the rescale polynomial, np.poly1d
                                                           coefficient order; identity by default)
    skip_i = A_i < threshold   and i is neither the first nor the last evaluation
    skip:    out = head(embed_i + r)                       (r: cached residual)
    compute: run every block; r = stream_after_blocks − embed_i; A_i = 0

and s_{i−1} is refreshed at every evaluation (skipped or not); the first and the last evaluation
always compute and reset A (as the authors' loops do with `cnt == 0 or cnt == num_steps − 1`).

The batch. The original computes d over the whole batch tensor (CFG halves included). Here d is
computed **per sample** over the batch the network receives — under classifier-free guidance that
is the doubled batch, conditional and unconditional halves both (`jaxee/diffusion/guidance.py`
calls the network once on [cond; uncond]) — and reduced to ONE scalar by `rule`:

* `'max'` (default): d = max_b d_b — no sample is skipped while any sample (either CFG half)
  changed a lot;
* `'mean'`: d = mean_b d_b;
* `'pooled'`: the original's ratio of batch-wide means, mean_b,k|Δ| / mean_b,k|s_{i−1}|.

Never sample 0 alone. With the batch sharded over devices under `jit` (`jaxee.sharded`), the
reduction is over the global batch (XLA inserts the collective) and every device takes the same
branch; a net wrapped by `plan.shard_net` (`shard_map`) would instead decide per device. The signature comes from
the backbone contract (`Backbone.step_signature`: DiT as above; U-ViT: the embedded tokens incl.
the time token; U-Net: conv_in output and time embedding), so this module has no family code.

Runner: embed, signature and decision always run; one scalar `lax.cond` either runs all units
(`backbone.run_all`) or adds the cached residual; then the head. The cache in the sampler's
carry is `{sig, acc, res}` (previous signature, accumulator — kept batch-major with equal entries
so the cache shards like the batch — and residual). `TeaCachePlan` is a pytree whose
threshold and polynomial coefficients are traced leaves: a threshold sweep compiles once.

FLOPs per sample: a computed NFE = full network + signature; a skipped one = embed + head +
signature (DiT: block 0's adaLN modulation; U-ViT/U-Net: 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib

RULES = ("max", "mean", "pooled")
IDENTITY = (1.0, 0.0)  # poly(d) = d
_TINY = 1e-30  # denominators: an all-zero previous signature gives a huge change, not NaN


@plan_lib.pytree_plan(data=("threshold", "coefficients"), static=("rule",))
class TeaCachePlan:
  """TeaCache on any backbone (see the module docstring).

  Attributes:
    threshold: skip while the accumulated rescaled change stays below it (≥ 0; 0 with the
      identity polynomial never skips). A traced leaf.
    coefficients: rescale polynomial, highest degree first (`np.poly1d` order); default the
      identity (1, 0). A traced leaf (its length is structure).
    rule: batch reduction of the per-sample change, 'max' | 'mean' | 'pooled' (static).
    metadata: free-form, dropped on flatten.
  """
  threshold: Any = 0.1
  coefficients: Any = IDENTITY
  rule: str = "max"
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"TeaCache rule must be one of {RULES}, got {self.rule!r}")
    if plan_lib.is_traced((self.threshold, self.coefficients)):
      return
    thr = np.asarray(self.threshold, np.float32)
    if thr.ndim != 0 or not np.isfinite(thr) or thr < 0:
      raise ValueError(f"TeaCache threshold must be a finite number ≥ 0, got {self.threshold!r}")
    coef = np.asarray(self.coefficients, np.float32)
    if coef.ndim != 1 or not coef.size or not np.all(np.isfinite(coef)):
      raise ValueError("TeaCache coefficients must be a non-empty 1-D list of finite numbers "
                       f"(highest degree first), got {self.coefficients!r}")
    object.__setattr__(self, "threshold", thr)
    object.__setattr__(self, "coefficients", coef)

  def check(self, model: Any, nfe_times) -> None:
    plan_lib.check_nfe_times(nfe_times)
    bb_lib.as_backbone(model, "block")

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    times = plan_lib.check_nfe_times(nfe_times)
    bb = bb_lib.as_backbone(model, "block")
    num_nfe = len(times)
    full = float(bb.full_flops + bb.step_signature_flops)
    skipped = float(bb.embed_flops + bb.head_flops + bb.step_signature_flops)
    threshold = jnp.asarray(self.threshold, jnp.float32)
    coefficients = jnp.asarray(self.coefficients, jnp.float32)
    rule = self.rule

    def init_cache(x_batch, y=None):
      def f(x, yy):
        st = bb.embed(params, x, jnp.zeros((x.shape[0],), jnp.float32), yy)
        return {"sig": bb.step_signature(params, st), "res": st["h"]}
      y_spec = None if y is None else jax.ShapeDtypeStruct(jnp.shape(y), jnp.int32)
      shapes = jax.eval_shape(f, jax.ShapeDtypeStruct(jnp.shape(x_batch), jnp.float32), y_spec)
      cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      cache["acc"] = jnp.zeros((jnp.shape(x_batch)[0],), jnp.float32)
      return cache

    def net(x, t_net, y, nfe_index, cache):
      state = bb.embed(params, x, t_net, y)
      sig = bb.step_signature(params, state)
      forced = (nfe_index == 0) | (nfe_index == num_nfe - 1)
      change = jnp.where(forced, 0.0, relative_change(sig, cache["sig"], rule))
      acc = jnp.max(cache["acc"]) + jnp.polyval(coefficients, change)  # entries are equal
      skip = jnp.logical_not(forced) & (acc < threshold)

      def compute(_):
        h = bb_lib.run_all(bb, params, state)["h"]
        return h, h - state["h"]

      def reuse(res):
        return state["h"] + res, res

      # One scalar predicate for the whole batch: only the taken branch runs.
      h, res = jax.lax.cond(skip, reuse, compute, cache["res"])
      out = bb.head(params, dict(state, h=h))
      acc = jnp.where(skip, acc, 0.0)
      new_cache = {"sig": sig, "res": res, "acc": jnp.broadcast_to(acc, cache["acc"].shape)}
      stats = {"blocks": jnp.where(skip, 0.0, float(bb.num_blocks)).astype(jnp.float32),
               "flops": jnp.where(skip, skipped, full).astype(jnp.float32)}
      return out, new_cache, stats

    def info():
      blocks = np.full(num_nfe, float(bb.num_blocks))
      return plan_lib.make_info(model, blocks, np.full(num_nfe, full),
                                plan=f"teacache:{float(self.threshold):g}:{rule}",
                                skipped_flops=skipped, upper_bound=True)
    return plan_lib.BoundPlan(net, init_cache, plan_lib.host_info(self, info))


def relative_change(sig, prev, rule: str = "max"):
  """The batch's relative L1 change as one float32 scalar (see the module docstring).

  Args:
    sig, prev: (B, ...) signatures of this and the previous evaluation.
    rule: 'max' / 'mean' over the per-sample ratios, or 'pooled' (ratio of batch-wide means).
  """
  if rule not in RULES:
    raise ValueError(f"TeaCache rule must be one of {RULES}, got {rule!r}")
  diff = jnp.abs(sig.astype(jnp.float32) - prev.astype(jnp.float32))
  base = jnp.abs(prev.astype(jnp.float32))
  if rule == "pooled":
    return jnp.mean(diff) / jnp.maximum(jnp.mean(base), _TINY)
  axes = tuple(range(1, sig.ndim))
  per_sample = jnp.mean(diff, axis=axes) / jnp.maximum(jnp.mean(base, axis=axes), _TINY)
  return jnp.max(per_sample) if rule == "max" else jnp.mean(per_sample)
