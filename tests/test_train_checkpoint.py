"""`jaxee.train.checkpoint`: exact round trip, keep-N, corrupt checkpoints, mismatched states.

Uses a small dict of params with AdamW + frozen groups (so the optax state has empty nodes and
`MaskedNode`s), no model and no compilation beyond `tx.init`.
"""
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from jaxee.train import checkpoint
from jaxee.train import optim
from jaxee.train import state as state_lib


def _state(step=0, scale=1.0, width=5):
  rs = np.random.RandomState(0)
  params = {"backbone": {"w": (scale * rs.standard_normal((3, width))).astype(np.float32)},
            "head": {"b": np.arange(4, dtype=np.float32) * scale}}
  tx = optim.make_optimizer({"lr": 1e-3, "weight_decay": 0.1,
                             "frozen_patterns": ["backbone/.*"]}, params)
  s = state_lib.create_train_state(params, tx, jax.random.PRNGKey(7),
                                   extras={"boost": np.float32(1.0)})
  s = jax.tree.map(np.asarray, jax.device_get(s))
  return s.replace(step=np.asarray(step, np.int32))


def _save_steps(directory, steps, keep=2, **kw):
  mgr = checkpoint.TrainCheckpointer(directory, keep=keep, **kw)
  for k in steps:
    assert mgr.save(k, _state(k, scale=float(k)), loader_state={"epoch": 0, "index": 16 * k},
                    host_state={"plateau": {"count": k}})
  mgr.wait()
  return mgr


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


def test_round_trip_keep_n_and_meta(tmp_path):
  mgr = _save_steps(tmp_path / "ckpt", [1, 2, 3], keep=2)
  assert mgr.all_steps() == [2, 3]
  assert not mgr.save(3, _state(3))  # an existing step is never overwritten
  restored, meta = mgr.restore_latest(_state())
  mgr.close()
  _assert_trees_equal(restored, _state(3, scale=3.0))
  assert meta["loader"] == {"epoch": 0, "index": 48}
  assert meta["host"] == {"plateau": {"count": 3}}
  # Empty optax nodes survived: the structure is the template's.
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(_state())


def test_no_checkpoint_returns_none(tmp_path):
  mgr = checkpoint.TrainCheckpointer(tmp_path / "ckpt")
  assert mgr.restore_latest(_state()) is None
  mgr.close()


def _data_files(step_dir: pathlib.Path):
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["garbage_data", "flip_byte", "missing_state", "bad_meta",
                                    "stale_arrays"])
def test_corrupt_latest_is_a_loud_error(tmp_path, damage):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1, 2], keep=3).close()
  step_dir = directory / "2"
  if damage == "garbage_data":
    for f in _data_files(step_dir):
      f.write_bytes(os.urandom(f.stat().st_size))
  elif damage == "flip_byte":
    # One byte in the middle of the largest data file: chunks may still decode, the CRC won't.
    f = max(_data_files(step_dir), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    f.write_bytes(bytes(raw))
  elif damage == "stale_arrays":
    # Arrays that OCDBT reads without complaint but that are not the ones saved with this
    # meta (e.g. a half-synced copy): only the per-leaf CRC32 catches it.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(directory / "1" / "state", step_dir / "state")
  elif damage == "missing_state":
    for f in (step_dir / "state").rglob("*"):
      if f.is_file():
        f.unlink()
  else:
    meta = next(p for p in (step_dir / "meta").iterdir() if p.is_file() and
                p.name == "metadata")
    meta.write_text(json.dumps({"format": "something-else"}))
  mgr = checkpoint.TrainCheckpointer(directory, keep=3)
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2") as info:
    mgr.restore_latest(_state())
  assert info.value.step == 2
  if damage == "stale_arrays":
    assert "checksum mismatch" in info.value.reason
  assert "ckpt_fallback" in str(info.value)
  assert step_dir.exists()  # nothing deleted without being asked
  mgr.close()


def test_fallback_moves_corrupt_step_aside_and_restores_previous(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1, 2, 3], keep=3).close()
  for f in _data_files(directory / "3"):
    f.write_bytes(os.urandom(f.stat().st_size))
  mgr = checkpoint.TrainCheckpointer(directory, keep=3, fallback=True)
  with caplog.at_level("WARNING"):
    restored, meta = mgr.restore_latest(_state())
  assert int(restored.step) == 2 and meta["step"] == 2
  _assert_trees_equal(restored, _state(2, scale=2.0))
  assert "falling back" in caplog.text and "step 3" in caplog.text
  assert mgr.all_steps() == [1, 2]
  moved = list((tmp_path / checkpoint.CORRUPT_DIR).iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("3-")
  # Training can continue and save step 3 again.
  assert mgr.save(3, _state(3, scale=5.0))
  mgr.close()


def test_fallback_with_every_step_corrupt_still_raises(tmp_path):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1], keep=3).close()
  for f in _data_files(directory / "1"):
    f.write_bytes(os.urandom(f.stat().st_size))
  mgr = checkpoint.TrainCheckpointer(directory, fallback=True)
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 1"):
    mgr.restore_latest(_state())
  mgr.close()


def test_checkpoint_of_another_state_is_a_config_error(tmp_path):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1]).close()
  mgr = checkpoint.TrainCheckpointer(directory)
  with pytest.raises(ValueError, match="different training state") as info:
    mgr.restore_latest(_state(width=6))
  assert not isinstance(info.value, checkpoint.CorruptCheckpointError)
  assert "params.backbone.w" in str(info.value)
  mgr.close()


def test_flatten_names_and_to_host():
  s = _state()
  flat = checkpoint.flatten_state(s)
  assert "params.backbone.w" in flat and "ema_params.head.b" in flat and "rng" in flat
  assert "extras.boost" in flat and "healthy" in flat
  _assert_trees_equal(checkpoint.unflatten_state(s, flat), s)
  placed = jax.device_put(s.params)
  _assert_trees_equal(checkpoint.to_host(placed), s.params)
