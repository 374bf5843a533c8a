"""Euler--Maruyama sampling of U-ViT's VP-SDE (reverse SDE and probability-flow ODE).

Reproduces U-ViT `sde.py` `euler_maruyama(rsde, x_init, sample_steps, eps=1e-3, T=1)` with
`ReverseSDE` / `ODE` around `ScoreModel(nnet, 'noise_pred', VPSDE(0.1, 20))`
(`research/dit_uvit.md` B6):

* grid: float64 `[0] ++ linspace(eps, T, N)` cast to float32, walked from the top over the pairs
  (s, t) = (0.999, 1), ..., (0, 0.001);
* score `= -eps_hat / sqrt(1 - abar(t))` with `eps_hat = nnet(x, 999 t)`;
* reverse SDE drift `f - g^2 score`, ODE drift `f - 0.5 g^2 score`, with `f = -0.5 beta(t) x` and
  `g = beta(t)^0.5`;
* `x <- x + drift (s - t)`, plus `g sqrt(t - s) z` for the SDE unless s == 0 (no noise on the
  last step).

`euler_maruyama_sample` takes an optional `noise` (steps − 1, B, H, W, C): the `randn_like` draw
of every step but the last, in loop order (`num_draws`), read by the scan as a per-step input
instead of the per-step PRNG draw, so a recorded run of the original replays exactly.

The per-step scalars are computed on the host in float32 with the original operation order.
"""
import functools
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.diffusion import sampler_core
from jaxee.diffusion import schedules


def time_grid(steps: int, eps: float = 1e-3, T: float = 1.0) -> np.ndarray:
  """`np.append(0, np.linspace(eps, T, steps))` (float64) cast to float32."""
  return np.append(0.0, np.linspace(eps, T, steps)).astype(np.float32)


def step_tables(sde: schedules.VPSDE, steps: int, eps: float = 1e-3,
                T: float = 1.0) -> Dict[str, np.ndarray]:
  """Per-step float32 scalars in loop order (from the top).

  Args:
    sde: the `VPSDE`.
    steps: number of steps (= NFE).
    eps: smallest non-zero time.
    T: largest time.

  Returns:
    dict of (steps,) arrays: `t_net` (999 t), `beta` (beta(t)), `g2` (g(t)^2),
    `score_scale` (-1/sqrt(1 - abar(t))), `dt` (s - t), `sigma` (g(t) sqrt(-dt)), `noise_mask`
    (1[s != 0]) and `step`.
  """
  grid = time_grid(steps, eps, T)
  s, t = grid[:-1][::-1], grid[1:][::-1]
  beta = sde.beta(t)
  g = beta ** np.float32(0.5)
  dt = (s - t).astype(np.float32)
  tables = {
      "t_net": sde.net_time(t),
      "beta": beta,
      "g2": g ** np.float32(2),
      "score_scale": -(np.float32(1) / np.sqrt(sde.cum_beta(t))),
      "dt": dt,
      "sigma": g * np.sqrt(-dt),
      "noise_mask": (s != 0).astype(np.float32),
      "step": np.arange(steps, dtype=np.int32),
  }
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in tables.items()}


def nfe_times(sde: schedules.VPSDE, steps: int, eps: float = 1e-3, T: float = 1.0,
              **unused) -> np.ndarray:
  """Network times per NFE (999 t, from the top), float32."""
  del unused
  return step_tables(sde, steps, eps, T)["t_net"]


def num_nfe(sde: schedules.VPSDE, steps: int, **unused) -> int:
  del sde, unused
  return steps


def num_draws_sde(sde: schedules.VPSDE, steps: int, **unused) -> int:
  """Gaussian draws of a reverse-SDE run: one per step except the last (s = 0)."""
  del sde, unused
  return steps - 1


@functools.partial(jax.jit, static_argnames=("denoise", "ode"))
def euler_loop(denoise, x, rng, cache, tables, ode: bool, noise=None):
  """The jitted Euler(-Maruyama) scan; returns (x_0, cache, stats).

  `noise`: None (SDE draws from `rng`) or (steps, B, H, W, C) draws, one per step (the last is
  masked out by `noise_mask`).
  """

  def body(carry, xs):
    c, z = xs
    x, cache, rng = carry
    out, cache, stats = sampler_core.call_denoiser(denoise, x, c["t_net"], c["step"], cache)
    score = c["score_scale"] * sampler_core.first_channels(out, x)
    f = -0.5 * (c["beta"] * x)
    drift = f - 0.5 * (c["g2"] * score) if ode else f - c["g2"] * score
    x = x + drift * c["dt"]
    if not ode:
      z = sampler_core.step_noise(rng, c["step"], x) if z is None else z
      x = x + c["noise_mask"] * (c["sigma"] * z)
    return (x, cache, rng), stats

  (x, cache, _), stats = jax.lax.scan(body, (x, cache, rng), (tables, noise))
  return x, cache, stats


def _sample(ode, denoise, sde, rng, x_T, shape, cache, steps, eps, T, noise=None):
  x, key = sampler_core.start_state(rng, x_T, shape)
  tables = sampler_core.as_jnp(step_tables(sde, steps, eps, T))
  noise = sampler_core.check_noise(noise, num_draws_sde(sde, steps), x)
  if noise is not None:  # the last step draws nothing: a zero row, masked out by noise_mask
    noise = jnp.concatenate([noise, jnp.zeros_like(x)[None]])
  return euler_loop(denoise, x, key, cache, tables, ode=ode, noise=noise)


def euler_maruyama_sample(denoise, sde: schedules.VPSDE, rng, x_T=None, *, steps: int = 1000,
                          eps: float = 1e-3, T: float = 1.0,
                          shape: Optional[Sequence[int]] = None, cache: Any = None,
                          noise=None):
  """Reverse-SDE Euler--Maruyama (`sde.euler_maruyama(ReverseSDE(...))`).

  Args:
    denoise: noise-predicting denoiser; receives `t_net = 999 t`.
    sde: the `VPSDE`.
    rng: PRNG key (start key + loop key; step k folds k into the loop key).
    x_T: optional start; drawn with `shape` when None.
    steps: number of steps (= NFE).
    eps: smallest non-zero time of the grid.
    T: top of the grid.
    shape: start shape when `x_T` is None.
    cache: initial cache pytree.
    noise: optional (steps − 1, B, H, W, C) standard normal draws, one per step but the last
      (the original's `randn_like`, in loop order), used instead of the draws from `rng`.

  Returns:
    (x, cache, stats) with stats leaves of shape (steps,).
  """
  return _sample(False, denoise, sde, rng, x_T, shape, cache, steps, eps, T, noise)


def euler_ode_sample(denoise, sde: schedules.VPSDE, rng, x_T=None, *, steps: int = 50,
                     eps: float = 1e-3, T: float = 1.0,
                     shape: Optional[Sequence[int]] = None, cache: Any = None):
  """Probability-flow ODE Euler (`sde.euler_maruyama(ODE(...))`); arguments as above."""
  return _sample(True, denoise, sde, rng, x_T, shape, cache, steps, eps, T)
