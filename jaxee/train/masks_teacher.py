"""TABM building blocks: the block-masked forward with a block-output cache, random masks, and
the teacher's sampling trajectory (`jaxee/train/masks_opt.py` has the optimisation).

* `run_blocks`: every block in execution order with block b's output m_b·f_b(h) + (1 − m_b)·
  cache_b (TABM's "x = s·f(x) + (1−s)·cache", `research/ee_methods.md` §4.7); with binary m it
  computes exactly what `exits.masks.MaskPlan(cache_mode='block_output')` runs at sampling time
  (a U-ViT in-block's mixed output is also its long skip). This is the training path: every block
  is computed and then mixed.
* `sample_gates`: Bernoulli with the straight-through estimator, binary concrete (Gumbel-sigmoid)
  or the relaxed scores themselves.
* `record_teacher`: the full network samples from Gaussian noise through `jaxee.sample` itself,
  with a recording "plan" that stores each NFE's network input and the relative change
  δ = ‖x_end,k − x_end,k−1‖ / ‖x_end,k‖ of the final block feature (no data needed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee import sampling
from jaxee.exits import ops
from jaxee.exits import plan as plan_lib

SAMPLING_MODES = ("bernoulli", "concrete", "relaxed")


# ------------------------------------------------------------------------------------------------
# Block-masked forward with a block-output cache (the training path: every block is computed).


def run_blocks(model, params, tokens, ctx, gates=None, cache=None):
  """All blocks in execution order, optionally mixed with a cache.

  Args:
    model: DiT or U-ViT.
    params: backbone params.
    tokens, ctx: `ops.embed` output.
    gates: (L,) mixing weights m (1 = compute), or None for the plain full network.
    cache: (L, B, N, D) cached block outputs (required with `gates`).

  Returns:
    (x_end (B, N, D), block outputs (L, B, N, D) after mixing).
  """
  b = ops.Blocks(model)
  full = gates is None

  def mix(l, new, cached):
    if full:
      return new
    g = gates[l].astype(new.dtype)
    return g * new + (1 - g) * cached

  def xs_cache(lo, hi):
    return jnp.zeros((hi - lo,)) if full else cache[lo:hi]

  if model.family == "dit":
    n_blocks = ops.stack_len(params["blocks"])

    def body(h, xs):
      l, p, cached = xs
      out = mix(l, b.dit(p, h, ctx), cached)
      return out, out
    return jax.lax.scan(body, tokens, (jnp.arange(n_blocks), params["blocks"],
                                       xs_cache(0, n_blocks)))
  n = model.num_in_blocks

  def in_body(h, xs):
    l, p, cached = xs
    out = mix(l, b.uvit_in(p, h), cached)
    return out, out
  h, skips = jax.lax.scan(in_body, tokens, (jnp.arange(n), params["in_blocks"], xs_cache(0, n)))
  h = mix(n, b.uvit_in(params["mid_block"], h), None if full else cache[n])
  mid = h

  def out_body(hh, xs):
    l, p, skip, cached = xs
    out = mix(l, b.uvit_out(p, hh, skip), cached)
    return out, out
  h, outs = jax.lax.scan(out_body, h, (jnp.arange(n + 1, 2 * n + 1), params["out_blocks"],
                                       skips[::-1], xs_cache(n + 1, 2 * n + 1)))
  return h, jnp.concatenate([skips, mid[None], outs], axis=0)


def sample_gates(scores, key, mode: str, temperature: float = 0.5):
  """Random masks from relaxed scores (see the module docstring); gradients reach `scores`."""
  if mode == "relaxed":
    return scores
  u = jax.random.uniform(key, scores.shape, minval=1e-6, maxval=1 - 1e-6)
  if mode == "bernoulli":
    hard = (u < scores).astype(scores.dtype)
    return scores + jax.lax.stop_gradient(hard - scores)
  if mode == "concrete":
    s = jnp.clip(scores, 1e-6, 1 - 1e-6)
    logits = jnp.log(s) - jnp.log1p(-s) + jnp.log(u) - jnp.log1p(-u)
    return jax.nn.sigmoid(logits / temperature)
  raise ValueError(f"unknown sampling mode {mode!r}; choose from {SAMPLING_MODES}")


# ------------------------------------------------------------------------------------------------
# Teacher trajectory.


@dataclasses.dataclass
class Trajectory:
  """The teacher's sampling run as the network saw it.

  Attributes:
    x: (N, B_net, H, W, C) network input per NFE (B_net = 2B under CFG).
    t: (N,) network time per NFE.
    y: (B_net,) labels at the network (None when unconditional).
    delta: (N,) relative change of x_end^orig (entry 0 is 0).
    samples: (B, H, W, C) the teacher's final samples.
  """
  x: np.ndarray
  t: np.ndarray
  y: Optional[np.ndarray]
  delta: np.ndarray
  samples: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class _RecorderPlan:
  """A full-network 'plan' that records each NFE's input and the change of x_end."""

  def bind(self, model, params, nfe_times):
    del nfe_times

    def net(x, t_net, y, nfe_index, cache):
      tokens, ctx = ops.embed(model, params, x, t_net, y)
      x_end, _ = run_blocks(model, params, tokens, ctx)
      out = ops.head(model, params, x_end, ctx)
      diff = jnp.sqrt(jnp.sum((x_end - cache) ** 2, axis=(1, 2)))
      rel = jnp.mean(diff / jnp.maximum(jnp.sqrt(jnp.sum(x_end ** 2, axis=(1, 2))), 1e-12))
      delta = jnp.where(nfe_index > 0, rel, 0.0)
      return out, x_end, {"x": x, "delta": delta}

    def init_cache(x_batch, y=None):
      shape = jax.eval_shape(lambda xx, yy: ops.embed(model, params, xx, jnp.zeros(
          (xx.shape[0],)), yy)[0], jax.ShapeDtypeStruct(x_batch.shape, jnp.float32), y)
      return jnp.zeros(shape.shape, shape.dtype)

    return plan_lib.BoundPlan(net, init_cache, {"plan": "tabm_teacher_recorder"})


# Stateless, so one instance serves every run (and `jaxee.sample` reuses its compilation).
_RECORDER = _RecorderPlan()


def _labels(model, opts: Any, rng) -> Optional[np.ndarray]:
  if model.num_classes <= 0 or opts.labels is None or str(opts.labels).lower() == "none":
    return None
  if isinstance(opts.labels, str):
    if opts.labels != "random":
      labels = [int(v) for v in opts.labels.split(",") if v.strip()]
    else:
      n_real = model.num_classes - (1 if model.family == "uvit" and model.null_class is not None
                                    else 0)
      return np.asarray(jax.random.randint(rng, (opts.num_samples,), 0, n_real), np.int32)
  else:
    labels = [int(v) for v in opts.labels]
  return np.resize(np.asarray(labels, np.int32), opts.num_samples)


def record_teacher(model, params, opts: Any, rng) -> Trajectory:
  """Samples with the full network from Gaussian noise and records every NFE (no data)."""
  k_noise, k_labels, k_sample = jax.random.split(rng, 3)
  size = model.input_size if model.family == "dit" else model.img_size
  channels = model.in_channels if model.family == "dit" else model.in_chans
  x_T = jax.random.normal(k_noise, (opts.num_samples, size, size, channels), jnp.float32)
  labels = _labels(model, opts, k_labels)
  samples, stats = sampling.sample(
      model, params, k_sample, sampler=opts.sampler, steps=opts.steps, labels=labels,
      guidance=opts.guidance, plan=_RECORDER, x_T=x_T, schedule=opts.schedule,
      return_stats=True, **dict(opts.sampler_options))
  guided = opts.guidance is not None and labels is not None
  y = labels
  if guided:
    y = np.concatenate([labels, np.full_like(labels, model.null_class)])
  return Trajectory(x=np.asarray(stats["x"]), t=np.asarray(stats["nfe_times"], np.float32),
                    y=y, delta=np.asarray(stats["delta"], np.float64),
                    samples=np.asarray(samples))
