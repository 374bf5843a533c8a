"""DuoDiff: a shallow backbone for the first (noisiest) steps, the deep one for the rest.

Reproduces the switching rule of `razvanmatisan/duodiff` `sampler.py:get_samples` (`--t_switch`,
`research/ee_methods.md` §3.3). `t_switch` = t_s counts steps of the 1000-step chain from the noise
end. With τ = `plan.model_time_to_unit(t_net)` (τ → 1 is noise) and the chain time t = 1000·τ:

* `rule='threshold'` (default; the original DDPM-1000 loop): the shallow model runs at every NFE
  with t ≥ 1000 − t_s, i.e. t = 999 … 1000 − t_s (t_s shallow evaluations for DDPM-1000).
* `rule='lagged'` (the original DDIM loop): the switch is tested *after* each update with
  t < 1000 − t_s, so the first NFE below the threshold still uses the shallow model (the
  original's DDIM-50 grid `linspace(0, 999, 50).astype(int)[::-1]` gives 16/21/26 shallow
  evaluations of 49 for t_s = 300/400/500).

Times are compared in float64 with a 1e-6 tolerance, so the rule maps onto any sampler whose host
`nfe_times` give the network times (DDPM-N, DDIM-N, DPM-Solver, Euler–Maruyama).

Params. The plan needs two param sets. Pass both to the sampler as one traced pytree,

    plan = DuoDiffPlan(shallow_model, t_switch=300)
    jaxee.sample(deep_model, plan.pack(deep_params, shallow_params), rng, plan=plan, ...)

(`pack` = `{'deep': ..., 'shallow': ...}`), or give `shallow_params` to the plan and pass only the
deep params; the shallow params are then closed over by the compiled sampler, which JAX embeds as
constants in the program (fine for small models and tests, slow to compile for large ones).

Control flow. The switch is static (known on the host from the NFE times):

* `DuoDiffPlan.bind` (used by `jaxee.sample`, every sampler) picks the model with `lax.cond` on a
  scalar read from a per-NFE host table: XLA runs only the taken model (one `conditional` per NFE,
  no per-sample work); an all-shallow or all-deep grid binds a single model without a cond.
* `sample_split` runs the sampler as two scans, shallow NFEs [0, k) then deep NFEs [k, N) — no
  per-step control flow at all — for the one-NFE-per-step samplers (ddpm, ddim, euler_maruyama,
  euler_ode). It gives the same samples as `jaxee.sample(..., plan=plan)` (same step tables, same
  per-step noise keys, same NFE indices).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.exits import plan as plan_lib

RULES = ("threshold", "lagged")
SPLIT_SAMPLERS = ("ddpm", "ddim", "euler_maruyama", "euler_ode")
_PACK_KEYS = frozenset(("deep", "shallow"))


def pack_params(deep: Any, shallow: Any) -> dict:
  """The joint params pytree `{'deep': deep, 'shallow': shallow}` that `bind` unpacks."""
  return {"deep": deep, "shallow": shallow}


def _is_packed(params: Any) -> bool:
  return isinstance(params, dict) and set(params) == _PACK_KEYS


@dataclasses.dataclass(frozen=True, eq=False)
class DuoDiffPlan:
  """Shallow model for the first `t_switch` steps of the chain, then the deep (bound) model.

  Attributes:
    shallow_model: the shallow backbone (same family, input and output shapes as the deep one).
    shallow_params: its params, or None when they are passed packed (`pack`) to `bind`.
    t_switch: t_s in units of the 1000-step chain (DuoDiff default 300; sweep 300/400/500).
    rule: 'threshold' or 'lagged' (see module docstring).
    time_schedule: time convention for τ (default: the deep model's `default_schedule`).
  """
  shallow_model: Any
  shallow_params: Any = None
  t_switch: float = 300.0
  rule: str = "threshold"
  time_schedule: Optional[str] = None

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"unknown DuoDiff rule {self.rule!r}; choose from {RULES}")
    if not 0 <= float(self.t_switch) <= 1000:
      raise ValueError(f"t_switch must be in [0, 1000] (steps of the 1000-step chain), "
                       f"got {self.t_switch}")

  @staticmethod
  def pack(deep_params: Any, shallow_params: Any) -> dict:
    """`pack_params(deep_params, shallow_params)`."""
    return pack_params(deep_params, shallow_params)

  def shallow_flags(self, model: Any, nfe_times) -> np.ndarray:
    """Per-NFE booleans: True where the shallow model runs."""
    times = plan_lib.check_nfe_times(nfe_times).astype(np.float64)
    tau = plan_lib.model_time_to_unit(times, plan_lib.time_schedule(model, self.time_schedule))
    if float(self.t_switch) <= 0:
      return np.zeros(len(times), bool)
    above = 1000.0 * tau >= 1000.0 - float(self.t_switch) - 1e-6
    if self.rule == "lagged":
      # NFE j is shallow iff every earlier NFE was at or above the threshold.
      below_seen = np.cumsum(~above) > 0
      lagged = np.ones_like(above)
      lagged[1:] = ~below_seen[:-1]
      above = lagged
    return above

  def split_index(self, model: Any, nfe_times) -> int:
    """k such that NFEs [0, k) are shallow and [k, N) deep; ValueError if not a prefix."""
    flags = self.shallow_flags(model, nfe_times)
    k = int(flags.sum())
    if not (flags[:k].all() and not flags[k:].any()):
      raise ValueError("the shallow NFEs are not a prefix of the grid (non-monotone times); "
                       "use the bound net's per-NFE cond instead of a static split")
    return k

  def resolve_params(self, params: Any) -> tuple[Any, Any]:
    """(deep, shallow) params from a packed pytree or from `params` + `self.shallow_params`."""
    if _is_packed(params):
      return params["deep"], params["shallow"]
    if self.shallow_params is None:
      raise ValueError("DuoDiffPlan has no shallow params: pass plan.pack(deep_params, "
                       "shallow_params) as the params, or build the plan with shallow_params")
    return params, self.shallow_params

  def check_models(self, model: Any) -> None:
    sm = self.shallow_model
    if sm.family != model.family or sm.out_channels != model.out_channels:
      raise ValueError("shallow and deep models must be of the same family and output channels "
                       f"(got {sm.family}/{sm.out_channels} and {model.family}/"
                       f"{model.out_channels})")

  def tables(self, model: Any, nfe_times) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shallow flags, blocks, flops) per NFE."""
    flags = self.shallow_flags(model, nfe_times)
    sm = self.shallow_model
    blocks = np.where(flags, flops_lib.num_blocks(sm), flops_lib.num_blocks(model))
    flops = np.where(flags, flops_lib.backbone_flops(sm), flops_lib.backbone_flops(model))
    return flags, blocks.astype(np.float64), flops.astype(np.float64)

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Binds the per-NFE switch (a scalar `lax.cond`; see the module docstring)."""
    self.check_models(model)
    deep_p, shallow_p = self.resolve_params(params)
    flags, blocks, flops = self.tables(model, nfe_times)
    shallow = plan_lib.full_forward(self.shallow_model, shallow_p)
    deep = plan_lib.full_forward(model, deep_p)
    flags_j = jnp.asarray(flags)

    def net(x, t_net, y, nfe_index, cache):
      if flags.all():
        out = shallow(x, t_net, y)
      elif not flags.any():
        out = deep(x, t_net, y)
      else:
        out = jax.lax.cond(flags_j[nfe_index], shallow, deep, x, t_net, y)
      return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

    try:
      split = self.split_index(model, nfe_times)
    except ValueError:
      split = None
    info = plan_lib.make_info(model, blocks, flops, plan=f"duodiff:{float(self.t_switch):g}",
                              shallow_flags=flags, split_index=split)
    return plan_lib.BoundPlan(net, plan_lib.no_cache, info)


def split_index(plan: DuoDiffPlan, model: Any, nfe_times) -> int:
  """Module-level alias of `DuoDiffPlan.split_index`."""
  return plan.split_index(model, nfe_times)


# --- Two-scan sampling (no per-step control flow) -------------------------------------------------


def _static_net(forward, blocks: float, flops: float):
  def net(x, t_net, y, nfe_index, cache):
    del nfe_index
    return forward(x, t_net, y), cache, {"blocks": jnp.float32(blocks),
                                         "flops": jnp.float32(flops)}
  return net


def _split_tables(tables: dict, k: int) -> tuple[dict, dict]:
  return ({n: v[:k] for n, v in tables.items()}, {n: v[k:] for n, v in tables.items()})


@functools.lru_cache(maxsize=16)
def _compiled_split(model: Any, plan: DuoDiffPlan, sampler: str, steps: int, guided: bool,
                    options: tuple):
  # Local imports: jaxee.sampling imports the exits package lazily, never the reverse at import.
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  from jaxee.diffusion import guidance as guidance_lib  # pylint: disable=g-import-not-at-top
  from jaxee.diffusion import sampler_core  # pylint: disable=g-import-not-at-top
  from jaxee.diffusion import samplers as samplers_lib  # pylint: disable=g-import-not-at-top
  from jaxee.diffusion import samplers_discrete  # pylint: disable=g-import-not-at-top
  from jaxee.diffusion import samplers_sde  # pylint: disable=g-import-not-at-top

  schedule = sampling.default_schedule(model, sampler, steps)
  # pylint: disable-next=protected-access
  kwargs = sampling._sampler_kwargs(sampler, steps, schedule, dict(options))
  nfe_times = np.asarray(samplers_lib.get_sampler(sampler).nfe_times(schedule, **kwargs),
                         np.float32)
  k = plan.split_index(model, nfe_times)
  sm = plan.shallow_model
  null = model.null_class
  if sampler in ("ddpm", "ddim"):
    tables = samplers_discrete.step_tables(schedule)
  else:
    tables = samplers_sde.step_tables(schedule, kwargs["steps"], kwargs.get("eps", 1e-3),
                                      kwargs.get("T", 1.0))

  def loop(denoise, x, key, cache, part):
    part = sampler_core.as_jnp(part)
    if sampler == "ddpm":
      return samplers_discrete.ddpm_loop(denoise, x, key, cache, part, var_type=schedule.var_type)
    if sampler == "ddim":
      return samplers_discrete.ddim_loop(denoise, x, key, cache, part,
                                         jnp.float32(kwargs.get("eta", 0.0)),
                                         var_type=schedule.var_type)
    return samplers_sde.euler_loop(denoise, x, key, cache, part, ode=sampler == "euler_ode")

  def run(params, rng, x_T, labels, scale):
    deep_p, shallow_p = plan.resolve_params(params)
    nets = (_static_net(plan_lib.full_forward(sm, shallow_p), flops_lib.num_blocks(sm),
                        flops_lib.backbone_flops(sm)),
            _static_net(plan_lib.full_forward(model, deep_p), flops_lib.num_blocks(model),
                        flops_lib.backbone_flops(model)))
    x, key = sampler_core.start_state(rng, x_T)
    cache, stats = (), []
    for net, part in zip(nets, _split_tables(tables, k)):
      if len(part["step"]) == 0:
        continue
      denoise = guidance_lib.make_denoiser(
          net, labels, family=model.family, null_label=null if null is not None else 0,
          scale=scale if guided else None)
      x, cache, st = loop(denoise, x, key, cache, part)
      stats.append(st)
    return x, sampler_core.concat_stats(stats)

  return jax.jit(run), nfe_times, k


def sample_split(model: Any, params: Any, rng, *, plan: DuoDiffPlan, num: Optional[int] = None,
                 sampler: str = "ddim", steps: int = 50, labels=None,
                 guidance: Optional[float] = None, x_T=None, return_stats: bool = False,
                 **sampler_options):
  """`jaxee.sample` for a DuoDiff plan as two scans (shallow prefix, deep rest).

  Arguments and the start-noise convention are those of `jaxee.sample` (the model's default
  schedule; `params` deep or packed, see the module docstring), so the samples are the same as
  `jaxee.sample(model, params, rng, plan=plan, ...)`.

  Returns:
    Samples, or `(samples, stats)` with per-NFE `blocks`, `flops`, `nfe_times` and `split_index`.
  """
  if sampler not in SPLIT_SAMPLERS:
    raise ValueError(f"sample_split supports {SPLIT_SAMPLERS} (one NFE per step); use "
                     f"jaxee.sample(..., plan=plan) for {sampler!r}")
  plan.check_models(model)
  size = model.input_size if model.family == "dit" else model.img_size
  channels = model.in_channels if model.family == "dit" else model.in_chans
  if x_T is None:
    if num is None:
      raise ValueError("give num (batch size) or x_T")
    rng, start_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (num, size, size, channels), jnp.float32)
  x_T = jnp.asarray(x_T, jnp.float32)
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
  guided = guidance is not None and labels is not None
  fn, nfe_times, k = _compiled_split(model, plan, sampler, int(steps), guided,
                                     tuple(sorted(sampler_options.items())))
  x, stats = fn(params, rng, x_T, labels, jnp.float32(guidance if guided else 0.0))
  if not return_stats:
    return x
  stats = dict(stats)
  stats["nfe_times"] = jnp.asarray(nfe_times)
  stats["split_index"] = k
  return x, stats
