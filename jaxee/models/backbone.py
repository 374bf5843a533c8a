"""The family-agnostic backbone contract: a network as embed → units → head.

Every exit runner (`jaxee/exits/`) and every training-time forward that skips, masks or exits is
written once against this contract; a backbone family (DiT, U-ViT, ...) implements it in
`jaxee/models/` and keeps its quirks inside its *state* (U-ViT's pending long skips, DiT's
conditioning vector and adaLN modulation).

Units. At granularity `'block'` a unit is one transformer block; at `'branch'` each block is two
units, attention then MLP (the block-masking paper's DiT granularity and Learning-to-Cache's).
Units are numbered 0..U−1 in execution order and grouped in `Segment`s: runs of units with the
same parameter layout, so a runner can loop over a segment with a traced index (`lax.fori_loop`,
`lax.while_loop`) and `lax.cond` inside it. A segment is `groups` repetitions of a `pattern` of
unit kinds (`('block',)` or `('attn', 'mlp')`); `UnitRef(segment, group, sub)` names one unit, with
`group` a Python int or a traced int32 and `sub` static.

A unit runs in three steps, which is what caches need:

    state = enter(params, ref, state)          # always cheap bookkeeping (U-ViT: long-skip fusion
                                               #   of an out-block's attention branch; DiT: adaLN)
    value = compute(params, ref, state)        # the expensive part, what a cache stores
    state = apply(params, ref, state, value)   # combine (block: replace the stream; branch:
                                               #   residual add with the current gate)

`run_unit` is the three in a row. A runner that reuses a cached value skips `compute` only; at
`'block'` granularity `enter` is the identity, so a reused block costs nothing. `drop` is what a
unit still does when a depth schedule removes it (ASE: the identity on the stream, but a U-ViT
out-block still applies its `skip_linear`, `research/ee_methods.md` §1.5). `head` reads only the
stream, so an early exit discards pending skips (DeeDiff on U-ViT, §2.8).

States are dicts of arrays whose leading axis is the batch (a per-sample `where` over a state is
`select_state`), with the token stream under `'h'`.

Step signature (TeaCache, `jaxee/exits/teacache.py`): `step_signature(params, state)` is a cheap,
batch-major indicator of how much the network input changed since the previous evaluation, read
from the embedded state. Default: the embedded stream `h` itself (U-ViT: the patch tokens with the
time and label tokens); DiT overrides it with TeaCache's timestep-modulated input of block 0.

FLOPs per sample: `unit_flops[i]` (the whole unit), `enter_flops[i]` (what a cache-reused unit
still costs), `drop_flops[i]`, `embed_flops`, `head_flops`; `full_flops` is their full sum and
equals `jaxee.eval.flops.backbone_flops(module)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("block", "branch")
State = dict


@dataclasses.dataclass(frozen=True)
class Segment:
  """`groups` repetitions of `pattern`, starting at unit `start` (static structure)."""
  name: str
  start: int
  groups: int
  pattern: tuple[str, ...] = ("block",)

  @property
  def size(self) -> int:
    return self.groups * len(self.pattern)

  @property
  def stop(self) -> int:
    return self.start + self.size


class UnitRef(NamedTuple):
  """One unit: `segment` and `sub` static, `group` a Python int or a traced int32."""
  segment: Segment
  group: Any
  sub: int = 0

  @property
  def kind(self) -> str:
    return self.segment.pattern[self.sub]

  @property
  def index(self):
    """The global unit index (traced when `group` is)."""
    return self.segment.start + self.group * len(self.segment.pattern) + self.sub


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A model seen as units at one granularity. Subclasses implement the abstract methods.

  Attributes:
    module: the Flax module (its `apply(x, t, y)` stays the exact full forward).
    granularity: 'block' or 'branch'.
  """
  module: Any
  granularity: str = "block"

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"unknown unit granularity {self.granularity!r}; choose from "
                       f"{GRANULARITIES}")

  # ---- structure (override `segments`) ------------------------------------------------------
  @property
  def segments(self) -> tuple[Segment, ...]:
    raise NotImplementedError

  @property
  def num_units(self) -> int:
    return self.segments[-1].stop

  @property
  def num_blocks(self) -> int:
    """Transformer blocks (units at 'block' granularity)."""
    return self.at("block").num_units

  @property
  def tail_start(self) -> int:
    """First unit a depth schedule may drop (units before it always run; default 0)."""
    return 0

  def ref(self, i: int) -> UnitRef:
    """The `UnitRef` of static unit index `i`."""
    i = int(i)
    for seg in self.segments:
      if seg.start <= i < seg.stop:
        g, s = divmod(i - seg.start, len(seg.pattern))
        return UnitRef(seg, g, s)
    raise IndexError(f"unit {i} out of range [0, {self.num_units})")

  def refs(self) -> list[UnitRef]:
    return [self.ref(i) for i in range(self.num_units)]

  def skip_consumers(self) -> Optional[dict[int, Union[int, tuple[int, ...]]]]:
    """Units whose output is also read later in the same forward, beyond the next unit.

    Returns {producer unit index: consumer unit index, or a tuple of them} (U-ViT: an in-block's
    output is the long skip of its paired out-block; U-Net: a unit before a downsample feeds two
    up ResNets), or None (default) when every unit's output is read only by the next unit.
    Host-side structure, used by mask rectification (`jaxee/exits/mask_tools.py`).
    """
    return None

  def cache_branches(self) -> tuple[tuple[int, int], ...]:
    """DeepCache branch points (`jaxee/exits/deepcache.py`), shallowest first.

    Each is (a, r): a cached step may skip units a..r−1 and the `enter` of unit r entirely, put
    the stream cached after unit r's `enter` at the last full step in their place and continue
    from unit r's `compute`, because no unit from a on writes state that unit r or a later one
    reads except the stream. Families without skip branches raise NotImplementedError (default).
    """
    raise NotImplementedError(
        f"{type(self).__name__} has no DeepCache branch points: DeepCache caches the up path's "
        "high-level feature of a U-Net skip branch and needs a backbone whose deep units are "
        "bypassed by skip connections (the DDPM U-Net implements Backbone.cache_branches)")

  def at(self, granularity: str) -> "Backbone":
    """The same model at another granularity."""
    return as_backbone(self.module, granularity)

  # ---- facts -----------------------------------------------------------------------------------
  @property
  def family(self) -> str:
    return self.module.family

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one input sample (NHWC)."""
    raise NotImplementedError

  @property
  def uniform_tokens(self) -> bool:
    """True when every unit's input stream has the same shape (needed by exit heads)."""
    return True

  # ---- FLOPs (per sample) ---------------------------------------------------------------------
  @property
  def unit_flops(self) -> np.ndarray:
    raise NotImplementedError

  @property
  def enter_flops(self) -> np.ndarray:
    return np.zeros(self.num_units)

  @property
  def drop_flops(self) -> np.ndarray:
    return np.zeros(self.num_units)

  @property
  def embed_flops(self) -> float:
    raise NotImplementedError

  @property
  def head_flops(self) -> float:
    raise NotImplementedError

  @property
  def full_flops(self) -> float:
    return float(self.embed_flops + np.sum(self.unit_flops) + self.head_flops)

  # ---- compute ---------------------------------------------------------------------------------
  def embed(self, params, x, t, y) -> State:
    raise NotImplementedError

  def enter(self, params, ref: UnitRef, state: State) -> State:
    del params, ref
    return state

  def compute(self, params, ref: UnitRef, state: State) -> jax.Array:
    raise NotImplementedError

  def apply(self, params, ref: UnitRef, state: State, value) -> State:
    raise NotImplementedError

  def drop(self, params, ref: UnitRef, state: State) -> State:
    raise NotImplementedError

  def head(self, params, state: State) -> jax.Array:
    raise NotImplementedError

  def step_signature(self, params, state: State) -> jax.Array:
    """A batch-major (B, ...) indicator of this evaluation's input, computed from the embedded
    state (TeaCache's "timestep-modulated input"). Default: the embedded stream `h`."""
    del params
    return state["h"]

  @property
  def step_signature_flops(self) -> float:
    """FLOPs per sample of `step_signature` beyond `embed` (default 0)."""
    return 0.0

  def final_feature(self, state: State) -> jax.Array:
    """The hidden state the head reads, batch-major (TABM's x_end); default the stream `h`."""
    return state["h"]

  def run_unit(self, params, ref: Union[UnitRef, int], state: State) -> State:
    """enter → compute → apply (a static int `ref` is resolved with `self.ref`)."""
    if not isinstance(ref, UnitRef):
      ref = self.ref(ref)
    state = self.enter(params, ref, state)
    return self.apply(params, ref, state, self.compute(params, ref, state))

  # ---- helpers for extra heads (DeeDiff) ------------------------------------------------------
  def exit_head_module(self):
    """A fresh module shaped like the backbone head: `m.apply(p, tokens, ctx) -> out`."""
    raise NotImplementedError(f"{type(self).__name__} has no exit heads")

  def exit_context(self, state: State):
    """What an exit head receives besides the tokens (DiT: c; otherwise None)."""
    del state
    return None

  def head_params_for_exit(self, params) -> Any:
    """The backbone head's params in the exit head's layout (a warm start for exit heads)."""
    raise NotImplementedError

  @property
  def pixels_per_token(self) -> int:
    """Output positions per image token (p² for p×p patches); sizes per-token map heads."""
    raise NotImplementedError(f"{type(self).__name__} has no token-to-image map")

  def tokens_to_image(self, values: jax.Array) -> jax.Array:
    """Per-token values (B, num_tokens, pixels_per_token·k) → an image map (B, H, W, k).

    The layout of the backbone's own head: the non-image tokens are dropped, then the image
    tokens are unpatchified exactly as the head's output is (DeeDiff's per-element UEM map).
    """
    raise NotImplementedError(f"{type(self).__name__} has no token-to-image map")

  @property
  def width(self) -> int:
    raise NotImplementedError

  @property
  def num_tokens(self) -> int:
    raise NotImplementedError

  # ---- output replacement (TABM masks at unit granularity) -------------------------------------
  def settle(self, params, ref: UnitRef, state: State, out) -> State:
    """The state after unit `ref` when its output stream (`state['h']` after it) is `out`.

    What a unit whose output is *replaced* by a cached one leaves behind (TABM's "x = s·f(x) +
    (1−s)·cache" per unit, `research/ee_methods.md` §4.7, §5.5); `state` is the state after
    `enter`. Invariant: `settle(p, r, s, apply(p, r, s, v)['h']) == apply(p, r, s, v)`. At
    'block' granularity this is `apply` (a block's value is its output stream); at 'branch' the
    default replaces the stream. Families whose units also write other state from their output
    (U-ViT in-blocks push their long skip) override it.
    """
    if self.granularity == "block":
      return self.apply(params, ref, state, out)
    return dict(state, h=out)


@functools.lru_cache(maxsize=256)
def as_backbone(module: Any, granularity: str = "block") -> Backbone:
  """The contract view of a model (`module.backbone(granularity)`), or the object itself."""
  if isinstance(module, Backbone):
    return module if module.granularity == granularity else module.at(granularity)
  make = getattr(module, "backbone", None)
  if make is None:
    raise TypeError(f"{type(module).__name__} does not implement the backbone contract "
                    "(a `backbone(granularity)` method returning a jaxee.models.backbone.Backbone)")
  return make(granularity)


def take(stack: Any, i) -> Any:
  """Params of one member of a stacked tree (static or traced index; host or device arrays)."""
  if isinstance(i, (int, np.integer)):
    return jax.tree.map(lambda a: a[i], stack)
  return jax.tree.map(lambda a: jnp.asarray(a)[i], stack)


def select_state(keep, new: State, old: State) -> State:
  """Per-sample `where(keep[b], new, old)` over batch-major states."""
  keep = jnp.asarray(keep)

  def sel(a, b):
    return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(sel, new, old)


def for_units(bb: Backbone, state, fn: Callable, segments=None):
  """Folds `fn(ref, carry) -> carry` over every unit in order, one `fori_loop` per segment.

  Each segment's groups run in a `lax.fori_loop` with a static trip count (a scan), so the body
  is compiled once per (segment, sub-unit); `ref.group` is traced inside it.
  """
  for seg in (segments or bb.segments):
    if seg.groups == 0:
      continue

    def body(g, carry, seg=seg):
      for s in range(len(seg.pattern)):
        carry = fn(UnitRef(seg, g, s), carry)
      return carry
    state = jax.lax.fori_loop(0, seg.groups, body, state)
  return state


def run_all(bb: Backbone, params, state: State) -> State:
  """Every unit in order (the full network between embed and head)."""
  return for_units(bb, state, lambda ref, s: bb.run_unit(params, ref, s))


def forward_units(bb: Backbone, params, x, t, y=None) -> jax.Array:
  """embed → every unit → head: equals `module.apply` (tested per family)."""
  return bb.head(params, run_all(bb, params, bb.embed(params, x, t, y)))


def collect_values(bb: Backbone, params, state: State):
  """Runs every unit and returns (final state, per-segment stacked values).

  The values are what a cache stores: a tuple with one (segment.size, ...) array per segment.
  """
  values = []
  for seg in bb.segments:
    def body(g, carry, seg=seg):
      st, vals = carry
      for s in range(len(seg.pattern)):
        ref = UnitRef(seg, g, s)
        st = bb.enter(params, ref, st)
        v = bb.compute(params, ref, st)
        st = bb.apply(params, ref, st, v)
        vals = jax.lax.dynamic_update_index_in_dim(vals, v, ref.index - seg.start, 0)
      return st, vals

    first = UnitRef(seg, 0, 0)
    shape = jax.eval_shape(lambda st, r=first: bb.compute(params, r, bb.enter(params, r, st)),
                           state)
    vals = jnp.zeros((seg.size,) + shape.shape, shape.dtype)
    state, vals = jax.lax.fori_loop(0, seg.groups, body, (state, vals))
    values.append(vals)
  return state, tuple(values)


def value_shapes(bb: Backbone, params, x_shape, y=None):
  """Shapes of the per-segment cache arrays of `collect_values` for inputs of `x_shape`."""
  def f(x, yy):
    st = bb.embed(params, x, jnp.zeros((x.shape[0],), jnp.float32), yy)
    return collect_values(bb, params, st)[1]
  y_spec = None if y is None else jax.ShapeDtypeStruct(jnp.shape(y), jnp.int32)
  return jax.eval_shape(f, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32), y_spec)


def zeros_cache(bb: Backbone, params, x_shape, y=None):
  """A zero cache: one (segment.size, ...) array per segment."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), value_shapes(bb, params, x_shape, y))


def segment_of(bb: Backbone, ref: UnitRef) -> int:
  """Position of `ref.segment` in `bb.segments`."""
  return bb.segments.index(ref.segment)


def cache_get(bb: Backbone, cache, ref: UnitRef):
  k = segment_of(bb, ref)
  return jax.lax.dynamic_index_in_dim(cache[k], ref.index - ref.segment.start, 0, keepdims=False)


def cache_set(bb: Backbone, cache, ref: UnitRef, value):
  k = segment_of(bb, ref)
  arr = jax.lax.dynamic_update_index_in_dim(cache[k], value, ref.index - ref.segment.start, 0)
  return cache[:k] + (arr,) + cache[k + 1:]


def take_prefix(stack: Any, n: int) -> Any:
  """The first n members of a stacked tree."""
  return jax.tree.map(lambda a: a[:n], stack)


def take_suffix(stack: Any, n: int) -> Any:
  """The last n members of a stacked tree."""
  return jax.tree.map(lambda a: a[a.shape[0] - n:], stack)
