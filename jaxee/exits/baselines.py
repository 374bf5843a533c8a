"""Static feature caching (FORA / Δ-DiT style) as a mask plan: the full network every k-th NFE.

FORA ("Fast-Forward Caching in Diffusion Transformer Acceleration", Selvaraju et al., 2024)
computes every layer at one step in `interval` and, at the steps in between, reuses the attention
and MLP outputs cached at the last full step ("static caching", one interval N for all layers).
Δ-DiT caches block outputs on the same kind of fixed schedule. Both are a (NFE × units) compute
mask of a fixed pattern, so they run on `MaskPlan`'s runner unchanged (per unit a scalar
`lax.cond`, `jaxee/exits/masks.py`):

    row r = all ones   if r % interval == 0  (row 0 always: the cache starts empty)
    row r = all zeros  otherwise             (every unit reads its cache)

Readings (no official JAX code; the rule above is the paper's "full computation every N steps"):

* rows count network evaluations, not sampler steps — with a second-order sampler the cache is
  refreshed every `interval` NFEs;
* `unit='branch'` (default): attention and MLP outputs are cached *before* the adaLN gate and
  re-gated with the current step's gate (`cache_mode='branch'`, Learning-to-Cache's DiT cache),
  so the current conditioning still reaches every block; U-ViT branches have no gates, and an
  out-block's long-skip fusion is recomputed every step. Whether FORA caches before or after the
  gate is not pinned down by the paper's text; this is jaxee's one branch cache;
* `unit='block'`: each block's output is cached (`cache_mode='block_output'`, Δ-DiT / TABM
  style): a cached block *replaces* the stream, so between full steps the network's output is the
  head on the last full step's final stream (with the current conditioning in the DiT head).
  The only choice on a U-Net, which has no branch units.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from jaxee.exits import masks as masks_lib

UNITS = masks_lib.UNITS


def fora_mask(num_nfe: int, num_units: int, interval: int) -> np.ndarray:
  """The FORA schedule: a (num_nfe, num_units) bool mask, row r all ones iff r % interval == 0.

  Args:
    num_nfe: network evaluations of the sampler (`jaxee.sampling.nfe_times`).
    num_units: mask columns (`masks.num_units(model, unit)`).
    interval: full computation every `interval` NFEs (1 = the full network at every NFE).

  Returns:
    A boolean NumPy array (row 0 is all ones).
  """
  for name, v, lo in (("num_nfe", num_nfe, 1), ("num_units", num_units, 1),
                      ("interval", interval, 1)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"FORA: {name} must be an integer ≥ {lo}, got {v!r}")
  rows = (np.arange(num_nfe) % int(interval)) == 0
  return np.repeat(rows[:, None], int(num_units), axis=1)


def fora_plan(model: Any, num_nfe: int, interval: int, unit: str = "branch") -> masks_lib.MaskPlan:
  """A `MaskPlan` running the FORA schedule on `model`.

  Args:
    model: the backbone (any family behind the contract).
    num_nfe: network evaluations (`len(jaxee.sampling.nfe_times(model, sampler, steps))`).
    interval: full computation every `interval` NFEs.
    unit: 'branch' (attention/MLP outputs cached, re-gated with the current adaLN gate) or
      'block' (block outputs cached); a U-Net has only 'block'.

  Returns:
    A `MaskPlan` (its mask is a traced leaf: another interval of the same NFE count does not
    recompile).
  """
  if unit not in UNITS:
    raise ValueError(f"FORA: unit must be one of {UNITS}, got {unit!r}")
  try:
    columns = masks_lib.num_units(model, unit)
  except NotImplementedError as e:
    raise ValueError(f"FORA with unit={unit!r} is not available for this model ({e}); "
                     "use unit='block' (spec fora:K:block)") from None
  mask = fora_mask(num_nfe, columns, interval)
  cache_mode = masks_lib.cache_mode_for(unit)
  return masks_lib.MaskPlan(mask, unit, cache_mode,
                            {"method": "fora", "interval": int(interval), "unit": unit})
