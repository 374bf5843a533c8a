"""Test helper: writes torch-format checkpoint files without PyTorch.

Produces files in the layout `torch.save` uses (zip format and legacy format)
from NumPy data, so the reader can be tested on views, shared storages, odd
dtypes, nested training checkpoints and malicious payloads. Torch globals are
emitted as raw GLOBAL opcodes by a pure-Python pickler subclass; nothing here
imports or needs torch.
"""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}
_DTYPE_NAMES = {
    np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.int64): "int64",
}


class Global:
  """A module-level name, pickled as a GLOBAL opcode (never called here)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("Global stand-ins are for pickling only")


class Reduce:
  """Pickles as `REDUCE(func, args)`: e.g. a malicious `posix.system(cmd)`."""

  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


class Storage:
  """A flat storage of NumPy data, optionally a legacy view of another one.

  Args:
    data: 1-D array holding the storage elements.
    untyped: Reference it as `torch.storage.UntypedStorage` (bytes).
    view_of: `(root Storage, element offset)` for legacy-format views.
    nbytes: Bytes actually written (to fake a truncated storage).
  """

  def __init__(self, data, untyped=False, view_of=None, nbytes=None):
    self.data = np.ascontiguousarray(data).reshape(-1)
    self.untyped, self.view_of = untyped, view_of
    self.nbytes = self.data.nbytes if nbytes is None else nbytes

  @property
  def numel(self):
    return self.data.nbytes if self.untyped else self.data.size

  def type_global(self):
    if self.untyped:
      return Global("torch.storage", "UntypedStorage")
    return Global("torch", _STORAGE_NAMES[self.data.dtype])


class Tensor:
  """A strided view of a `Storage` that pickles like a torch tensor.

  Args:
    storage: The Storage.
    offset: Storage offset in elements.
    size: Tensor shape.
    stride: Strides in elements (row-major contiguous when None).
    rebuild: 'v2', 'v3' (explicit dtype) or 'parameter'.
  """

  def __init__(self, storage, offset=0, size=None, stride=None, rebuild="v2"):
    self.storage, self.offset = storage, offset
    self.size = tuple(storage.data.shape if size is None else size)
    if stride is None:
      stride = tuple(int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
    self.stride, self.rebuild = tuple(stride), rebuild

  def __reduce_ex__(self, protocol):
    hooks = collections.OrderedDict()
    if self.rebuild == "v3":
      dtype = Global("torch", _DTYPE_NAMES[self.storage.data.dtype])
      return (Global("torch._utils", "_rebuild_tensor_v3"),
              (self.storage, self.offset, self.size, self.stride, False, hooks, dtype))
    args = (self.storage, self.offset, self.size, self.stride, False, hooks)
    if self.rebuild == "parameter":
      inner = Tensor(self.storage, self.offset, self.size, self.stride)
      return (Global("torch._utils", "_rebuild_parameter"), (inner, True, hooks))
    return (Global("torch._utils", "_rebuild_tensor_v2"), args)


def tensor(array, **kwargs):
  """Returns a contiguous Tensor holding a copy of `array` in its own storage."""
  array = np.asarray(array)
  return Tensor(Storage(array.reshape(-1)), size=array.shape, **kwargs)


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python pickler emitting `Global`s as GLOBAL and storages as pids."""

  def __init__(self, file, legacy=False):
    super().__init__(file, protocol=2)
    self.storages, self.keys, self.legacy = {}, {}, legacy

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      memo = self.memo.get(id(obj))
      if memo is not None:
        self.write(self.get(memo[0]))
        return
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      self.memoize(obj)
      return
    super().save(obj, save_persistent_id)

  def _key(self, storage):
    if id(storage) not in self.keys:
      self.keys[id(storage)] = key = str(len(self.storages))
      self.storages[key] = storage
    return self.keys[id(storage)]

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    if not self.legacy:
      return ("storage", obj.type_global(), self._key(obj), "cpu", obj.numel)
    if obj.view_of is None:
      return ("storage", obj.type_global(), self._key(obj), "cpu", obj.numel, None)
    root, offset = obj.view_of
    view_key = f"view{id(obj)}"
    return ("storage", root.type_global(), self._key(root), "cpu", root.numel,
            (view_key, offset, obj.numel))


def dumps(obj, legacy=False):
  """Pickles `obj` (protocol 2); returns (bytes, {key: Storage})."""
  buf = io.BytesIO()
  pickler = _Pickler(buf, legacy=legacy)
  pickler.dump(obj)
  return buf.getvalue(), pickler.storages


def save_zip(obj, path, top="archive", data_pkl=None):
  """Writes `obj` in the torch zip format (stored entries under `top/`).

  Args:
    obj: The object (Tensors, containers, Globals, Reduce payloads).
    path: Output file.
    top: The archive's top folder name.
    data_pkl: Raw bytes to store as data.pkl instead of pickling `obj`.
  """
  pkl, storages = dumps(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{top}/data.pkl", pkl if data_pkl is None else data_pkl)
    zf.writestr(f"{top}/byteorder", "little")
    for key, storage in storages.items():
      zf.writestr(f"{top}/data/{key}", storage.data.tobytes()[:storage.nbytes])
    zf.writestr(f"{top}/version", "3\n")
    zf.writestr(f"{top}/.data/version", "3\n")


def save_legacy(obj, path, obj_pickle=None):
  """Writes `obj` in the torch legacy format (a sequence of pickles).

  Args:
    obj: The object to save.
    path: Output file.
    obj_pickle: Raw bytes to use as the object pickle instead of `obj`'s.
  """
  pkl, storages = dumps(obj, legacy=True)
  sys_info = {"protocol_version": 1001, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, 1001, sys_info):
      f.write(pickle.dumps(header, protocol=2))
    f.write(pkl if obj_pickle is None else obj_pickle)
    keys = list(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for key in keys:
      storage = storages[key]
      f.write(struct.pack("<q", storage.data.size))
      f.write(storage.data.tobytes()[:storage.nbytes])
