"""A test-only backbone that is neither DiT nor U-ViT, behind the unit contract.

`Toy` (per-pixel tokens, width D) has two segments of different parameter layouts:

* `a` blocks: h ← h + mix(h); h ← h + mlp(h); each writes its output to a skip slot;
* `b` blocks (FIFO, unlike U-ViT's LIFO): h ← fuse([h, skip_g]); h ← h + σ(gate)·mix(h);
  h ← h + mlp(h), where mix(h) = (mean_tokens(h) − h)·W_mix and mlp(h) = tanh(h·W1)·W2.

`Toy.__call__` is the full forward written directly; `ToyBackbone` is the contract
implementation. Depth schedules may drop only `b` blocks (`tail_start`); a dropped `b` block still
fuses its skip. Every runner in `jaxee.exits` must accept it unchanged.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxee.models import backbone as bb_lib
from jaxee.models import layers


def _mix(p, h):
  return (h.mean(axis=1, keepdims=True) - h) @ p["mix"]


def _mlp(p, h):
  return jnp.tanh(h @ p["fc1"]) @ p["fc2"]


def _fuse(p, h, skip):
  return jnp.concatenate([h, skip], axis=-1) @ p["fuse"]


def _gate(p):
  return jax.nn.sigmoid(p["gate"])[..., None, :]


class Toy(nn.Module):
  """The toy model (see the module docstring)."""
  size: int = 4
  channels: int = 2
  width: int = 16
  n_a: int = 2
  n_b: int = 2
  num_classes: int = 3

  family = "toy"
  default_schedule = "linear_discrete"
  cfg_convention = "uvit"
  learn_sigma = False

  @property
  def null_class(self):
    return self.num_classes

  @property
  def out_channels(self):
    return self.channels

  def backbone(self, granularity="block"):
    return ToyBackbone(self, granularity)

  def setup(self):
    d, init = self.width, nn.initializers.normal(0.3)
    self.p_embed = self.param("embed", init, (self.channels, d))
    self.p_time = self.param("time", init, (d, d))
    self.p_label = self.param("label", init, (self.num_classes + 1, d))
    self.p_a = self.param("a_blocks", lambda k: {
        "mix": init(jax.random.fold_in(k, 0), (self.n_a, d, d)),
        "fc1": init(jax.random.fold_in(k, 1), (self.n_a, d, 2 * d)),
        "fc2": init(jax.random.fold_in(k, 2), (self.n_a, 2 * d, d))})
    self.p_b = self.param("b_blocks", lambda k: {
        "mix": init(jax.random.fold_in(k, 0), (self.n_b, d, d)),
        "fc1": init(jax.random.fold_in(k, 1), (self.n_b, d, 2 * d)),
        "fc2": init(jax.random.fold_in(k, 2), (self.n_b, 2 * d, d)),
        "fuse": init(jax.random.fold_in(k, 3), (self.n_b, 2 * d, d)),
        "gate": init(jax.random.fold_in(k, 4), (self.n_b, d))})
    self.p_head = self.param("head", init, (d, self.channels))

  def embed(self, x, t, y=None):
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    y = jnp.full((b,), self.null_class, jnp.int32) if y is None else jnp.asarray(y)
    tokens = x.reshape(b, -1, self.channels) @ self.p_embed
    cond = layers.timestep_embedding(t, self.width) @ self.p_time + self.p_label[y]
    return tokens + cond[:, None, :]

  def head(self, h):
    return (h @ self.p_head).reshape(h.shape[0], self.size, self.size, self.channels)

  def __call__(self, x, t, y=None):
    h = self.embed(x, t, y)
    skips = []
    for g in range(self.n_a):
      p = jax.tree.map(lambda a, g=g: a[g], self.p_a)
      h = h + _mix(p, h)
      h = h + _mlp(p, h)
      skips.append(h)
    for g in range(self.n_b):
      p = jax.tree.map(lambda a, g=g: a[g], self.p_b)
      h = _fuse(p, h, skips[g])
      h = h + _gate(p) * _mix(p, h)
      h = h + _mlp(p, h)
    return self.head(h)


class ToyExitHead(nn.Module):
  """An exit head shaped like the toy head (a per-token Dense)."""
  width: int
  size: int
  channels: int

  @nn.compact
  def __call__(self, tokens, ctx=None):
    del ctx
    out = nn.Dense(self.channels, use_bias=False, name="linear")(tokens)
    return out.reshape(tokens.shape[0], self.size, self.size, self.channels)


@dataclasses.dataclass(frozen=True)
class ToyBackbone(bb_lib.Backbone):
  """`Toy` behind the contract; state: `h` (B, N, D) and `skips` (B, n_a, N, D)."""

  @property
  def _per(self):
    return 1 if self.granularity == "block" else 2

  @property
  def segments(self):
    m, per = self.module, self._per
    pattern = ("block",) if per == 1 else ("attn", "mlp")
    return (bb_lib.Segment("a", 0, m.n_a, pattern), bb_lib.Segment("b", m.n_a * per, m.n_b,
                                                                   pattern))

  @property
  def tail_start(self):
    return self.module.n_a * self._per

  @property
  def input_shape(self):
    m = self.module
    return (m.size, m.size, m.channels)

  @property
  def width(self):
    return self.module.width

  @property
  def num_tokens(self):
    return self.module.size ** 2

  @property
  def unit_flops(self):
    n, d = self.num_tokens, self.width
    mix, mlp, fuse = 2.0 * n * d * d, 8.0 * n * d * d, 4.0 * n * d * d
    m = self.module
    if self._per == 1:
      return np.array([mix + mlp] * m.n_a + [fuse + mix + mlp] * m.n_b)
    return np.array([mix, mlp] * m.n_a + [fuse + mix, mlp] * m.n_b)

  @property
  def enter_flops(self):
    if self._per == 1:
      return np.zeros(self.num_units)
    fuse = 4.0 * self.num_tokens * self.width ** 2
    return np.array([0.0, 0.0] * self.module.n_a + [fuse, 0.0] * self.module.n_b)

  @property
  def drop_flops(self):
    fuse = 4.0 * self.num_tokens * self.width ** 2
    m = self.module
    return np.array(([0.0] * self._per) * m.n_a + ([fuse] + [0.0] * (self._per - 1)) * m.n_b)

  @property
  def embed_flops(self):
    m = self.module
    return 2.0 * self.num_tokens * m.channels * m.width + 2.0 * m.width ** 2

  @property
  def head_flops(self):
    return 2.0 * self.num_tokens * self.width * self.module.channels

  def _p(self, params, ref):
    stack = params["a_blocks" if ref.segment.name == "a" else "b_blocks"]
    return bb_lib.take(stack, ref.group)

  def _skip(self, ref, state):
    return jax.lax.dynamic_index_in_dim(state["skips"], ref.group, 1, keepdims=False)

  def embed(self, params, x, t, y):
    h = self.module.apply({"params": params}, x, t, y, method="embed")
    return {"h": h, "skips": jnp.repeat(jnp.zeros_like(h)[:, None], self.module.n_a, axis=1)}

  def enter(self, params, ref, state):
    if ref.segment.name == "b" and ref.kind == "attn":
      return dict(state, h=_fuse(self._p(params, ref), state["h"], self._skip(ref, state)))
    return state

  def compute(self, params, ref, state):
    p, h = self._p(params, ref), state["h"]
    if ref.kind == "block":
      if ref.segment.name == "b":
        h = _fuse(p, h, self._skip(ref, state))
        h = h + _gate(p) * _mix(p, h)
      else:
        h = h + _mix(p, h)
      return h + _mlp(p, h)
    return _mix(p, h) if ref.kind == "attn" else _mlp(p, h)

  def apply(self, params, ref, state, value):
    if ref.kind == "block":
      h = value
    elif ref.kind == "attn" and ref.segment.name == "b":
      h = state["h"] + _gate(self._p(params, ref)) * value
    else:
      h = state["h"] + value
    state = dict(state, h=h)
    if ref.segment.name == "a" and ref.kind in ("block", "mlp"):
      state["skips"] = jax.lax.dynamic_update_index_in_dim(state["skips"], h, ref.group, 1)
    return state

  def drop(self, params, ref, state):
    if ref.segment.name == "b" and ref.kind in ("block", "attn"):
      return dict(state, h=_fuse(self._p(params, ref), state["h"], self._skip(ref, state)))
    if ref.segment.name == "a" and ref.kind in ("block", "mlp"):
      skips = jax.lax.dynamic_update_index_in_dim(state["skips"], state["h"], ref.group, 1)
      return dict(state, skips=skips)
    return state

  def head(self, params, state):
    return self.module.apply({"params": params}, state["h"], method="head")

  def exit_head_module(self):
    m = self.module
    return ToyExitHead(m.width, m.size, m.channels)

  def head_params_for_exit(self, params):
    return {"linear": {"kernel": params["head"]}}

  @property
  def pixels_per_token(self):
    return 1

  def tokens_to_image(self, values):
    """Per-pixel tokens: a reshape, as the toy head does."""
    return values.reshape(values.shape[0], self.module.size, self.module.size, values.shape[-1])


def toy(seed: int = 0, **overrides):
  """(model, params) of a toy backbone."""
  model = Toy(**overrides)
  x = jnp.zeros((1, model.size, model.size, model.channels))
  params = model.init(jax.random.PRNGKey(seed), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  return model, params["params"]
