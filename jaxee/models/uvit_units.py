"""U-ViT behind the backbone contract (`jaxee/models/backbone.py`).

Units in execution order (baofff/U-ViT `libs/uvit.py` `UViT.forward`): the n = depth//2 in-blocks,
the mid block, the n out-blocks — as blocks (`'block'`) or as attention/MLP branches (`'branch'`).
The model owns the long skips: the state carries `skips` (B, n, N, D); in-block g writes slot g
after it runs, out-block g reads slot n−1−g (LIFO) and fuses it with `skip_linear(concat[x, skip])`
before its attention.

* `'block'`: an out-block's value is its whole output (fusion included), so a cache-reused
  out-block costs nothing and its skip is consumed unread (TABM block-output cache); a reused
  in-block's cached output is also written as its skip.
* `'branch'`: entering an out-block's attention unit applies the fusion (always, as in
  Learning-to-Cache's `uvit_router.Block._forward`); the residual adds have no gates.
* `drop` (a depth schedule): a dropped out-block still applies its fusion (ASE, paper Fig. 8,
  `research/ee_methods.md` §1.5); a dropped in-block passes its input on as its skip.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.models import backbone as bb_lib
from jaxee.models import layers


@dataclasses.dataclass(frozen=True)
class UViTBackbone(bb_lib.Backbone):
  """`UViT` as units (see the module docstring)."""

  @property
  def _n(self) -> int:
    return self.module.num_in_blocks

  @property
  def _per(self) -> int:
    return 1 if self.granularity == "block" else 2

  @property
  def segments(self):
    n, per = self._n, self._per
    pattern = ("block",) if per == 1 else ("attn", "mlp")
    return (bb_lib.Segment("in", 0, n, pattern), bb_lib.Segment("mid", n * per, 1, pattern),
            bb_lib.Segment("out", (n + 1) * per, n, pattern))

  @property
  def tail_start(self) -> int:
    return (self._n + 1) * self._per

  def skip_consumers(self):
    """In-block g's output is the long skip of out-block n−1−g (LIFO, `UViT.forward`).

    'block': unit g → unit n+1+(n−1−g); 'branch': in-block g's MLP unit (which writes the skip)
    → the attention unit of that out-block (whose `enter` fuses it).
    """
    n, per = self._n, self._per
    return {per * g + per - 1: per * (n + 1 + (n - 1 - g)) for g in range(n)}

  @property
  def input_shape(self):
    m = self.module
    return (m.img_size, m.img_size, m.in_chans)

  @property
  def width(self) -> int:
    return self.module.embed_dim

  @property
  def num_tokens(self) -> int:
    return self.module.extras + self.module.num_patches

  # FLOPs ----------------------------------------------------------------------------------------
  def _per_unit(self, plain, out):
    n = self._n
    return np.concatenate([np.tile(plain, n + 1), np.tile(out, n)]).astype(np.float64)

  @property
  def unit_flops(self):
    m = self.module
    if self.granularity == "block":
      return self._per_unit([flops_lib.block_flops(m)], [flops_lib.block_flops(m, "out_block")])
    a, f, s = flops_lib.attn_flops(m), flops_lib.mlp_flops(m), flops_lib.skip_flops(m)
    return self._per_unit([a, f], [a + s, f])

  @property
  def enter_flops(self):
    if self.granularity == "block":
      return np.zeros(self.num_units)
    return self._per_unit([0.0, 0.0], [flops_lib.skip_flops(self.module), 0.0])

  @property
  def drop_flops(self):
    s = flops_lib.skip_flops(self.module)
    return self._per_unit([0.0] * self._per, [s] + [0.0] * (self._per - 1))

  @property
  def embed_flops(self):
    return flops_lib.embed_flops(self.module)

  @property
  def head_flops(self):
    return flops_lib.head_flops(self.module)

  # Compute --------------------------------------------------------------------------------------
  def _apply_block(self, params, ref, *args, method="__call__"):
    seg = ref.segment.name
    if seg == "mid":
      p = params["mid_block"]
    else:
      p = bb_lib.take(params["in_blocks" if seg == "in" else "out_blocks"], ref.group)
    blk = self.module.block_module(seg == "out")
    return layers.block_fn(blk, method, self.module.remat)(p, *args)

  def _skip(self, ref, state):
    return jax.lax.dynamic_index_in_dim(state["skips"], self._n - 1 - ref.group, 1,
                                        keepdims=False)

  def _push(self, ref, state, h):
    skips = jax.lax.dynamic_update_index_in_dim(state["skips"], h, ref.group, 1)
    return dict(state, h=h, skips=skips)

  def embed(self, params, x, t, y):
    tokens = self.module.apply({"params": params}, x, t, y, method="embed")
    # Derived from the tokens (not a fresh constant) so it carries the same sharding/varying
    # type inside `shard_map` as the values written into it.
    skips = jax.numpy.repeat(jax.numpy.zeros_like(tokens)[:, None], self._n, axis=1)
    return {"h": tokens, "skips": skips}

  def _merge(self, params, ref, state):
    merged = self._apply_block(params, ref, state["h"], self._skip(ref, state),
                               method="merge_skip")
    return dict(state, h=merged)

  def enter(self, params, ref, state):
    if ref.kind == "attn" and ref.segment.name == "out":
      return self._merge(params, ref, state)
    return state

  def compute(self, params, ref, state):
    h = state["h"]
    if ref.kind == "block":
      if ref.segment.name == "out":
        return self._apply_block(params, ref, h, self._skip(ref, state))
      return self._apply_block(params, ref, h)
    method = "attn_branch" if ref.kind == "attn" else "mlp_branch"
    return self._apply_block(params, ref, h, method=method)

  def apply(self, params, ref, state, value):
    h = value if ref.kind == "block" else state["h"] + value
    if ref.segment.name == "in" and ref.kind in ("block", "mlp"):
      return self._push(ref, state, h)
    return dict(state, h=h)

  def drop(self, params, ref, state):
    seg = ref.segment.name
    if seg == "out" and ref.kind in ("block", "attn"):
      return self._merge(params, ref, state)
    if seg == "in" and ref.kind in ("block", "mlp"):
      return self._push(ref, state, state["h"])
    return state

  def settle(self, params, ref, state, out):
    """Output replacement: an in-block's replaced output is also its long skip (either granularity;
    at 'branch' the MLP unit ends the in-block and writes the skip, as `apply` does)."""
    if ref.segment.name == "in" and ref.kind in ("block", "mlp"):
      return self._push(ref, state, out)
    return dict(state, h=out)

  def head(self, params, state):
    return self.module.apply({"params": params}, state["h"], method="head")

  # Exit heads, shallow copies, training facts ---------------------------------------------------
  def exit_head_module(self):
    from jaxee.models import exit_heads  # pylint: disable=g-import-not-at-top
    m = self.module
    return exit_heads.UViTExitHead(m.embed_dim, m.patch_size, m.in_chans, m.extras)

  @property
  def pixels_per_token(self) -> int:
    return self.module.patch_size ** 2

  def tokens_to_image(self, values):
    """Drop the `extras` (time/label) tokens, then `unpatchify` as the U-ViT head does."""
    m = self.module
    return layers.unpatchify(values[:, m.extras:], m.patch_size,
                             values.shape[-1] // m.patch_size ** 2)

  def head_params_for_exit(self, params):
    src = {"norm": params["norm"], "linear": params["decoder_pred"]}
    if self.module.conv:
      src["conv"] = params["final_layer"]
    return src

  @property
  def time_embedder_pattern(self):
    return "time_embed_.*" if self.module.mlp_time_embed else None

  def shallow_depth(self, num_layers: int) -> int:
    """DuoDiff counts in-blocks + mid + out-blocks ("3 layers" = 1 + 1 + 1, §3.1)."""
    full = 2 * self._n + 1
    if num_layers < 3 or num_layers % 2 == 0 or num_layers > full:
      raise ValueError(f"a shallow U-ViT has an odd number of layers in 3..{full} "
                       f"(in-blocks + mid + out-blocks), got {num_layers}")
    return num_layers - 1

  def shallow_params(self, deep_params, shallow_module):
    """The first in-blocks, the mid block and the LAST out-blocks (their LIFO partners)."""
    n = shallow_module.num_in_blocks
    if n > self._n:
      raise ValueError(f"shallow U-ViT has {n} in-blocks, the deep one {self._n}")
    out = dict(deep_params)
    out["in_blocks"] = bb_lib.take_prefix(deep_params["in_blocks"], n)
    out["out_blocks"] = bb_lib.take_suffix(deep_params["out_blocks"], n)
    return out
