"""DDPM ancestral and DDIM sampling of DiT as one `lax.scan` each.

Reproduces DiT `diffusion/gaussian_diffusion.py` `p_sample_loop` / `ddim_sample_loop` on a
`SpacedDiffusion` (`research/dit_uvit.md` A6):

* the loop runs over respaced indices i = N-1 ... 0; the network receives the *original* index
  `timestep_map[i]` (as float32);
* DDPM: `x <- mean + 1[i != 0] exp(0.5 log_var) z`, with z drawn at every step, including i = 0
  where it is masked (learned-range variance: `frac = (v + 1) / 2`);
* DDIM (IDDPM eq. 12): eps is re-derived from the predicted x0 before the update,
  `sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)`.

Per-step coefficients are the float64 tables cast to float32 and reordered on the host into the
loop order; the scan reads them as `xs`. The jitted loops take the tables as arguments, so the
lowered program is the same for every step count except for array shapes.
"""
import functools
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.diffusion import gaussian
from jaxee.diffusion import sampler_core
from jaxee.diffusion import schedules

_KEYS = ("t_net", "log_betas", "posterior_log_variance_clipped", "posterior_mean_coef1",
         "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
         "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "fixed_large_variance",
         "fixed_large_log_variance")


def step_tables(diffusion: schedules.DiscreteDiffusion) -> Dict[str, np.ndarray]:
  """Per-step float32 coefficients in loop order (i = N-1 ... 0), plus `step` and `nonzero`.

  Args:
    diffusion: a (respaced) `DiscreteDiffusion`.

  Returns:
    dict of (N,) arrays: every coefficient needed by DDPM/DDIM, `t_net` (original indices),
    `step` (0..N-1, int32) and `nonzero` (1[i != 0], float32).
  """
  order = np.arange(diffusion.num_timesteps)[::-1]
  tables = {k: np.ascontiguousarray(diffusion.tables[k][order]) for k in _KEYS}
  tables["step"] = np.arange(diffusion.num_timesteps, dtype=np.int32)
  tables["nonzero"] = (order != 0).astype(np.float32)
  return tables


def nfe_times(diffusion: schedules.DiscreteDiffusion, **unused) -> np.ndarray:
  """Network times per NFE, in order: `timestep_map[N-1], ..., timestep_map[0]` (float32)."""
  del unused
  return diffusion.timestep_map[::-1].astype(np.float32)


def num_nfe(diffusion: schedules.DiscreteDiffusion, **unused) -> int:
  del unused
  return diffusion.num_timesteps


@functools.partial(jax.jit, static_argnames=("denoise", "var_type"))
def ddpm_loop(denoise, x, rng, cache, tables, var_type: str = "learned_range"):
  """The jitted DDPM scan. `tables` from `step_tables`; returns (x_0, cache, stats)."""

  def body(carry, c):
    x, cache, rng = carry
    out, cache, stats = sampler_core.call_denoiser(denoise, x, c["t_net"], c["step"], cache)
    pmv = gaussian.p_mean_variance(c, out, x, var_type=var_type)
    noise = sampler_core.step_noise(rng, c["step"], x)
    x = gaussian.p_sample_step(pmv, c["nonzero"], noise)
    return (x, cache, rng), stats

  (x, cache, _), stats = jax.lax.scan(body, (x, cache, rng), tables)
  return x, cache, stats


@functools.partial(jax.jit, static_argnames=("denoise", "var_type"))
def ddim_loop(denoise, x, rng, cache, tables, eta, var_type: str = "learned_range"):
  """The jitted DDIM scan. `tables` from `step_tables`; returns (x_0, cache, stats)."""

  def body(carry, c):
    x, cache, rng = carry
    out, cache, stats = sampler_core.call_denoiser(denoise, x, c["t_net"], c["step"], cache)
    pmv = gaussian.p_mean_variance(c, out, x, var_type=var_type)
    noise = sampler_core.step_noise(rng, c["step"], x)
    x = gaussian.ddim_step(c, pmv, x, eta=eta, noise=noise, nonzero=c["nonzero"])
    return (x, cache, rng), stats

  (x, cache, _), stats = jax.lax.scan(body, (x, cache, rng), tables)
  return x, cache, stats


def ddpm_sample(denoise, diffusion: schedules.DiscreteDiffusion, rng, x_T=None, *,
                shape: Optional[Sequence[int]] = None, cache: Any = None):
  """DDPM ancestral sampling (`p_sample_loop`).

  Args:
    denoise: `denoise(x, t_net, nfe_index, cache) -> (out, cache, stats)`; `out` has 2C channels
      (eps, v) for learned-range variance, C otherwise.
    diffusion: the respaced `DiscreteDiffusion` (e.g. `create_dit_diffusion("250")`).
    rng: PRNG key (split into a start key and a loop key; step k uses `fold_in(loop_key, k)`).
    x_T: optional start (B, H, W, C); drawn from `rng` with `shape` when None.
    shape: start shape when `x_T` is None.
    cache: initial cache pytree.

  Returns:
    (x_0, cache, stats) with stats leaves of shape (num_timesteps,).
  """
  x, key = sampler_core.start_state(rng, x_T, shape)
  tables = sampler_core.as_jnp(step_tables(diffusion))
  return ddpm_loop(denoise, x, key, cache, tables, var_type=diffusion.var_type)


def ddim_sample(denoise, diffusion: schedules.DiscreteDiffusion, rng, x_T=None, *,
                eta: float = 0.0, shape: Optional[Sequence[int]] = None, cache: Any = None):
  """DDIM sampling (`ddim_sample_loop`); arguments as `ddpm_sample` plus `eta`.

  Returns:
    (x_0, cache, stats) with stats leaves of shape (num_timesteps,).
  """
  x, key = sampler_core.start_state(rng, x_T, shape)
  tables = sampler_core.as_jnp(step_tables(diffusion))
  return ddim_loop(denoise, x, key, cache, tables, jnp.float32(eta), var_type=diffusion.var_type)
