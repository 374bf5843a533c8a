"""Noise schedules of DiT and U-ViT, built on the host.

Reproduces, from their descriptions in `research/dit_uvit.md` (A6, B5):

* DiT `diffusion/gaussian_diffusion.py` + `respace.py` (after OpenAI IDDPM): linear betas
  `linspace(1e-4, 0.02, 1000)` in float64, `space_timesteps`, and the `SpacedDiffusion` tables
  (betas re-derived as `1 - abar_i / abar_prev` over the kept steps). Tables are float64 NumPy and
  are cast to float32 *before* they are gathered, which is what `_extract_into_tensor` does.
* U-ViT `sde.py` `VPSDE(0.1, 20)` and `dpm_solver_pytorch.NoiseScheduleVP('linear')`:
  `log alpha_t = -0.25 t^2 (b1 - b0) - 0.5 t b0`, `sigma_t`, `lambda_t` and the closed-form
  inverse of `lambda`. The network receives `999 t`.
* U-ViT `dpm_solver_pp.NoiseScheduleVP('discrete')` with the Stable-Diffusion betas
  `linspace(sqrt(0.00085), sqrt(0.012), 1000)^2`: an fp32 `0.5 cumsum log(1 - beta)` table on the
  fp32 grid `linspace(1/1000, 1, 1000)`, piecewise-linear interpolation with linear extrapolation
  (`interpolate_fn`). The network receives `1000 t`.

Continuous-schedule methods are written once for NumPy and `jax.numpy` (`xp` is picked from the
argument), so the samplers can build their per-step tables on the host in float32 with the
originals' operation order and the training losses can call the same formulas on device.
"""
import dataclasses
from typing import Any, Dict, Iterable, List, Union

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
  """Returns `jnp` for JAX arrays/tracers and `np` otherwise."""
  return jnp if isinstance(x, jax.Array) else np


def _f32(x):
  """Casts to float32, keeping NumPy inputs on the host."""
  return x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps)` in float32 (CPU kernel formula).

  The kernel computes `step = (end - start) / (steps - 1)` in float32 and fills the first half
  as `start + step * i` and the second half as `end - step * (steps - 1 - i)`.

  Args:
    start: first value (rounded to float32).
    end: last value (rounded to float32).
    steps: number of points.

  Returns:
    A float32 array of `steps` points.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  idx = np.arange(steps)
  halfway = steps // 2
  lo = start32 + step * idx.astype(np.float32)
  hi = end32 - step * (steps - 1 - idx).astype(np.float32)
  return np.where(idx < halfway, lo, hi).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# DiT discrete diffusion (IDDPM tables).


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
  """DiT/IDDPM 'linear' betas, scaled by 1000/num_steps, in float64."""
  scale = 1000 / num_steps
  return np.linspace(start * scale, end * scale, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> List[int]:
  """Kept steps of a respaced chain, as IDDPM `respace.space_timesteps`.

  Args:
    num_timesteps: length of the original chain (1000).
    section_counts: `"ddimN"` (the smallest integer stride giving N steps), `"linspaceN"`
      (DuoDiff's DDIM grid `np.linspace(0, num_timesteps - 1, N).astype(int)`: float64 points,
      truncated toward zero), a comma-separated
      string of per-section counts (e.g. `"250"` or `"10,15,20"`), or a list of counts. Each
      section of the chain keeps `round(cur)` with `cur` stepping by `(size-1)/(count-1)`
      (Python `round`: half to even).

  Returns:
    The kept original indices, sorted ascending (the original returns them as a set).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    if section_counts.startswith("linspace"):
      return linspace_timesteps(num_timesteps, int(section_counts[len("linspace"):]))
    section_counts = [int(x) for x in section_counts.split(",")]
  section_counts = list(section_counts)
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  kept = set()
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide section of {size} steps into {count}")
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.add(start_idx + round(cur))
      cur += frac_stride
    start_idx += size
  return sorted(kept)


def linspace_timesteps(num_timesteps: int, count: int) -> List[int]:
  """DuoDiff's DDIM grid (`sampler.py`): `np.linspace(0, T - 1, count).astype(int)`, ascending.

  The points are float64 and truncated toward zero (`astype(int)`); the original walks them in
  reverse and stops at index 0 (see `samplers_discrete.ddim_sample`, `grid='duodiff'`).

  Args:
    num_timesteps: length of the original chain T (1000).
    count: number of grid points N, 2 <= N <= T (the points are then distinct).

  Returns:
    The N kept original indices, sorted ascending (first 0, last T - 1).
  """
  if not 2 <= count <= num_timesteps:
    raise ValueError(f"the linspace grid needs 2 <= N <= {num_timesteps} points, got {count}")
  return [int(v) for v in np.linspace(0, num_timesteps - 1, count).astype(int)]


VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


class DiscreteDiffusion:
  """DiT `SpacedDiffusion` (epsilon prediction) as float64 host tables.

  Attributes:
    betas: respaced betas (float64), `1 - abar_i / abar_prev` over the kept steps.
    timestep_map: kept original indices (int64); the network receives `timestep_map[i]`.
    num_timesteps: length of the respaced chain.
    var_type: 'learned_range' (DiT), 'fixed_large' or 'fixed_small'.
    tables64: every coefficient table in float64.
    tables: the same tables cast to float32 (what the originals gather), plus `t_net`.
  """

  def __init__(self, base_betas: np.ndarray, use_timesteps: Iterable[int] = None,
               var_type: str = "learned_range"):
    if var_type not in VAR_TYPES:
      raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
    base_betas = np.asarray(base_betas, np.float64)
    if use_timesteps is None:
      use_timesteps = range(len(base_betas))
    keep = sorted(set(int(i) for i in use_timesteps))
    base_abar = np.cumprod(1.0 - base_betas)
    new_betas, last = [], 1.0
    for i in keep:
      new_betas.append(1.0 - base_abar[i] / last)
      last = base_abar[i]
    self.base_betas = base_betas
    self.timestep_map = np.asarray(keep, np.int64)
    self.betas = np.asarray(new_betas, np.float64)
    self.num_timesteps = len(keep)
    self.var_type = var_type
    self.tables64 = _iddpm_tables(self.betas)
    self.tables = {k: v.astype(np.float32) for k, v in self.tables64.items()}
    self.tables["t_net"] = self.timestep_map.astype(np.float32)

  @property
  def learn_sigma(self) -> bool:
    return self.var_type == "learned_range"

  def __repr__(self):
    return (f"DiscreteDiffusion(num_timesteps={self.num_timesteps}, var_type={self.var_type!r}, "
            f"original_steps={len(self.base_betas)})")

  def respace(self, spec: Union[str, Iterable[int]]) -> "DiscreteDiffusion":
    """A respaced copy of the *original* chain (`spec` as in `space_timesteps`)."""
    keep = space_timesteps(len(self.base_betas), spec)
    return DiscreteDiffusion(self.base_betas, keep, self.var_type)

  def at(self, t) -> Dict[str, jax.Array]:
    """Float32 coefficients gathered at respaced indices `t` (int array, any shape)."""
    t = jnp.asarray(t, jnp.int32)
    return {k: jnp.asarray(v)[t] for k, v in self.tables.items()}


def _iddpm_tables(betas: np.ndarray) -> Dict[str, np.ndarray]:
  """IDDPM `GaussianDiffusion.__init__` tables (float64) for the given betas."""
  alphas = 1.0 - betas
  abar = np.cumprod(alphas, axis=0)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(
      np.maximum(post_var, 1e-20))
  large_var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas.copy()
  return {
      "betas": betas,
      "log_betas": np.log(betas),
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "sqrt_alphas_cumprod": np.sqrt(abar),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
      "posterior_variance": post_var,
      "posterior_log_variance_clipped": post_logvar,
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
      "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
      "fixed_large_variance": large_var,
      "fixed_large_log_variance": np.log(large_var),
  }


def create_dit_diffusion(timestep_respacing: Union[str, Iterable[int], None] = "",
                         learn_sigma: bool = True, sigma_small: bool = False,
                         diffusion_steps: int = 1000) -> DiscreteDiffusion:
  """DiT `create_diffusion` (linear betas, epsilon prediction).

  Args:
    timestep_respacing: `""`/None (all steps), `"250"`, `"ddim50"`, ... (`space_timesteps`).
    learn_sigma: learned-range variance (8-channel model output) when True.
    sigma_small: with `learn_sigma=False`, fixed-small instead of fixed-large variance.
    diffusion_steps: length of the original chain.

  Returns:
    A `DiscreteDiffusion`.
  """
  betas = linear_betas(diffusion_steps)
  if not timestep_respacing:
    timestep_respacing = [diffusion_steps]
  keep = space_timesteps(diffusion_steps, timestep_respacing)
  var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
  return DiscreteDiffusion(betas, keep, var_type)


# ------------------------------------------------------------------------------------------------
# U-ViT continuous VP-SDE.


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """Linear VP-SDE of U-ViT (`sde.VPSDE`, `dpm_solver_pytorch.NoiseScheduleVP('linear')`).

  All methods take float32 NumPy or JAX arrays and follow the originals' fp32 operation order.
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  T: float = 1.0
  time_scale: float = 999.0  # `ScoreModel.predict`: nnet(x, 999 t).

  def net_time(self, t):
    """The time the network receives: `999 t` (fp32)."""
    return _f32(t) * np.float32(self.time_scale)

  # sde.py formulas (Euler--Maruyama, LSimple).
  def beta(self, t):
    """`squared_diffusion(t) = b0 + t (b1 - b0)`."""
    return self.beta_min + _f32(t) * (self.beta_max - self.beta_min)

  def integral_beta(self, t):
    """`int_0^t beta = b0 t + (b1 - b0) t^2 / 2`."""
    t = _f32(t)
    return self.beta_min * t + (self.beta_max - self.beta_min) * (t ** 2) * 0.5

  def cum_alpha(self, t):
    """`abar(t) = exp(-int_0^t beta)`."""
    return _xp(t).exp(-self.integral_beta(t))

  def cum_beta(self, t):
    """`1 - abar(t)`."""
    return 1.0 - self.cum_alpha(t)

  # NoiseScheduleVP('linear') formulas (DPM-Solver).
  def marginal_log_mean_coeff(self, t):
    """`log alpha_t = -0.25 t^2 (b1 - b0) - 0.5 t b0`."""
    t = _f32(t)
    return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def marginal_alpha(self, t):
    return _xp(t).exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    xp = _xp(t)
    return xp.sqrt(1.0 - xp.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    """`lambda_t = log alpha_t - log sigma_t`."""
    xp = _xp(t)
    lmc = self.marginal_log_mean_coeff(t)
    log_std = 0.5 * xp.log(1.0 - xp.exp(2.0 * lmc))
    return lmc - log_std

  def inverse_lambda(self, lamb):
    """Closed-form inverse of `marginal_lambda`."""
    xp = _xp(lamb)
    lamb = _f32(lamb)
    db = self.beta_max - self.beta_min
    tmp = 2.0 * db * xp.logaddexp(-2.0 * lamb, _f32(xp.zeros_like(lamb)))
    delta = self.beta_min ** 2 + tmp
    return tmp / (xp.sqrt(delta) + self.beta_min) / db


# ------------------------------------------------------------------------------------------------
# U-ViT discrete Stable-Diffusion schedule.


def sd_betas(linear_start: float = 0.00085, linear_end: float = 0.012,
             n_timestep: int = 1000) -> np.ndarray:
  """`stable_diffusion_beta_schedule`: `linspace(sqrt(start), sqrt(end), n)^2` in float64."""
  return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2


def interpolate_fn(x, xp_, yp):
  """Piecewise-linear interpolation with linear extrapolation (`dpm_solver_pp.interpolate_fn`).

  Args:
    x: query points, any shape.
    xp_: increasing 1-D knots (K >= 2).
    yp: values at the knots.

  Returns:
    Interpolated values with the shape of `x`; outside the knots the first/last segment is
    extended.
  """
  xp = _xp(x)
  k = xp_.shape[0]
  idx = xp.searchsorted(xp_, x, side="left")
  start = xp.clip(idx - 1, 0, k - 2)
  sx, ex = xp_[start], xp_[start + 1]
  sy, ey = yp[start], yp[start + 1]
  return sy + (x - sx) * (ey - sy) / (ex - sx)


class SDDiscreteSchedule:
  """U-ViT discrete schedule: SD betas for training, fp32 interpolated `log alpha` for sampling.

  Attributes:
    betas: float64 SD betas (1000).
    cum_alphas: float64 `[1, prod_{i<=n}(1 - beta_i)]` (index n = 0..1000, training `Schedule`).
    t_discrete: float32 `torch.linspace(1/N, 1, N)`.
    log_alpha_discrete: float32 `0.5 cumsum(log(1 - beta_fp32))`.
  """

  def __init__(self, betas: np.ndarray = None, time_scale: float = 1000.0):
    betas = sd_betas() if betas is None else np.asarray(betas, np.float64)
    self.betas = betas
    self.num_timesteps = len(betas)
    self.time_scale = time_scale
    self.T = 1.0
    self.cum_alphas = np.cumprod(np.append(1.0, 1.0 - betas))
    self.cum_betas = 1.0 - self.cum_alphas
    betas32 = betas.astype(np.float32)
    self.log_alpha_discrete = (np.float32(0.5) * np.cumsum(
        np.log(np.float32(1.0) - betas32), dtype=np.float32)).astype(np.float32)
    self.t_discrete = torch_linspace_f32(1.0 / self.num_timesteps, 1.0, self.num_timesteps)

  def __repr__(self):
    return f"SDDiscreteSchedule(num_timesteps={self.num_timesteps})"

  def net_time(self, t):
    """The time the network receives: `1000 t` (fp32)."""
    return _f32(t) * np.float32(self.time_scale)

  def _tables(self, like):
    if _xp(like) is jnp:
      return jnp.asarray(self.t_discrete), jnp.asarray(self.log_alpha_discrete)
    return self.t_discrete, self.log_alpha_discrete

  def marginal_log_mean_coeff(self, t):
    t = _f32(t)
    td, la = self._tables(t)
    return interpolate_fn(t, td, la)

  def marginal_alpha(self, t):
    return _xp(t).exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    xp = _xp(t)
    return xp.sqrt(1.0 - xp.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    xp = _xp(t)
    lmc = self.marginal_log_mean_coeff(t)
    return lmc - 0.5 * xp.log(1.0 - xp.exp(2.0 * lmc))

  def inverse_lambda(self, lamb):
    """`log alpha = -0.5 logaddexp(0, -2 lambda)`, then interpolate on the flipped table."""
    xp = _xp(lamb)
    lamb = _f32(lamb)
    log_alpha = -0.5 * xp.logaddexp(_f32(xp.zeros_like(lamb)), -2.0 * lamb)
    td, la = self._tables(lamb)
    return interpolate_fn(log_alpha, xp.flip(la), xp.flip(td))


Schedule = Any  # DiscreteDiffusion | VPSDE | SDDiscreteSchedule


def vp_continuous() -> VPSDE:
  """U-ViT's continuous schedule (`VPSDE(beta_min=0.1, beta_max=20)`)."""
  return VPSDE()


def sd_discrete() -> SDDiscreteSchedule:
  """U-ViT's discrete Stable-Diffusion schedule."""
  return SDDiscreteSchedule()


def get_schedule(name: str, **kwargs) -> Schedule:
  """`'linear_discrete'` (DiT), `'vp_continuous'` or `'sd_discrete'` (U-ViT)."""
  if name == "linear_discrete":
    return create_dit_diffusion(**kwargs)
  if name == "vp_continuous":
    return VPSDE(**kwargs)
  if name == "sd_discrete":
    return SDDiscreteSchedule(**kwargs)
  raise ValueError(f"unknown schedule {name!r}")

