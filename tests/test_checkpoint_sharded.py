"""Sharded `TrainState` checkpoints on 8 fake CPU devices (`tests/conftest.py` sets them up).

* a state whose leaves are sharded over the 8 devices (and some replicated) saves and restores
  to the same values and the same shardings;
* no full host gather on the save path: every device-to-host transfer during `save` is of a
  single-device shard (spy on `jax.Array.__array__`, `jax.device_get` and
  `process_allgather`), and the host memory allocated by a save (tracemalloc; NumPy buffers are
  traced) stays well below the v1 path, which copied the whole state to NumPy and then its
  bytes again for the CRC32;
* an interrupted save (killed after writing its data, before Orbax's commit rename) leaves the
  previous step as the latest, restorable one;
* the fingerprint is independent of the sharding and catches a single changed word.
"""
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxee.train import checkpoint
from jaxee.train import optim
from jaxee.train import state as state_lib


def _mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  return jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))


def _sharded_state(mesh, rows=64, cols=32, step=3):
  rs = np.random.RandomState(1)
  params = {"big": rs.standard_normal((rows, cols)).astype(np.float32),
            "head": {"b": rs.standard_normal((7,)).astype(np.float32)}}
  tx = optim.make_optimizer({"lr": 1e-3, "weight_decay": 0.1}, params)
  s = state_lib.create_train_state(params, tx, jax.random.PRNGKey(5))
  s = s.replace(step=jnp.asarray(step, jnp.int32),
                opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, s.opt_state))

  def put(x):
    x = np.asarray(x)
    spec = P("data") if x.ndim and x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, s)


def _assert_same(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert isinstance(y, jax.Array)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_sharded_round_trip_same_values_and_shardings(tmp_path):
  mesh = _mesh()
  s = _sharded_state(mesh)
  assert not s.params["big"].sharding.is_fully_replicated  # really sharded
  mgr = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=True)
  assert mgr.save(3, s, loader_state={"epoch": 0, "index": 3})
  mgr.wait()
  # Abstract template: shapes, dtypes and target shardings only.
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), s)
  restored, meta = mgr.restore_latest(template)
  mgr.close()
  assert meta["format"] == checkpoint.FORMAT and meta["loader"]["index"] == 3
  _assert_same(s, restored)
  # Onto another layout: everything replicated (the fingerprints do not depend on it).
  repl = NamedSharding(mesh, P())
  mgr = checkpoint.TrainCheckpointer(tmp_path / "ckpt")
  other, _ = mgr.restore(3, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), s))
  mgr.close()
  assert other.params["big"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(other.params["big"]), np.asarray(s.params["big"]))


def test_save_does_not_gather_the_state_on_the_host(tmp_path, monkeypatch):
  mesh = _mesh()
  s = _sharded_state(mesh, rows=512, cols=1024)  # 2 MiB per array, ~8 MiB of state
  state_bytes = sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(s))
  gathers = []
  array_cls = type(s.params["big"])
  orig_array, orig_get, orig_allgather = (array_cls.__array__, jax.device_get,
                                          multihost_utils.process_allgather)

  def spy_array(self, *a, **k):
    if len(self.sharding.device_set) > 1:
      gathers.append(("__array__", self.shape))
    return orig_array(self, *a, **k)

  def spy_get(x):
    gathers.extend(("device_get", leaf.shape) for leaf in jax.tree.leaves(x)
                   if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1)
    return orig_get(x)

  def spy_allgather(x, *a, **k):
    gathers.append(("process_allgather", None))
    return orig_allgather(x, *a, **k)

  mgr = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
  mgr.save(1, s)  # warm-up: compiles the fingerprint, creates the directory
  monkeypatch.setattr(array_cls, "__array__", spy_array)
  monkeypatch.setattr(jax, "device_get", spy_get)
  monkeypatch.setattr(multihost_utils, "process_allgather", spy_allgather)
  tracemalloc.start()
  mgr.save(2, s)
  mgr.wait()
  _, peak_new = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  monkeypatch.undo()
  assert gathers == []
  # The v1 path for comparison: whole state to NumPy, then its bytes for the CRC32s.
  tracemalloc.start()
  checkpoint.checksums(checkpoint.flatten_state(checkpoint.to_host(s)))
  _, peak_old = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  mgr.close()
  print(f"state {state_bytes / 2**20:.1f} MiB; host peak of a save {peak_new / 2**20:.2f} MiB; "
        f"v1 gather + CRC {peak_old / 2**20:.2f} MiB")
  assert peak_old >= state_bytes
  assert peak_new < 0.5 * state_bytes


def test_interrupted_save_keeps_the_previous_step(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  s1 = _sharded_state(mesh, step=1)
  directory = tmp_path / "ckpt"
  mgr = checkpoint.TrainCheckpointer(directory, async_save=False)
  mgr.save(1, s1)
  mgr.close()

  async def die(self, *a, **k):  # the data is written, the commit rename never happens
    raise KeyboardInterrupt("killed before commit")
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", die)
  mgr = checkpoint.TrainCheckpointer(directory, async_save=False)
  with pytest.raises(BaseException, match="killed before commit"):
    mgr.save(2, _sharded_state(mesh, step=2))
  monkeypatch.undo()
  assert any(p.name.startswith("2.") for p in directory.iterdir())  # the uncommitted leftover
  mgr = checkpoint.TrainCheckpointer(directory, async_save=False)
  assert mgr.all_steps() == [1]
  restored, _ = mgr.restore_latest(s1)
  _assert_same(s1, restored)
  assert mgr.save(2, _sharded_state(mesh, step=2))  # and the run goes on
  mgr.close()


def test_fingerprint_independent_of_sharding_and_sensitive():
  mesh = _mesh()
  x = np.random.RandomState(0).standard_normal((16, 6)).astype(np.float32)
  ref = checkpoint.fingerprints({"x": x})["x"]
  for spec in (P("data"), P()):
    assert checkpoint.fingerprints({"x": jax.device_put(x, NamedSharding(mesh, spec))})["x"] == ref
  y = x.copy()
  y[11, 4] = np.nextafter(y[11, 4], np.float32(np.inf))  # one bit of one word
  assert checkpoint.fingerprints({"x": y})["x"] != ref
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checkpoint.fingerprints({"x": swapped})["x"] != ref
  for leaf in (np.arange(5, dtype=np.int8), np.ones(3, np.bool_),
               np.ones(4, jnp.bfloat16), np.zeros((), np.int32)):
    assert isinstance(checkpoint.fingerprints({"v": leaf})["v"], int)


def test_v1_checkpoints_still_restore_with_their_crc32(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = _mesh()
  s = _sharded_state(mesh, step=4)
  flat = checkpoint.flatten_state(checkpoint.to_host(s))
  meta = {"format": checkpoint.FORMAT_V1, "step": 4, "loader": {}, "host": {},
          "crc32": checkpoint.checksums(flat),
          "leaves": {k: [str(v.dtype), list(v.shape)] for k, v in sorted(flat.items())}}
  mgr = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
  mgr._manager.save(4, args=ocp.args.Composite(  # what v1's `save` wrote
      state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)))
  mgr.wait()
  restored, _ = mgr.restore(4, s)  # onto the sharded layout
  _assert_same(s, restored)
  mgr.close()
