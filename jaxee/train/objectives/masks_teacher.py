"""TABM building blocks: the block-masked forward with a block-output cache, random masks, and
the teacher's sampling trajectory (`jaxee/train/objectives/masks.py` has the optimisation).

Everything is written once against the backbone contract (`jaxee/models/backbone.py`) at
`'block'` or `'branch'` granularity (`unit`); no family branches.

* `run_blocks`: every unit in execution order with unit b's value m_b·f_b(state) + (1 − m_b)·
  cache_b (TABM's "x = s·f(x) + (1−s)·cache", `research/ee_methods.md` §4.7, §5.5), applied with
  the contract's `apply`; with binary m it computes exactly what `exits.masks.MaskPlan(
  cache_mode='block_output')` runs at sampling time (a U-ViT in-block's mixed output is also its
  long skip, because `apply` pushes it). This is the training path: every unit is computed and
  then mixed. The cache is the contract's: one (segment.size, B, N, D) array per segment.
* `run_units(..., unit='branch')`: the same at the paper's MHA/MLP granularity (§3.2) with
  per-unit output replacement, unit u's output stream = m_u·f_u + (1 − m_u)·cache_u, the state
  completed by the contract's `settle`; with binary m it computes exactly what
  `exits.masks.MaskPlan(unit='branch', cache_mode='unit_output')` runs. The cache holds each
  unit's output stream (`exits.masks.zeros_output_cache`).
* `sample_gates`: Bernoulli with the straight-through estimator, binary concrete (Gumbel-sigmoid)
  or the relaxed scores themselves.
* `record_teacher`: the full network samples from Gaussian noise through `jaxee.sample` itself,
  with a recording "plan" that stores each NFE's network input and, per sample, ‖x_end,k −
  x_end,k−1‖ and ‖x_end,k‖ of the final block feature (no data needed); `relative_changes`
  turns them into δ (`delta_direction`, below).
* δ direction (paper Eq. 9–10, δ[t] = relative change of the end feature between t and t−1,
  where t counts diffusion time down, so t−1 is the NEXT step executed): 'next' (the paper's
  reading) δ_k = ‖x_end,k − x_end,k+1‖ / ‖x_end,k‖ with NFE k+1 the next executed; the last NFE
  has no next step and takes its only neighbour pair, ‖x_end,N−1 − x_end,N−2‖ / ‖x_end,N−1‖.
  'previous' (jaxee's earlier reading) δ_k = ‖x_end,k − x_end,k−1‖ / ‖x_end,k‖, δ_0 = 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee import sampling
from jaxee.exits import masks as masks_lib
from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib

SAMPLING_MODES = ("bernoulli", "concrete", "relaxed")
DELTA_DIRECTIONS = ("next", "previous")


# ------------------------------------------------------------------------------------------------
# Block-masked forward with a block-output cache (the training path: every block is computed).


def block_backbone(model) -> bb_lib.Backbone:
  """The contract view TABM works on (one unit per transformer block)."""
  return bb_lib.as_backbone(model, "block")


def unit_backbone(model, unit: str = "block") -> bb_lib.Backbone:
  """The contract view at mask granularity `unit` ('block' or 'branch')."""
  return bb_lib.as_backbone(model, unit)


def zeros_unit_cache(model, params, x_shape, y=None, unit: str = "block"):
  """The empty cache of `run_units` at `unit` granularity (block values / unit output streams)."""
  bb = unit_backbone(model, unit)
  if unit == "block":
    return bb_lib.zeros_cache(bb, params, x_shape, y)
  return masks_lib.zeros_output_cache(bb, params, x_shape, y)


def run_units(model, params, state, gates=None, cache=None, unit: str = "block"):
  """`run_blocks` at either granularity; 'branch' mixes unit output streams (module docstring).

  At 'branch' the cache is required even without `gates` (it gives the output shapes).
  """
  if unit == "block":
    return run_blocks(model, params, state, gates, cache)
  bb = unit_backbone(model, unit)
  if cache is None:
    raise ValueError("run_units at 'branch' granularity needs a cache (zeros_unit_cache)")

  def one(ref, carry):
    st, outs = carry
    st = bb.enter(params, ref, st)
    out = masks_lib.computed_output(bb, params, ref, st)
    if gates is not None:
      g = gates[ref.index].astype(out.dtype)
      out = g * out + (1 - g) * bb_lib.cache_get(bb, cache, ref)
    outs = bb_lib.cache_set(bb, outs, ref, out)
    return bb.settle(params, ref, st, out), outs

  return bb_lib.for_units(bb, (state, tuple(cache)), one)


def run_blocks(model, params, state, gates=None, cache=None):
  """All units in execution order, optionally mixed with a cache.

  Args:
    model: a backbone module (or a `Backbone`, viewed at 'block' granularity).
    params: backbone params.
    state: `bb.embed(params, x, t, y)`.
    gates: (L,) mixing weights m (1 = compute), or None for the plain full network.
    cache: per-segment cached unit values (the contract's cache; required with `gates`).

  Returns:
    (final state — `state['h']` is x_end, `bb.head(params, state)` the output —, per-segment
    unit values after mixing: the next cache).
  """
  bb = block_backbone(model)
  if gates is None:
    return bb_lib.collect_values(bb, params, state)

  def unit(ref, carry):
    st, values = carry
    st = bb.enter(params, ref, st)
    new = bb.compute(params, ref, st)
    g = gates[ref.index].astype(new.dtype)
    value = g * new + (1 - g) * bb_lib.cache_get(bb, cache, ref)
    values = bb_lib.cache_set(bb, values, ref, value)
    return bb.apply(params, ref, st, value), values

  return bb_lib.for_units(bb, (state, tuple(cache)), unit)


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
    delta: (N,) relative change of x_end^orig in the options' `delta_direction`.
    samples: (B, H, W, C) the teacher's final samples.
  """
  x: np.ndarray
  t: np.ndarray
  y: Optional[np.ndarray]
  delta: np.ndarray
  samples: np.ndarray


@plan_lib.pytree_plan()
class _RecorderPlan:
  """A full-network 'plan' that records each NFE's input and the change of x_end (no leaves)."""

  def check(self, model, nfe_times):
    del model
    plan_lib.check_nfe_times(nfe_times)

  def bind(self, model, params, nfe_times):
    del nfe_times
    bb = block_backbone(model)

    def net(x, t_net, y, nfe_index, cache):
      state = bb_lib.run_all(bb, params, bb.embed(params, x, t_net, y))
      x_end = bb.final_feature(state)
      out = bb.head(params, state)
      axes = tuple(range(1, x_end.ndim))
      diff = jnp.sqrt(jnp.sum((x_end - cache) ** 2, axis=axes))
      diff = jnp.where(nfe_index > 0, diff, 0.0)
      norm = jnp.sqrt(jnp.sum(x_end ** 2, axis=axes))
      return out, x_end, {"x": x, "diff": diff, "norm": norm}

    def init_cache(x_batch, y=None):
      shape = jax.eval_shape(
          lambda xx, yy: bb.final_feature(
              bb.embed(params, xx, jnp.zeros((xx.shape[0],)), yy)),
          jax.ShapeDtypeStruct(jnp.shape(x_batch), jnp.float32), y)
      return jnp.zeros(shape.shape, shape.dtype)

    return plan_lib.BoundPlan(net, init_cache, {"plan": "tabm_teacher_recorder"})


# Stateless (an empty pytree), so every instance shares one compiled sampler.
_RECORDER = _RecorderPlan()


def num_real_classes(model) -> int:
  """Labels a random draw may use: the label table minus a null row stored inside it.

  DiT keeps its null class at index `num_classes` (outside the table: all `num_classes` labels are
  real); U-ViT presets with CFG store it as the table's last row (`num_classes − 1` real labels).
  """
  null = model.null_class
  return model.num_classes - (1 if null is not None and null < model.num_classes else 0)


def _labels(model, opts: Any, rng) -> Optional[np.ndarray]:
  if model.num_classes <= 0 or opts.labels is None or str(opts.labels).lower() == "none":
    return None
  if isinstance(opts.labels, str):
    if opts.labels != "random":
      labels = [int(v) for v in opts.labels.split(",") if v.strip()]
    else:
      return np.asarray(jax.random.randint(rng, (opts.num_samples,), 0, num_real_classes(model)),
                        np.int32)
  else:
    labels = [int(v) for v in opts.labels]
  return np.resize(np.asarray(labels, np.int32), opts.num_samples)


def relative_changes(diff, norm, direction: str) -> np.ndarray:
  """δ per NFE (batch mean) from per-sample ‖x_end,k − x_end,k−1‖ (`diff`, row 0 unused) and
  ‖x_end,k‖ (`norm`), both (N, B); see the module docstring for the two directions."""
  if direction not in DELTA_DIRECTIONS:
    raise ValueError(f"delta_direction {direction!r} unknown; choose from {DELTA_DIRECTIONS}")
  diff, norm = np.asarray(diff, np.float64), np.maximum(np.asarray(norm, np.float64), 1e-12)
  n = diff.shape[0]
  delta = np.zeros(n, np.float64)
  if n < 2:
    return delta
  if direction == "previous":
    delta[1:] = np.mean(diff[1:] / norm[1:], axis=1)
  else:
    delta[:-1] = np.mean(diff[1:] / norm[:-1], axis=1)
    delta[-1] = np.mean(diff[-1] / norm[-1])   # no next step: the last pair, seen from N−1
  return delta


def feature_deltas(features, direction: str) -> np.ndarray:
  """δ per NFE from a (N, B, ...) sequence of end features (host; `relative_changes`)."""
  f = np.asarray(features, np.float64).reshape(np.shape(features)[0], np.shape(features)[1], -1)
  diff = np.zeros(f.shape[:2])
  diff[1:] = np.sqrt(np.sum((f[1:] - f[:-1]) ** 2, axis=2))
  return relative_changes(diff, np.sqrt(np.sum(f ** 2, axis=2)), direction)


def record_teacher(model, params, opts: Any, rng) -> Trajectory:
  """Samples with the full network from Gaussian noise and records every NFE (no data).

  δ follows `opts.delta_direction` ('next' | 'previous').
  """
  k_noise, k_labels, k_sample = jax.random.split(rng, 3)
  shape = tuple(block_backbone(model).input_shape)
  x_T = jax.random.normal(k_noise, (opts.num_samples,) + shape, jnp.float32)
  labels = _labels(model, opts, k_labels)
  guided = opts.guidance is not None and labels is not None
  samples, stats = sampling.sample(
      model, params, k_sample, sampler=opts.sampler, steps=opts.steps, labels=labels,
      guidance=opts.guidance if guided else None, plan=_RECORDER, x_T=x_T, schedule=opts.schedule,
      return_stats=True, **dict(opts.sampler_options))
  y = labels
  if guided:
    y = np.concatenate([labels, np.full_like(labels, model.null_class)])
  return Trajectory(x=np.asarray(stats["x"]), t=np.asarray(stats["nfe_times"], np.float32),
                    y=y, delta=relative_changes(stats["diff"], stats["norm"],
                                                opts.delta_direction),
                    samples=np.asarray(samples))
