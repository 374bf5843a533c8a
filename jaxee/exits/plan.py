"""The exit-plan protocol: what runs at each network evaluation, bound to a model and params.

`shared/DESIGN.md` ("Plans" and "Runners") and `docs/ARCHITECTURE.md`: a plan is a **pytree**
(`pytree_plan`): its arrays — masks, depth tables, θ, head/UEM params, a shallow model's params —
are leaves, passed into the jitted sampler as traced arguments; only its structure (unit
granularity, runner kind, models) is static. A new plan object of the same structure, a new θ or
a new mask never recompiles, and nothing in jaxee keeps a plan alive after the call.

`plan.bind(model, params, nfe_times)` (called inside the trace, leaves possibly traced) compiles it
against the times the network will receive (one float32 per NFE, in NFE order, from
`jaxee.sampling.nfe_times`) into a `BoundPlan` whose `net(x, t_net, y, nfe_index, cache) -> (out,
cache, stats)` does the real skipping with scalar-predicate control flow, written against the
backbone contract (`jaxee/models/backbone.py`). `plan.check(model, nfe_times)` validates a
concrete plan on the host before tracing. `stats` always has

* `blocks`: mean number of transformer blocks executed per sample in this call;
* `flops`: FLOPs executed per sample in this call (embedding + blocks + head + plan extras),
  from `jaxee.eval.flops`.

Time is mapped to τ ∈ [0, 1] (τ → 1 is noise) with `model_time_to_unit`, which follows
`research/ee_methods.md` §1.6 (DiT `get_early_exit_idx` bins the original integer t by 100).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.models.backbone import as_backbone

Net = Callable[..., tuple[jax.Array, Any, dict]]


def pytree_plan(data: Sequence[str] = (), static: Sequence[str] = ()):
  """Class decorator: a frozen dataclass registered as a pytree with `data` fields as leaves.

  `static` fields are part of the tree structure (they must be hashable: two plans with equal
  static fields and leaf shapes share one compiled program); any other field (free-form
  metadata) is dropped when the plan is flattened, so it never causes a recompile. Unflattening
  bypasses `__init__`/`__post_init__`, whose validation is for concrete host values only.
  """
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = (set(data) | set(static)) - names
    if unknown:
      raise TypeError(f"{cls.__name__}: no field(s) {sorted(unknown)}")

    def flatten(plan):
      return [getattr(plan, n) for n in data], tuple(getattr(plan, n) for n in static)

    def unflatten(aux, children):
      obj = object.__new__(cls)
      values = dict(zip(static, aux))
      values.update(zip(data, children))
      for f in fields:
        if f.name in values:
          v = values[f.name]
        elif f.default is not dataclasses.MISSING:
          v = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
          v = f.default_factory()  # type: ignore[misc]
        else:
          v = None
        object.__setattr__(obj, f.name, v)
      return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    cls.data_fields, cls.static_fields = tuple(data), tuple(static)
    return cls
  return wrap


def is_traced(tree: Any) -> bool:
  """True when any leaf of `tree` is a tracer (the plan is being bound inside a trace)."""
  return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


def host_info(tree: Any, build: Callable[[], dict]) -> Optional[dict]:
  """`build()` when `tree` is concrete (host-side facts for tools), None inside a trace."""
  return None if is_traced(tree) else build()

# Divisor that turns the network time into τ, per time convention (ee_methods §1.6).
_TIME_SCALE = {"linear_discrete": 1000.0, "sd_discrete": 1000.0, "vp_continuous": 999.0}


def model_time_to_unit(t_net, schedule: str):
  """Maps the time the network receives to τ ∈ [0, 1].

  Args:
    t_net: network time(s) (NumPy or JAX).
    schedule: 'linear_discrete' (DiT, t ∈ {0..999}) and 'sd_discrete' (U-ViT, 1000·t): t/1000;
      'vp_continuous' (U-ViT, 999·t): t/999.

  Returns:
    τ with the type of `t_net`.
  """
  if schedule not in _TIME_SCALE:
    raise ValueError(f"unknown time schedule {schedule!r}; choose from {sorted(_TIME_SCALE)}")
  return t_net / _TIME_SCALE[schedule]


def time_schedule(model: Any, override: Optional[str] = None) -> str:
  """The time convention used to map network times to τ (the model's default unless given)."""
  return override or model.default_schedule


class BoundPlan(NamedTuple):
  """A plan compiled for one model, params and NFE time grid.

  Attributes:
    net: `net(x, t_net, y, nfe_index, cache) -> (out, cache, stats)`; jittable, closes over the
      params. Bind inside the jitted function that receives the params as an argument (as
      `jaxee.sample` does): concrete arrays closed over by a jitted function are embedded in
      the program as constants, which makes large models slow to compile.
    init_cache: `init_cache(x_batch, y) -> cache` for the batch the net sees (after CFG
      doubling); `()` when the plan keeps no cache.
    info: host-side facts: `blocks_per_nfe` and `flops_per_nfe` (np arrays, exact for static
      plans, upper bounds for dynamic ones), `full_flops` (per sample per NFE), `ideal_saving`,
      plus plan-specific entries; None when the plan was bound inside a trace (`host_info`).
  """
  net: Net
  init_cache: Callable[..., Any]
  info: dict


def no_cache(x_batch=None, y=None):
  """`init_cache` of plans without a cache."""
  del x_batch, y
  return ()


def stats_from_tables(nfe_index, blocks, flops) -> dict:
  """Per-call stats read from per-NFE tables (host or traced) indexed by the NFE index."""
  return {"blocks": jnp.asarray(blocks, jnp.float32)[nfe_index],
          "flops": jnp.asarray(flops, jnp.float32)[nfe_index]}


def make_info(model: Any, blocks_per_nfe, flops_per_nfe, **extra) -> dict:
  """The `BoundPlan.info` dict, with `ideal_saving` = 1 − mean(plan FLOPs) / full FLOPs."""
  full = as_backbone(model).full_flops
  flops_per_nfe = np.asarray(flops_per_nfe, np.float64)
  info = {
      "blocks_per_nfe": np.asarray(blocks_per_nfe, np.float64),
      "flops_per_nfe": flops_per_nfe,
      "full_flops": full,
      "ideal_saving": float(1.0 - flops_per_nfe.mean() / full) if len(flops_per_nfe) else 0.0,
  }
  info.update(extra)
  return info


def check_nfe_times(nfe_times) -> np.ndarray:
  """Validates the host NFE time grid (1-D, finite) and returns it as float32."""
  times = np.asarray(nfe_times, np.float32)
  if times.ndim != 1 or not len(times):
    raise ValueError(f"nfe_times must be a non-empty 1-D array, got shape {times.shape}")
  if not np.all(np.isfinite(times)):
    raise ValueError("nfe_times contains non-finite values")
  return times


def full_forward(model: Any, params: Any) -> Callable:
  """`f(x, t_net, y) -> out`: the exact backbone forward."""
  def f(x, t_net, y):
    return model.apply({"params": params}, x, t_net, y)
  return f


@pytree_plan(static=("name",))
class FullPlan:
  """Runs every block at every NFE (the baseline)."""
  name: str = "full"

  def check(self, model: Any, nfe_times) -> None:
    check_nfe_times(nfe_times)

  def bind(self, model: Any, params: Any, nfe_times) -> BoundPlan:
    """Binds the full forward.

    Args:
      model: backbone module.
      params: its params.
      nfe_times: network times per NFE.

    Returns:
      A `BoundPlan`.
    """
    times = check_nfe_times(nfe_times)
    n = len(times)
    bb = as_backbone(model)
    blocks = np.full(n, bb.num_blocks, np.float64)
    flops = np.full(n, bb.full_flops)
    forward = full_forward(model, params)

    def net(x, t_net, y, nfe_index, cache):
      return forward(x, t_net, y), cache, stats_from_tables(nfe_index, blocks, flops)

    return BoundPlan(net, no_cache, make_info(model, blocks, flops, plan=self.name))


def shard_net(net: Net, mesh: jax.sharding.Mesh, axis_name: str = "data",
              cache_spec: Any = None) -> Net:
  """Runs a bound net per device with `jax.shard_map` over the batch axis.

  Each device runs its own slice of the batch with its own control flow (a `while_loop` exit or a
  `cond` branch decided per device, `research/jax_style.md` §4.3 rule 3). Stats are averaged over
  devices once, after the network (no collective inside the loops).

  Args:
    net: `net(x, t_net, y, nfe_index, cache)`.
    mesh: a mesh with axis `axis_name`; the batch must divide by its size.
    axis_name: the batch axis name.
    cache_spec: PartitionSpec pytree for the cache (default: batch-sharded leaves, `P()` for
      an empty cache).

  Returns:
    A net with the same signature; inputs must be placed on the mesh (or be host arrays).
  """
  spec = jax.sharding.PartitionSpec
  batch = spec(axis_name)

  def local(x, t_net, y, nfe_index, cache):
    out, cache, stats = net(x, t_net, y, nfe_index, cache)
    stats = jax.tree.map(lambda s: jax.lax.pmean(jnp.asarray(s, jnp.float32), axis_name), stats)
    return out, cache, stats

  def wrapped(x, t_net, y, nfe_index, cache):
    c_spec = cache_spec if cache_spec is not None else jax.tree.map(lambda _: batch, cache)
    y_spec = None if y is None else batch
    fn = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, y_spec, spec(), c_spec),
                       out_specs=(batch, c_spec, spec()), check_vma=False)

    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)

    def place_one(a, s):
      sharding = jax.sharding.NamedSharding(mesh, s)
      if explicit:
        return jax.sharding.reshard(a, sharding)
      return jax.lax.with_sharding_constraint(a, sharding)

    def place(tree, specs):
      return jax.tree.map(place_one, tree, specs)

    x, t_net = place(x, batch), place(t_net, batch)
    y = None if y is None else place(y, batch)
    cache = place(cache, c_spec)
    return fn(x, t_net, y, jnp.asarray(nfe_index, jnp.int32), cache)

  return wrapped
