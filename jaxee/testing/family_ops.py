"""Runner-facing pieces of the DiT and U-ViT backbones as pure functions of params.

The exit runners need the backbone split into embedding, blocks (and their branches) and head,
with the block params stacked along a leading axis (`jaxee/models/dit.py`, `uvit.py`). These
helpers call the modules' own methods (`embed`, `head`, `mid`, `block_module(...)` and the block
methods `modulation`, `attn_branch`, `mlp_branch`, `merge_skip`, `body`), so every runner computes
exactly what the full forward computes (DiT `DiT.forward`, U-ViT `UViT.forward`).

`ctx` is the per-sample conditioning the blocks and head need: DiT's c = t_emb + y_emb (B, D);
`None` for U-ViT (time and label are tokens).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def embed(model: Any, params: Any, x, t_net, y) -> tuple[jax.Array, Optional[jax.Array]]:
  """Tokens and context: DiT `(tokens, c)`, U-ViT `(tokens, None)`."""
  out = model.apply({"params": params}, x, t_net, y, method="embed")
  if model.family == "dit":
    return out
  return out, None


def head(model: Any, params: Any, tokens, ctx):
  """The backbone head on the final tokens."""
  if model.family == "dit":
    return model.apply({"params": params}, tokens, ctx, method="head")
  return model.apply({"params": params}, tokens, method="head")


def take(stack: Any, i) -> Any:
  """Params of one block of a stacked tree (static or traced index)."""
  return jax.tree.map(lambda a: a[i], stack)


def static_slice(stack: Any, start: int, stop: int) -> Any:
  """A static slice [start, stop) of a stacked tree."""
  return jax.tree.map(lambda a: a[start:stop], stack)


def stack_one(tree: Any) -> Any:
  """Adds a leading axis of size 1 (to treat the U-ViT mid block as a stack of one)."""
  return jax.tree.map(lambda a: a[None], tree)


def stack_len(stack: Any) -> int:
  return int(jax.tree.leaves(stack)[0].shape[0])


class Blocks:
  """Block-level callables of one backbone (unbound modules applied to given params)."""

  def __init__(self, model: Any):
    self.model = model
    self.family = model.family
    if self.family == "dit":
      self._blk = model.block_module()
    else:
      self._in = model.block_module(False)
      self._out = model.block_module(True)

  # DiT ------------------------------------------------------------------------------------------
  def dit(self, p, x, c):
    return self._blk.apply({"params": p}, x, c)

  def dit_modulation(self, p, c):
    return self._blk.apply({"params": p}, c, method="modulation")

  def dit_attn(self, p, x, mod):
    return self._blk.apply({"params": p}, x, mod, method="attn_branch")

  def dit_mlp(self, p, x, mod):
    return self._blk.apply({"params": p}, x, mod, method="mlp_branch")

  # U-ViT ----------------------------------------------------------------------------------------
  def uvit_in(self, p, x):
    """An in-block or the mid block (no skip)."""
    return self._in.apply({"params": p}, x)

  def uvit_out(self, p, x, skip):
    return self._out.apply({"params": p}, x, skip)

  def uvit_merge(self, p, x, skip):
    return self._out.apply({"params": p}, x, skip, method="merge_skip")

  def uvit_body(self, p, x, skip: bool):
    blk = self._out if skip else self._in
    return blk.apply({"params": p}, x, method="body")

  def uvit_attn(self, p, x, skip: bool):
    blk = self._out if skip else self._in
    return blk.apply({"params": p}, x, method="attn_branch")

  def uvit_mlp(self, p, x, skip: bool):
    blk = self._out if skip else self._in
    return blk.apply({"params": p}, x, method="mlp_branch")

  # Scans ----------------------------------------------------------------------------------------
  def scan_dit(self, stack, x, c):
    """All DiT blocks of `stack` in order."""
    if stack_len(stack) == 0:
      return x
    return jax.lax.scan(lambda h, p: (self.dit(p, h, c), None), x, stack)[0]

  def scan_uvit_in(self, stack, x):
    """In-blocks in order; returns (x, skips) with skips stacked (n, B, N, D)."""
    def body(h, p):
      h = self.uvit_in(p, h)
      return h, h
    return jax.lax.scan(body, x, stack)

  def scan_uvit_out(self, stack, x, skips_lifo):
    """Out-blocks in order; `skips_lifo[i]` is the skip consumed by out-block i."""
    if stack_len(stack) == 0:
      return x
    return jax.lax.scan(lambda h, ps: (self.uvit_out(ps[0], h, ps[1]), None), x,
                        (stack, skips_lifo))[0]

  def scan_uvit_merge(self, stack, x, skips_lifo):
    """Only the skip fusion of out-blocks (ASE's dropped U-ViT out-blocks)."""
    if stack_len(stack) == 0:
      return x
    return jax.lax.scan(lambda h, ps: (self.uvit_merge(ps[0], h, ps[1]), None), x,
                        (stack, skips_lifo))[0]


def hidden_states(model: Any, params: Any, x, t_net, y):
  """Runs every block and returns the input of each block (the DeeDiff exit points).

  Args:
    model: backbone.
    params: backbone params.
    x, t_net, y: network inputs.

  Returns:
    (states (L, B, N, D) — state k is the input of block k in execution order, i.e. after k
    blocks —, final tokens, ctx).
  """
  ops = Blocks(model)
  tokens, ctx = embed(model, params, x, t_net, y)
  if model.family == "dit":
    def body(h, p):
      return ops.dit(p, h, ctx), h
    final, states = jax.lax.scan(body, tokens, params["blocks"])
    return states, final, ctx
  h, skips = ops.scan_uvit_in(params["in_blocks"], tokens)
  in_states = jnp.concatenate([tokens[None], skips[:-1]], axis=0)
  mid_in = h
  h = ops.uvit_in(params["mid_block"], h)

  def body(hh, ps):
    return ops.uvit_out(ps[0], hh, ps[1]), hh
  final, out_states = jax.lax.scan(body, h, (params["out_blocks"], skips[::-1]))
  states = jnp.concatenate([in_states, mid_in[None], out_states], axis=0)
  return states, final, ctx
