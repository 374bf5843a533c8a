"""Converted checkpoints on disk: an Orbax params tree plus the model config as JSON.

Layout of a converted directory:

    DIR/params/        Orbax StandardCheckpointer tree (block params stacked)
    DIR/config.json    {"model": models.model_config(model) | "vae": VAEConfig fields,
                        "source": ..., "arch": ...}

Writes are atomic: everything goes to a sibling temporary directory that is renamed into place
only when complete, so an interrupted conversion leaves no half-written `DIR`. `overwrite=True`
replaces only a directory that is itself a converted checkpoint (its `config.json` names a model
or VAE and `params/` is there, nothing else): the new one is written beside it, the old one is
renamed aside, the new one renamed into place and only then the old one deleted. Anything else
(`--out .`, a home directory, a file) is refused. The directory gets the usual mode (0777 less
the umask), not `mkdtemp`'s 0700.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxee import models
from jaxee.convert.errors import CheckpointError
from jaxee.models import vae as vae_lib

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _describe(model) -> dict[str, Any]:
  """The JSON entry that rebuilds `model`: a backbone config, or a VAE config."""
  if isinstance(model, vae_lib.AutoencoderKL):
    return {"vae": dataclasses.asdict(model.config)}
  return {"model": models.model_config(model)}


def _shape_tree(model) -> Any:
  if isinstance(model, vae_lib.AutoencoderKL):
    return vae_lib.param_shapes(model.config)
  from jaxee.convert import backbone_rules  # local: avoids an import cycle at package import
  target: dict[str, Any] = {}
  for p, shape in backbone_rules.param_shapes(model).items():
    node = target
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
  return target


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory written by `save_converted` (and holds nothing else)."""
  root = pathlib.Path(path)
  if not root.is_dir() or not (root / PARAMS_DIR).is_dir():
    return False
  if {p.name for p in root.iterdir()} != {CONFIG_FILE, PARAMS_DIR}:
    return False
  try:
    config = json.loads((root / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and ("model" in config or "vae" in config)


def _check_target(out: pathlib.Path, overwrite: bool) -> None:
  """Refuses a target that is a file, a non-empty directory (unless overwriting a checkpoint)."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} is a file; --out must be a directory path")
  if not out.exists() or not any(out.iterdir()):
    return
  if not overwrite:
    raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
  if not is_converted_checkpoint(out) or out == pathlib.Path.cwd().absolute():
    raise FileExistsError(f"refusing to overwrite {out}: it is not a jaxee converted checkpoint "
                          f"(only a directory holding just {CONFIG_FILE} and {PARAMS_DIR}/ "
                          f"from a previous conversion is replaced); choose a new --out")


def _default_dir_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o777 & ~umask


def save_converted(out_dir: str | os.PathLike, model, params: Any, *,
                   extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` and the model config to `out_dir` atomically; returns the final path.

  Args:
    out_dir: the checkpoint directory (new, empty, or with `overwrite` a converted checkpoint).
    model: the backbone or VAE.
    params: its params.
    extra: more entries for `config.json` (source, arch, ...).
    overwrite: replace an existing converted checkpoint (never any other directory).

  Raises:
    FileExistsError: `out_dir` is a file, or a non-empty directory that may not be replaced.
  """
  out = pathlib.Path(out_dir).absolute()
  _check_target(out, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  old = None
  try:
    os.chmod(tmp, _default_dir_mode())
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / PARAMS_DIR, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    config = {**_describe(model), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    if out.exists():
      _check_target(out, overwrite)  # again, right before the swap
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, old / "ckpt")  # aside; restored below if the swap fails
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and (old / "ckpt").exists() and not out.exists():
      os.replace(old / "ckpt", out)
      shutil.rmtree(old, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return out


def load_converted(path: str | os.PathLike):
  """Reads a converted directory → `(model, params)` with params as host NumPy/JAX arrays."""
  root = pathlib.Path(path).absolute()
  config_path = root / CONFIG_FILE
  if not config_path.is_file() or not (root / PARAMS_DIR).is_dir():
    raise CheckpointError(f"not a jaxee converted checkpoint (need {CONFIG_FILE} and "
                          f"{PARAMS_DIR}/)", path=root)
  try:
    config = json.loads(config_path.read_text())
    if "vae" in config:
      vae_config = dict(config["vae"])
      vae_config = {k: tuple(v) if isinstance(v, list) else v for k, v in vae_config.items()}
      model = vae_lib.AutoencoderKL(vae_lib.VAEConfig(**vae_config))
    else:
      model = models.from_config(config["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"unreadable {CONFIG_FILE}: {e}", path=root) from e
  try:
    params = ocp.StandardCheckpointer().restore(root / PARAMS_DIR, _shape_tree(model))
  except Exception as e:  # Orbax raises many types for a damaged tree
    raise CheckpointError(f"could not restore params: {type(e).__name__}: {e}", path=root) from e
  return model, params
