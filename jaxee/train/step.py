"""One pure data-parallel training step, wrapped three ways: pmap, jit(shard_map), jit.

`step_core(state, batch, rng, *, loss_fn, tx, ema_decay, axis_name)` computes the loss and
gradients, averages them over the data axis, applies the optax update and the EMA, and reports
metrics (including an all-reduced `finite` flag). The objective is a plug-in:

    loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)

where `batch` is the per-device slice, `rng` the per-device key, `loss` a scalar (the mean over
the slice; per-sample weighting happens inside the objective), `metrics` a dict of scalars and
`train_state_extras` is `dict(state.extras, step=state.step)`.

**Randomness.** In every mode the key handed to the objective for data block `d` (the rows that
device `d` of the `data` axis holds) is

    fold_in(fold_in(rng, state.step), d)

so the noise an example sees depends only on (rng, step, its block index), never on the
wrapper. pmap and shard_map read `d` from `lax.axis_index`. The `jit` wrapper works on the global
batch; it reshapes the leading axis into `(num_blocks, rows_per_block)` — block `d` being
exactly the rows that the `P('data')` sharding puts on device `d` — and `vmap`s the objective
over the blocks with key `fold_in(step_key, d)`; the block mean of the losses is the same as the
`pmean` of the other two modes, and XLA inserts the all-reduce for the gradient. All three
therefore agree to float rounding (tested at 1e-6).

**Non-finite guard.** `metrics['finite']` is True iff the (all-reduced) loss and gradient norm
are finite. With `skip_nonfinite=True` (default) a non-finite step leaves the whole state
unchanged and clears the sticky `state.healthy` flag; every later step is then a no-op (its
`metrics['healthy']` stays 0). The trainer therefore reads the flag only at log and checkpoint
time, with no per-step host sync, and still holds exactly the last good state (its `step` is
the index of the first bad step) when it stops the run.

**Placement.** `shard_map` does not reshard its inputs: put the state on
`NamedSharding(mesh, P())` and the batch on `NamedSharding(mesh, P('data'))` first
(`ParallelStep.place_state` / `place_batch` do it, also for multi-process global arrays). The
state argument is donated in all three wrappers; never reuse a state after passing it in.
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxee.train import state as state_lib

PyTree = Any
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]
DATA = "data"
KINDS = ("shard_map", "pmap", "jit")


def _block_loss(loss_fn, params, batch, rng, extras):
  loss, metrics = loss_fn(params, batch, rng, train_state_extras=extras)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics).items()}
  return jnp.asarray(loss, jnp.float32), metrics


def _varying(tree, axis_name):
  """Marks `tree` as varying over `axis_name` (a no-op where varying axes are not tracked)."""
  def one(x):
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    if axis_name in getattr(axis_type, "varying", ()):
      return x
    return lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(one, tree)


def step_core(state: state_lib.TrainState, batch: PyTree, rng: Optional[jax.Array], *,
              loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
              axis_name: Optional[str] = None, num_blocks: int = 1,
              ema_warmup: Optional[str] = None,
              skip_nonfinite: bool = True) -> Tuple[state_lib.TrainState, Dict[str, jax.Array]]:
  """One optimizer step (pure; see the module docstring).

  Args:
    state: the `TrainState` (replicated view).
    batch: pytree of arrays with a leading batch axis (the per-device slice under pmap /
      shard_map, the global batch under jit).
    rng: base key (raw uint32); None uses `state.rng`.
    loss_fn: the objective `loss_fn(params, batch, rng, *, train_state_extras)`.
    tx: the optax transformation.
    ema_decay: EMA decay (DiT: 0.9999).
    axis_name: the mapped data axis (pmap / shard_map) or None (global view).
    num_blocks: with `axis_name=None`, the number of data blocks (devices on the data axis)
      the global batch is split into for the per-block keys.
    ema_warmup: None or `'linear'` (see `state.ema_decay_at`).
    skip_nonfinite: keep the old state when the loss or gradient norm is not finite, and from
      then on (`state.healthy` is sticky).

  Returns:
    `(new_state, metrics)`; metrics are all-reduced float32 scalars: the objective's metrics
    plus `loss`, `grad_norm`, `param_norm` and the booleans `finite` (this step) and `healthy`
    (this and every earlier step).
  """
  base = state.rng if rng is None else rng
  step_key = jax.random.fold_in(base, state.step)
  extras = dict(state.extras, step=state.step)

  if axis_name is not None:
    dev_key = jax.random.fold_in(step_key, lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(
        lambda p: _block_loss(loss_fn, p, batch, dev_key, extras), has_aux=True)
    # Differentiate w.r.t. a device-varying view of the params: under shard_map's varying-axis
    # checks, the gradient w.r.t. a replicated (invariant) input is implicitly psum-ed, which
    # would make the pmean below return the device *sum*. With the cast, each device gets its
    # local gradient and the explicit pmean is the only reduction, exactly as under pmap.
    (loss, metrics), grads = grad_fn(_varying(state.params, axis_name))
    loss, metrics, grads = lax.pmean((loss, metrics, grads), axis_name)
  elif num_blocks == 1:
    dev_key = jax.random.fold_in(step_key, 0)
    grad_fn = jax.value_and_grad(
        lambda p: _block_loss(loss_fn, p, batch, dev_key, extras), has_aux=True)
    (loss, metrics), grads = grad_fn(state.params)
  else:
    def split(x):
      if x.shape[0] % num_blocks:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_blocks} blocks")
      return x.reshape((num_blocks, x.shape[0] // num_blocks) + x.shape[1:])
    blocks = jax.tree.map(split, batch)

    def total(params):
      def one(block, index):
        return _block_loss(loss_fn, params, block, jax.random.fold_in(step_key, index), extras)
      losses, metrics = jax.vmap(one)(blocks, jnp.arange(num_blocks))
      return jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(state.params)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = state_lib.ema_decay_at(state.step, ema_decay, ema_warmup)
  healthy = jnp.logical_and(state.healthy, finite)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=state_lib.update_ema(state.ema_params, params, decay))
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(healthy, new, old), new_state, state)
  new_state = new_state.replace(healthy=healthy)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite, healthy=healthy,
                 param_norm=optax.tree.norm(new_state.params))
  return new_state, metrics


def _core(loss_fn, tx, ema_decay, ema_warmup, skip_nonfinite, **kw):
  return functools.partial(step_core, loss_fn=loss_fn, tx=tx, ema_decay=ema_decay,
                           ema_warmup=ema_warmup, skip_nonfinite=skip_nonfinite, **kw)


def make_pmap_step(*, loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
                   ema_warmup: Optional[str] = None, skip_nonfinite: bool = True):
  """`jax.pmap` wrapper: state replicated with a leading device axis, batch `[n_dev, per, ...]`.

  The rng argument is broadcast (`in_axes=None`); metrics come back with a leading device axis.
  """
  core = _core(loss_fn, tx, ema_decay, ema_warmup, skip_nonfinite, axis_name=DATA)
  return jax.pmap(core, axis_name=DATA, in_axes=(0, 0, None), donate_argnums=(0,))


def make_shard_map_step(mesh: jax.sharding.Mesh, *, loss_fn: LossFn,
                        tx: optax.GradientTransformation, ema_decay: float,
                        ema_warmup: Optional[str] = None, skip_nonfinite: bool = True):
  """`jax.jit(jax.shard_map(...))` wrapper (the default): global arrays, explicit pmean.

  The state must be on `NamedSharding(mesh, P())`, the batch on `NamedSharding(mesh, P('data'))`.
  """
  core = _core(loss_fn, tx, ema_decay, ema_warmup, skip_nonfinite, axis_name=DATA)
  mapped = jax.shard_map(core, mesh=mesh, in_specs=(P(), P(DATA), P()),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,))


def make_jit_step(mesh: jax.sharding.Mesh, *, loss_fn: LossFn,
                  tx: optax.GradientTransformation, ema_decay: float,
                  ema_warmup: Optional[str] = None, skip_nonfinite: bool = True):
  """`jax.jit` wrapper with NamedSharding in/out shardings; XLA inserts the all-reduce."""
  core = _core(loss_fn, tx, ema_decay, ema_warmup, skip_nonfinite, axis_name=None,
               num_blocks=mesh.shape[DATA])
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
  return jax.jit(core, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh over `devices` (default: all global devices, in `jax.devices()`
  order, so process p's devices hold a contiguous range of row blocks)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def _to_global(x, sharding):
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


@dataclasses.dataclass
class ParallelStep:
  """A wrapped step plus the placement helpers that go with its layout.

  Attributes:
    kind: `'shard_map'`, `'pmap'` or `'jit'`.
    mesh: the 1-D data mesh.
    fn: `fn(state, batch, rng) -> (state, metrics)` (state donated).
  """
  kind: str
  mesh: jax.sharding.Mesh
  fn: Callable

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng)

  def place_state(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """Puts a (host or single-device) state into this step's layout (always a copy)."""
    return self.place_replicated(state)

  def restore_template(self, host_state: state_lib.TrainState) -> PyTree:
    """What a checkpoint restore should produce for this layout: abstract arrays on the
    replicated `NamedSharding` (restored in place, no host copy, already in this layout), or
    the host state (pmap: then `place_state` it)."""
    if self.kind == "pmap":
      return host_state
    repl = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=repl), host_state)

  def place_replicated(self, tree: PyTree) -> PyTree:
    """Puts a host pytree (identical on every process) into the replicated layout: a leading
    device axis for pmap, `NamedSharding(mesh, P())` global arrays otherwise (always a copy)."""
    if self.kind == "pmap":
      host = jax.tree.map(np.asarray, tree)
      return flax.jax_utils.replicate(host, devices=list(self.mesh.devices.flat))
    repl = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: _to_global(x, repl), tree)

  def place_batch(self, local_batch: PyTree) -> PyTree:
    """Puts this process's rows of the global batch into this step's layout."""
    if self.kind == "pmap":
      n = self.mesh.devices.size
      sharding = NamedSharding(self.mesh, P(DATA))
      return jax.tree.map(
          lambda x: jax.device_put(np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), sharding),
          local_batch)
    data = NamedSharding(self.mesh, P(DATA))
    return jax.tree.map(lambda x: _to_global(x, data), local_batch)

  def adopt_restored(self, state: state_lib.TrainState) -> Tuple[state_lib.TrainState, jax.Array]:
    """`(state, base key)` in this layout from a state restored onto `restore_template`."""
    rng = state.rng
    rng = np.asarray(rng.addressable_data(0)) if isinstance(rng, jax.Array) else rng
    return (self.place_state(state) if self.kind == "pmap" else state), self.place_rng(rng)

  def place_rng(self, rng) -> jax.Array:
    """The base key in this step's layout (replicated)."""
    rng = state_lib.as_raw_key(rng)
    if self.kind == "pmap":
      return jnp.array(np.asarray(rng))
    return _to_global(rng, NamedSharding(self.mesh, P()))

  def canonical_state(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """The global-view state (pmap: replica 0) for checkpointing and evaluation."""
    if self.kind == "pmap":
      return jax.tree.map(lambda x: x[0], state)
    return state

  def host_metrics(self, metrics: Dict[str, jax.Array]) -> Dict[str, float]:
    """Metrics as Python floats (they are replicated; read one local copy)."""
    def one(x):
      value = np.asarray(x.addressable_data(0))
      return value[0] if self.kind == "pmap" else value
    return {k: float(one(v)) for k, v in metrics.items()}


def make_train_step(kind: str, *, loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float = 0.9999, ema_warmup: Optional[str] = None,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    skip_nonfinite: bool = True) -> ParallelStep:
  """Builds the step for `config.parallel` in `{'shard_map', 'pmap', 'jit'}`.

  Args:
    kind: the wrapper.
    loss_fn: the objective.
    tx: the optax transformation.
    ema_decay: EMA decay.
    ema_warmup: None or `'linear'`.
    mesh: the data mesh (default: `data_mesh()`; pmap uses the process-local devices).
    skip_nonfinite: see `step_core`.

  Returns:
    A `ParallelStep`.
  """
  kw = dict(loss_fn=loss_fn, tx=tx, ema_decay=ema_decay, ema_warmup=ema_warmup,
            skip_nonfinite=skip_nonfinite)
  if kind == "pmap":
    if jax.process_count() > 1:
      raise ValueError("parallel='pmap' is single-process only here; use 'shard_map'")
    return ParallelStep(kind, mesh or data_mesh(jax.local_devices()), make_pmap_step(**kw))
  mesh = mesh or data_mesh()
  if kind == "shard_map":
    return ParallelStep(kind, mesh, make_shard_map_step(mesh, **kw))
  if kind == "jit":
    return ParallelStep(kind, mesh, make_jit_step(mesh, **kw))
  raise ValueError(f"unknown parallel kind {kind!r}; expected one of {KINDS}")
