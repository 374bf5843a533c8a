"""`jaxee.sample`: the one front door — any backbone, sampler, guidance and exit plan.

    samples = jaxee.sample(model, params, rng, num=8, sampler='ddim', steps=50, labels=y,
                           guidance=1.5, plan=None)
    times = jaxee.sampling.nfe_times(model, 'ddim', 50)    # what the network receives, per NFE

The sampler runs as one jitted `lax.scan` (`jaxee/diffusion/`); the exit plan (`jaxee/exits/`) is
a pytree passed to the jitted function as a traced argument and bound to the model and params
inside the same trace, where it decides what runs at each network evaluation. One program is
compiled per (model, sampler, steps, schedule, guidance on/off, options, plan *structure*,
shapes); params, plan leaves (masks, depth tables, θ, extra params), the key, the start noise,
the per-step noise (`noise=`), the labels and the guidance scale are traced, so new values never
recompile, and nothing here keeps a plan or its params alive after the call (`trace_count()`
counts traces, for tests).
"""
from __future__ import annotations

import collections
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
from jaxee.models.backbone import as_backbone

_TRACES = collections.Counter()


def trace_count() -> int:
  """How many times a sampling program has been traced in this process (compile counting)."""
  return sum(_TRACES.values())


def check_sampler(model, sampler: str, schedule: Any = None, options: Optional[dict] = None):
  """Raises a clear ValueError unless `sampler` runs on the model's (or the given) schedule and
  takes `options` (`jaxee.validation.check_sampler_schedule` names the accepted samplers)."""
  validation.check_sampler_schedule(model, sampler, schedule)
  _check_options(sampler, options)


def _check_options(sampler: str, options: Optional[dict]) -> None:
  spec = samplers_lib.get_sampler(sampler)
  unknown = sorted(set(options or {}) - set(spec.options))
  if unknown:
    raise ValueError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {spec.options}")


def default_schedule(model, sampler: str, steps: int, schedule: Any = None,
                     options: Optional[dict] = None):
  """The schedule object a sampler runs on, from the model unless `schedule` is given.

  DDPM/DDIM take their step count from DiT's respacing (`"250"` / `"ddim50"`; DDIM with the
  option `grid='duodiff'`: DuoDiff's `"linspace50"`), so for them the schedule is built per step
  count; the continuous samplers take `steps` as an option.
  """
  if schedule is not None and not isinstance(schedule, str):
    return schedule
  name = schedule or model.default_schedule
  if name == "linear_discrete":
    respacing = str(steps)
    if sampler == "ddim":
      grid = (options or {}).get("grid", "dit")
      respacing = f"linspace{steps}" if grid == "duodiff" else f"ddim{steps}"
    return _named_schedule(name, respacing, model.learn_sigma)
  return _named_schedule(name, None, None)


@functools.lru_cache(maxsize=32)
def _named_schedule(name: str, respacing, learn_sigma):
  """Built once per name/respacing, so repeated calls hit the compile cache."""
  if name == "linear_discrete":
    return schedules_lib.create_dit_diffusion(respacing, learn_sigma=learn_sigma)
  return schedules_lib.get_schedule(name)


def sampler_kwargs(sampler: str, steps: int, schedule, options: dict) -> dict:
  """The keyword arguments of the sampler function (options + `steps` where it takes it)."""
  spec = samplers_lib.get_sampler(sampler)
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    raise ValueError(f"sampler {sampler!r} takes no option(s) {unknown}; it takes {spec.options}")
  kwargs = dict(options)
  if not isinstance(schedule, schedules_lib.DiscreteDiffusion):
    kwargs["steps"] = steps
  return kwargs


def nfe_times(model, sampler: str = "ddim", steps: int = 50, schedule: Any = None,
              **sampler_options) -> np.ndarray:
  """The network times of every NFE of a run, in order (float32; the one public NFE grid).

  Args:
    model: the backbone.
    sampler, steps, schedule, **sampler_options: as for `sample`.

  Returns:
    (num_nfe,) float32: what the network receives at each evaluation (DiT: the original integer
    t; U-ViT continuous: 999·t; discrete: 1000·t).
  """
  check_sampler(model, sampler, schedule, sampler_options)
  sched = default_schedule(model, sampler, steps, schedule, sampler_options)
  kwargs = sampler_kwargs(sampler, steps, sched, sampler_options)
  return np.asarray(samplers_lib.get_sampler(sampler).nfe_times(sched, **kwargs), np.float32)


def _full_plan():
  from jaxee.exits import plan as plan_lib  # pylint: disable=g-import-not-at-top
  return plan_lib.FullPlan()


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler: str, steps: int, schedule, guided: bool, options_key):
  """One jitted sampler per static configuration; plans are traced arguments."""
  options = dict(options_key)
  if isinstance(schedule, _ByIdentity):
    schedule = schedule.obj
  spec = samplers_lib.get_sampler(sampler)
  kwargs = sampler_kwargs(sampler, steps, schedule, options)
  times = np.asarray(spec.nfe_times(schedule, **kwargs), np.float32)
  null = model.null_class

  def run(params, plan, rng, x_T, labels, scale, noise=None):
    _TRACES[(sampler, steps)] += 1  # trace-time only: counts compilations
    bound = plan.bind(model, params, times)
    denoise = guidance_lib.make_denoiser(
        bound.net, labels, family=getattr(model, "cfg_convention", model.family),
        null_label=null if null is not None else 0,
        scale=scale if guided else None)
    batch_x = jnp.concatenate([x_T, x_T]) if guided else x_T
    batch_y = None if labels is None else (
        jnp.concatenate([labels, jnp.full_like(labels, null)]) if guided else labels)
    cache = bound.init_cache(batch_x, batch_y)
    extra = {} if noise is None else {"noise": noise}
    return spec.sample(denoise, schedule, rng, x_T, cache=cache, **kwargs, **extra)

  return jax.jit(run), times


def sampling_program(model, sampler: str = "ddim", steps: int = 50, *, guided: bool = False,
                     schedule: Any = None, **sampler_options):
  """`(fn, nfe_times)`: the jitted program `sample` runs, for callers that trace it inside their
  own programs (the plan search maps it over a batch of candidate plans).

  `fn(params, plan, rng, x_T, labels, scale, noise=None) -> (x, cache, stats)`; the plan is a
  traced argument, so candidates of one structure share one trace. No plan or input checks are
  made here (`sample` makes them).
  """
  validation.check_sample_args(model, num=None, labels=None, guidance=None, sampler=sampler,
                               steps=steps, schedule=schedule)
  _check_options(sampler, sampler_options)
  sched = default_schedule(model, sampler, steps, schedule, sampler_options)
  return _compiled(model, sampler, int(steps), _schedule_key(sched), bool(guided),
                   tuple(sorted(sampler_options.items())))


class _ByIdentity:
  """Hash/eq by identity for unhashable schedule objects (kept alive only while cached)."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.obj is self.obj


def _schedule_key(sched):
  """The schedule itself when hashable, else an identity wrapper (bounded by the lru_cache)."""
  try:
    hash(sched)
    return sched
  except TypeError:
    return _ByIdentity(sched)


def sample(model, params, rng, *, num: Optional[int] = None, sampler: str = "ddim",
           steps: int = 50, labels=None, guidance: Optional[float] = None, plan=None,
           x_T=None, schedule=None, return_stats: bool = False, check_finite: bool = True,
           noise=None, compute_dtype: Optional[str] = None, **sampler_options):
  """Samples `num` images (or latents) from a backbone.

  Args:
    model: a backbone from `jaxee.models.create` (or `convert.load_converted`).
    params: its params.
    rng: a PRNG key (start noise when `x_T` is None, and the per-step noise).
    num: batch size; required unless `x_T` is given.
    sampler: 'ddpm' | 'ddim' | 'dpm_solver' | 'dpm_solver_pp' | 'euler_maruyama' | 'euler_ode';
      it must run on the model's schedule (or the given `schedule`).
    steps: sampling steps (DDPM/DDIM: respaced chain length; others: solver steps).
    labels: (num,) int class labels, or None (unconditional / null class).
    guidance: CFG scale in the family's convention (DiT: uncond + s·(cond − uncond) on the first
      3 ε channels, FID setting 1.5; U-ViT: cond + s·(cond − uncond), 0.4/0.7), or None;
      requires `labels`.
    plan: an exit plan from `jaxee.exits` (None: the full network).
    x_T: optional (num, H, W, C) start, so deterministic samplers reproduce the original
      implementation's trajectory from the same noise.
    schedule: a schedule name ('linear_discrete', 'vp_continuous', 'sd_discrete') or object;
      default from the model family.
    return_stats: also return per-NFE exit statistics.
    check_finite: raise `validation.NonFiniteError` when the samples hold NaN/Inf.
    noise: optional (draws, num, H, W, C) standard normal draws used instead of the per-step
      draws from `rng` (stochastic samplers only): one draw per stochastic update in the order
      the original takes them — ddpm and ddim with eta > 0: every step, the last masked out
      (draws = steps); euler_maruyama: every step but the last (draws = steps − 1). With
      guidance the draws are for the `num` sampled rows (the guided denoiser makes one
      prediction per row).
    compute_dtype: 'bfloat16' (or 'float16', 'float32') to run the network in that dtype with
      its float32 params (`models.with_runtime`); the sampler's state and updates stay
      float32. None: the model's own `dtype` (float32 unless it was built otherwise).
    **sampler_options: `var_type` (ddpm: 'fixed_small' = DuoDiff's β̃, 'fixed_large' = β),
      `eta` and `grid` (ddim: 'dit' | 'duodiff'), `eps` / `T` (continuous samplers).

  Returns:
    The final NHWC samples in the model's space, or `(samples, stats)` with `stats` a dict of
    per-NFE arrays (`blocks`: mean blocks run per sample, `flops`: FLOPs per sample; plans
    may add more) plus `nfe_times` when `return_stats=True`.
  """
  if compute_dtype is not None:
    from jaxee.models import registry  # pylint: disable=g-import-not-at-top
    model = registry.with_runtime(model, compute_dtype=compute_dtype)
  steps = validation.check_sample_args(model, num=num, labels=labels, guidance=guidance,
                                       sampler=sampler, steps=steps, schedule=schedule)
  _check_options(sampler, sampler_options)
  shape = tuple(as_backbone(model).input_shape)
  if x_T is None:
    if num is None:
      raise ValueError("give num (batch size) or x_T")
    rng, start_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (num,) + shape, jnp.float32)
  x_T = jnp.asarray(x_T, jnp.float32)
  chex.assert_shape(x_T, (num if num is not None else x_T.shape[0],) + shape)
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
    chex.assert_shape(labels, (x_T.shape[0],))
  if guidance is not None and labels is None:
    raise ValueError("guidance needs labels: classifier-free guidance mixes the conditional and "
                     "unconditional predictions of the given labels")
  guided = guidance is not None
  if guided and model.null_class is None:
    raise ValueError(f"guidance needs a null class, and this {type(model).__name__} has none")
  sched = default_schedule(model, sampler, steps, schedule, sampler_options)
  if noise is not None:
    spec = samplers_lib.get_sampler(sampler)
    kwargs = sampler_kwargs(sampler, steps, sched, sampler_options)
    draws = spec.num_draws(sched, **kwargs) if spec.num_draws is not None else 0
    validation.check_noise(noise, sampler, draws, tuple(x_T.shape), sampler_options)
    noise = jnp.asarray(noise, jnp.float32)
  fn, times = _compiled(model, sampler, int(steps), _schedule_key(sched), guided,
                        tuple(sorted(sampler_options.items())))
  plan = _full_plan() if plan is None else plan
  if hasattr(plan, "check"):
    plan.check(model, times)
  scale = jnp.float32(guidance if guided else 0.0)
  x, _, stats = fn(params, plan, rng, x_T, labels, scale, noise)
  if check_finite:
    validation.check_finite(x, f"the samples of jaxee.sample ({sampler}, {steps} steps)")
  if not return_stats:
    return x
  stats = dict(stats)
  stats["nfe_times"] = jnp.asarray(times)
  return x, stats
