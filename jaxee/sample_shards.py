"""Shard storage for long sample runs: atomic files, byte-stable `.npz`, out_dir ownership.

Used by `jaxee.sample_main`. Every file is written to a temp file beside its target, fsynced and
`os.replace`d over it (a kill leaves either the old file, the new one or a stray temp file that
the next run removes); `.npz` members are stored uncompressed with fixed zip timestamps, so the
same arrays always give the same bytes and an interrupted run can be compared byte for byte with
an uninterrupted one. A shard that cannot be read back with the expected sample count is treated
as missing and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import zipfile
from typing import Any, Optional

from absl import logging
import numpy as np

from jaxee import atomic_io

# Config keys that never change the samples; every other key must match to resume.
NON_SAMPLE_KEYS = frozenset({"out_dir", "merge", "force", "progress", "multi_device", "grid_nrow"})


class ConfigMismatchError(ValueError):
  """The out_dir holds a run made with a config that produces different samples."""


def sample_config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} for every key that changes the samples."""
  keys = (set(old) | set(new)) - NON_SAMPLE_KEYS
  return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON atomically."""
  data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
  atomic_io.atomic_write(path, lambda f: f.write(data))


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """An uncompressed `.npz` with fixed zip timestamps (same arrays → same bytes), atomically."""
  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name in sorted(arrays):
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as member:
          np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]),
                                    allow_pickle=False)
  atomic_io.atomic_write(path, write)


def read_shard(path: pathlib.Path, count: int) -> Optional[dict[str, np.ndarray]]:
  """The arrays of a complete shard of `count` samples, or None if it is missing/unreadable."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    data = arrays.get("images", arrays.get("latents"))
    if data is None or data.shape[0] != count or arrays["labels"].shape != (count,):
      raise ValueError(f"expected {count} samples")
    return arrays
  except Exception as e:  # zipfile/npy/CRC errors all mean "recompute"
    logging.warning("shard %s is unreadable (%s: %s); recomputing it", path, type(e).__name__, e)
    return None


def shard_counts(num_samples: int, shard_size: int) -> list[int]:
  """Samples per shard: full shards then a remainder."""
  full, rest = divmod(num_samples, shard_size)
  return [shard_size] * full + ([rest] if rest else [])


def prepare_out_dir(out: pathlib.Path, saved: dict, force: bool) -> None:
  """Refuses a different run's out_dir (unless forced) and removes stale temp files."""
  config_path = out / "config.json"
  shards = out / "shards"
  if config_path.exists():
    old = json.loads(config_path.read_text())
    diff = sample_config_diff(old, saved)
    if diff and not force:
      lines = [f"  {k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items()]
      raise ConfigMismatchError(f"{out} holds a run with a different sampling config (set "
                                "force=True, --config.force=True, to resume anyway):\n"
                                + "\n".join(lines))
    if diff:
      logging.warning("force=True: resuming %s despite differing keys %s", out, sorted(diff))
  elif shards.exists() and any(shards.iterdir()) and not force:
    raise ConfigMismatchError(f"{shards} has files but {config_path} is missing; "
                              "set force=True (--config.force=True) to reuse it")
  stale_files = [*out.glob(".*.tmp-*"), *out.glob(".grid.png.*"), *shards.glob(".*.tmp-*")]
  for stale in stale_files:
    logging.info("removing stale temp file %s", stale)
    stale.unlink(missing_ok=True)


def sha256(path: pathlib.Path) -> str:
  """Hex SHA-256 of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(out: pathlib.Path, counts: list[int], merge: bool, kind: str) -> dict:
  """Writes manifest.json and, with `merge`, samples.npz (both atomically)."""
  paths = [out / "shards" / f"shard_{k:05d}.npz" for k in range(len(counts))]
  manifest = {"num_samples": int(sum(counts)), "kind": kind,
              "shards": [{"file": str(p.relative_to(out)), "count": c, "sha256": sha256(p)}
                         for p, c in zip(paths, counts)]}
  if merge:
    parts = [read_shard(p, c) for p, c in zip(paths, counts)]
    if any(p is None for p in parts):
      raise RuntimeError("a shard became unreadable while merging; rerun to recompute it")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    write_npz(out / "samples.npz", merged)
    manifest["merged"] = {"file": "samples.npz", "sha256": sha256(out / "samples.npz")}
  write_json(out / "manifest.json", manifest)
  return manifest
