"""Shared pieces of the samplers: the denoiser call, the start state and per-NFE stats.

The denoiser contract (`docs/ARCHITECTURE.md`) is

    denoise(x, t_net, nfe_index, cache) -> (model_out, cache, stats)

with `t_net` (B,) float32 (the time the *network* receives), `nfe_index` an int32 scalar counting
network evaluations from 0, `cache` any pytree carried through the sampler's `lax.scan`, and
`stats` a dict of float32 scalars that the sampler stacks per NFE.

Every sampler is one jitted function whose per-step tables (times and fp32 coefficients built on
the host) are *arguments*, so the lowered program does not depend on the number of steps other
than through array shapes, and compile time does not grow with it.
"""
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Denoiser = Callable[[jax.Array, jax.Array, jax.Array, Any], Tuple[jax.Array, Any, Any]]


def call_denoiser(denoise: Denoiser, x, t_net, nfe_index, cache):
  """Calls `denoise` with the time broadcast to (B,) float32 and an int32 NFE index.

  Args:
    denoise: the denoiser.
    x: state (B, H, W, C).
    t_net: scalar (or (B,)) network time.
    nfe_index: scalar NFE counter.
    cache: carried pytree.

  Returns:
    (model_out, cache, stats) with every stats leaf a float32 scalar.
  """
  t_vec = jnp.broadcast_to(jnp.asarray(t_net, jnp.float32), (x.shape[0],))
  out, cache, stats = denoise(x, t_vec, jnp.asarray(nfe_index, jnp.int32), cache)
  stats = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), {} if stats is None else stats)
  return out, cache, stats


def first_channels(model_out, x):
  """The first C channels of a model output (drops learned-sigma channels)."""
  return model_out[..., :x.shape[-1]]


def start_state(rng, x_T=None, shape: Optional[Sequence[int]] = None):
  """Splits the key and draws x_T ~ N(0, I) when no start is given.

  Args:
    rng: a PRNG key.
    x_T: optional start (B, H, W, C).
    shape: the start shape when `x_T` is None.

  Returns:
    (x_T float32, loop key).
  """
  k_init, k_loop = jax.random.split(rng)
  if x_T is None:
    if shape is None:
      raise ValueError("give x_T or shape")
    x_T = jax.random.normal(k_init, tuple(shape), jnp.float32)
  return jnp.asarray(x_T, jnp.float32), k_loop


def step_noise(rng, step, x):
  """Standard normal noise for scan step `step` (the step index is folded into the key)."""
  return jax.random.normal(jax.random.fold_in(rng, step), x.shape, x.dtype)


def check_noise(noise, draws: int, x):
  """Given per-step draws as float32 after checking their shape against (draws,) + x.shape.

  Args:
    noise: None, or the Gaussian draws of a stochastic sampler, one per stochastic update.
    draws: how many draws the sampler takes.
    x: the sampler state (B, H, W, C).

  Returns:
    None, or `noise` as a float32 array.
  """
  if noise is None:
    return None
  noise = jnp.asarray(noise, jnp.float32)
  expected = (draws,) + tuple(x.shape)
  if tuple(noise.shape) != expected:
    raise ValueError(f"noise must have shape (draws, B, H, W, C) = {expected}, got "
                     f"{tuple(noise.shape)}")
  return noise


def stack_stats(per_nfe: Sequence[Any]):
  """Stacks a list of per-NFE stats dicts (scalars) into arrays of shape (n,)."""
  return jax.tree.map(lambda *s: jnp.stack(s), *per_nfe)


def flatten_stats(stats):
  """Collapses (steps, nfe_per_step) stats into NFE order (steps * nfe_per_step,)."""
  return jax.tree.map(lambda s: s.reshape(-1), stats)


def concat_stats(parts: Sequence[Any]):
  """Concatenates stats pytrees of (n_i,) arrays in order; skips None parts."""
  parts = [p for p in parts if p is not None]
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *s: jnp.concatenate(s), *parts)


def as_jnp(tables):
  """Host tables (nested dicts/lists of NumPy arrays) as device arrays."""
  return jax.tree.map(jnp.asarray, tables)
