"""`jaxee.sample`: one call that samples a DiT or U-ViT with any sampler, guidance and exit plan.

    samples = jaxee.sample(model, params, rng, num=8, sampler='ddim', steps=50, labels=y,
                           guidance=1.5, plan=None)

The sampler runs as one jitted `lax.scan` (`jaxee/diffusion/`); the exit plan (`jaxee/exits/`)
is bound to the model and params inside the same trace and decides what runs at each network
evaluation. The function is compiled once per (model, sampler, steps, schedule, plan, guidance
on/off, shapes) and cached; params, the key, the start noise, the labels and the guidance scale
are traced arguments, so new values never recompile.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxee.diffusion import guidance as guidance_lib
from jaxee.diffusion import samplers as samplers_lib
from jaxee.diffusion import schedules as schedules_lib
from jaxee import validation
from jaxee.eval import flops as flops_lib

# Options that only the continuous / DDIM samplers take.
_SAMPLER_OPTIONS = {"ddim": ("eta",), "euler_maruyama": ("eps", "T"), "euler_ode": ("eps", "T"),
                    "dpm_solver": ("eps", "T"), "dpm_solver_pp": ("eps", "T"), "ddpm": ()}


def default_schedule(model, sampler: str, steps: int, schedule: Any = None):
  """The schedule object a sampler runs on, from the model family unless `schedule` is given.

  DDPM/DDIM take their step count from DiT's respacing (`"250"` / `"ddim50"`), so for them the
  schedule is built per step count; the continuous samplers take `steps` as an option.
  """
  if schedule is not None and not isinstance(schedule, str):
    return schedule
  name = schedule or model.default_schedule
  if name == "linear_discrete":
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return _named_schedule(name, respacing, model.learn_sigma)
  return _named_schedule(name, None, None)


@functools.lru_cache(maxsize=32)
def _named_schedule(name: str, respacing, learn_sigma):
  """Built once per name/respacing, so repeated calls hit the compile cache."""
  if name == "linear_discrete":
    return schedules_lib.create_dit_diffusion(respacing, learn_sigma=learn_sigma)
  return schedules_lib.get_schedule(name)


def _sampler_kwargs(sampler: str, steps: int, schedule, options: dict) -> dict:
  allowed = _SAMPLER_OPTIONS[sampler]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {allowed}")
  kwargs = dict(options)
  if not isinstance(schedule, schedules_lib.DiscreteDiffusion):
    kwargs["steps"] = steps
  return kwargs


class _FullNetwork:
  """The plan-free network: the exact full forward, with its executed depth as a stat."""

  def bind(self, model, params, nfe_times):
    del nfe_times
    depth = float(flops_lib.num_blocks(model))
    flops = float(flops_lib.backbone_flops(model))

    def net(x, t_net, y, nfe_index, cache):
      del nfe_index
      out = model.apply({"params": params}, x, t_net, y)
      return out, cache, {"blocks": jnp.float32(depth), "flops": jnp.float32(flops)}

    return net, (lambda x, y: ())


def _bind(plan, model, params, nfe_times):
  bound = (plan or _FullNetwork()).bind(model, params, nfe_times)
  if hasattr(bound, "net"):  # a `plan.BoundPlan` (net, init_cache, info)
    return bound.net, bound.init_cache
  return bound  # a plain (net, init_cache) pair


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler: str, steps: int, schedule_key, plan_key, guided: bool,
              options_key):
  schedule = _SCHEDULES[schedule_key]
  plan = _PLANS[plan_key]
  options = dict(options_key)
  spec = samplers_lib.get_sampler(sampler)
  kwargs = _sampler_kwargs(sampler, steps, schedule, options)
  nfe_times = np.asarray(spec.nfe_times(schedule, **kwargs), np.float32)
  null = model.null_class

  def run(params, rng, x_T, labels, scale):
    net, init_cache = _bind(plan, model, params, nfe_times)
    denoise = guidance_lib.make_denoiser(
        net, labels, family=model.family, null_label=null if null is not None else 0,
        scale=scale if guided else None)
    batch_x = jnp.concatenate([x_T, x_T]) if guided else x_T
    batch_y = None if labels is None else (
        jnp.concatenate([labels, jnp.full_like(labels, null)]) if guided else labels)
    cache = init_cache(batch_x, batch_y)
    return spec.sample(denoise, schedule, rng, x_T, cache=cache, **kwargs)

  return jax.jit(run), nfe_times


# Schedules and plans are not always hashable (they hold NumPy tables): key them by identity and
# keep them alive here so an id is never reused while its compiled function is cached.
_SCHEDULES: dict[Any, Any] = {}
_PLANS: dict[Any, Any] = {}


def _key(store: dict, obj) -> Any:
  try:
    hash(obj)
    key = ("h", obj)
  except TypeError:
    key = ("id", id(obj))
  store.setdefault(key, obj)
  return key


def sample(model, params, rng, *, num: Optional[int] = None, sampler: str = "ddim",
           steps: int = 50, labels=None, guidance: Optional[float] = None, plan=None,
           x_T=None, schedule=None, return_stats: bool = False, check_finite: bool = True,
           **sampler_options):
  """Samples `num` images (or latents) from a backbone.

  Args:
    model: a backbone from `jaxee.models.create` (or `convert.load_converted`).
    params: its params.
    rng: a PRNG key (start noise when `x_T` is None, and the per-step noise).
    num: batch size; required unless `x_T` is given.
    sampler: 'ddpm' | 'ddim' | 'dpm_solver' | 'dpm_solver_pp' | 'euler_maruyama' | 'euler_ode'.
    steps: sampling steps (DDPM/DDIM: respaced chain length; others: solver steps).
    labels: (num,) int class labels, or None (unconditional / null class).
    guidance: CFG scale in the family's convention (DiT: uncond + s·(cond − uncond) on the first
      3 ε channels, FID setting 1.5; U-ViT: cond + s·(cond − uncond), 0.4/0.7), or None.
    plan: an exit plan from `jaxee.exits` (None: the full network).
    x_T: optional (num, H, W, C) start, so deterministic samplers reproduce the original
      implementation's trajectory from the same noise.
    schedule: a schedule name ('linear_discrete', 'vp_continuous', 'sd_discrete') or object;
      default from the model family.
    return_stats: also return per-NFE exit statistics.
    check_finite: raise `validation.NonFiniteError` when the samples hold NaN/Inf.
    **sampler_options: `eta` (ddim), `eps` / `T` (continuous samplers).

  Returns:
    The final NHWC samples in the model's space, or `(samples, stats)` with `stats` a dict of
    per-NFE arrays (`blocks`: mean blocks run per sample, `flops`: FLOPs per sample; plans
    may add more) plus `nfe_times` when `return_stats=True`.
  """
  if sampler not in _SAMPLER_OPTIONS:
    raise ValueError(f"unknown sampler {sampler!r}; choose from {tuple(_SAMPLER_OPTIONS)}")
  steps = validation.check_sample_args(model, num=num, labels=labels, guidance=guidance,
                                       sampler=sampler, steps=steps, schedule=schedule)
  size = model.input_size if model.family == "dit" else model.img_size
  channels = model.in_channels if model.family == "dit" else model.in_chans
  if x_T is None:
    if num is None:
      raise ValueError("give num (batch size) or x_T")
    rng, start_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (num, size, size, channels), jnp.float32)
  x_T = jnp.asarray(x_T, jnp.float32)
  chex.assert_shape(x_T, (num if num is not None else x_T.shape[0], size, size, channels))
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
    chex.assert_shape(labels, (x_T.shape[0],))
  guided = guidance is not None and labels is not None
  if guided and model.null_class is None:
    raise ValueError(f"guidance needs a null class, and this {type(model).__name__} has none")
  sched = default_schedule(model, sampler, steps, schedule)
  fn, nfe_times = _compiled(model, sampler, int(steps), _key(_SCHEDULES, sched),
                            _key(_PLANS, plan), guided, tuple(sorted(sampler_options.items())))
  scale = jnp.float32(guidance if guided else 0.0)
  x, _, stats = fn(params, rng, x_T, labels, scale)
  if check_finite:
    validation.check_finite(x, f"the samples of jaxee.sample ({sampler}, {steps} steps)")
  if not return_stats:
    return x
  stats = dict(stats)
  stats["nfe_times"] = jnp.asarray(nfe_times)
  return x, stats
