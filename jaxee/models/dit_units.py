"""DiT behind the backbone contract (`jaxee/models/backbone.py`).

Units are DiT blocks (`'block'`) or their two adaLN-gated residual branches (`'branch'`: attention
then MLP, units 2ℓ and 2ℓ+1), as in facebookresearch/DiT `models.py` `DiTBlock.forward`:

    x = x + gate_msa · attn(modulate(norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp · mlp(modulate(norm2(x), shift_mlp, scale_mlp))

State: `h` (B, N, D) tokens, `c` (B, D) = t_emb + y_emb, and at branch granularity `mod` (B, 6, D),
the block's six modulation vectors, computed when the attention unit is entered (so a cached
branch is re-gated with the current step's gate, Learning-to-Cache `DiTBlock.forward`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.models import backbone as bb_lib
from jaxee.models import layers


@dataclasses.dataclass(frozen=True)
class DiTBackbone(bb_lib.Backbone):
  """`DiT` as units (see the module docstring)."""

  @property
  def segments(self):
    pattern = ("block",) if self.granularity == "block" else ("attn", "mlp")
    return (bb_lib.Segment("blocks", 0, self.module.depth, pattern),)

  @property
  def input_shape(self):
    m = self.module
    return (m.input_size, m.input_size, m.in_channels)

  @property
  def width(self) -> int:
    return self.module.hidden_size

  @property
  def num_tokens(self) -> int:
    return self.module.num_tokens

  # FLOPs ----------------------------------------------------------------------------------------
  @property
  def unit_flops(self):
    m = self.module
    if self.granularity == "block":
      return np.full(m.depth, flops_lib.block_flops(m))
    per = [flops_lib.attn_flops(m) + flops_lib.modulation_flops(m), flops_lib.mlp_flops(m)]
    return np.tile(np.asarray(per), m.depth)

  @property
  def enter_flops(self):
    if self.granularity == "block":
      return np.zeros(self.num_units)
    return np.tile(np.asarray([flops_lib.modulation_flops(self.module), 0.0]), self.module.depth)

  @property
  def drop_flops(self):
    return self.enter_flops

  @property
  def embed_flops(self):
    return flops_lib.embed_flops(self.module)

  @property
  def head_flops(self):
    return flops_lib.head_flops(self.module)

  # Compute --------------------------------------------------------------------------------------
  def _block(self, params, ref, *args, method="__call__"):
    p = bb_lib.take(params["blocks"], ref.group)
    return layers.block_fn(self.module.block_module(), method, self.module.remat)(p, *args)

  def embed(self, params, x, t, y):
    tokens, c = self.module.apply({"params": params}, x, t, y, method="embed")
    state = {"h": tokens, "c": c}
    if self.granularity == "branch":
      state["mod"] = jnp.repeat(jnp.zeros_like(c)[:, None], 6, axis=1)  # varying like c
    return state

  def enter(self, params, ref, state):
    if ref.kind != "attn":
      return state
    mod = self._block(params, ref, state["c"], method="modulation")
    return dict(state, mod=jnp.stack(mod, axis=1))

  def compute(self, params, ref, state):
    if ref.kind == "block":
      return self._block(params, ref, state["h"], state["c"])
    mod = tuple(state["mod"][:, k] for k in range(6))
    method = "attn_branch" if ref.kind == "attn" else "mlp_branch"
    return self._block(params, ref, state["h"], mod, method=method)

  def apply(self, params, ref, state, value):
    if ref.kind == "block":
      return dict(state, h=value)
    gate = state["mod"][:, 2 if ref.kind == "attn" else 5][:, None, :]
    return dict(state, h=state["h"] + gate * value)

  def drop(self, params, ref, state):
    return self.enter(params, ref, state)

  def head(self, params, state):
    return self.module.apply({"params": params}, state["h"], state["c"], method="head")

  def step_signature(self, params, state):
    """Block 0's modulate(norm1(x), shift_msa, scale_msa) on the embedded tokens: the
    timestep-modulated input TeaCache reads (its DiT-family forwards take
    `blocks[0].norm1(x, emb)`), (B, N, D)."""
    p = bb_lib.take(params["blocks"], 0)
    return self.module.block_module().apply({"params": p}, state["h"], state["c"],
                                             method="modulated_input")

  @property
  def step_signature_flops(self):
    return flops_lib.modulation_flops(self.module)

  # Exit heads, shallow copies, training facts ---------------------------------------------------
  def exit_head_module(self):
    from jaxee.models import exit_heads  # pylint: disable=g-import-not-at-top
    m = self.module
    return exit_heads.DiTExitHead(m.hidden_size, m.patch_size, m.out_channels)

  def exit_context(self, state):
    return state["c"]

  @property
  def pixels_per_token(self) -> int:
    return self.module.patch_size ** 2

  def tokens_to_image(self, values):
    """`unpatchify` as DiT's `FinalLayer` output (every token is an image token)."""
    p = self.module.patch_size
    return layers.unpatchify(values, p, values.shape[-1] // p ** 2)

  def head_params_for_exit(self, params):
    return {"adaLN_modulation": params["final_layer"]["adaLN_modulation"],
            "linear": params["final_layer"]["linear"]}

  @property
  def time_embedder_pattern(self) -> str:
    """Param-path regex of the time embedding MLP (frozen by ASE's option)."""
    return "t_embedder/.*"

  def shallow_depth(self, num_layers: int) -> int:
    """The `depth` of a shallow copy with `num_layers` blocks (DuoDiff)."""
    if not 1 <= num_layers <= self.module.depth:
      raise ValueError(f"a shallow DiT needs 1..{self.module.depth} layers, got {num_layers}")
    return num_layers

  def shallow_params(self, deep_params, shallow_module):
    """A shallow copy's params: embeddings and head as is, the first blocks."""
    if shallow_module.depth > self.module.depth:
      raise ValueError(f"shallow depth {shallow_module.depth} > deep depth {self.module.depth}")
    out = dict(deep_params)
    out["blocks"] = bb_lib.take_prefix(deep_params["blocks"], shallow_module.depth)
    return out
