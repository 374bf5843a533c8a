"""DDPM ancestral and DDIM sampling of DiT as one `lax.scan` each.

Reproduces DiT `diffusion/gaussian_diffusion.py` `p_sample_loop` / `ddim_sample_loop` on a
`SpacedDiffusion` (`research/dit_uvit.md` A6):

* the loop runs over respaced indices i = N-1 ... 0; the network receives the *original* index
  `timestep_map[i]` (as float32);
* DDPM: `x <- mean + 1[i != 0] exp(0.5 log_var) z`, with z drawn at every step, including i = 0
  where it is masked (learned-range variance: `frac = (v + 1) / 2`; the `var_type` option picks
  the fixed β̃ / β variances of a model without learned σ, e.g. DuoDiff's U-ViTs: β̃);
* DDIM (IDDPM eq. 12): eps is re-derived from the predicted x0 before the update,
  `sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)`, with z drawn at every
  step as in DDPM (`randn_like` in `ddim_sample`, masked at i = 0).

Both loops take an optional `noise` (N, B, H, W, C): the z of every step in loop order (the last
one is masked out, as in the original), read by the scan as a per-step input instead of the
per-step PRNG draw, so a recorded run of the original replays exactly (`num_draws`).

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


GRIDS = ("dit", "duodiff")


def _stops_at_index_0(grid: str) -> bool:
  """True when the loop ends at the chain's index 0 without the final x0 step (DuoDiff)."""
  if grid not in GRIDS:
    raise ValueError(f"DDIM grid must be one of {GRIDS}, got {grid!r}")
  return grid == "duodiff"


def check_grid(diffusion: schedules.DiscreteDiffusion, grid: str) -> None:
  """Raises unless `diffusion` is respaced as `grid` needs ('duodiff': the linspace grid)."""
  if _stops_at_index_0(grid):
    n = diffusion.num_timesteps
    want = schedules.linspace_timesteps(len(diffusion.base_betas), n) if n >= 2 else None
    if want is None or list(diffusion.timestep_map) != want:
      raise ValueError("grid='duodiff' needs the schedule respaced as 'linspaceN' (DuoDiff's "
                       "linspace(0, 999, N).astype(int)), got timesteps "
                       f"{list(diffusion.timestep_map)[:4]}...")


def nfe_times(diffusion: schedules.DiscreteDiffusion, grid: str = "dit",
              **unused) -> np.ndarray:
  """Network times per NFE, in order: `timestep_map[N-1], ..., timestep_map[0]` (float32);
  with `grid='duodiff'` (DDIM) the last, at index 0, is not evaluated (N - 1 NFEs)."""
  del unused
  times = diffusion.timestep_map[::-1].astype(np.float32)
  return times[:-1] if _stops_at_index_0(grid) else times


def num_nfe(diffusion: schedules.DiscreteDiffusion, grid: str = "dit", **unused) -> int:
  del unused
  return diffusion.num_timesteps - int(_stops_at_index_0(grid))


def num_draws_ddpm(diffusion: schedules.DiscreteDiffusion, **unused) -> int:
  """Gaussian draws of a DDPM run: one per step, the last (i = 0) masked out (`p_sample`)."""
  del unused
  return diffusion.num_timesteps


def num_draws_ddim(diffusion: schedules.DiscreteDiffusion, eta: float = 0.0, grid: str = "dit",
                   **unused) -> int:
  """Gaussian draws of a DDIM run: one per step when eta > 0; 0 when eta = 0 (deterministic)."""
  del unused
  return num_nfe(diffusion, grid) if float(eta) != 0.0 else 0


@functools.partial(jax.jit, static_argnames=("denoise", "var_type"))
def ddpm_loop(denoise, x, rng, cache, tables, var_type: str = "learned_range", noise=None):
  """The jitted DDPM scan. `tables` from `step_tables`; `noise` (N, B, H, W, C) or None (draws
  from `rng`); returns (x_0, cache, stats)."""

  def body(carry, xs):
    c, z = xs
    x, cache, rng = carry
    out, cache, stats = sampler_core.call_denoiser(denoise, x, c["t_net"], c["step"], cache)
    pmv = gaussian.p_mean_variance(c, out, x, var_type=var_type)
    z = sampler_core.step_noise(rng, c["step"], x) if z is None else z
    x = gaussian.p_sample_step(pmv, c["nonzero"], z)
    return (x, cache, rng), stats

  (x, cache, _), stats = jax.lax.scan(body, (x, cache, rng), (tables, noise))
  return x, cache, stats


@functools.partial(jax.jit, static_argnames=("denoise", "var_type"))
def ddim_loop(denoise, x, rng, cache, tables, eta, var_type: str = "learned_range", noise=None):
  """The jitted DDIM scan. `tables` from `step_tables`; `noise` as in `ddpm_loop`; returns
  (x_0, cache, stats)."""

  def body(carry, xs):
    c, z = xs
    x, cache, rng = carry
    out, cache, stats = sampler_core.call_denoiser(denoise, x, c["t_net"], c["step"], cache)
    pmv = gaussian.p_mean_variance(c, out, x, var_type=var_type)
    z = sampler_core.step_noise(rng, c["step"], x) if z is None else z
    x = gaussian.ddim_step(c, pmv, x, eta=eta, noise=z, nonzero=c["nonzero"])
    return (x, cache, rng), stats

  (x, cache, _), stats = jax.lax.scan(body, (x, cache, rng), (tables, noise))
  return x, cache, stats


def check_var_type(var_type: Optional[str], diffusion: schedules.DiscreteDiffusion) -> str:
  """The variance type a run uses: `var_type`, or the schedule's own when None."""
  if var_type is None:
    return diffusion.var_type
  if var_type not in schedules.VAR_TYPES:
    raise ValueError(f"var_type must be one of {schedules.VAR_TYPES}, got {var_type!r}")
  return var_type


def ddpm_sample(denoise, diffusion: schedules.DiscreteDiffusion, rng, x_T=None, *,
                shape: Optional[Sequence[int]] = None, cache: Any = None, noise=None,
                var_type: Optional[str] = None):
  """DDPM ancestral sampling (`p_sample_loop`).

  Args:
    denoise: `denoise(x, t_net, nfe_index, cache) -> (out, cache, stats)`; `out` has 2C channels
      (eps, v) for learned-range variance, C otherwise.
    diffusion: the respaced `DiscreteDiffusion` (e.g. `create_dit_diffusion("250")`).
    rng: PRNG key (split into a start key and a loop key; step k uses `fold_in(loop_key, k)`).
    x_T: optional start (B, H, W, C); drawn from `rng` with `shape` when None.
    shape: start shape when `x_T` is None.
    cache: initial cache pytree.
    noise: optional (num_timesteps, B, H, W, C) standard normal draws, one per step in loop
      order (the original's `randn_like` of `p_sample`; the last is masked out), used instead
      of the per-step draws from `rng`.
    var_type: the variance of p(x_{t-1} | x_t), overriding the schedule's `var_type`:
      'fixed_small' (the posterior variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), DDPM Eq. 7,
      with IDDPM's clipped log variance; DuoDiff's `sampler.py` and `eesampler.py`),
      'fixed_large' (β_t, with β̃_1 at t = 0 as IDDPM; the default of a model without learned σ),
      'learned_range' (DiT, 2C-channel output). None: the schedule's.

  Returns:
    (x_0, cache, stats) with stats leaves of shape (num_timesteps,).
  """
  var_type = check_var_type(var_type, diffusion)
  x, key = sampler_core.start_state(rng, x_T, shape)
  tables = sampler_core.as_jnp(step_tables(diffusion))
  noise = sampler_core.check_noise(noise, num_draws_ddpm(diffusion), x)
  return ddpm_loop(denoise, x, key, cache, tables, var_type=var_type, noise=noise)


def ddim_sample(denoise, diffusion: schedules.DiscreteDiffusion, rng, x_T=None, *,
                eta: float = 0.0, shape: Optional[Sequence[int]] = None, cache: Any = None,
                noise=None, grid: str = "dit"):
  """DDIM sampling (`ddim_sample_loop`); arguments as `ddpm_sample` plus `eta` (`noise`: the
  `randn_like` of every `ddim_sample` step, (num_nfe, B, H, W, C)) and `grid`:

  * 'dit' (default): DiT's loop over every step of the respaced chain (`"ddimN"` for
    `jaxee.sample`), the last from the chain's first kept index to x0;
  * 'duodiff': DuoDiff's `sampler.py` loop on its grid g = `linspace(0, 999, N).astype(int)`
    (the schedule respaced as `"linspaceN"`): the pairs (t, s) = (g[i], g[i-1]) for
    i = N-1 ... 1, i.e. N - 1 NFEs, ending at index 0 (no separate x0 step); the noise of the
    last update (s = 0) is masked as in the original. With eta = 0 this is DuoDiff's
    deterministic DDIM; eta > 0 uses the standard DDIM σ, not DuoDiff's σ² = η·β̃_t quirk.

  Returns:
    (x_0, cache, stats) with stats leaves of shape (num_nfe,).
  """
  check_grid(diffusion, grid)
  x, key = sampler_core.start_state(rng, x_T, shape)
  tables = step_tables(diffusion)
  if _stops_at_index_0(grid):
    tables = {k: v[:-1] for k, v in tables.items()}
    tables["nonzero"] = tables["nonzero"].copy()
    tables["nonzero"][-1] = 0.0   # `z = randn_like(x) if s > 0 else 0`
  tables = sampler_core.as_jnp(tables)
  noise = sampler_core.check_noise(noise, num_nfe(diffusion, grid), x)
  return ddim_loop(denoise, x, key, cache, tables, jnp.float32(eta), var_type=diffusion.var_type,
                   noise=noise)
