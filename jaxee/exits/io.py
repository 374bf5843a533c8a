"""Plan files: save and load every plan kind without pickles (`np.load(allow_pickle=False)`).

| kind    | file                                   | written by                               |
|---------|----------------------------------------|------------------------------------------|
| mask    | `.npz` {mask, metadata JSON}           | `MaskPlan.save` (TABM optimiser, tools)  |
| ase+mask| mask `.npz` + `ase_schedule` in metadata| `search.SearchResult.save` (plan search)|
| ase     | `.json` {name, schedule, family, ...}  | `save_ase_plan` (ASE fine-tuning export) |
| deediff | `.npz` {__meta__ JSON, heads/UEM leaves}| `save_deediff_heads` (DeeDiff training) |

`load_plan(path)` recognises the kind from the file and returns the plan (a DeeDiff file gives a
`DeeDiffPlan` with the trained θ). A directory is searched for the files the training methods
export (`ase_plan.json`, `deediff_heads.npz`). Inference code reads these files through this
module; training code writes them through it (inference never imports `jaxee.train`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Dict, Tuple

import jax
import numpy as np

from jaxee import atomic_io

ASE_PLAN_FILE = "ase_plan.json"
DEEDIFF_FILE = "deediff_heads.npz"


def param_path(path, sep: str = "/") -> str:
  """The `sep`-joined name of a pytree key path (dict keys, attribute names, sequence indices),
  e.g. `blocks/attn/qkv/kernel`; the one spelling of parameter names in files and logs."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return sep.join(parts)


def save_deediff_heads(path, ee_params: Any, *, threshold: float, uem: str,
                       layout: str = "inputs") -> str:
  """Writes DeeDiff heads/UEMs and their θ, UEM kind and exit layout ('inputs': exits 0..L−1,
  'outputs': the paper's 1..L−1) to `path` (`.npz`, atomically)."""
  flat = {param_path(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(ee_params)[0]}
  meta = json.dumps({"threshold": float(threshold), "uem": uem, "layout": layout})
  atomic_io.atomic_write(path, lambda f: np.savez(f, __meta__=np.array(meta), **flat))
  return str(path)


def load_deediff_heads(path) -> Tuple[Dict[str, Any], dict]:
  """(ee_params, meta) from a DeeDiff workdir or its `deediff_heads.npz` (no pickles read).

  `meta` holds the trained θ (`threshold`), the UEM kind (`uem`) and the exit layout
  (`layout`; 'inputs' for files written before layouts existed).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / DEEDIFF_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no DeeDiff heads file at {path} (written by method 'deediff')")
  try:
    with np.load(path, allow_pickle=False) as data:
      if "__meta__" not in data.files:
        raise ValueError(f"{path} is not a DeeDiff heads file (no __meta__ entry)")
      meta = json.loads(str(data["__meta__"]))
      meta.setdefault("layout", "inputs")
      ee: Dict[str, Any] = {}
      for key in data.files:
        if key == "__meta__":
          continue
        node = ee
        *parents, leaf = key.split("/")
        for part in parents:
          node = node.setdefault(part, {})
        node[leaf] = data[key]
  except (OSError, ValueError, json.JSONDecodeError) as e:
    if isinstance(e, ValueError) and "DeeDiff" in str(e):
      raise
    raise ValueError(f"{path} is not a readable DeeDiff heads file: {e}") from None
  return ee, meta


def save_ase_plan(path, plan, family: str, **extra) -> str:
  """Writes an ASE plan as JSON (name, schedule, family, time schedule, paper speed-up, and any
  `extra` entries, e.g. a plan search's record)."""
  spec = {"name": plan.name, "schedule": list(plan.table), "family": family,
          "time_schedule": plan.time_schedule, "speedup": plan.speedup, **extra}
  atomic_io.atomic_write(path, lambda f: json.dump(spec, f, indent=2), mode="w")
  return str(path)


def load_ase_plan(path):
  """The `ASEPlan` of a file written by `save_ase_plan` (or a workdir holding one)."""
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / ASE_PLAN_FILE
  try:
    spec = json.loads(path.read_text())
    return ase_lib.ASEPlan(tuple(spec["schedule"]), name=spec.get("name", "custom"),
                           family=spec.get("family"), time_schedule=spec.get("time_schedule"),
                           speedup=spec.get("speedup"))
  except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a readable ASE plan file: {e}") from None


def load_plan(path, **options):
  """Any plan file (see the module docstring); `options` go to the plan (e.g. `threshold`,
  `mode`, `min_fraction` for DeeDiff)."""
  from jaxee.exits import deediff as deediff_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import masks as masks_lib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.is_dir():
    for name in (ASE_PLAN_FILE, DEEDIFF_FILE):
      if (path / name).is_file():
        return load_plan(path / name, **options)
    raise FileNotFoundError(f"{path} holds no plan file ({ASE_PLAN_FILE}, {DEEDIFF_FILE})")
  if not path.is_file():
    raise FileNotFoundError(f"no plan file at {path}")
  if path.suffix == ".json":
    return load_ase_plan(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      files = set(data.files)
  except Exception as e:  # numpy/zip errors of a file that is not an .npz
    raise ValueError(f"plan file {path} is not a mask plan or another jaxee plan file "
                     f"({type(e).__name__}: {e})") from None
  if "__meta__" in files:
    ee, meta = load_deediff_heads(path)
    threshold = options.pop("threshold", None)
    return deediff_lib.DeeDiffPlan(
        ee, threshold=float(meta["threshold"] if threshold is None else threshold),
        uem=meta.get("uem", "token_mean"), layout=meta["layout"], **options)
  try:
    plan = masks_lib.load_mask_plan(str(path))
  except Exception as e:  # JSON/shape errors of an .npz that is not a mask plan
    raise ValueError(f"plan file {path} is not a mask plan written by MaskPlan.save "
                     f"({type(e).__name__}: {e})") from None
  schedule = plan.metadata.get("ase_schedule")
  if schedule is None:
    return plan
  # A searched depth schedule + cache (`exits.search`): the mask file carries the ASE table.
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import composition  # pylint: disable=g-import-not-at-top
  depth = ase_lib.ASEPlan(tuple(int(n) for n in schedule), name="search",
                          family=plan.metadata.get("ase_family"))
  return composition.compose(depth, plan)
