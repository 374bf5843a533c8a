"""Gaussian diffusion math: forward process, posterior, learned sigma, VLB and training losses.

Reproduces DiT `diffusion/gaussian_diffusion.py` and `diffusion/diffusion_utils.py` (after OpenAI
IDDPM) as described in `research/dit_uvit.md` A6:

* `q_sample`: `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`;
* `q_posterior_mean_variance`: `mean = coef1 x0 + coef2 x_t` (IDDPM eq. 10-11);
* learned-range variance: `log var = frac log(beta_t) + (1 - frac) log(post_var_clipped)`,
  `frac = (v + 1) / 2` (IDDPM eq. 15);
* `normal_kl`, the discretized Gaussian decoder likelihood (tanh CDF approximation, bins of
  1/255, edges at +-0.999, clamped at 1e-12) and the VLB term in bits;
* `training_losses`: the hybrid `mse + vb` loss with a stop-gradient on the predicted mean;
* the plain epsilon-MSE losses of U-ViT (`sde.LSimple` with net time 999 t, and the discrete SD
  `LSimple` with integer n in 1..1000).

Coefficients are float32 values gathered from the float64 tables (`DiscreteDiffusion.at`), so
every per-step formula runs in fp32 exactly as in the original. All images are NHWC (channels
last); the formulas themselves are layout-agnostic except for the channel split of learned sigma.
"""
import math
from typing import Callable, Dict, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.diffusion import schedules

Coefs = Mapping[str, jax.Array]
ModelOut = Union[jax.Array, Callable[[jax.Array, jax.Array], jax.Array]]


def bcast(c, x):
  """Broadcasts a per-sample coefficient (B,) or scalar () against `x` (B, ...)."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def mean_flat(x):
  """Mean over all non-batch axes."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _coefs(diffusion_or_coefs, t) -> Coefs:
  if isinstance(diffusion_or_coefs, schedules.DiscreteDiffusion):
    return diffusion_or_coefs.at(t)
  return diffusion_or_coefs


def split_learned_sigma(model_out, channels: int):
  """Splits a (…, 2C) learned-sigma output into (eps, v); passes a C-channel output through."""
  if model_out.shape[-1] == 2 * channels:
    return model_out[..., :channels], model_out[..., channels:]
  if model_out.shape[-1] != channels:
    raise ValueError(f"model output has {model_out.shape[-1]} channels, expected {channels} "
                     f"or {2 * channels}")
  return model_out, None


def q_sample(diffusion, x0, t, noise):
  """Forward process sample `x_t` for respaced indices `t` (B,)."""
  c = _coefs(diffusion, t)
  return bcast(c["sqrt_alphas_cumprod"], x0) * x0 + bcast(
      c["sqrt_one_minus_alphas_cumprod"], x0) * noise


def q_posterior_mean_variance(diffusion, x0, x_t, t=None):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  c = _coefs(diffusion, t)
  mean = bcast(c["posterior_mean_coef1"], x_t) * x0 + bcast(c["posterior_mean_coef2"], x_t) * x_t
  var = bcast(c["posterior_variance"], x_t) * jnp.ones_like(x_t)
  logvar = bcast(c["posterior_log_variance_clipped"], x_t) * jnp.ones_like(x_t)
  return mean, var, logvar


def predict_xstart_from_eps(diffusion, x_t, eps, t=None):
  """`x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps`."""
  c = _coefs(diffusion, t)
  return (bcast(c["sqrt_recip_alphas_cumprod"], x_t) * x_t
          - bcast(c["sqrt_recipm1_alphas_cumprod"], x_t) * eps)


def predict_eps_from_xstart(diffusion, x_t, x0, t=None):
  """`eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)` (DDIM re-derivation)."""
  c = _coefs(diffusion, t)
  return ((bcast(c["sqrt_recip_alphas_cumprod"], x_t) * x_t - x0)
          / bcast(c["sqrt_recipm1_alphas_cumprod"], x_t))


def model_log_variance(coefs: Coefs, v, x, var_type: str):
  """Log-variance and variance of p(x_{t-1} | x_t).

  Args:
    coefs: gathered float32 coefficients (`DiscreteDiffusion.at`).
    v: the variance channels of the model output (learned range) or None.
    x: the current state (for the broadcast shape).
    var_type: 'learned_range', 'fixed_large' or 'fixed_small'.

  Returns:
    (variance, log_variance), both shaped like `x`.
  """
  if var_type == "learned_range":
    min_log = bcast(coefs["posterior_log_variance_clipped"], x)
    max_log = bcast(coefs["log_betas"], x)
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return jnp.exp(log_var), log_var
  if var_type == "fixed_large":
    var, log_var = coefs["fixed_large_variance"], coefs["fixed_large_log_variance"]
  elif var_type == "fixed_small":
    var, log_var = coefs["posterior_variance"], coefs["posterior_log_variance_clipped"]
  else:
    raise ValueError(f"unknown var_type {var_type!r}")
  ones = jnp.ones_like(x)
  return bcast(var, x) * ones, bcast(log_var, x) * ones


def p_mean_variance(diffusion, model_out, x, t=None, *, var_type: str = None,
                    clip_denoised: bool = False) -> Dict[str, jax.Array]:
  """IDDPM `p_mean_variance` for an epsilon-predicting model.

  Args:
    diffusion: a `DiscreteDiffusion` (then `t` are respaced indices (B,)) or already gathered
      coefficients (then `t` is ignored and `var_type` is required).
    model_out: (B, H, W, C) or (B, H, W, 2C) with learned sigma (eps then v).
    x: x_t, (B, H, W, C).
    t: respaced indices (B,) when `diffusion` is a `DiscreteDiffusion`.
    var_type: variance type; defaults to `diffusion.var_type`.
    clip_denoised: clamp x0 to [-1, 1] (False in DiT's sampling scripts).

  Returns:
    dict with `mean`, `variance`, `log_variance`, `pred_xstart`, `eps`.
  """
  if var_type is None:
    var_type = diffusion.var_type
  c = _coefs(diffusion, t)
  eps, v = split_learned_sigma(model_out, x.shape[-1])
  if var_type == "learned_range" and v is None:
    raise ValueError("learned_range variance needs a 2C-channel model output")
  var, log_var = model_log_variance(c, v, x, var_type)
  x0 = predict_xstart_from_eps(c, x, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1, 1)
  mean, _, _ = q_posterior_mean_variance(c, x0, x)
  return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0, "eps": eps}


def p_sample_step(out: Mapping[str, jax.Array], nonzero, noise):
  """DDPM ancestral update `mean + 1[t != 0] exp(0.5 log_var) noise`."""
  return out["mean"] + bcast(nonzero, noise) * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(diffusion, out: Mapping[str, jax.Array], x, t=None, *, eta: float = 0.0,
              noise=None, nonzero=None):
  """One IDDPM `ddim_sample` update from a `p_mean_variance` result.

  Args:
    diffusion: `DiscreteDiffusion` (with respaced `t` (B,)) or gathered coefficients.
    out: `p_mean_variance` output at (x, t).
    x: x_t.
    t: respaced indices when `diffusion` is a `DiscreteDiffusion`.
    eta: DDIM eta.
    noise: standard normal noise shaped like x (zeros when None).
    nonzero: 1[t != 0] (B,) or scalar; derived from `t` when None.

  Returns:
    x_{t-1}.
  """
  c = _coefs(diffusion, t)
  if nonzero is None:
    nonzero = (jnp.asarray(t) != 0).astype(x.dtype)
  if noise is None:
    noise = jnp.zeros_like(x)
  x0 = out["pred_xstart"]
  eps = predict_eps_from_xstart(c, x, x0)
  abar = bcast(c["alphas_cumprod"], x)
  abar_prev = bcast(c["alphas_cumprod_prev"], x)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = x0 * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
  return mean + bcast(nonzero, x) * sigma * noise


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Tanh approximation of the standard normal CDF."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of x in [-1, 1] under a Gaussian discretized into 1/255 bins (nats)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion, model_out, x0, x_t, t):
  """IDDPM `_vb_terms_bpd` (clip_denoised=False): KL for t > 0, decoder NLL at t = 0, in bits.

  Args:
    diffusion: `DiscreteDiffusion`.
    model_out: (B, H, W, 2C) output (the caller applies any stop-gradient).
    x0: clean data.
    x_t: noised data.
    t: respaced indices (B,).

  Returns:
    (B,) float32 bits per dimension.
  """
  c = diffusion.at(t)
  true_mean, _, true_logvar = q_posterior_mean_variance(c, x0, x_t)
  out = p_mean_variance(c, model_out, x_t, var_type=diffusion.var_type)
  kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / math.log(
      2.0)
  nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
  nll = mean_flat(nll) / math.log(2.0)
  return jnp.where(jnp.asarray(t) == 0, nll, kl)


def _call_model(model: ModelOut, x_t, t_net):
  return model(x_t, t_net) if callable(model) else model


def training_losses(diffusion: schedules.DiscreteDiffusion, model: ModelOut, x0, t,
                    noise) -> Dict[str, jax.Array]:
  """DiT's hybrid loss (`LossType.MSE` with learned-range sigma): per-sample mse, vb and loss.

  Args:
    diffusion: the training `DiscreteDiffusion` (usually the full 1000-step chain).
    model: the model output at `x_t` (an array, (B, H, W, 2C) or (B, H, W, C)), or a callable
      `model(x_t, t_net) -> output` where `t_net` = `timestep_map[t]` as float32.
    x0: clean latents (B, H, W, C).
    t: respaced indices (B,) int.
    noise: standard normal noise shaped like x0.

  Returns:
    dict of (B,) arrays: `mse`, `vb` (zeros without learned sigma) and `loss = mse + vb`, plus
    `x_t`. Average them with any per-sample weight (e.g. `jnp.mean(w * out['loss'])`).
  """
  t = jnp.asarray(t, jnp.int32)
  x_t = q_sample(diffusion, x0, t, noise)
  model_out = _call_model(model, x_t, diffusion.at(t)["t_net"])
  eps, v = split_learned_sigma(model_out, x0.shape[-1])
  mse = mean_flat((noise - eps) ** 2)
  if diffusion.learn_sigma:
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(diffusion, frozen, x0, x_t, t)
  else:
    vb = jnp.zeros_like(mse)
  return {"mse": mse, "vb": vb, "loss": mse + vb, "x_t": x_t}


def vp_q_sample(sde: schedules.VPSDE, x0, t, noise):
  """U-ViT `VPSDE.marginal_prob` sample: `sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps`."""
  t = jnp.asarray(t, jnp.float32)
  return bcast(sde.cum_alpha(t) ** 0.5, x0) * x0 + bcast(sde.cum_beta(t) ** 0.5, x0) * noise


def vp_eps_loss(sde: schedules.VPSDE, model: ModelOut, x0, t, noise) -> Dict[str, jax.Array]:
  """U-ViT `sde.LSimple` (noise prediction), per sample.

  Args:
    sde: the `VPSDE`.
    model: output at x_t, or `model(x_t, t_net)` with `t_net = 999 t`.
    x0: clean data (B, H, W, C).
    t: continuous times (B,), drawn U[0, 1) by the caller.
    noise: standard normal noise.

  Returns:
    dict with `loss` (= `mse`) (B,) and `x_t`.
  """
  x_t = vp_q_sample(sde, x0, t, noise)
  eps = _call_model(model, x_t, sde.net_time(jnp.asarray(t, jnp.float32)))
  eps = eps[..., :x0.shape[-1]]
  mse = mean_flat((noise - eps) ** 2)
  return {"mse": mse, "loss": mse, "x_t": x_t}


def sd_q_sample(schedule: schedules.SDDiscreteSchedule, x0, n, noise):
  """U-ViT discrete `Schedule.sample`: float64 `cum_alphas[n]` cast to fp32 (n in 1..N)."""
  sa = jnp.asarray(np.sqrt(schedule.cum_alphas).astype(np.float32))[n]
  sb = jnp.asarray(np.sqrt(schedule.cum_betas).astype(np.float32))[n]
  return bcast(sa, x0) * x0 + bcast(sb, x0) * noise


def sd_eps_loss(schedule: schedules.SDDiscreteSchedule, model: ModelOut, x0, n,
                noise) -> Dict[str, jax.Array]:
  """U-ViT discrete `LSimple`: the network gets the integer n (1..1000), per sample.

  Args:
    schedule: the `SDDiscreteSchedule`.
    model: output at x_n, or `model(x_n, t_net)` with `t_net = float32(n)`.
    x0: clean latents (B, H, W, C).
    n: integer steps (B,) in 1..1000, drawn by the caller.
    noise: standard normal noise.

  Returns:
    dict with `loss` (= `mse`) (B,) and `x_t`.
  """
  n = jnp.asarray(n, jnp.int32)
  x_t = sd_q_sample(schedule, x0, n, noise)
  eps = _call_model(model, x_t, n.astype(jnp.float32))
  eps = eps[..., :x0.shape[-1]]
  mse = mean_flat((noise - eps) ** 2)
  return {"mse": mse, "loss": mse, "x_t": x_t}
