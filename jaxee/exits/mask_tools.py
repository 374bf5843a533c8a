"""Host-side tools for (steps × units) compute masks: rectification, makers and plan files.

Rectification is TABM's post-processing (Timestep-Aware Block Masking, arXiv 2603.19939, rule as
given in the exits issue): m[t, b] = 0 if m[t, b+1] = 0 and m[t−1, b] = 1, where t counts
diffusion time down, so t − 1 is the NEXT network evaluation executed. Under block-output caching
block b's output at step t is read only by block b+1 at t (which outputs its cache instead) and by
block b's cache, which the next evaluation refreshes before anyone reads it; computing it is
wasted, and clearing it leaves the sampler output bit-for-bit unchanged. Conventions:

* rows are NFEs in execution order (row r+1 is executed right after row r), so the rule reads
  m[r, b] = 0 if m[r, b+1] = 0 and m[r+1, b] = 1; the last row has no next step and is kept;
* row 0 is forced to ones first (the first NFE always computes everything: empty cache);
* one sweep from the last step to the first and, within a step, from the last block to the first.
  m[r, b] depends on m[r, b+1] and m[r+1, b], which the sweep has already finalised, so zeros
  cascade down a step and one sweep is a fixed point (`rectify` checks it);
* extra readers (`skip_consumers`, from the backbone contract's `Backbone.skip_consumers()`):
  a U-ViT in-block's output is also the long skip of its paired out-block (U-ViT
  `UViT.forward`, LIFO); a U-Net unit's output may be read by two up ResNets (its own skip and,
  through the next unit's downsample, the downsample's skip). An entry is cleared only when every
  such consumer is 0 too at that step (otherwise the clear would change the output). A
  consumer is a unit index or a tuple of them. Pass `skip_consumers=None` for the bare rule.

`research/ee_methods.md` §4.7 and §5.5 describe TABM; this module is host-side NumPy only.

Plan files are `.npz` with the mask and a JSON metadata string (arch, sampler, steps, unit, cache
mode, ...), written atomically (temporary file in the same directory, then `os.replace`).
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from jaxee import atomic_io


def uvit_skip_consumers(num_in_blocks: int) -> dict[int, int]:
  """Unit index of in-block b → unit index of the out-block consuming its skip.

  Units are ordered in-blocks, mid, out-blocks; out-block j consumes in-block n−1−j. The same
  map as `as_backbone(uvit, 'block').skip_consumers()` (which runners use; kept for tools).
  """
  n = num_in_blocks
  return {b: n + 1 + (n - 1 - b) for b in range(n)}


def rectify(mask: np.ndarray, skip_consumers: Optional[dict[int, Any]] = None) -> np.ndarray:
  """TABM rectification of a (steps × blocks) mask (see module docstring).

  Args:
    mask: (T, L) binary mask, 1 = compute, rows in execution order.
    skip_consumers: extra consumers of a block's output at the same step ({producer: consumer
      unit index or tuple of indices}: U-ViT in-block → out-block, U-Net down unit → up
      ResNets), or None.

  Returns:
    The rectified boolean mask (row 0 all ones).
  """
  m = np.array(mask, dtype=bool, copy=True)
  if m.ndim != 2:
    raise ValueError(f"mask must be 2-D (steps × blocks), got shape {m.shape}")
  m[0] = True
  steps, blocks = m.shape
  consumers = {int(b): _as_tuple(c) for b, c in (skip_consumers or {}).items()}
  bad = [c for cs in consumers.values() for c in cs if not 0 <= c < blocks]
  if bad or any(not 0 <= b < blocks for b in consumers):
    raise ValueError(f"skip_consumers name units outside [0, {blocks}): {skip_consumers}")

  def clearable(r, b):
    if not (m[r, b] and not m[r, b + 1] and m[r + 1, b]):
      return False
    return not any(m[r, c] for c in consumers.get(b, ()))

  for r in range(steps - 2, -1, -1):
    for b in range(blocks - 2, -1, -1):
      if clearable(r, b):
        m[r, b] = False
  if any(clearable(r, b) for r in range(steps - 1) for b in range(blocks - 1)):
    raise AssertionError("rectification sweep did not reach a fixed point")
  return m


def _as_tuple(consumer) -> tuple[int, ...]:
  if isinstance(consumer, (int, np.integer)):
    return (int(consumer),)
  return tuple(int(c) for c in consumer)


def force_first_row(mask: np.ndarray) -> np.ndarray:
  m = np.array(mask, dtype=bool, copy=True)
  m[0] = True
  return m


def random_mask(steps: int, units: int, p: float, seed: int = 0) -> np.ndarray:
  """Bernoulli(p) mask (1 = compute), row 0 ones."""
  rng = np.random.default_rng(seed)
  return force_first_row(rng.random((steps, units)) < p)


def keep_fraction_mask(steps: int, units: int, p: float) -> np.ndarray:
  """Deterministic mask computing round(p·units) units per step (rows ≥ 1), row 0 ones.

  The kept units rotate with the step (row t keeps units (t·k + j) mod units, j < k), so every
  unit is refreshed regularly and cached values never get very stale.
  """
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be in [0, 1], got {p}")
  k = int(np.floor(p * units + 0.5))
  m = np.zeros((steps, units), bool)
  for t in range(steps):
    m[t, (t * k + np.arange(k)) % units] = True
  return force_first_row(m)


def prefix_mask(depth_per_step: Sequence[int], units: int) -> np.ndarray:
  """Row t computes the first depth_per_step[t] units (an ASE-like pattern, for tests)."""
  d = np.asarray(depth_per_step)
  return force_first_row(np.arange(units)[None, :] < d[:, None])


def save_mask_plan(path: str, mask: np.ndarray, metadata: dict[str, Any]) -> None:
  """Writes `{mask, metadata(JSON)}` to `path` atomically.

  Args:
    path: target `.npz` path.
    mask: (steps × units) binary mask.
    metadata: JSON-serialisable dict (arch, sampler, steps, unit, cache_mode, ...).
  """
  meta = json.dumps(metadata, sort_keys=True)
  atomic_io.atomic_write(path, lambda f: np.savez(f, mask=np.asarray(mask, bool),
                                                  metadata=np.array(meta)))


def load_mask_file(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """Reads a file written by `save_mask_plan`; returns (mask, metadata)."""
  with np.load(path, allow_pickle=False) as data:
    if "mask" not in data.files or "metadata" not in data.files:
      raise ValueError(f"{path} is not a mask plan file (needs 'mask' and 'metadata')")
    return data["mask"].astype(bool), json.loads(str(data["metadata"]))
