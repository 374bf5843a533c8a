"""Atomic file writes: a temporary file beside the target, fsynced, then `os.replace`d over it.

A process killed mid-write leaves either the old file or the new one (plus, at worst, a stray
`.NAME.tmp-*` file that nothing reads), never a half-written target. Every writer of run outputs
(sample shards, exports, mask plans, reports, figures, configs) goes through here.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Callable


def _temp_beside(path: pathlib.Path, suffix: str = "") -> tuple[int, str]:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
  os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
  return fd, tmp


def atomic_write(path, write: Callable[[Any], None], mode: str = "wb") -> pathlib.Path:
  """Calls `write(file)` on a temporary file opened with `mode`, then renames it over `path`.

  Args:
    path: the target.
    write: writes the content to the open file object.
    mode: 'wb' (default) or 'w'.

  Returns:
    `path` as a `pathlib.Path`.
  """
  path = pathlib.Path(path)
  fd, tmp = _temp_beside(path)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_via_path(path, write: Callable[[str], None]) -> pathlib.Path:
  """Like `atomic_write` for writers that take a file *name* (e.g. `Figure.savefig`); the
  temporary name keeps `path`'s suffix."""
  path = pathlib.Path(path)
  fd, tmp = _temp_beside(path, suffix=path.suffix)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_text(path, text: str) -> pathlib.Path:
  """Writes `text` (UTF-8) atomically."""
  data = text.encode("utf-8")
  return atomic_write(path, lambda f: f.write(data))
