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

Control flow: `bind` picks the model with `lax.cond` on a scalar read from a per-NFE table
computed from the static time grid and the traced t_s, so XLA runs only the taken model (one
`conditional` per NFE, no per-sample work), with every sampler through `jaxee.sample`.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import plan as plan_lib
from jaxee.models.backbone import as_backbone

RULES = ("threshold", "lagged")
_PACK_KEYS = frozenset(("deep", "shallow"))


def pack_params(deep: Any, shallow: Any) -> dict:
  """The joint params pytree `{'deep': deep, 'shallow': shallow}` that `bind` unpacks."""
  return {"deep": deep, "shallow": shallow}


def _is_packed(params: Any) -> bool:
  return isinstance(params, dict) and set(params) == _PACK_KEYS


@plan_lib.pytree_plan(data=("shallow_params", "t_switch"),
                      static=("shallow_model", "rule", "time_schedule"))
class DuoDiffPlan:
  """Shallow model for the first `t_switch` steps of the chain, then the deep (bound) model.

  A pytree: the shallow params and t_s are traced leaves (a t_s sweep never recompiles, and the
  shallow params are arguments of the compiled sampler, not constants baked into it).

  Attributes:
    shallow_model: the shallow backbone (same family, input and output shapes as the deep one).
    shallow_params: its params, or None when they are passed packed (`pack`) to `bind`.
    t_switch: t_s in units of the 1000-step chain (DuoDiff default 300; sweep 300/400/500).
    rule: 'threshold' or 'lagged' (see module docstring).
    time_schedule: time convention for τ (default: the deep model's `default_schedule`).
  """
  shallow_model: Any
  shallow_params: Any = None
  t_switch: Any = 300.0
  rule: str = "threshold"
  time_schedule: Optional[str] = None

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"unknown DuoDiff rule {self.rule!r}; choose from {RULES}")
    if not plan_lib.is_traced(self.t_switch):
      if not 0 <= float(self.t_switch) <= 1000:
        raise ValueError(f"t_switch must be in [0, 1000] (steps of the 1000-step chain), "
                         f"got {self.t_switch}")
      object.__setattr__(self, "t_switch", float(self.t_switch))

  @staticmethod
  def pack(deep_params: Any, shallow_params: Any) -> dict:
    """`pack_params(deep_params, shallow_params)`."""
    return pack_params(deep_params, shallow_params)

  def shallow_flags(self, model: Any, nfe_times):
    """Per-NFE booleans: True where the shallow model runs (NumPy, or traced inside a trace)."""
    times = plan_lib.check_nfe_times(nfe_times).astype(np.float64)
    tau = plan_lib.model_time_to_unit(times, plan_lib.time_schedule(model, self.time_schedule))
    xp = jnp if plan_lib.is_traced(self.t_switch) else np
    t_s = xp.asarray(self.t_switch, xp.float32 if xp is jnp else np.float64)
    above = (1000.0 * tau >= 1000.0 - t_s - 1e-6) & (t_s > 0)
    if self.rule == "lagged":
      # NFE j is shallow iff every earlier NFE was at or above the threshold.
      below_seen = xp.cumsum(~above) > 0
      above = xp.concatenate([xp.ones((1,), bool), ~below_seen[:-1]])
    return above

  def split_index(self, model: Any, nfe_times) -> int:
    """k such that NFEs [0, k) are shallow and [k, N) deep; ValueError if not a prefix."""
    flags = np.asarray(self.shallow_flags(model, nfe_times))
    k = int(flags.sum())
    if not (flags[:k].all() and not flags[k:].any()):
      raise ValueError("the shallow NFEs are not a prefix of the grid (non-monotone times)")
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
    if (sm.family != model.family or sm.out_channels != model.out_channels
        or as_backbone(sm).input_shape != as_backbone(model).input_shape):
      raise ValueError("shallow and deep models must be of the same family, input shape and "
                       f"output channels (got {sm.family}/{sm.out_channels} and "
                       f"{model.family}/{model.out_channels})")

  def check(self, model: Any, nfe_times) -> None:
    plan_lib.check_nfe_times(nfe_times)
    self.check_models(model)

  def tables(self, model: Any, nfe_times):
    """(shallow flags, blocks, flops) per NFE."""
    flags = self.shallow_flags(model, nfe_times)
    xp = np if isinstance(flags, np.ndarray) else jnp
    sb, db = as_backbone(self.shallow_model), as_backbone(model)
    blocks = xp.where(flags, sb.num_blocks, db.num_blocks)
    flops = xp.where(flags, sb.full_flops, db.full_flops)
    return flags, blocks, flops

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Binds the per-NFE switch (a scalar `lax.cond`; see the module docstring)."""
    deep_p, shallow_p = self.resolve_params(params)
    flags, blocks, flops = self.tables(model, nfe_times)
    shallow = plan_lib.full_forward(self.shallow_model, shallow_p)
    deep = plan_lib.full_forward(model, deep_p)
    flags_j = jnp.asarray(flags)

    def net(x, t_net, y, nfe_index, cache):
      out = jax.lax.cond(flags_j[nfe_index], shallow, deep, x, t_net, y)
      return out, cache, plan_lib.stats_from_tables(nfe_index, blocks, flops)

    def info():
      self.check_models(model)
      try:
        split = self.split_index(model, nfe_times)
      except ValueError:
        split = None
      return plan_lib.make_info(model, blocks, flops, plan=f"duodiff:{float(self.t_switch):g}",
                                shallow_flags=flags, split_index=split)
    return plan_lib.BoundPlan(net, plan_lib.no_cache, plan_lib.host_info(self, info))


def split_index(plan: DuoDiffPlan, model: Any, nfe_times) -> int:
  """Module-level alias of `DuoDiffPlan.split_index`."""
  return plan.split_index(model, nfe_times)
