"""DeeDiff / AdaDiff exit heads and uncertainty estimation modules (UEMs).

Reproduces `razvanmatisan/duodiff` `models/early_exit.py` (`OutputHead`, `MLPProbe`) as described
in `research/ee_methods.md` §2.2–2.3, and the UEM of the DeeDiff paper (Tang et al. 2023, Eq. for
u_{i,t} = f(w_tᵀ[L_{i,t}, timesteps] + b_t), quoted in §2.2):

* `UViTExitHead`: LayerNorm(D, eps 1e-5, affine) → Linear(D→p²·C) → drop the `extras` tokens →
  unpatchify → Conv2d(C→C, 3×3, pad 1).
* `DiTExitHead`: shaped like DiT's `FinalLayer` — adaLN (SiLU → Linear(D→2D), shift then scale),
  LayerNorm without affine (eps 1e-6), Linear(D→p²·C_out) → unpatchify. DiT has no public DeeDiff
  head; this mirrors the backbone's own head so an exit sees the same conditioning c.
* `TokenMeanUEM` ('token_mean', the public re-implementation): per-token Linear(D→1) + sigmoid,
  mean over all tokens (U-ViT: including the time/label tokens).
* `TimestepAwareUEM` ('timestep_aware', the paper's form): u = sigmoid(wᵀ[mean-pool(L_i), e(t)] + b)
  where mean-pool averages the block-input tokens over the sequence (all tokens) and e(t) is the
  D-dim sinusoidal embedding of the network time (cos then sin, as the backbones').

All heads and UEMs use PyTorch's default `nn.Linear`/`nn.Conv2d` init (kaiming-uniform(a=√5):
U(±1/√fan_in) for weights and biases), because the original creates them after the backbone's
`_init_weights` (§2.3). Params for all exits are stacked along a leading axis of length L (the
number of blocks; head k reads the input of block k).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxee.models import layers
from jaxee.models.exit_heads import DiTExitHead, UViTExitHead, _dense, _torch_uniform  # noqa: F401

UEM_KINDS = ("token_mean", "timestep_aware")


class TokenMeanUEM(nn.Module):
  """`MLPProbe`: mean over tokens of sigmoid(Linear(D→1)(token)); (B,)."""
  dim: int

  @nn.compact
  def __call__(self, tokens: jax.Array, t_emb: jax.Array) -> jax.Array:
    del t_emb
    return jax.nn.sigmoid(_dense(1, self.dim, "linear")(tokens)[..., 0]).mean(axis=-1)


class TimestepAwareUEM(nn.Module):
  """u = sigmoid(wᵀ[mean-pooled tokens, e(t)] + b); (B,)."""
  dim: int

  @nn.compact
  def __call__(self, tokens: jax.Array, t_emb: jax.Array) -> jax.Array:
    feats = jnp.concatenate([tokens.mean(axis=1), t_emb], axis=-1)
    return jax.nn.sigmoid(_dense(1, 2 * self.dim, "linear")(feats)[..., 0])


def num_exits(model: Any) -> int:
  """L = number of blocks (U-ViT: in + mid + out); exits k = 0..L−1, k = L is the backbone."""
  return model.depth if model.family == "dit" else 2 * model.num_in_blocks + 1


def width(model: Any) -> int:
  return model.hidden_size if model.family == "dit" else model.embed_dim


def make_head(model: Any) -> nn.Module:
  if model.family == "dit":
    return DiTExitHead(model.hidden_size, model.patch_size, model.out_channels)
  return UViTExitHead(model.embed_dim, model.patch_size, model.in_chans, model.extras)


def make_uem(model: Any, kind: str) -> nn.Module:
  if kind == "token_mean":
    return TokenMeanUEM(width(model))
  if kind == "timestep_aware":
    return TimestepAwareUEM(width(model))
  raise ValueError(f"unknown UEM {kind!r}; choose from {UEM_KINDS}")


def time_features(model: Any, t_net) -> jax.Array:
  """e(t): the D-dim sinusoid of the network time, (B, D)."""
  return layers.timestep_embedding(jnp.asarray(t_net, jnp.float32), width(model))


def _example(model: Any):
  d = width(model)
  if model.family == "dit":
    n = (model.input_size // model.patch_size) ** 2
  else:
    n = model.extras + model.num_patches
  return jnp.zeros((1, n, d)), jnp.zeros((1, d))


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def _stacked_init(module: nn.Module, n: int, rng, tokens_shape, ctx_shape):
  """n independent inits of `module` stacked on a leading axis (one compiled program)."""
  tokens, c = jnp.zeros(tokens_shape), jnp.zeros(ctx_shape)
  return jax.vmap(lambda k: module.init(k, tokens, c)["params"])(jax.random.split(rng, n))


def init_deediff_params(model: Any, rng, uem: str = "token_mean",
                        backbone_params: Optional[Any] = None) -> dict:
  """Stacked head and UEM params for all L exits: {'heads': ..., 'uems': ...}.

  Args:
    model: backbone (DiT or U-ViT).
    rng: PRNG key.
    uem: 'token_mean' or 'timestep_aware'.
    backbone_params: if given, every exit head starts as a copy of the backbone's own head
      (DiT `final_layer` adaLN + linear; U-ViT `norm`, `decoder_pred` and, with `conv`, the 3×3
      `final_layer`), which is a warm start for fine-tuning; otherwise PyTorch-default init as
      in the public code (§2.3).

  Returns:
    A param pytree, leaves with a leading axis L = `num_exits(model)`.
  """
  if uem not in UEM_KINDS:
    raise ValueError(f"unknown UEM {uem!r}; choose from {UEM_KINDS}")
  tokens, c = _example(model)
  k_head, k_uem = jax.random.split(rng)
  n = num_exits(model)
  heads = _stacked_init(make_head(model), n, k_head, tokens.shape, c.shape)
  uems = _stacked_init(make_uem(model, uem), n, k_uem, tokens.shape, c.shape)
  if backbone_params is not None:
    heads = _heads_from_backbone(model, backbone_params, heads)
  return {"heads": heads, "uems": uems}


def _heads_from_backbone(model: Any, backbone_params: Any, heads: dict) -> dict:
  """Replaces the stacked head params by L copies of the backbone head's params."""
  if model.family == "dit":
    src = {"adaLN_modulation": backbone_params["final_layer"]["adaLN_modulation"],
           "linear": backbone_params["final_layer"]["linear"]}
  else:
    src = {"norm": backbone_params["norm"], "linear": backbone_params["decoder_pred"]}
    if model.conv:
      src["conv"] = backbone_params["final_layer"]
  n = num_exits(model)
  copied = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + jnp.shape(a)), src)
  out = dict(heads)
  out.update(copied)
  if jax.tree.structure(out) != jax.tree.structure(heads) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(heads))):
    raise ValueError("backbone head params do not match the exit head's structure")
  return out


def check_deediff_params(model: Any, ee_params: Any, uem: str) -> None:
  """Raises ValueError unless `ee_params` are L stacked heads and UEMs of kind `uem` for `model`."""
  if uem not in UEM_KINDS:
    raise ValueError(f"unknown UEM {uem!r}; choose from {UEM_KINDS}")
  if not isinstance(ee_params, dict) or set(ee_params) != {"heads", "uems"}:
    raise ValueError("ee_params must be a dict {'heads': ..., 'uems': ...} "
                     "(see init_deediff_params)")
  tokens, c = _example(model)
  n = num_exits(model)
  for part, module in (("heads", make_head(model)), ("uems", make_uem(model, uem))):
    want = jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0), tokens, c)["params"])
    got = ee_params[part]
    if jax.tree.structure(got) != jax.tree.structure(want):
      raise ValueError(f"ee_params[{part!r}] does not have the structure of a {uem!r} "
                       f"DeeDiff {part[:-1]} for this {model.family} model")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if tuple(g.shape) != (n,) + tuple(w.shape):
        raise ValueError(f"ee_params[{part!r}] leaf has shape {tuple(g.shape)}, expected "
                         f"{(n,) + tuple(w.shape)} ({n} exits; uem={uem!r})")
