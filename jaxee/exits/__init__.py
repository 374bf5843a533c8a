"""Exit plans: what runs at each network evaluation, and the runners that really skip it.

    from jaxee import exits
    plan = exits.ase_plan('D3-DiT', depth=model.depth)          # ASE static schedule
    plan = exits.DuoDiffPlan(shallow_model, t_switch=300)         # + params=plan.pack(deep, sh)
    plan = exits.MaskPlan(mask, unit='block')                     # TABM / L2C masks with caches
    plan = exits.load_mask_plan('plan.npz')
    plan = exits.fora_plan(model, num_nfe, interval=3)            # FORA static caching
    plan = exits.TeaCachePlan(threshold=0.1)                      # TeaCache adaptive caching
    plan = exits.DeepCachePlan(interval=3, branch=0)               # DeepCache (U-Net)
    samples, stats = jaxee.sample(model, params, rng, plan=plan, return_stats=True, ...)

See `docs/ARCHITECTURE.md` ("Plans and runners") for the protocol (`plan.py`).
"""
from jaxee.exits.baselines import fora_mask, fora_plan
from jaxee.exits.teacache import TeaCachePlan
from jaxee.exits.ase import ASE_TABLES, ASEPlan, ase_plan, scale_schedule
from jaxee.exits.composition import ComposedPlan, compose
from jaxee.exits.deepcache import DeepCachePlan
from jaxee.exits.duodiff import DuoDiffPlan, pack_params
from jaxee.exits.masks import MaskPlan, load_mask_plan
from jaxee.exits.mask_tools import keep_fraction_mask, random_mask, rectify
from jaxee.exits.plan import BoundPlan, FullPlan

__all__ = ["DeepCachePlan", "ComposedPlan", "compose", "ASE_TABLES", "ASEPlan", "ase_plan", "scale_schedule", "DuoDiffPlan", "pack_params",
           "MaskPlan", "load_mask_plan", "keep_fraction_mask", "random_mask",
           "rectify", "BoundPlan", "FullPlan", "fora_mask", "fora_plan", "TeaCachePlan"]

try:  # DeeDiff lives in its own module (separate owner); export it when it imports cleanly.
  from jaxee.exits.deediff import DeeDiffPlan, init_deediff_params  # noqa: F401
  __all__ += ["DeeDiffPlan", "init_deediff_params"]
except ImportError:  # pragma: no cover
  pass
