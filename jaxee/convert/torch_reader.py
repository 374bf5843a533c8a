"""Safe reading of PyTorch and safetensors checkpoints into NumPy, without torch.

`torch.save` files are pickles, and a pickle may call any importable function
while it is read. User data never reaches `pickle.load`/`torch.load`: a restricted
`pickle.Unpickler` admits only an allow-list of globals (tensor rebuilders, storage
types, dtypes, plain containers), each replaced by a local stand-in, and refuses
any other global before anything is called. Reads the torch zip format, the
legacy format and safetensors; tensors come back as NumPy array copies.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Dict, Mapping, Union

import ml_dtypes
import numpy as np
import safetensors

from jaxee.convert.errors import CheckpointError, CheckpointNotFoundError, PathLike

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_SAFE_HINT = "Only tensors and containers are read; convert the checkpoint to safetensors."

# (typed storage class, torch dtype names, safetensors name) -> NumPy dtype.
_DTYPES = [
    ("FloatStorage", ("float32", "float"), "F32", np.float32),
    ("DoubleStorage", ("float64", "double"), "F64", np.float64),
    ("HalfStorage", ("float16", "half"), "F16", np.float16),
    ("BFloat16Storage", ("bfloat16",), "BF16", ml_dtypes.bfloat16),
    ("LongStorage", ("int64", "long"), "I64", np.int64),
    ("IntStorage", ("int32", "int"), "I32", np.int32),
    ("ShortStorage", ("int16", "short"), "I16", np.int16),
    ("CharStorage", ("int8",), "I8", np.int8),
    ("ByteStorage", ("uint8",), "U8", np.uint8),
    ("BoolStorage", ("bool",), "BOOL", np.bool_),
    ("ComplexFloatStorage", ("complex64",), None, np.complex64),
    ("ComplexDoubleStorage", ("complex128",), None, np.complex128),
]


class _NoState:
  """Mixin: refuses pickle BUILD so a payload cannot overwrite our fields."""
  __slots__ = ()

  def __setstate__(self, state):
    raise CheckpointError(f"BUILD on {type(self).__name__} is not allowed")


class _Global(_NoState):
  """Stand-in for an allowed torch global: a dtype or storage type, or a function."""
  __slots__ = ("name", "dtype", "fn")

  def __init__(self, name: str, dtype=None, fn=None):
    self.name, self.dtype, self.fn = name, None if dtype is None else np.dtype(dtype), fn

  def __call__(self, *args):
    if self.fn is None:
      raise CheckpointError(f"{self.name} cannot be called")
    return self.fn(*args)


_UNTYPED = _Global("torch.storage.UntypedStorage", np.uint8)


class _Storage(_NoState):
  """A storage: raw bytes (possibly filled in later) read as `dtype`."""
  __slots__ = ("key", "dtype", "numel", "data", "base", "offset")

  def __init__(self, key, dtype, numel, data=None, base=None, offset=0):
    self.key, self.dtype, self.numel = key, np.dtype(dtype), numel
    self.data, self.base, self.offset = data, base, offset

  def buffer(self) -> bytes:
    """Returns the storage bytes (a slice of the base storage for views)."""
    if self.base is not None:
      start = self.offset * self.dtype.itemsize
      data = self.base.buffer()[start:start + self.numel * self.dtype.itemsize]
    else:
      data = self.data
    if data is None:
      raise CheckpointError(f"no data was found for storage {self.key!r}")
    if len(data) < self.numel * self.dtype.itemsize:
      raise CheckpointError(
          f"storage {self.key!r} is truncated: {len(data)} bytes, expected "
          f"{self.numel} x {self.dtype.itemsize} bytes")
    return data


class _PendingTensor(_NoState):
  """A tensor to rebuild once every storage's bytes are known."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype")

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.size = storage, offset, size
    self.stride, self.dtype = stride, dtype


def _ints(value, what: str) -> tuple:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise CheckpointError(f"tensor {what} must be non-negative ints, got {value!r}")
  return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
  """Stand-in for `torch._utils._rebuild_tensor_v2` (a strided storage view)."""
  del unused  # requires_grad, backward_hooks[, metadata]
  return _rebuild_tensor_v3(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, dtype=None, metadata=None):
  """Stand-in for `torch._utils._rebuild_tensor_v3` (carries the dtype)."""
  del requires_grad, backward_hooks, metadata  # Irrelevant for NumPy.
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor storage must be a storage, got {type(storage).__name__}")
  if dtype is not None and (not isinstance(dtype, _Global) or dtype.dtype is None):
    raise CheckpointError(f"tensor dtype must be a torch dtype, got {dtype!r}")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} differ in rank")
  (offset,) = _ints((storage_offset,), "storage_offset")
  return _PendingTensor(storage, offset, size, stride,
                        None if dtype is None else dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """Stand-in for `torch._utils._rebuild_parameter[_with_state]`."""
  del requires_grad, backward_hooks, state
  return data


class _Namespace(dict):
  """Stand-in for `argparse.Namespace`: its attributes become dict items."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise CheckpointError("argparse.Namespace state must be a dict")
    self.update(state)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Global("_rebuild_tensor_v2", fn=_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Global("_rebuild_tensor_v3", fn=_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Global("_rebuild_parameter", fn=_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"):
        _Global("_rebuild_parameter_with_state", fn=_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch", "Size"): _Global("torch.Size", fn=lambda dims=(): _ints(dims, "torch.Size")),
    ("argparse", "Namespace"): _Namespace,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
for _storage_name, _dtype_names, _, _np_dtype in _DTYPES:
  for _name in (_storage_name,) + _dtype_names:
    _ALLOWED[("torch", _name)] = _Global(f"torch.{_name}", _np_dtype)


class _SafeUnpickler(pickle.Unpickler):
  """Admits only `_ALLOWED` globals; storage persistent ids go to `load_storage`.

  `load_storage(key, dtype, numel, view_metadata)` returns a `_Storage`; when it
  is None, no persistent ids are allowed.
  """

  def __init__(self, file, load_storage=None):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "__builtin__":
      module = "builtins"
    allowed = _ALLOWED.get((module, name))
    if allowed is None:
      raise CheckpointError(f"refused unsafe global '{module}.{name}' in the pickle. "
                            + _SAFE_HINT)
    return allowed

  def persistent_load(self, pid):
    if (self._load_storage is None or not isinstance(pid, tuple) or len(pid) not in (5, 6)
        or pid[0] not in ("storage", b"storage")):
      raise CheckpointError(f"unsupported persistent id {str(pid)[:80]!r}")
    stype, key, _, numel = pid[1:5]
    if not isinstance(stype, _Global) or stype.dtype is None:
      raise CheckpointError(f"unsupported storage type {stype!r}")
    if isinstance(key, bytes):
      key = key.decode("ascii", "replace")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise CheckpointError(f"malformed storage reference {str(pid)[:80]!r}")
    return self._load_storage(key, stype.dtype, numel, pid[5] if len(pid) == 6 else None)


def _to_array(t: _PendingTensor, swap: bool) -> np.ndarray:
  """Copies the strided view described by `t` out of its storage."""
  dtype = t.dtype if t.dtype is not None else t.storage.dtype
  data = t.storage.buffer()
  if 0 in t.size:
    return np.zeros(t.size, dtype)
  extent = t.offset + 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if extent * dtype.itemsize > len(data):
    raise CheckpointError(
        f"storage {t.storage.key!r} is too short for a tensor of size {t.size}, "
        f"stride {t.stride}, offset {t.offset}: needs {extent * dtype.itemsize} "
        f"bytes, has {len(data)}")
  base = np.frombuffer(data, dtype, count=extent - t.offset, offset=t.offset * dtype.itemsize)
  strides = tuple(s * dtype.itemsize for s in t.stride)
  arr = np.array(np.lib.stride_tricks.as_strided(base, t.size, strides, writeable=False),
                 order="C")
  return arr.byteswap() if swap and dtype.itemsize > 1 else arr


def _resolve(obj, swap: bool, memo: Dict[int, Any]):
  """Replaces pending tensors (and bare storages) in `obj` by NumPy arrays."""
  if isinstance(obj, (str, bytes, int, float, complex, type(None), np.ndarray)):
    return obj
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _PendingTensor):
    out = _to_array(obj, swap)
  elif isinstance(obj, _Storage):
    out = _to_array(_PendingTensor(obj, 0, (obj.numel,), (1,)), swap)
  elif isinstance(obj, _Global):
    out = obj.name
  elif isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    memo[id(obj)] = out
    for k, v in obj.items():
      out[_resolve(k, swap, memo)] = _resolve(v, swap, memo)
  elif isinstance(obj, list):
    out = memo[id(obj)] = []
    out.extend(_resolve(v, swap, memo) for v in obj)
  elif isinstance(obj, (tuple, set, frozenset)):
    out = type(obj)(_resolve(v, swap, memo) for v in obj)
  else:
    out = obj
  memo[id(obj)] = out
  return out


def _check_file(path: PathLike) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointNotFoundError("checkpoint file not found", path)
  if os.path.isdir(path):
    raise CheckpointError("expected a file, found a directory", path)
  if os.path.getsize(path) == 0:
    raise CheckpointError("empty file (0 bytes), not a checkpoint", path)
  return path


def _read_zip(path: str):
  """Reads a torch zip-format checkpoint."""
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise CheckpointError(f"truncated or corrupt zip archive ({e})") from e
  with zf:
    pkls = sorted((n for n in zf.namelist() if n.endswith("data.pkl")), key=len)
    if not pkls:
      raise CheckpointError("zip archive has no data.pkl; not a torch checkpoint")
    top = pkls[0][:-len("data.pkl")]
    names = set(zf.namelist())
    order = zf.read(top + "byteorder").decode().strip() if top + "byteorder" in names else "little"
    if order not in ("little", "big"):
      raise CheckpointError(f"unknown byteorder {order!r}")
    storages: Dict[str, _Storage] = {}

    def load_storage(key, dtype, numel, view):
      if view is not None:
        raise CheckpointError("storage views are not used by the zip format")
      if key not in storages:
        name = f"{top}data/{key}"
        if name not in names:
          raise CheckpointError(f"storage entry {name!r} is missing")
        storages[key] = _Storage(key, dtype, numel, zf.read(name))
        storages[key].buffer()  # Checks the length.
      return storages[key]

    obj = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), load_storage).load()
    return _resolve(obj, order != sys.byteorder, {})


def _read_legacy(path: str):
  """Reads a torch legacy-format checkpoint (a sequence of pickles)."""
  with open(path, "rb") as f:
    blob = f.read()
  stream = io.BytesIO(blob)
  if _SafeUnpickler(stream).load() != _LEGACY_MAGIC:
    raise CheckpointError("not a torch checkpoint: a pickle without torch's magic number. "
                          + _SAFE_HINT)
  protocol = _SafeUnpickler(stream).load()
  if protocol != 1001:
    raise CheckpointError(f"unsupported legacy protocol version {protocol!r}")
  sys_info = _SafeUnpickler(stream).load()
  little = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)
  swap = little != (sys.byteorder == "little")
  roots: Dict[str, _Storage] = {}
  views: Dict[str, _Storage] = {}

  def load_storage(key, dtype, numel, view):
    root = roots.setdefault(key, _Storage(key, dtype, numel))
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3):
      raise CheckpointError(f"malformed storage view {view!r}")
    vkey, (voff, vsize) = view[0], _ints(view[1:], "storage view")
    if vkey not in views:
      views[vkey] = _Storage(vkey, dtype, vsize, base=root, offset=voff)
    return views[vkey]

  obj = _SafeUnpickler(stream, load_storage).load()
  keys = _SafeUnpickler(stream).load()
  if not isinstance(keys, list) or set(keys) != set(roots):
    raise CheckpointError("storage key list does not match the storages referenced")
  pos = stream.tell()
  for key in keys:
    storage = roots[key]
    (count,) = struct.unpack_from("<q", blob, pos) if pos + 8 <= len(blob) else (-1,)
    nbytes = count * storage.dtype.itemsize
    if count < max(storage.numel, 0) or pos + 8 + nbytes > len(blob):
      raise CheckpointError(
          f"storage {key!r} is truncated: needs {storage.numel} elements, "
          f"declares {count}, file has {max(0, len(blob) - pos - 8)} bytes left")
    storage.data = blob[pos + 8:pos + 8 + nbytes]
    pos += 8 + nbytes
  return _resolve(obj, swap, {})


def _sniff(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:2] == b"PK":
    return "zip"
  if head[:1] == b"\x80":
    return "pickle"
  return "safetensors" if head[8:9] == b"{" else "unknown"


def _guard(path: str, what: str, fn, *args):
  """Runs `fn(*args)`, turning any failure into a CheckpointError naming `path`."""
  try:
    return fn(*args)
  except CheckpointError as e:
    raise e.with_path(path) from e.__cause__
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{what}: {type(e).__name__}: {e}", path) from e


def read_torch_file(path: PathLike) -> Any:
  """Reads a `torch.save` file safely; tensors become NumPy arrays.

  Args:
    path: A torch zip-format or legacy-format checkpoint (.pt/.pth/.bin/.ckpt).

  Returns:
    The saved object, with tensors as NumPy array copies, `argparse.Namespace`
    as a plain dict and `collections.OrderedDict` kept.

  Raises:
    CheckpointError: Unsafe globals, corrupt or truncated data, not torch.
  """
  path = _check_file(path)
  kind = _sniff(path)
  if kind == "zip":
    return _guard(path, "corrupt torch zip checkpoint", _read_zip, path)
  if kind == "pickle":
    return _guard(path, "corrupt torch legacy checkpoint", _read_legacy, path)
  hint = "; it looks like safetensors (use read_safetensors)" if kind == "safetensors" else ""
  raise CheckpointError(f"not a torch checkpoint (neither a zip archive nor a pickle){hint}",
                        path)


def _safetensors_data_end(path: str, header_len: int) -> int:
  """The largest `data_offsets` end in a safetensors header (-1 when it cannot be parsed)."""
  try:
    with open(path, "rb") as f:
      f.seek(8)
      header = json.loads(f.read(header_len).decode("utf-8"))
    return max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
               default=0)
  except Exception:  # pylint: disable=broad-except
    return -1


def _parse_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads every tensor through the `safetensors` package (NumPy; BF16 via `ml_dtypes`)."""
  size = os.path.getsize(path)
  if size < 8:
    raise CheckpointError(f"truncated safetensors file: {size} bytes, no header length")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
  if n > size - 8:
    raise CheckpointError(f"truncated safetensors file: header claims {n} bytes, "
                          f"file has {size - 8} after the length")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      # `np.array` copies: the result owns its memory, independent of the file.
      return {name: np.array(f.get_tensor(name)) for name in f.keys()}
  except safetensors.SafetensorError as e:
    end = _safetensors_data_end(path, n)
    if end > size - 8 - n:
      raise CheckpointError(f"truncated safetensors file: the header lists tensor data up to "
                            f"byte {end} but the file has {size - 8 - n} data bytes") from e
    raise CheckpointError(f"corrupt safetensors file: {e}") from e


def read_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
  """Reads a .safetensors file through the `safetensors` package (header length pre-checked).

  Args:
    path: The .safetensors file.

  Returns:
    A dict from tensor name to a NumPy array (a copy).

  Raises:
    CheckpointError: Truncated file, corrupt header or unsupported dtype.
  """
  path = _check_file(path)
  return _guard(path, "corrupt safetensors file", _parse_safetensors, path)


_EMA_KEYS = ("ema", "nnet_ema", "model_ema", "ema_model")
_MODEL_KEYS = ("model", "nnet", "state_dict", "module", "net")


def _select(obj, prefer: str, depth: int = 0) -> Dict[str, np.ndarray]:
  """Picks the flat state dict out of `obj` (maybe a training checkpoint)."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"expected a state dict (a mapping), found {type(obj).__name__}")
  if obj and all(hasattr(v, "__array__") and hasattr(v, "dtype") for v in obj.values()):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise CheckpointError(f"state dict key {k!r} is not a string")
      name = k[len("module."):] if k.startswith("module.") else k
      if name in out:
        raise CheckpointError(f"duplicate parameter {name!r} after stripping 'module.'")
      out[name] = np.asarray(v)
    return out
  order = (_EMA_KEYS + _MODEL_KEYS) if prefer != "model" else (_MODEL_KEYS + _EMA_KEYS)
  for key in (prefer,) + order:
    if depth < 2 and isinstance(obj.get(key), Mapping) and obj[key]:
      try:
        return _select(obj[key], prefer, depth + 1)
      except CheckpointError:
        continue
  found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:20])
  raise CheckpointError(f"no flat state dict of arrays found; top-level keys ({len(obj)}): "
                        f"{{{found}}}")


def load_state_dict(src: Union[PathLike, Mapping], *, prefer: str = "ema"
                    ) -> Dict[str, np.ndarray]:
  """Loads a flat parameter dict from a file, a U-ViT checkpoint dir or a mapping.

  Training checkpoints (e.g. DiT's `{'model', 'ema', 'opt', 'args'}`) are
  searched for a nested state dict: `prefer` first if present, then EMA
  weights, then 'model'/'state_dict'-like entries (`prefer='model'` puts the
  non-EMA entries first). A leading DDP `module.` prefix is stripped.

  Args:
    src: A .pt/.pth/.bin/.ckpt/.safetensors file (format sniffed from content),
      a U-ViT `<step>.ckpt/` directory holding `nnet_ema.pth`/`nnet.pth`, or an
      already-loaded mapping.
    prefer: Which nested entry to pick first ('ema' or 'model', or any key).

  Returns:
    A flat dict from parameter name to NumPy array.

  Raises:
    CheckpointError: Unreadable input, or no flat state dict of arrays found.
  """
  if isinstance(src, Mapping):
    return _select(src, prefer)
  if not isinstance(src, (str, os.PathLike)):
    raise CheckpointError(f"expected a path or a mapping, got {type(src).__name__}")
  path = os.fspath(src)
  if os.path.isdir(path):
    names = ("nnet.pth", "nnet_ema.pth") if prefer == "model" else ("nnet_ema.pth", "nnet.pth")
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise CheckpointError(f"directory has no nnet_ema.pth or nnet.pth; it holds "
                            f"{sorted(os.listdir(path))[:20]}", path)
    path = found[0]
  kind = _sniff(_check_file(path))
  if kind == "safetensors" or (kind == "unknown" and path.endswith(".safetensors")):
    obj = read_safetensors(path)
  else:
    obj = read_torch_file(path)
  return _guard(path, "unexpected checkpoint layout", _select, obj, prefer)
