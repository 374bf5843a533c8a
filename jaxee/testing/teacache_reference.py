"""A compute-everything reference of TeaCache (`jaxee/exits/teacache.py`) for DiT and U-ViT.

`TeaCacheReference(plan)` goes through `jaxee.sample` like any plan, but shares no code with the
runner or the backbone contract: the blocks, embedding and head are the modules' own methods
(`family_ops`), the DiT signature is written out here (LayerNorm without affine, eps 1e-6, then
x·(1 + scale_msa) + shift_msa of block 0, DiT `models.py` `DiTBlock.forward`), and every NFE runs
the whole network and then *selects* with `jnp.where` between the fresh output and the cached
residual — no `lax.cond`. Its stats are its own decisions (`blocks` 0 on a skipped NFE), so a
test compares the runner's decisions with these.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxee.exits import plan as plan_lib
from jaxee.testing import family_ops as ops


def _dit_signature(model, params, tokens, c):
  mod = ops.Blocks(model).dit_modulation(ops.take(params["blocks"], 0), c)
  mu = jnp.mean(tokens, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(tokens - mu), axis=-1, keepdims=True)
  normed = (tokens - mu) / jnp.sqrt(var + 1e-6)
  return normed * (1.0 + mod[1][:, None, :]) + mod[0][:, None, :]


def _final_tokens(model, params, tokens, c):
  b = ops.Blocks(model)
  h = tokens
  if model.family == "dit":
    for l in range(model.depth):
      h = b.dit(ops.take(params["blocks"], l), h, c)
    return h
  skips = []
  for l in range(model.num_in_blocks):
    h = b.uvit_in(ops.take(params["in_blocks"], l), h)
    skips.append(h)
  h = b.uvit_in(params["mid_block"], h)
  for l in range(model.num_in_blocks):
    h = b.uvit_out(ops.take(params["out_blocks"], l), h, skips.pop())
  return h


def _batch_change(sig, prev, rule):
  """Per-sample relative L1 change, reduced by `rule` (written independently of the runner)."""
  b = sig.shape[0]
  diff = jnp.abs(sig - prev).reshape(b, -1)
  base = jnp.abs(prev).reshape(b, -1)
  if rule == "pooled":
    return diff.sum() / jnp.maximum(base.sum(), 1e-30)
  ratios = diff.sum(1) / jnp.maximum(base.sum(1), 1e-30)
  return ratios.max() if rule == "max" else ratios.mean()


@plan_lib.pytree_plan(data=("plan",))
class TeaCacheReference:
  """Every block at every NFE, then `where` (see the module docstring)."""
  plan: Any

  def check(self, model: Any, nfe_times) -> None:
    self.plan.check(model, nfe_times)

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    if model.family not in ("dit", "uvit"):
      raise ValueError("the TeaCache reference covers DiT and U-ViT")
    num_nfe = len(nfe_times)
    plan = self.plan
    coefficients = jnp.asarray(plan.coefficients, jnp.float32)

    def signature(tokens, c):
      return _dit_signature(model, params, tokens, c) if model.family == "dit" else tokens

    def init_cache(x_batch, y=None):
      tokens, c = ops.embed(model, params, x_batch, jnp.zeros((x_batch.shape[0],)), y)
      return {"sig": jnp.zeros_like(signature(tokens, c)), "res": jnp.zeros_like(tokens),
              "acc": jnp.zeros(())}

    def net(x, t_net, y, nfe_index, cache):
      tokens, c = ops.embed(model, params, x, t_net, y)
      sig = signature(tokens, c)
      final = _final_tokens(model, params, tokens, c)
      first_or_last = (nfe_index == 0) | (nfe_index == num_nfe - 1)
      d = _batch_change(sig, cache["sig"], plan.rule)
      poly = sum(coefficients[k] * d ** (len(coefficients) - 1 - k)
                 for k in range(len(coefficients)))
      acc = cache["acc"] + jnp.where(first_or_last, 0.0, poly)
      skip = (~first_or_last) & (acc < plan.threshold)
      h = jnp.where(skip, tokens + cache["res"], final)
      res = jnp.where(skip, cache["res"], final - tokens)
      out = ops.head(model, params, h, c)
      blocks = model.depth if model.family == "dit" else 2 * model.num_in_blocks + 1
      stats = {"blocks": jnp.where(skip, 0.0, float(blocks)), "flops": jnp.zeros(())}
      return out, {"sig": sig, "res": res, "acc": jnp.where(skip, acc, 0.0)}, stats
    return plan_lib.BoundPlan(net, init_cache, None)
