"""Training checkpoints: an Orbax `CheckpointManager` over the whole `TrainState` and the input.

Layout of `WORKDIR/checkpoints/<step>/` (one Orbax step directory, written atomically by Orbax:
a temporary directory renamed into place once complete, so a kill -9 mid-save leaves no step):

* `state/`: the `TrainState` (params, optimizer state, EMA, step, base RNG, extras, healthy
  flag) as a flat `{name: numpy array}` dict, names from the pytree key paths
  (`params.blocks.attn.qkv.kernel`, `opt_state.0.mu.blocks...`), through `StandardSave`;
* `meta/`: JSON through `JsonSave`: `{'format', 'step', 'loader': DataLoader.state(),
  'host': {...trainer/method host state...}, 'crc32': {name: checksum}}`.

Why flat NumPy: optax states contain empty nodes (`EmptyState`, `MaskedNode`) that Orbax trees
do not round-trip, NumPy leaves are written by the primary process only (Orbax `NumpyHandler`),
which is exactly "only process 0 writes" in a multi-host run while every process still joins
Orbax's barriers, and restoring NumPy onto any mesh is one `device_put` (`ParallelStep`). The
CRC32 of every leaf, checked on restore, turns silent corruption (flipped bytes in a chunk that
still decompresses) into the same loud error as a missing or truncated file.

Resume policy (`TrainCheckpointer.restore_latest`): the workdir's latest step; if it cannot be
read or fails its checksums, `CorruptCheckpointError` names the step and the reason, unless
`fallback=True`, in which case the damaged step is moved aside to `WORKDIR/checkpoints_corrupt/`
(never deleted), the fallback is logged as a warning, and the previous step is tried. A run is
never restarted from scratch silently while checkpoints exist. Keep-N is Orbax's `max_to_keep`.
The big_vision reasoning about preemption-safe saves (`utils.py save_checkpoint_ts`) holds here
with Orbax's own commit protocol.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import time
import zlib
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from jaxee.exits import io as plan_io

PyTree = Any
FORMAT = "jaxee-train-v1"
STATE_ITEM = "state"
META_ITEM = "meta"
CORRUPT_DIR = "checkpoints_corrupt"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step that cannot be restored (unreadable, incomplete or failing checksums)."""

  def __init__(self, step: int, directory: os.PathLike | str, reason: str):
    self.step, self.directory, self.reason = step, str(directory), reason
    super().__init__(
        f"checkpoint step {step} in {directory} is corrupt: {reason}. Refusing to restart from "
        f"scratch. Set config.train.ckpt_fallback=True to fall back to the previous step "
        f"(the damaged one is moved to {CORRUPT_DIR}/), or remove step {step} by hand.")


def leaf_name(path) -> str:
  """`.`-joined name of a pytree key path (dict keys, attribute names, sequence indices)."""
  return plan_io.param_path(path, ".")


def to_host(tree: PyTree) -> PyTree:
  """NumPy copy of a pytree of (possibly multi-process, replicated) arrays.

  A replicated global array is read from this process's first local shard; anything else is
  all-gathered (`process_allgather`), so every process gets the same full value.
  """
  def one(x):
    if isinstance(x, jax.Array):
      if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def flatten_state(state: PyTree) -> Dict[str, np.ndarray]:
  """`{name: numpy leaf}` of a (host) state; raises on a name collision."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = leaf_name(path)
    if name in flat:
      raise ValueError(f"two state leaves share the checkpoint name {name!r}")
    flat[name] = np.asarray(leaf)
  return flat


def unflatten_state(template: PyTree, flat: Dict[str, np.ndarray]) -> PyTree:
  """Inverse of `flatten_state` onto `template`'s structure (names, shapes and dtypes checked)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [leaf_name(p) for p, _ in leaves_with_path]
  missing = sorted(set(names) - set(flat))
  unexpected = sorted(set(flat) - set(names))
  if missing or unexpected:
    raise ValueError(f"checkpoint does not match the training state: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                     f"{'...' if len(unexpected) > 8 else ''}")
  leaves = []
  for (_, ref), name in zip(leaves_with_path, names):
    value = np.asarray(flat[name])
    ref_shape = np.shape(ref)
    ref_dtype = np.dtype(ref.dtype) if hasattr(ref, "dtype") else np.asarray(ref).dtype
    if value.shape != tuple(ref_shape) or value.dtype != ref_dtype:
      raise ValueError(f"checkpoint leaf {name}: {value.dtype}{list(value.shape)} does not "
                       f"match the training state's {ref_dtype}{list(ref_shape)}")
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def checksums(flat: Dict[str, np.ndarray]) -> Dict[str, int]:
  """CRC32 of every leaf's bytes (C order)."""
  return {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) & 0xFFFFFFFF
          for k, v in sorted(flat.items())}


def _signature(flat: Dict[str, np.ndarray]) -> Dict[str, list]:
  """`{name: [dtype, shape]}`: what a checkpoint must match to belong to a training state."""
  return {k: [str(v.dtype), list(v.shape)] for k, v in sorted(flat.items())}


class TrainCheckpointer:
  """Saves and restores `(TrainState, loader position, host state)` under `directory`.

  Every process constructs one and calls `save` / `restore_latest` (Orbax synchronises them);
  only process 0 writes files.
  """

  def __init__(self, directory: os.PathLike | str, *, keep: int = 3, async_save: bool = True,
               fallback: bool = False):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: `WORKDIR/checkpoints`.
      keep: number of most recent steps kept (Orbax `max_to_keep`); 0 or None keeps all.
      async_save: write in a background thread (the next save or `wait` joins it).
      fallback: on a corrupt latest step, log and fall back to the previous one instead of
        raising `CorruptCheckpointError`.
    """
    self.directory = pathlib.Path(directory).absolute()
    self.keep = int(keep) if keep else None
    self.async_save = bool(async_save)
    self.fallback = bool(fallback)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=self.async_save)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=(STATE_ITEM, META_ITEM))

  # ------------------------------------------------------------------------------------------
  # Saving.

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, *, loader_state: Optional[dict] = None,
           host_state: Optional[dict] = None) -> bool:
    """Saves the (canonical, global-view) state at `step`; returns False if it already exists.

    Args:
      step: the state's step (updates applied so far).
      state: the `TrainState` (device or host arrays; replicated global arrays are fine).
      loader_state: `DataLoader.state()` after the last batch consumed by this state.
      host_state: JSON-serialisable host-side state (method schedules, ...).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    flat = flatten_state(to_host(state))
    meta = {"format": FORMAT, "step": step, "loader": dict(loader_state or {}),
            "host": dict(host_state or {}), "crc32": checksums(flat),
            "leaves": _signature(flat), "time": time.time()}
    self._manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(flat), META_ITEM: ocp.args.JsonSave(meta)}))
    return True

  def wait(self) -> None:
    """Blocks until any background save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # ------------------------------------------------------------------------------------------
  # Restoring.

  def restore(self, step: int, template: PyTree) -> Tuple[PyTree, dict]:
    """Restores step `step` onto `template`'s structure as host NumPy arrays.

    Args:
      step: an existing step.
      template: a (host) `TrainState` with the expected structure, shapes and dtypes.

    Returns:
      `(state, meta)`.

    Raises:
      CorruptCheckpointError: unreadable, incomplete, mismatched format or failing checksums.
      ValueError: the checkpoint is intact but belongs to a different training state
        (another model or optimizer): a configuration error, never silently "fixed".
    """
    flat_template = flatten_state(to_host(template))
    path = self.directory / str(step)
    meta = self.read_meta(step)
    # An intact checkpoint of a different model/optimizer is a configuration error, not
    # corruption: say so before touching the arrays.
    saved, wanted = meta.get("leaves") or {}, _signature(flat_template)
    if saved != wanted:
      diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
      raise ValueError(
          f"checkpoint step {step} in {self.directory} belongs to a different training state "
          f"(model, method or optimizer changed?); differing leaves: "
          + "; ".join(f"{k}: saved {saved.get(k)} vs now {wanted.get(k)}" for k in diff[:6])
          + (" ..." if len(diff) > 6 else ""))
    flat = self.restore_flat(step, meta)
    state = unflatten_state(template, flat)
    if int(np.asarray(state.step)) != step:
      raise CorruptCheckpointError(step, path, f"state.step is {int(np.asarray(state.step))}")
    return state, meta

  def restore_flat(self, step: int, meta: dict) -> Dict[str, np.ndarray]:
    """The `{name: array}` leaves of step `step` (shapes from `meta`), checksums verified."""
    path = self.directory / str(step)
    leaves = meta.get("leaves") or {}
    expected = meta.get("crc32") or {}
    if not leaves or set(expected) != set(leaves):
      raise CorruptCheckpointError(step, path, "the meta does not list the saved leaves")
    target = {k: np.zeros(shape, np.dtype(dtype)) for k, (dtype, shape) in leaves.items()}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardRestore(target)}))
      flat = {k: np.asarray(v) for k, v in dict(restored[STATE_ITEM]).items()}
    except Exception as e:  # Orbax/TensorStore raise many types for a damaged step.
      raise CorruptCheckpointError(step, path, f"{type(e).__name__}: {e}") from e
    if set(flat) != set(leaves):
      raise CorruptCheckpointError(step, path, "restored leaves differ from the meta's list")
    actual = checksums(flat)
    bad = sorted(k for k in flat if int(expected[k]) != actual[k])
    if bad:
      raise CorruptCheckpointError(step, path, f"checksum mismatch in {len(bad)} leaves "
                                   f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    return flat

  def read_meta(self, step: int) -> dict:
    """The JSON meta of step `step` (raises `CorruptCheckpointError` if unreadable)."""
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(step, path, f"unreadable meta: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise CorruptCheckpointError(step, path, f"unknown or missing meta format in {meta!r:.200}")
    if int(meta.get("step", -1)) != step:
      raise CorruptCheckpointError(step, path, f"meta names step {meta.get('step')}")
    return meta

  def restore_latest(self, template: PyTree) -> Optional[Tuple[PyTree, dict]]:
    """Restores the newest readable step, or returns None when there is no checkpoint at all.

    With `fallback=False` a corrupt newest step raises `CorruptCheckpointError`. With
    `fallback=True` it is moved to `checkpoints_corrupt/<step>` (process 0), a warning is
    logged, and the next older step is tried; if every step is corrupt the last error is
    raised (never a silent restart).
    """
    last_error = None
    while True:
      step = self._manager.latest_step()
      if step is None:
        if last_error is not None:
          raise last_error
        return None
      try:
        return self.restore(step, template)
      except CorruptCheckpointError as e:
        if not self.fallback:
          raise
        last_error = e
        logging.warning("%s -- falling back to the previous checkpoint (config.train."
                        "ckpt_fallback=True)", e)
        self._quarantine(step)

  def _quarantine(self, step: int) -> None:
    """Moves a corrupt step out of the manager's directory (kept for inspection)."""
    self._manager.wait_until_finished()
    self._manager.close()
    if jax.process_index() == 0:
      dest_root = self.directory.parent / CORRUPT_DIR
      dest_root.mkdir(parents=True, exist_ok=True)
      dest = dest_root / f"{step}-{int(time.time())}"
      src = self.directory / str(step)
      if src.exists():
        shutil.move(str(src), str(dest))
        logging.warning("moved corrupt checkpoint step %d to %s", step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxee_quarantine_{step}")
    self._manager = self._open()
