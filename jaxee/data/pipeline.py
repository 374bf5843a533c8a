"""A deterministic, resumable, multi-process NumPy input pipeline over random-access sources.

Reproduces the sampling of the original training loops while fitting JAX's multi-host model:

* DuoDiff's `ResumableSeedableSampler`: each epoch is a permutation seeded by (seed, epoch),
  iteration is endless by default and the incomplete last batch is dropped;
* PyTorch `DistributedSampler`-style sharding, but per *global batch*: global batch b of an epoch
  is `perm[b * B:(b + 1) * B]` and process p reads only rows [p * B / P, (p + 1) * B / P) of it,
  so the union over processes is exactly the single-process batch;
* random augmentations (flips, latent posterior samples) draw from a generator derived from
  (seed, epoch, record index) (`transforms.example_rng`), so a record gets the same
  augmentation whatever the batch size, process count, prefetch depth or restart point.

A source is any object with `__len__` and `__getitem__(int) -> dict` (deterministic output).
It may define `augment(example, rng) -> example` for its random part; a `transform(example, rng)`
passed to the loader runs after it. Batches are dicts of stacked arrays: 'image' float32 NHWC,
'label' int32, other keys as stacked; with `drop_remainder=False` the last batch is padded to
full size and every batch carries a float32 'mask' (1 real, 0 padding).

`DataLoader.state()` is the position after the last batch handed out, `{'epoch', 'index'}`
(index = examples of that epoch already consumed globally); `restore(state)` resumes there.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from jaxee.data import transforms

Batch = dict[str, np.ndarray]
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]

_END = object()


def collate(examples: list[Mapping[str, Any]]) -> Batch:
  """Stacks examples key by key; 'image' becomes float32 and 'label' int32.

  Args:
    examples: dicts with the same keys.

  Returns:
    A dict of arrays with a leading batch axis.
  """
  batch = {}
  for key in examples[0]:
    arr = np.stack([np.asarray(ex[key]) for ex in examples])
    if key == 'image':
      arr = arr.astype(np.float32, copy=False)
    elif key == 'label':
      arr = arr.astype(np.int32, copy=False)
    batch[key] = arr
  return batch


def _produce(loader_ref: weakref.ref, pos: tuple[int, int], out: queue.Queue,
             stop: threading.Event) -> None:
  """Prefetch thread body: fills `out` with (batch, next position) from `pos` on.

  Holds the loader only weakly between batches, so a dropped loader stops its thread.

  Args:
    loader_ref: weak reference to the `DataLoader`.
    pos: (epoch, index) to start from.
    out: bounded queue shared with the consumer.
    stop: set by the consumer to end the thread.
  """
  epoch, index = pos
  while not stop.is_set():
    loader = loader_ref()
    if loader is None:
      return
    try:
      if loader._done(epoch):  # pylint: disable=protected-access
        item = _END
      else:
        batch = loader.batch_at(epoch, index)
        epoch, index = loader._advance(epoch, index)  # pylint: disable=protected-access
        item = (batch, (epoch, index))
    except BaseException as e:  # pylint: disable=broad-except
      item = e  # Re-raised in the consumer.
    del loader
    while not stop.is_set() and loader_ref() is not None:
      try:
        out.put(item, timeout=0.05)
        break
      except queue.Full:
        continue
    if item is _END or isinstance(item, BaseException):
      return


class DataLoader:
  """Iterates over per-process slices of deterministic global batches; checkpointable."""

  def __init__(self, source: Any, global_batch_size: int, *, seed: int, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int | None = None,
               process_count: int | None = None, transform: Transform | None = None,
               num_epochs: int | None = None, prefetch: int = 0, num_threads: int = 0):
    """Creates the loader at position (epoch 0, index 0).

    Args:
      source: random-access source (`len`, `[i]`, optional `augment(example, rng)`).
      global_batch_size: examples per step over all processes.
      seed: seeds the epoch permutations and the per-record augmentation generators.
      shuffle: permute each epoch (else sequential order, e.g. for evaluation).
      drop_remainder: drop the incomplete last batch of each epoch; if False it is padded
        (wrapping to the epoch's first records) and batches carry a 'mask'.
      process_index: this process; defaults to `jax.process_index()`.
      process_count: number of processes; defaults to `jax.process_count()`.
      transform: optional `fn(example, rng) -> example`, run after `source.augment`.
      num_epochs: stop after this many epochs; None iterates forever.
      prefetch: batches prepared ahead by a background thread (0: none).
      num_threads: threads loading the records of one batch (0: in the caller's thread).
    """
    self.source = source
    self.num_examples = len(source)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    self.transform = transform
    self.num_epochs = num_epochs
    self.prefetch = int(prefetch)
    if self.global_batch_size <= 0 or self.global_batch_size % self.process_count:
      raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                       f'process_count={self.process_count}.')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} not in [0, {self.process_count}).')
    if self.num_examples == 0:
      raise ValueError('The source is empty.')
    if drop_remainder and self.num_examples < self.global_batch_size:
      raise ValueError(f'Source has {self.num_examples} examples, fewer than one global batch '
                       f'({self.global_batch_size}) with drop_remainder=True.')
    self.local_batch_size = self.global_batch_size // self.process_count
    self._augment = getattr(source, 'augment', None)
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 0
                  else None)
    self._perm_cache: tuple[int, np.ndarray] | None = None
    self._epoch, self._index = 0, 0
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()

  # ----------------------------------------------------------------------------------------
  # Order.

  @property
  def batches_per_epoch(self) -> int:
    """Global batches in one epoch."""
    n, b = self.num_examples, self.global_batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def permutation(self, epoch: int) -> np.ndarray:
    """The record order of `epoch` (a pure function of seed and epoch).

    Args:
      epoch: epoch number.

    Returns:
      int64 array of the `len(source)` record indices.
    """
    cache = self._perm_cache  # Read once: the prefetch thread may replace it.
    if cache is not None and cache[0] == epoch:
      return cache[1]
    if self.shuffle:
      perm = np.random.default_rng([self.seed, int(epoch), 0]).permutation(self.num_examples)
    else:
      perm = np.arange(self.num_examples)
    self._perm_cache = (epoch, perm)
    return perm

  def global_indices(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Record indices and validity mask of the global batch starting at (epoch, index).

    Args:
      epoch: epoch number.
      index: position in the epoch's permutation.

    Returns:
      (indices, mask), each of length `global_batch_size`.
    """
    perm = self.permutation(epoch)
    idx = perm[index:index + self.global_batch_size]
    mask = np.ones(self.global_batch_size, np.float32)
    short = self.global_batch_size - len(idx)
    if short:
      mask[len(idx):] = 0.0
      idx = np.concatenate([idx, np.resize(perm, short)])
    return idx, mask

  def _advance(self, epoch: int, index: int) -> tuple[int, int]:
    return self._normalize(epoch, index + self.global_batch_size)

  def _normalize(self, epoch: int, index: int) -> tuple[int, int]:
    remaining = self.num_examples - index
    if remaining <= 0 or (self.drop_remainder and remaining < self.global_batch_size):
      return epoch + 1, 0
    return epoch, index

  # ----------------------------------------------------------------------------------------
  # Loading.

  def _load(self, record: int, epoch: int) -> dict[str, Any]:
    example = self.source[int(record)]
    if self._augment is not None or self.transform is not None:
      rng = transforms.example_rng(self.seed, epoch, int(record))
      if self._augment is not None:
        example = self._augment(example, rng)
      if self.transform is not None:
        example = self.transform(example, rng)
    return example

  def batch_at(self, epoch: int, index: int) -> Batch:
    """This process's slice of the global batch at (epoch, index); no state change.

    Args:
      epoch: epoch number.
      index: position in the epoch's permutation.

    Returns:
      A dict batch with `local_batch_size` rows.
    """
    idx, mask = self.global_indices(epoch, index)
    lo = self.process_index * self.local_batch_size
    idx, mask = idx[lo:lo + self.local_batch_size], mask[lo:lo + self.local_batch_size]
    if self._pool is not None:
      examples = list(self._pool.map(lambda r: self._load(r, epoch), idx))
    else:
      examples = [self._load(r, epoch) for r in idx]
    batch = collate(examples)
    if not self.drop_remainder:
      batch['mask'] = mask
    return batch

  def _done(self, epoch: int) -> bool:
    return self.num_epochs is not None and epoch >= self.num_epochs

  # ----------------------------------------------------------------------------------------
  # Iteration and checkpointing.

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    if self.prefetch <= 0:
      if self._done(self._epoch):
        raise StopIteration
      batch = self.batch_at(self._epoch, self._index)
      self._epoch, self._index = self._advance(self._epoch, self._index)
      return batch
    if self._thread is None:
      self._start_thread()
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # Keep answering StopIteration.
      raise StopIteration
    if isinstance(item, BaseException):
      self._join()
      raise item
    batch, (self._epoch, self._index) = item
    return batch

  def _start_thread(self) -> None:
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self.prefetch)
    start = (self._epoch, self._index)
    self._thread = threading.Thread(
        target=_produce, args=(weakref.ref(self), start, self._queue, self._stop),
        daemon=True, name='jaxee-prefetch')
    self._thread.start()

  def _join(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread, self._queue = None, None

  def state(self) -> dict[str, int]:
    """The position after the last batch handed out (safe to save with a checkpoint).

    Returns:
      {'epoch': int, 'index': int}.
    """
    return {'epoch': int(self._epoch), 'index': int(self._index)}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a position saved by `state()` (discarding any prefetched batches).

    Args:
      state: {'epoch', 'index'}; an index past the last full batch moves to the next epoch.
    """
    self._join()
    epoch, index = int(state['epoch']), int(state['index'])
    if epoch < 0 or index < 0:
      raise ValueError(f'Invalid loader state {dict(state)}.')
    self._epoch, self._index = self._normalize(epoch, index)

  def close(self) -> None:
    """Stops the prefetch thread and the loading threads."""
    self._join()
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None

  def __del__(self):
    stop, pool = getattr(self, '_stop', None), getattr(self, '_pool', None)
    if stop is not None:
      stop.set()
    if pool is not None:
      pool.shutdown(wait=False)

  def __repr__(self) -> str:
    return (f'DataLoader(n={self.num_examples}, global_batch={self.global_batch_size}, '
            f'process={self.process_index}/{self.process_count}, state={self.state()})')


def shard_for_devices(batch: Any, n_local_devices: int | None = None) -> Any:
  """Reshapes every leaf [B, ...] -> [n_dev, B / n_dev, ...] for `pmap`.

  Args:
    batch: pytree of arrays with a common leading batch axis.
    n_local_devices: defaults to `jax.local_device_count()`.

  Returns:
    The reshaped pytree (NumPy leaves stay NumPy).
  """
  n = jax.local_device_count() if n_local_devices is None else int(n_local_devices)

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f'Batch of {x.shape[0]} does not split over {n} devices.')
    return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

  return jax.tree.map(split, batch)


def data_mesh(axis_name: str = 'data', devices: Any = None) -> Mesh:
  """A 1-D mesh over all devices (process-major order), for data parallelism.

  Args:
    axis_name: name of the mesh axis.
    devices: defaults to `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh`.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(-1), (axis_name,))


def make_global_batch(batch: Any, mesh: Mesh | None = None, axis_name: str = 'data') -> Any:
  """Assembles per-process batches into global `jax.Array`s sharded along `axis_name`.

  Each process passes its own `DataLoader` slice; the global leading axis is
  `local_batch * process_count`, with process p's rows at p's devices of the mesh.

  Args:
    batch: pytree of per-process arrays (leading batch axis).
    mesh: defaults to `data_mesh(axis_name)`.
    axis_name: mesh axis the batch axis is sharded over.

  Returns:
    The pytree of global arrays with `NamedSharding(mesh, P(axis_name))`.
  """
  mesh = data_mesh(axis_name) if mesh is None else mesh
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
