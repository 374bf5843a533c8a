"""Sampler registry: one name, one jitted `lax.scan`, one host-side list of network times.

The samplers reproduce the originals used by DiT and U-ViT (`research/dit_uvit.md` A6, B6):

| name             | original                                         | schedule              |
|------------------|--------------------------------------------------|-----------------------|
| `ddpm`           | DiT `p_sample_loop` (learned sigma)              | `DiscreteDiffusion`   |
| `ddim`           | DiT `ddim_sample_loop` (eta)                     | `DiscreteDiffusion`   |
| `euler_maruyama` | U-ViT `sde.euler_maruyama(ReverseSDE)`           | `VPSDE`               |
| `euler_ode`      | U-ViT `sde.euler_maruyama(ODE)`                  | `VPSDE`               |
| `dpm_solver`     | U-ViT `dpm_solver_pytorch` fast (noise, logSNR)  | `VPSDE`               |
| `dpm_solver_pp`  | U-ViT `dpm_solver_pp` 'fast' (data, time grid)   | `SDDiscreteSchedule`  |

Every sampler has the signature

    sample(denoise, schedule, rng, x_T=None, *, shape=None, cache=None, **options)
        -> (x_final, cache, stats)

where `denoise(x, t_net, nfe_index, cache) -> (model_out, cache, stats)` follows
`docs/ARCHITECTURE.md`, and `stats` leaves come back with shape (num_nfe,). Its host twin
`nfe_times(schedule, **options)` lists the float32 network times per NFE, in order, so that a plan
can be compiled to per-NFE tables before tracing. Options: `var_type` (ddpm: 'fixed_small' = the
posterior variance β̃ as DuoDiff samples, 'fixed_large' = β, 'learned_range'; default the
schedule's), `eta` and `grid` (ddim: 'dit', DiT's `"ddimN"` chain, or 'duodiff', DuoDiff's
`linspace(0, 999, N).astype(int)` grid, N − 1 NFEs ending at index 0); `steps`, `eps`, `T` (continuous samplers). DDPM/DDIM take their step
count from the respaced schedule.

The stochastic samplers also take `noise=`: the Gaussian draws to use, (draws, B, H, W, C), one
per stochastic update in the order the original takes them, instead of the draws from `rng`;
`num_draws(schedule, **options)` says how many (DDPM: every step, the last masked out; DDIM with
eta > 0: the same; Euler--Maruyama: every step but the last). It is None for the deterministic
samplers.
"""
from typing import Callable, NamedTuple, Optional

from jaxee.diffusion import dpm_solver
from jaxee.diffusion import samplers_discrete
from jaxee.diffusion import samplers_sde


class Sampler(NamedTuple):
  """A registered sampler.

  Attributes:
    name: registry name.
    sample: `sample(denoise, schedule, rng, x_T=None, *, shape=None, cache=None, **options)`.
    nfe_times: `nfe_times(schedule, **options) -> np.ndarray` (float32, network times per NFE).
    num_nfe: `num_nfe(schedule, **options) -> int`.
    schedule: the schedule kind it runs on ('linear_discrete', 'vp_continuous', 'sd_discrete').
    options: the keyword options it takes besides the schedule (`steps` for the continuous
      samplers is passed by `jaxee.sample` itself).
    num_draws: `num_draws(schedule, **options) -> int`, the Gaussian draws a run takes (the
      leading size of `noise=`); None for deterministic samplers (they take no `noise`).
  """
  name: str
  sample: Callable
  nfe_times: Callable
  num_nfe: Callable
  schedule: str
  options: tuple = ()
  num_draws: Optional[Callable] = None


_REGISTRY = {
    "ddpm": Sampler("ddpm", samplers_discrete.ddpm_sample, samplers_discrete.nfe_times,
                    samplers_discrete.num_nfe, "linear_discrete", ("var_type",),
                    samplers_discrete.num_draws_ddpm),
    "ddim": Sampler("ddim", samplers_discrete.ddim_sample, samplers_discrete.nfe_times,
                    samplers_discrete.num_nfe, "linear_discrete", ("eta", "grid"),
                    samplers_discrete.num_draws_ddim),
    "euler_maruyama": Sampler("euler_maruyama", samplers_sde.euler_maruyama_sample,
                              samplers_sde.nfe_times, samplers_sde.num_nfe, "vp_continuous",
                              ("eps", "T"), samplers_sde.num_draws_sde),
    "euler_ode": Sampler("euler_ode", samplers_sde.euler_ode_sample, samplers_sde.nfe_times,
                         samplers_sde.num_nfe, "vp_continuous", ("eps", "T")),
    "dpm_solver": Sampler("dpm_solver", dpm_solver.dpm_solver_sample, dpm_solver.nfe_times_fast,
                          dpm_solver.num_nfe, "vp_continuous", ("eps", "T")),
    "dpm_solver_pp": Sampler("dpm_solver_pp", dpm_solver.dpm_solver_pp_sample,
                             dpm_solver.nfe_times_pp, dpm_solver.num_nfe, "sd_discrete",
                             ("eps", "T")),
}

SAMPLERS = tuple(_REGISTRY)

# Convenience re-exports.
ddpm_sample = samplers_discrete.ddpm_sample
ddim_sample = samplers_discrete.ddim_sample
euler_maruyama_sample = samplers_sde.euler_maruyama_sample
euler_ode_sample = samplers_sde.euler_ode_sample
dpm_solver_sample = dpm_solver.dpm_solver_sample
dpm_solver_pp_sample = dpm_solver.dpm_solver_pp_sample


def get_sampler(name: str) -> Sampler:
  """Returns the registered `Sampler` called `name` (one of `SAMPLERS`)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}") from None


def samplers_for(schedule_kind: str) -> tuple[str, ...]:
  """The samplers that run on a schedule kind."""
  return tuple(n for n, s in _REGISTRY.items() if s.schedule == schedule_kind)


def nfe_times(name: str, schedule, **options):
  """Host-side network times per NFE of sampler `name` (float32)."""
  return get_sampler(name).nfe_times(schedule, **options)
