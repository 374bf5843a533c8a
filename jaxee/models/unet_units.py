"""The DDPM U-Net behind the backbone contract (`jaxee/models/backbone.py`).

Units, in execution order (diffusers `UNet2DModel.forward`, `jaxee/models/unet.py`): every
`ResnetBlock2D` and every attention block of the down path, the mid block (ResNet, attention,
ResNet) and the up path — the paper's granularity for U-Net block caching. Only `'block'`
granularity exists: a U-Net has no attention/MLP branch split, so `'branch'` raises
NotImplementedError (and so do the mask plans that need it).

Segments. Neighbouring units differ in parameter layout, channels or resolution, so every unit is
its own `Segment` with `groups=1` (named `down1.res0`, `down1.attn0`, `mid.res1`, `up2.res2`, ...);
each is static, so every per-unit decision below is a Python one.

State (batch-major):

* `h` (B, N_max): the stream, flattened into one buffer as large as the largest feature map, so
  the loop carries one shape however the resolution and width change; a unit reads the prefix of
  its input shape and writes the prefix of its output shape (`UNetBackbone.spec(i)` says which);
* `temb` (B, 4·C₀): the time embedding, computed in `embed`;
* `skips`: a tuple with one (B, H_k, W_k, C_k) array per skip slot (static slots, execution
  order): slot 0 is `conv_in`'s output (written by `embed`), then every down-path layer output
  and every downsample output. The up path pops them LIFO, which is a static slot per up ResNet.

Unit steps:

* `enter`: the resampling between levels — the first ResNet of down level i>0 runs level i−1's
  `Downsample2D` on the stream and writes its skip slot; the first ResNet of up level i>0 runs up
  block i−1's `Upsample2D`. It runs for a cache-reused unit too (its output is a skip / the next
  unit's input), so its FLOPs are that unit's `enter_flops`.
* `compute`: the ResNet (up path: over `concat[h, skip]`, skip read from its static slot) or the
  attention block; the value is the unit's output map (what a block-output cache stores).
* `apply`: writes the value to the stream and, for the last unit of a down-path layer (the ResNet,
  or its attention in `AttnDownBlock2D`), to its skip slot.
* `drop` raises NotImplementedError: ASE-style depth schedules (drop the last units, keep the
  stream) do not apply to a U-Net, whose up path consumes every skip and changes resolution.
* `head`: `conv_norm_out` → SiLU → `conv_out` on the full-resolution stream.

FLOPs per sample count convolutions, linears and attention matmuls as `jaxee/eval/flops.py`
does (2·m·k·n): `embed_flops` = time MLP + conv_in, `head_flops` = conv_out.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.models import backbone as bb_lib


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """Static facts of one unit.

  Attributes:
    name: segment name (`down1.res0`, `mid.attn0`, `up2.res2`).
    kind: 'res' or 'attn'.
    where, block, layer: `UNet` block ('down' / 'mid' / 'up'), its index and the layer in it.
    size: spatial side of the unit's input and output.
    in_channels, out_channels: stream channels in and out (before any skip concat).
    pop: the skip slot an up ResNet concatenates (None elsewhere).
    push: the skip slot the unit's output is written to (None when not a skip).
    pre: 'down' / 'up' when `enter` first runs the previous level's sampler, else None.
    pre_block: the block that owns that sampler.
    pre_push: the skip slot the downsample output is written to.
  """
  name: str
  kind: str
  where: str
  block: int
  layer: int
  size: int
  in_channels: int
  out_channels: int
  pop: Optional[int] = None
  push: Optional[int] = None
  pre: Optional[str] = None
  pre_block: int = 0
  pre_push: Optional[int] = None

  @property
  def pre_in(self) -> tuple[int, int]:
    """(side, channels) of the sampler's input."""
    side = self.size * 2 if self.pre == "down" else self.size // 2
    return side, self.in_channels


def layout(m) -> tuple[tuple[UnitSpec, ...], tuple[tuple[int, int], ...]]:
  """(units, skip slots as (side, channels)) of a `UNet`, in execution order."""
  boc, lpb, s = m.block_out_channels, m.layers_per_block, m.sample_size
  n = len(boc)
  units, slots = [], [(s, boc[0])]
  ch, pre = boc[0], None
  for i, kind in enumerate(m.down_block_types):
    size, attn = s // 2 ** i, kind.startswith("Attn")
    for j in range(lpb):
      first = dict(pre=pre[0], pre_block=pre[1], pre_push=pre[2]) if (j == 0 and pre) else {}
      slots.append((size, boc[i]))
      units.append(UnitSpec(f"down{i}.res{j}", "res", "down", i, j, size, ch, boc[i],
                            push=None if attn else len(slots) - 1, **first))
      ch = boc[i]
      if attn:
        units.append(UnitSpec(f"down{i}.attn{j}", "attn", "down", i, j, size, ch, ch,
                              push=len(slots) - 1))
    pre = None
    if i < n - 1:
      slots.append((size // 2, ch))
      pre = ("down", i, len(slots) - 1)
  size = s // 2 ** (n - 1)
  first = dict(pre=pre[0], pre_block=pre[1], pre_push=pre[2]) if pre else {}
  units.append(UnitSpec("mid.res0", "res", "mid", 0, 0, size, ch, boc[-1], **first))
  if m.add_attention:
    units.append(UnitSpec("mid.attn0", "attn", "mid", 0, 0, size, boc[-1], boc[-1]))
  units.append(UnitSpec("mid.res1", "res", "mid", 0, 1, size, boc[-1], boc[-1]))
  ch, stack, pre = boc[-1], list(range(len(slots))), None
  for i, kind in enumerate(m.up_block_types):
    size, out, attn = s // 2 ** (n - 1 - i), boc[n - 1 - i], kind.startswith("Attn")
    for j in range(lpb + 1):
      first = dict(pre=pre[0], pre_block=pre[1]) if (j == 0 and pre) else {}
      units.append(UnitSpec(f"up{i}.res{j}", "res", "up", i, j, size, ch, out, pop=stack.pop(),
                            **first))
      ch = out
      if attn:
        units.append(UnitSpec(f"up{i}.attn{j}", "attn", "up", i, j, size, ch, ch))
    pre = ("up", i) if i < n - 1 else None
  return tuple(units), tuple(slots)


@dataclasses.dataclass(frozen=True)
class UNetBackbone(bb_lib.Backbone):
  """`UNet` as units (see the module docstring)."""

  def __post_init__(self):
    super().__post_init__()
    if self.granularity != "block":
      raise NotImplementedError(
          "the U-Net backbone has only 'block' units (ResNet and attention blocks); it has no "
          "attention/MLP branch split, so 'branch' granularity (unit='branch' or "
          "cache_mode='branch' mask plans) is not available")

  @functools.cached_property
  def _layout(self):
    self.module.validate()
    return layout(self.module)

  @property
  def specs(self) -> tuple[UnitSpec, ...]:
    return self._layout[0]

  @property
  def skip_slots(self) -> tuple[tuple[int, int], ...]:
    return self._layout[1]

  def spec(self, ref) -> UnitSpec:
    return self.specs[ref.segment.start] if isinstance(ref, bb_lib.UnitRef) else self.specs[ref]

  @property
  def segments(self):
    return tuple(bb_lib.Segment(u.name, i, 1) for i, u in enumerate(self.specs))

  def skip_consumers(self):
    """Down-path units whose output is also read by up ResNets → those ResNets' unit indices.

    A unit that pushes a skip is read by the up ResNet that pops it; the last unit of a down
    level with a downsampler is also read, through the next unit's `enter` (the downsample), by
    the up ResNet that pops the downsample's slot. Values are sorted tuples (rectification clears
    such a unit only when all of them are skipped too).
    """
    specs = self.specs
    reader = {u.pop: i for i, u in enumerate(specs) if u.pop is not None}
    readers = {i: {reader[u.push]} for i, u in enumerate(specs) if u.push is not None}
    for i, u in enumerate(specs):
      if u.pre_push is not None and i > 0:
        readers.setdefault(i - 1, set()).add(reader[u.pre_push])
    return {i: tuple(sorted(r)) for i, r in sorted(readers.items())}

  def cache_branches(self):
    """DeepCache branch points (a, r), shallowest first (Ma et al., CVPR 2024, §3).

    For every up-path unit r: the stream after r's `enter` (after the upsampler when r starts a
    level: DeepCache's cached output of U_{m+1}) can be reused if no skip slot read by r or later
    units is written by a skipped unit, so a = 1 + the last unit before r writing such a slot
    (its apply's skip or its `enter`'s downsample; slot 0 is `embed`'s). Pairs with a < r only.
    r = the last unit gives a = 0: only conv_in, the last up ResNet and the head run (DeepCache's
    shallowest branch); a larger r keeps more of the down path.
    """
    specs = self.specs
    writer = {0: -1}
    for i, u in enumerate(specs):
      for slot in (u.push, u.pre_push):
        if slot is not None:
          writer[slot] = i
    out = []
    for r in range(len(specs) - 1, -1, -1):
      if specs[r].where != "up":
        continue
      a = 1 + max((writer[u.pop] for u in specs[r:] if u.pop is not None), default=-1)
      if a < r:
        out.append((a, r))
    return tuple(out)

  @property
  def input_shape(self):
    m = self.module
    return (m.sample_size, m.sample_size, m.in_channels)

  @property
  def uniform_tokens(self) -> bool:
    return False

  @property
  def width(self) -> int:
    return self.module.block_out_channels[0]

  @property
  def num_tokens(self) -> int:
    return self.module.sample_size ** 2

  @functools.cached_property
  def _stream_size(self) -> int:
    sizes = [u.size ** 2 * max(u.in_channels, u.out_channels) for u in self.specs]
    sizes += [u.pre_in[0] ** 2 * u.pre_in[1] for u in self.specs if u.pre]
    return max(sizes + [self.module.sample_size ** 2 * self.module.block_out_channels[0]])

  # FLOPs ----------------------------------------------------------------------------------------
  def _pre_flops(self, u: UnitSpec) -> float:
    if u.pre is None:
      return 0.0
    return flops_lib.conv_flops(u.size, 3, u.pre_in[1], u.pre_in[1])

  def _compute_flops(self, u: UnitSpec) -> float:
    if u.kind == "attn":
      return flops_lib.spatial_attn_flops(u.size ** 2, u.out_channels)
    c_in = u.in_channels + (self.skip_slots[u.pop][1] if u.pop is not None else 0)
    c = u.out_channels
    temb_out = 2 * c if self.module.resnet_time_scale_shift == "scale_shift" else c
    out = (flops_lib.conv_flops(u.size, 3, c_in, c) + flops_lib.conv_flops(u.size, 3, c, c)
           + 2.0 * self.module.time_embed_dim * temb_out)
    if c_in != c:
      out += flops_lib.conv_flops(u.size, 1, c_in, c)
    return out

  @property
  def unit_flops(self):
    return np.array([self._pre_flops(u) + self._compute_flops(u) for u in self.specs])

  @property
  def enter_flops(self):
    return np.array([self._pre_flops(u) for u in self.specs], np.float64)

  @property
  def embed_flops(self):
    m = self.module
    c0, d = m.block_out_channels[0], m.time_embed_dim
    return 2.0 * c0 * d + 2.0 * d * d + flops_lib.conv_flops(m.sample_size, 3, m.in_channels, c0)

  @property
  def head_flops(self):
    m = self.module
    return flops_lib.conv_flops(m.sample_size, 3, m.block_out_channels[0], m.out_channels)

  # Compute --------------------------------------------------------------------------------------
  def _call(self, params, method, *args):
    return self.module.apply({"params": params}, *args, method=method)

  @staticmethod
  def _read(state, side, channels):
    h = state["h"]
    return h[:, :side * side * channels].reshape(h.shape[0], side, side, channels)

  @staticmethod
  def _write(state, value):
    flat = value.reshape(value.shape[0], -1)
    return dict(state, h=jax.lax.dynamic_update_slice_in_dim(state["h"], flat.astype(
        state["h"].dtype), 0, axis=1))

  @staticmethod
  def _push(state, slot, value):
    skips = state["skips"]
    return dict(state, skips=skips[:slot] + (value.astype(skips[slot].dtype),) + skips[slot + 1:])

  def embed(self, params, x, t, y):
    h0, temb = self._call(params, "embed", x, t, y)
    b = h0.shape[0]
    zero = jnp.zeros_like(h0[:, :1, :1, :1])  # carries h0's sharding / varying type
    skips = (h0,) + tuple(jnp.broadcast_to(zero, (b, side, side, c))
                          for side, c in self.skip_slots[1:])
    flat = h0.reshape(b, -1)
    pad = jnp.broadcast_to(zero.reshape(b, 1), (b, self._stream_size - flat.shape[1]))
    return {"h": jnp.concatenate([flat, pad], axis=1), "temb": temb, "skips": skips}

  def enter(self, params, ref, state):
    u = self.spec(ref)
    if u.pre is None:
      return state
    side, c = u.pre_in
    out = self._call(params, "sampler", u.pre, u.pre_block, self._read(state, side, c))
    state = self._write(state, out)
    return state if u.pre_push is None else self._push(state, u.pre_push, out)

  def compute(self, params, ref, state):
    u = self.spec(ref)
    h = self._read(state, u.size, u.in_channels)
    if u.kind == "attn":
      return self._call(params, "attention", u.where, u.block, u.layer, h)
    skip = None if u.pop is None else state["skips"][u.pop]
    return self._call(params, "resnet", u.where, u.block, u.layer, h, state["temb"], skip)

  def apply(self, params, ref, state, value):
    u = self.spec(ref)
    state = self._write(state, value)
    return state if u.push is None else self._push(state, u.push, value)

  def drop(self, params, ref, state):
    raise NotImplementedError(
        "depth schedules (ASE) do not apply to the U-Net backbone: its up path consumes every "
        "down-path skip and changes resolution, so 'drop the last units' has no meaning")

  def step_signature(self, params, state):
    """No adaLN to read: `conv_in`'s output (skip slot 0) and the time embedding, flattened and
    concatenated per sample, (B, H·W·C₀ + 4·C₀) — the input and the time it is denoised at
    (a documented fallback for TeaCache, whose indicator is DiT-style modulated input)."""
    del params
    h0, temb = state["skips"][0], state["temb"]
    return jnp.concatenate([h0.reshape(h0.shape[0], -1), temb.astype(h0.dtype)], axis=1)

  def final_feature(self, state):
    """The full-resolution map the head reads (the stream buffer's prefix; its tail is stale)."""
    m = self.module
    return self._read(state, m.sample_size, m.block_out_channels[0])

  def head(self, params, state):
    m = self.module
    return self._call(params, "head", self.final_feature(state))
