"""Training checkpoints: Orbax saves the sharded `TrainState` as it lies on the devices.

Layout of `WORKDIR/checkpoints/<step>/` (one Orbax step directory, written atomically by Orbax:
a temporary directory renamed into place once complete, so a kill -9 mid-save leaves no step):

* `state/`: the `TrainState` (params, optimizer state, EMA, step, base RNG, extras, healthy
  flag) as a flat `{name: array}` dict, names from the pytree key paths
  (`params.blocks.attn.qkv.kernel`, `opt_state.0.mu.blocks...`), through `StandardSave`. The
  leaves are the state's own `jax.Array`s: Orbax writes every shard from the process that holds
  it (one replica of a replicated array), so no process ever holds more than its own shards;
  there is no `device_get` / all-gather of the state on the save path;
* `meta/`: JSON through `JsonSave`: `{'format', 'step', 'loader': DataLoader.state(),
  'host': {...trainer/method host state...}, 'leaves': {name: [dtype, shape]},
  'fingerprint': {name: uint32}}`.

Integrity (format `jaxee-train-v2`). Until v1 the host pulled the whole state into NumPy and
CRC32-ed its bytes before every save (11 GB for DiT-XL/2 with Adam). Now each leaf gets a
*fingerprint* computed on the devices where it lives (`fingerprints`: a position-weighted sum of
the leaf's 32-bit words modulo 2^32, one jitted reduction over the sharded arrays; only one
uint32 per leaf reaches the host). Integer addition modulo 2^32 is associative, so the value
does not depend on the sharding, the device count or the reduction order: a restore onto another
mesh checks the same numbers. What is kept from v1: a flipped byte, truncated, garbage or stale
(another step's) arrays and a missing item are each a `CorruptCheckpointError` naming the step;
an interrupted save never replaces the previous step (Orbax's temporary-directory commit). What
is weaker: the fingerprint is not a CRC, so a deliberate collision is easy and two compensating
corruptions could cancel; against random damage it is a 32-bit check like the CRC (every
single-word change alters it). v1 checkpoints still restore (their CRC32s checked on the host).

Why a flat dict: optax states contain empty nodes (`EmptyState`, `MaskedNode`) that Orbax
trees do not round-trip. Restoring takes a template whose leaves are NumPy arrays (restored to
host memory) or `jax.Array` / `jax.ShapeDtypeStruct` with a sharding (restored directly onto
that sharding, every process reading only its shards).

Resume policy (`TrainCheckpointer.restore_latest`): the workdir's latest step; if it cannot be
read or fails its fingerprints, `CorruptCheckpointError` names the step and the reason, unless
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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxee.exits import io as plan_io

PyTree = Any
FORMAT = "jaxee-train-v2"
FORMAT_V1 = "jaxee-train-v1"  # host CRC32s; still restorable
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
  return {k: np.asarray(v) for k, v in flatten_leaves(state).items()}


def flatten_leaves(state: PyTree) -> Dict[str, Any]:
  """`{name: leaf}` with the leaves as they are (jax.Arrays stay on their devices)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = leaf_name(path)
    if name in flat:
      raise ValueError(f"two state leaves share the checkpoint name {name!r}")
    flat[name] = leaf if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else np.asarray(leaf)
  return flat


def unflatten_state(template: PyTree, flat: Dict[str, Any]) -> PyTree:
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
    value = flat[name]
    if not isinstance(value, jax.Array):
      value = np.asarray(value)
    ref_shape = np.shape(ref)
    ref_dtype = np.dtype(ref.dtype) if hasattr(ref, "dtype") else np.asarray(ref).dtype
    if tuple(value.shape) != tuple(ref_shape) or np.dtype(value.dtype) != ref_dtype:
      raise ValueError(f"checkpoint leaf {name}: {value.dtype}{list(value.shape)} does not "
                       f"match the training state's {ref_dtype}{list(ref_shape)}")
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def checksums(flat: Dict[str, np.ndarray]) -> Dict[str, int]:
  """CRC32 of every leaf's bytes (C order): the v1 host-side check, kept to read v1 steps."""
  return {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) & 0xFFFFFFFF
          for k, v in sorted(flat.items())}


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as a flat uint32 vector (narrower words zero-extended, wider ones split)."""
  bits = np.dtype(x.dtype).itemsize * 8
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  w = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")) if bits <= 32 else \
      jax.lax.bitcast_convert_type(x, jnp.uint32)
  return w.reshape(-1).astype(jnp.uint32)


def _fingerprint_one(x: jax.Array) -> jax.Array:
  """Position-weighted sum of the mixed 32-bit words of `x`, modulo 2^32 (see module doc).

  Word i contributes `mix(w_i) * (2 i + 1)`; `mix` (multiply by the golden-ratio constant and
  fold the high half down) makes every bit of a word matter, the odd weight is invertible
  modulo 2^32 so any change of one word changes the sum, and the position makes swapped
  words differ. Exact integer arithmetic: the same on any sharding and device count.
  """
  w = _words(x)
  v = w * jnp.uint32(0x9E3779B1)
  v = v ^ (v >> 16)
  weight = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  size = jnp.uint32(w.shape[0] & 0xFFFFFFFF)
  return jnp.sum(v * weight, dtype=jnp.uint32) ^ (size * jnp.uint32(0x85EBCA77))


@jax.jit
def _fingerprint_all(leaves):
  return [_fingerprint_one(x) for x in leaves]


def fingerprints(flat: Dict[str, Any]) -> Dict[str, int]:
  """`{name: uint32 fingerprint}` of every leaf, computed where the leaves live.

  jax.Arrays (sharded or replicated, also multi-process global arrays) are reduced on their
  devices by one jitted call; only the scalars come to the host. Every process must call it
  (as it calls `save`). NumPy leaves are reduced on the default device.
  """
  names = sorted(flat)
  out = _fingerprint_all([flat[k] for k in names])
  return {k: int(np.asarray(v.addressable_data(0))) for k, v in zip(names, out)}


def _signature(flat: Dict[str, Any]) -> Dict[str, list]:
  """`{name: [dtype, shape]}`: what a checkpoint must match to belong to a training state."""
  return {k: [str(np.dtype(v.dtype)), list(v.shape)] for k, v in sorted(flat.items())}


def _restore_target(leaf) -> Any:
  """Orbax restore target of one template leaf: a sharded abstract array or a NumPy array."""
  sharding = getattr(leaf, "sharding", None)
  if sharding is not None:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  return np.zeros(np.shape(leaf), np.dtype(leaf.dtype))


def _scalar(x) -> int:
  """A (possibly global, replicated) scalar as a Python int, read from one local copy."""
  if isinstance(x, jax.Array):
    return int(np.asarray(x.addressable_data(0)))
  return int(np.asarray(x))


class TrainCheckpointer:
  """Saves and restores `(TrainState, loader position, host state)` under `directory`.

  Every process constructs one and calls `save` / `restore_latest` (Orbax synchronises them);
  each process writes the array slices it owns (its own OCDBT store), process 0 the meta.
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

    The state's jax.Arrays are handed to Orbax as they are (any sharding, multi-process global
    arrays included): no host gather, no host-side checksum. Every process must call it.

    Args:
      step: the state's step (updates applied so far).
      state: the `TrainState` (device arrays of any sharding, or host arrays).
      loader_state: `DataLoader.state()` after the last batch consumed by this state.
      host_state: JSON-serialisable host-side state (method schedules, ...).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    flat = flatten_leaves(state)
    meta = {"format": FORMAT, "step": step, "loader": dict(loader_state or {}),
            "host": dict(host_state or {}), "fingerprint": fingerprints(flat),
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
    """Restores step `step` onto `template`'s structure, shardings and dtypes.

    Args:
      step: an existing step.
      template: a `TrainState` with the expected structure, shapes and dtypes. NumPy leaves
        are restored as NumPy arrays; `jax.Array` / `jax.ShapeDtypeStruct` leaves with a
        sharding are restored as jax.Arrays on that sharding (each process reads its shards).

    Returns:
      `(state, meta)`.

    Raises:
      CorruptCheckpointError: unreadable, incomplete, mismatched format or failing checks.
      ValueError: the checkpoint is intact but belongs to a different training state
        (another model or optimizer): a configuration error, never silently "fixed".
    """
    flat_template = flatten_leaves(template)
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
    targets = {k: _restore_target(v) for k, v in flat_template.items()}
    flat = self.restore_flat(step, meta, targets)
    state = unflatten_state(template, flat)
    if _scalar(state.step) != step:
      raise CorruptCheckpointError(step, path, f"state.step is {_scalar(state.step)}")
    return state, meta

  def restore_flat(self, step: int, meta: dict,
                   targets: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The `{name: array}` leaves of step `step`, verified against the meta's checks.

    Args:
      step: an existing step.
      meta: its `read_meta`.
      targets: `{name: np.ndarray | jax.ShapeDtypeStruct(sharding=...)}`; default: every leaf
        as a host NumPy array (shapes from `meta`).
    """
    path = self.directory / str(step)
    leaves = meta.get("leaves") or {}
    v1 = meta.get("format") == FORMAT_V1
    expected = meta.get("crc32" if v1 else "fingerprint") or {}
    if not leaves or set(expected) != set(leaves):
      raise CorruptCheckpointError(step, path, "the meta does not list the saved leaves")
    host = {k: np.zeros(shape, np.dtype(dtype)) for k, (dtype, shape) in leaves.items()}
    if targets is None:
      targets = host
    elif set(targets) != set(leaves):
      raise ValueError(f"restore targets do not match the leaves of step {step}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardRestore(host if v1 else targets)}))
      flat = dict(restored[STATE_ITEM])
    except Exception as e:  # Orbax/TensorStore raise many types for a damaged step.
      raise CorruptCheckpointError(step, path, f"{type(e).__name__}: {e}") from e
    if set(flat) != set(leaves):
      raise CorruptCheckpointError(step, path, "restored leaves differ from the meta's list")
    if v1:
      flat = {k: np.asarray(v) for k, v in flat.items()}
      actual = checksums(flat)
    else:
      actual = fingerprints(flat)
    bad = sorted(k for k in flat if int(expected[k]) != actual[k])
    if bad:
      raise CorruptCheckpointError(step, path, f"checksum mismatch in {len(bad)} leaves "
                                   f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    if v1:  # v1 steps were read on the host: place them as asked.
      flat = {k: jax.device_put(v, t.sharding) if isinstance(t, jax.ShapeDtypeStruct) else v
              for k, v in flat.items() for t in (targets[k],)}
    return flat

  def read_meta(self, step: int) -> dict:
    """The JSON meta of step `step` (raises `CorruptCheckpointError` if unreadable)."""
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(step, path, f"unreadable meta: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_V1):
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
