"""Workdir and optimizer checks of the training loop: no silent restarts, no silent changes.

* `check_workdir`: the workdir is a directory we can create (not a file, not read-only).
* `check_optim`: `config.optim` values that can only be mistakes (lr <= 0 or NaN, betas outside
  [0, 1), negative warm-up / weight decay / clipping) are refused before anything runs.
* `refuse_silent_restart`: a workdir with evidence of past progress but no usable checkpoint
  (every step was moved to `checkpoints_corrupt/`, `checkpoints/` was deleted, ...) is refused
  instead of restarting from step 0 over its `metrics.jsonl` and `export/`.
* `config_changes`: the keys whose values differ between the workdir's saved `config.json` and
  the config resuming it (a changed lr, batch size or num_steps is reported, not silently taken).
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, Optional

from jaxee.train import checkpoint as ckpt_lib
from jaxee.train import optim as optim_lib

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EXPORT_DIR = "export"


class NoUsableCheckpointError(ValueError):
  """The workdir shows past progress but none of it can be resumed."""


def check_workdir(workdir: pathlib.Path, create: bool) -> None:
  """Raises ValueError when `workdir` is a file or (with `create`) cannot be created."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a directory; pass a directory path")
  if create:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create workdir {workdir} ({e.strerror or e}); choose a "
                       f"writable location") from None


def check_optim(optim: Any) -> None:
  """Refuses optimizer settings that cannot be meant (one ValueError naming the field)."""
  def get(name, default=None):
    return optim_lib.config_get(optim, name, default)

  lr = float(get("lr", 1e-4))
  if not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"config.optim.lr must be a finite number > 0, got {lr}")
  betas = get("betas") or (get("b1", 0.9), get("b2", 0.999))
  for name, value in zip(("b1", "b2"), betas):
    if not 0.0 <= float(value) < 1.0:
      raise ValueError(f"config.optim.{name} must be in [0, 1), got {value}")
  for name in ("eps", "weight_decay", "warmup_steps", "grad_clip_norm", "min_lr_ratio"):
    value = get(name)
    if value is not None and (not math.isfinite(float(value)) or float(value) < 0):
      raise ValueError(f"config.optim.{name} must be a finite number >= 0, got {value}")


def _max_logged_step(workdir: pathlib.Path) -> int:
  path = workdir / METRICS_FILE
  if not path.is_file():
    return 0
  best = 0
  for line in path.read_text(errors="replace").splitlines():
    try:
      best = max(best, int(json.loads(line).get("step", 0)))
    except (ValueError, AttributeError, TypeError):
      continue  # a torn last line
  return best


def refuse_silent_restart(workdir: pathlib.Path, *, ckpt_every: int, num_steps: int) -> None:
  """Raises `NoUsableCheckpointError` when a restart from step 0 would discard progress.

  Called only when `checkpoints/` has no step. Evidence of progress: checkpoints moved to
  `checkpoints_corrupt/`, an `export/`, or `metrics.jsonl` logged past step `2 * first` (first =
  the first checkpoint step): the save at step `2 * first` waits for the one at `first`, so by
  then a checkpoint had been finalized. A run killed before that is restarted as before.
  """
  first = ckpt_every if ckpt_every else num_steps
  evidence = []
  corrupt = workdir / ckpt_lib.CORRUPT_DIR
  if corrupt.is_dir() and any(corrupt.iterdir()):
    evidence.append(f"{ckpt_lib.CORRUPT_DIR}/ holds {len(list(corrupt.iterdir()))} "
                    f"quarantined step(s)")
  if (workdir / EXPORT_DIR).exists():
    evidence.append(f"{EXPORT_DIR}/ exists")
  logged = _max_logged_step(workdir)
  if logged > 2 * first:
    evidence.append(f"{METRICS_FILE} logs training up to step {logged}")
  if evidence:
    raise NoUsableCheckpointError(
        f"workdir {workdir} shows past progress ({'; '.join(evidence)}) but checkpoints/ has no "
        f"usable checkpoint: refusing to restart from step 0 over its {METRICS_FILE} and "
        f"{EXPORT_DIR}/. To start over on purpose, use a new --workdir (or move "
        f"{METRICS_FILE}, {EXPORT_DIR}/, {ckpt_lib.CORRUPT_DIR}/ and tb/ out of this one); to "
        f"recover, restore a checkpoint step into {workdir / 'checkpoints'}")


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def config_changes(workdir: pathlib.Path, config_json: str) -> Optional[Dict[str, list]]:
  """{dotted key: [saved, now]} between `WORKDIR/config.json` and `config_json` (None: no file)."""
  path = workdir / CONFIG_FILE
  if not path.is_file():
    return None
  try:
    saved = _flatten(json.loads(path.read_text()))
  except ValueError:
    return {"config.json": ["unreadable", "rewritten"]}
  now = _flatten(json.loads(config_json))
  return {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now))
          if saved.get(k) != now.get(k)}
