"""Shard storage for long sample runs: atomic files, byte-stable `.npz`, out_dir ownership.

Used by `jaxee.sharded.run`. Every file is written to a temp file beside its target, fsynced and
`os.replace`d over it (a kill leaves either the old file, the new one or a stray temp file that
the next run removes); `.npz` members are stored uncompressed with fixed zip timestamps, so the
same arrays always give the same bytes and an interrupted run can be compared byte for byte with
an uninterrupted one.

Provenance: `provenance.json` records, for every shard written, its SHA-256 and the id of the
sampling config that produced it (the configs themselves are stored there by id), so a forced
resume with another config still says which config made which shard; `manifest.json` repeats it.
A shard is reused only when its content is what that shard must be: its recorded SHA-256 (from
`provenance.json`, else `manifest.json`), its `index` array (the shard's global sample numbers),
its kind, dtype and shape. Anything else (a copy of another shard, a zeroed or reshaped array, a
truncated file) is logged and recomputed, never re-signed.

Ownership: `claim_out_dir` holds an exclusive `flock` on `OUT/.jaxee.lock` for the whole run, so
two processes never sample into one out_dir at once.

Multi-process runs (`jax.distributed`, P processes): process p owns the shards k with
k mod P = p; the processes share the out_dir lock (`claim_out_dir(process=p)`), any other run is
still refused. Each records provenance in
`provenance.part{p}.json` (read on top of `provenance.json`); after a barrier, process 0 folds
the parts into `provenance.json` (`merge_provenance_parts`) and writes the manifest.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import zipfile
from typing import Any, Iterator, Optional

from absl import logging
import numpy as np

from jaxee import atomic_io

# Config keys that never change the samples; every other key must match to resume.
NON_SAMPLE_KEYS = frozenset({"out_dir", "merge", "force", "progress", "multi_device", "grid_nrow"})


PROVENANCE_FILE = "provenance.json"
LOCK_FILE = ".jaxee.lock"


class ConfigMismatchError(ValueError):
  """The out_dir holds a run made with a config that produces different samples."""


class OutDirError(ValueError):
  """The out_dir cannot be used: a file, not writable, in use, or holding a corrupt config."""


def config_id(saved: dict) -> str:
  """A short id of the sample-relevant part of a saved config (16 hex digits of its SHA-256)."""
  relevant = {k: v for k, v in saved.items() if k not in NON_SAMPLE_KEYS}
  text = json.dumps(relevant, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def read_shard(path: pathlib.Path, count: int, *, start: Optional[int] = None,
               kind: Optional[str] = None, sample_shape: Optional[tuple] = None,
               digest: Optional[str] = None) -> Optional[dict[str, np.ndarray]]:
  """The arrays of a shard that is what it must be, or None (missing or not trustworthy).

  Args:
    path: the shard file.
    count: its number of samples.
    start: the global number of its first sample: `index` must be `arange(start, start+count)`.
    kind: 'images' (uint8) or 'latents' (float32); the array it must hold.
    sample_shape: the (H, W, C) of one sample.
    digest: the SHA-256 recorded when it was written (provenance or manifest).

  Returns:
    The arrays, or None after logging why the shard will be recomputed.
  """
  if not path.exists():
    return None
  try:
    if digest is not None and sha256(path) != digest:
      raise ValueError("its SHA-256 differs from the one recorded when it was written "
                       "(replaced or modified)")
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    _check_arrays(arrays, count, start, kind, sample_shape)
    return arrays
  except Exception as e:  # zipfile/npy/CRC errors and wrong content all mean "recompute"
    logging.warning("shard %s is unreadable or not this shard (%s: %s); recomputing it", path,
                    type(e).__name__, e)
    return None


def _check_arrays(arrays: dict, count: int, start: Optional[int], kind: Optional[str],
                  sample_shape: Optional[tuple]) -> None:
  """Raises ValueError when a shard's arrays are not those of this shard."""
  data = arrays.get(kind) if kind else arrays.get("images", arrays.get("latents"))
  if data is None:
    raise ValueError(f"no {kind or 'images/latents'} array (keys {sorted(arrays)})")
  if data.shape[0] != count or arrays["labels"].shape != (count,):
    raise ValueError(f"expected {count} samples, got {data.shape[0]}")
  if kind is not None:
    want = np.uint8 if kind == "images" else np.float32
    if data.dtype != want:
      raise ValueError(f"{kind} are {data.dtype}, expected {np.dtype(want)}")
  if sample_shape is not None and tuple(data.shape[1:]) != tuple(sample_shape):
    raise ValueError(f"samples of shape {tuple(data.shape[1:])}, expected {tuple(sample_shape)}")
  if start is not None:
    index = arrays.get("index")
    if index is None or not np.array_equal(index, np.arange(start, start + count)):
      raise ValueError(f"its index array is not samples {start}..{start + count - 1} "
                       f"(a copy of another shard?)")


class Provenance:
  """`OUT/provenance.json`: per shard the SHA-256 written and the id of the config that made it."""

  def __init__(self, out: pathlib.Path, part: Optional[int] = None):
    """`part`: this process's index in a multi-process run (records go to its part file)."""
    self.out = out
    self.path = out / (PROVENANCE_FILE if part is None else f"provenance.part{part}.json")
    self.data = {"configs": {}, "shards": {}}
    for path in dict.fromkeys([out / PROVENANCE_FILE, self.path]):
      if path.is_file():
        try:
          data = json.loads(path.read_text())
          self.data["configs"].update(dict(data["configs"]))
          self.data["shards"].update(dict(data["shards"]))
        except (ValueError, KeyError, TypeError) as e:
          logging.warning("%s is unreadable (%s); shards are checked by index, shape and dtype "
                          "only", path, e)
    self._manifest = {}
    manifest = out / "manifest.json"
    if manifest.is_file():
      try:
        entries = json.loads(manifest.read_text())["shards"]
        self._manifest = {pathlib.Path(e["file"]).name: e["sha256"] for e in entries}
      except (ValueError, KeyError, TypeError) as e:
        logging.warning("%s is unreadable (%s); it will be rewritten", manifest, e)

  def digest(self, name: str) -> Optional[str]:
    """The SHA-256 shard `name` must have, when one was recorded."""
    entry = self.data["shards"].get(name)
    return entry["sha256"] if entry else self._manifest.get(name)

  def record(self, name: str, digest: str, config: Optional[dict]) -> None:
    """Records shard `name` as written with `digest` by `config` (None: unknown) and saves."""
    cid = None
    if config is not None:
      cid = config_id(config)
      self.data["configs"].setdefault(cid, {k: v for k, v in config.items()
                                            if k not in NON_SAMPLE_KEYS})
    self.data["shards"][name] = {"sha256": digest, "config": cid}
    write_json(self.path, self.data)

  def known(self, name: str, digest: str) -> bool:
    entry = self.data["shards"].get(name)
    return bool(entry) and entry["sha256"] == digest


def merge_provenance_parts(out: pathlib.Path) -> "Provenance":
  """Folds every `provenance.part*.json` into `provenance.json` (then removes the parts)."""
  merged = Provenance(out)
  parts = sorted(out.glob("provenance.part*.json"))
  for part in parts:
    data = json.loads(part.read_text())
    merged.data["configs"].update(data["configs"])
    merged.data["shards"].update(data["shards"])
  if parts:
    write_json(merged.path, merged.data)
    for part in parts:
      part.unlink()
  return merged


@contextlib.contextmanager
def claim_out_dir(out: pathlib.Path, process: Optional[int] = None) -> Iterator[None]:
  """Holds the out_dir lock of `out` (created if missing) for the duration of a run.

  A single-process run (`process=None`) holds `OUT/.jaxee.lock` exclusively. Process p of a
  multi-process run holds it shared plus `OUT/.jaxee.lock.p{p}` exclusively, so the processes
  of one run share the out_dir while any other run (single or multi-process) is refused.

  Raises:
    OutDirError: `out` is a file, cannot be created/written, or another process holds it.
  """
  if out.exists() and not out.is_dir():
    raise OutDirError(f"out_dir {out} is a file, not a directory; pass a directory path")
  created = not out.exists()
  locks = [(LOCK_FILE, fcntl.LOCK_EX if process is None else fcntl.LOCK_SH)]
  if process is not None:
    locks.append((f"{LOCK_FILE}.p{int(process)}", fcntl.LOCK_EX))
  fds = []
  try:
    for name, mode in locks:
      try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / name, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise OutDirError(f"cannot write to out_dir {out} ({e.strerror or e}); choose a "
                          f"writable location") from None
      fds.append(fd)
      try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
      except OSError:
        raise OutDirError(f"another process is sampling into {out} (it holds {out / name}); "
                          f"wait for it to finish or use another out_dir") from None
    yield
  finally:
    names = {name for name, _ in locks}
    if created and fds and {p.name for p in out.iterdir()} <= names:  # a run that wrote nothing
      for name in names:
        (out / name).unlink(missing_ok=True)
      with contextlib.suppress(OSError):
        out.rmdir()
    for fd in fds:
      os.close(fd)


def shard_counts(num_samples: int, shard_size: int) -> list[int]:
  """Samples per shard: full shards then a remainder."""
  full, rest = divmod(num_samples, shard_size)
  return [shard_size] * full + ([rest] if rest else [])


def prepare_out_dir(out: pathlib.Path, saved: dict, force: bool,
                    clean: bool = True) -> Optional[dict]:
  """Refuses a different run's out_dir (unless forced) and removes stale temp files (`clean`:
  process 0 of a multi-process run only, before the others start writing).

  Returns:
    The out_dir's saved config (None when it has none).
  """
  old = None
  config_path = out / "config.json"
  shards = out / "shards"
  if config_path.exists():
    try:
      old = json.loads(config_path.read_text())
      if not isinstance(old, dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise OutDirError(f"{config_path} is corrupt ({e}); restore it, or delete it and rerun "
                        f"with --config.force=True to reuse the shards") from None
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
  stale_files = stale_files if clean else []
  for stale in stale_files:
    logging.info("removing stale temp file %s", stale)
    stale.unlink(missing_ok=True)
  return old


def sha256(path: pathlib.Path) -> str:
  """Hex SHA-256 of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(out: pathlib.Path, counts: list[int], merge: bool, kind: str,
                   provenance: Optional[Provenance] = None) -> dict:
  """Writes manifest.json and, with `merge`, samples.npz (both atomically).

  With `provenance`, each shard entry names the id of the config that made it (`config`) and
  the manifest lists those configs under `configs`.
  """
  paths = [out / "shards" / f"shard_{k:05d}.npz" for k in range(len(counts))]
  manifest = {"num_samples": int(sum(counts)), "kind": kind,
              "shards": [{"file": str(p.relative_to(out)), "count": c, "sha256": sha256(p)}
                         for p, c in zip(paths, counts)]}
  if provenance is not None:
    used = set()
    for entry in manifest["shards"]:
      record = provenance.data["shards"].get(pathlib.Path(entry["file"]).name) or {}
      entry["config"] = record.get("config")
      used.add(entry["config"])
    manifest["configs"] = {c: provenance.data["configs"][c] for c in sorted(used - {None})}
  if merge:
    parts = [read_shard(p, c) for p, c in zip(paths, counts)]
    if any(p is None for p in parts):
      raise RuntimeError("a shard became unreadable while merging; rerun to recompute it")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    write_npz(out / "samples.npz", merged)
    manifest["merged"] = {"file": "samples.npz", "sha256": sha256(out / "samples.npz")}
  write_json(out / "manifest.json", manifest)
  return manifest
