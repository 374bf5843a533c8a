"""DeeDiff / AdaDiff exit heads and uncertainty estimation modules (UEMs), for any backbone.

Reproduces `razvanmatisan/duodiff` `models/early_exit.py` (`OutputHead`, `MLPProbe`) as described
in `research/ee_methods.md` §2.2–2.3, and the UEM of the DeeDiff paper (Tang et al. 2023, Eq. for
u_{i,t} = f(w_tᵀ[L_{i,t}, timesteps] + b_t), quoted in §2.2). Everything is read from the backbone
contract (`jaxee/models/backbone.py`) at `'block'` granularity, with no per-family code:

* exit heads g_k: `bb.exit_head_module()`, applied as `g.apply(p, tokens, bb.exit_context(state))`
  — shaped like the backbone's own head (`jaxee/models/exit_heads.py`: U-ViT `OutputHead`
  LayerNorm → Linear → drop extras → unpatchify → 3×3 conv; DiT a `FinalLayer`-shaped adaLN head
  that sees the conditioning c); `bb.head_params_for_exit(params)` is the warm start;
* `TokenMeanUEM` ('token_mean', the public re-implementation): per-token Linear(D→1) + sigmoid,
  mean over all tokens (U-ViT: including the time/label tokens);
* `TimestepAwareUEM` ('timestep_aware', a pooled reading of the paper):
  u = sigmoid(wᵀ[mean-pool(L_i), e(t)] + b) where mean-pool averages the block-input tokens over
  the sequence (all tokens) and e(t) is the D-dim sinusoidal embedding of the network time (cos
  then sin, as the backbones'), D = `bb.width`;
* `PaperMapUEM` ('paper_map', the paper's UEM, Eq. 8 u_{i,t} = f(w_tᵀ[L_{i,t}, t] + b_t) per token,
  with the uncertainty map of Eq. 9): timestep-specific parameters *generated* from e(t) (so they
  work for any traced t, discrete or continuous): w_t = diag(1 + γ(t))·W and b_t = b + β(t) with
  γ(t) = Linear(D→D)(e(t)), β(t) = Linear(D→p²·C)(e(t)); every token gives p²·C values
  sigmoid(w_tᵀL + b_t), which `bb.tokens_to_image` lays out as the backbone's head lays out its
  output (drop non-image tokens, unpatchify) → a per-element map u ∈ (0,1)^{H×W×C} (C = the
  input/ε channels). The exit decision reads its mean over the H·W·C elements (one scalar per
  sample, the scale of the public code's mean-reduced pseudo-target), so the runners see (B,) as
  for the scalar UEMs; training reads the map (`uncertainty_map`).

All heads and UEMs use PyTorch's default `nn.Linear`/`nn.Conv2d` init (kaiming-uniform(a=√5):
U(±1/√fan_in) for weights and biases), because the original creates them after the backbone's
`_init_weights` (§2.3). Params for all exits are stacked along a leading axis; two layouts
(`LAYOUTS`), with L = `bb.num_units` (the blocks in execution order):

* 'inputs' (the public code, §2.1): L exits, stacked entry k = exit k at the INPUT of block k,
  k = 0..L−1 (k = 0 runs no block); exit L is the backbone's own head;
* 'outputs' (the paper: exits at layers 1..N, none that runs zero blocks): L−1 exits, stacked
  entry j = exit k = j + 1 at the OUTPUT of block k (= the input of block k+1), k = 1..L−1; exit
  L is the backbone's own head (jointly trained by L_simple), so no extra head or UEM sits on
  the final stream.

Exit k always means "k blocks executed". Exit heads need every block input to have the same
shape, so a backbone with `uniform_tokens == False` is refused.

Also here, because they only read heads and UEMs: their FLOPs (`kernel_flops`: 2·positions·kernel
size per Dense/Conv kernel, from shapes), θ validation, the host prediction of exits for t-only
UEMs (`predict_exits`) and scripted UEMs for benchmarks (`scripted_uem_params`, §2.6); the runners
are in `deediff.py`, which re-exports these names.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import plan as plan_lib
from jaxee.models import layers
from jaxee.models.backbone import Backbone, as_backbone
from jaxee.models.exit_heads import DiTExitHead, UViTExitHead, _dense, _torch_uniform  # noqa: F401

UEM_KINDS = ("token_mean", "timestep_aware", "paper_map")
MAP_UEMS = ("paper_map",)              # per-element uncertainty maps (training reads the map)
TIME_UEMS = ("timestep_aware", "paper_map")  # UEMs that read e(t)
LAYOUTS = ("inputs", "outputs")


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


class PaperMapUEM(nn.Module):
  """The paper's UEM (module docstring): map (B, H, W, C) by `uncertainty_map`, its mean (B,)."""
  dim: int
  backbone: Any  # the contract view (`Backbone`), for `pixels_per_token` / `tokens_to_image`
  channels: int

  def setup(self):
    out = self.backbone.pixels_per_token * self.channels
    dense = lambda n: nn.Dense(n, kernel_init=_torch_uniform(self.dim),  # noqa: E731
                               bias_init=_torch_uniform(self.dim))
    self.linear = dense(out)           # W, b
    self.time_scale = dense(self.dim)  # γ(t): w_t = diag(1 + γ(t))·W
    self.time_bias = dense(out)        # β(t): b_t = b + β(t)

  def uncertainty_map(self, tokens: jax.Array, t_emb: jax.Array) -> jax.Array:
    gamma = self.time_scale(t_emb)[:, None, :]
    logits = self.linear(tokens * (1.0 + gamma)) + self.time_bias(t_emb)[:, None, :]
    return self.backbone.tokens_to_image(jax.nn.sigmoid(logits))

  def __call__(self, tokens: jax.Array, t_emb: jax.Array) -> jax.Array:
    return reduce_map(self.uncertainty_map(tokens, t_emb))


def reduce_map(u_map: jax.Array) -> jax.Array:
  """The exit score of an uncertainty map: the mean over its H·W·C elements, (B, ...) → (B,)."""
  return u_map.reshape(u_map.shape[0], -1).mean(axis=-1)


def check_layout(layout: str) -> int:
  """The first exit layer of `layout` (0 for 'inputs', 1 for 'outputs'); ValueError otherwise."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown DeeDiff exit layout {layout!r}; choose from {LAYOUTS}")
  return LAYOUTS.index(layout)


def backbone(model: Any) -> Backbone:
  """The model at 'block' granularity; ValueError unless its block inputs share one shape."""
  bb = as_backbone(model, "block")
  if not bb.uniform_tokens:
    raise ValueError(f"DeeDiff needs a backbone whose block inputs all have the same shape "
                     f"(uniform_tokens); {type(bb).__name__} has uniform_tokens=False")
  return bb


def num_exits(model: Any, layout: str = "inputs") -> int:
  """Stacked exits: L (blocks in execution order) for 'inputs', L − 1 for 'outputs'."""
  num = backbone(model).num_units
  off = check_layout(layout)
  if num - off < 1:
    raise ValueError(f"layout {layout!r} needs at least {off + 1} blocks, the model has {num}")
  return num - off


def width(model: Any) -> int:
  """D, the width of the token stream."""
  return backbone(model).width


def make_head(model: Any) -> nn.Module:
  """The exit head module (`bb.exit_head_module()`)."""
  return backbone(model).exit_head_module()


def make_uem(model: Any, kind: str) -> nn.Module:
  if kind == "token_mean":
    return TokenMeanUEM(width(model))
  if kind == "timestep_aware":
    return TimestepAwareUEM(width(model))
  if kind == "paper_map":
    bb = backbone(model)
    return PaperMapUEM(bb.width, bb, int(bb.input_shape[-1]))
  raise ValueError(f"unknown UEM {kind!r}; choose from {UEM_KINDS}")


def time_features(model: Any, t_net) -> jax.Array:
  """e(t): the D-dim sinusoid of the network time, (B, D)."""
  return layers.timestep_embedding(jnp.asarray(t_net, jnp.float32), width(model))


def example_inputs(model: Any):
  """Batch-1 input specs (x, t, y) of the backbone network (y None when it takes no labels)."""
  bb = backbone(model)
  x = jax.ShapeDtypeStruct((1,) + tuple(bb.input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  labelled = getattr(bb.module, "num_classes", 0) > 0
  return x, t, (jax.ShapeDtypeStruct((1,), jnp.int32) if labelled else None)


@functools.lru_cache(maxsize=64)
def _example_specs(model: Any):
  """ShapeDtypeStructs of (block-input tokens, exit context) for batch 1 (no compute)."""
  bb = backbone(model)

  def f(x, t, y):
    params = bb.module.init(jax.random.PRNGKey(0), x, t, y)["params"]
    state = bb.embed(params, x, t, y)
    return state["h"], bb.exit_context(state)
  return jax.eval_shape(f, *example_inputs(model))


def _example(model: Any):
  """Zeros (tokens (1, N, D), exit context, t_emb (1, D)) to initialise heads and UEMs."""
  tokens, ctx = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _example_specs(model))
  return tokens, ctx, jnp.zeros((1, width(model)), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _stacked_init(module: nn.Module, n: int, rng, tokens, ctx):
  """n independent inits of `module` stacked on a leading axis (one compiled program)."""
  return jax.vmap(lambda k: module.init(k, tokens, ctx)["params"])(jax.random.split(rng, n))


def init_deediff_params(model: Any, rng, uem: str = "token_mean",
                        backbone_params: Optional[Any] = None, layout: str = "inputs") -> dict:
  """Stacked head and UEM params for all exits: {'heads': ..., 'uems': ...}.

  Args:
    model: backbone implementing the contract (DiT, U-ViT, ...).
    rng: PRNG key.
    uem: 'token_mean', 'timestep_aware' or 'paper_map'.
    backbone_params: if given, every exit head starts as a copy of the backbone's own head
      (`bb.head_params_for_exit`: DiT `final_layer` adaLN + linear; U-ViT `norm`, `decoder_pred`
      and, with `conv`, the 3×3 `final_layer`), which is a warm start for fine-tuning; otherwise
      PyTorch-default init as in the public code (§2.3).
    layout: 'inputs' (public, exits 0..L−1) or 'outputs' (paper, exits 1..L−1; module docstring).

  Returns:
    A param pytree, leaves with a leading axis `num_exits(model, layout)`.
  """
  if uem not in UEM_KINDS:
    raise ValueError(f"unknown UEM {uem!r}; choose from {UEM_KINDS}")
  n = num_exits(model, layout)
  tokens, ctx, t_emb = _example(model)
  k_head, k_uem = jax.random.split(rng)
  heads = _stacked_init(make_head(model), n, k_head, tokens, ctx)
  uems = _stacked_init(make_uem(model, uem), n, k_uem, tokens, t_emb)
  if backbone_params is not None:
    heads = _heads_from_backbone(model, backbone_params, heads, n)
  return {"heads": heads, "uems": uems}


def _heads_from_backbone(model: Any, backbone_params: Any, heads: dict, n: int) -> dict:
  """Replaces the stacked head params by n copies of the backbone head's params."""
  src = backbone(model).head_params_for_exit(backbone_params)
  copied = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (n,) + jnp.shape(a)), src)
  out = dict(heads)
  out.update(copied)
  if jax.tree.structure(out) != jax.tree.structure(heads) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(heads))):
    raise ValueError("backbone head params do not match the exit head's structure")
  return out


@functools.lru_cache(maxsize=64)
def _expected_shapes(model: Any, uem: str):
  """Per-exit param shapes of (head, UEM) for `model` (cached; no compute)."""
  tokens, ctx, t_emb = _example(model)
  out = {}
  for part, module, second in (("heads", make_head(model), ctx),
                               ("uems", make_uem(model, uem), t_emb)):
    out[part] = jax.eval_shape(lambda m=module, s=second: m.init(jax.random.PRNGKey(0), tokens,
                                                                 s)["params"])
  return out


def check_deediff_params(model: Any, ee_params: Any, uem: str, layout: str = "inputs") -> None:
  """Raises ValueError unless `ee_params` are the stacked heads and UEMs of kind `uem` of
  `layout` for `model`.

  Only shapes are read, so this also works on traced params.
  """
  if uem not in UEM_KINDS:
    raise ValueError(f"unknown UEM {uem!r}; choose from {UEM_KINDS}")
  if not isinstance(ee_params, dict) or set(ee_params) != {"heads", "uems"}:
    raise ValueError("ee_params must be a dict {'heads': ..., 'uems': ...} "
                     "(see init_deediff_params)")
  n = num_exits(model, layout)
  expected = _expected_shapes(model, uem)
  for part in ("heads", "uems"):
    want, got = expected[part], ee_params[part]
    if jax.tree.structure(got) != jax.tree.structure(want):
      raise ValueError(f"ee_params[{part!r}] does not have the structure of a {uem!r} "
                       f"DeeDiff {part[:-1]} for this {type(model).__name__} model")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if tuple(jnp.shape(g)) != (n,) + tuple(w.shape):
        raise ValueError(f"ee_params[{part!r}] leaf has shape {tuple(jnp.shape(g))}, expected "
                         f"{(n,) + tuple(w.shape)} ({n} exits; uem={uem!r}, "
                         f"layout={layout!r})")


def validate_threshold(threshold) -> float:
  """θ as a float; ValueError unless it is a finite number in [0, 1] (concrete values only)."""
  try:
    value = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"DeeDiff threshold θ must be a number in [0, 1], got {threshold!r}") from None
  if not (math.isfinite(value) and 0.0 <= value <= 1.0):
    raise ValueError(f"DeeDiff threshold θ must be in [0, 1], got {threshold!r}")
  return value


def kernel_flops(module: nn.Module, *args) -> float:
  """Per-sample FLOPs of every Dense/Conv kernel `module` applies to batch-1 inputs `args`.

  Each kernel costs 2·prod(output.shape[:-1])·prod(kernel.shape) (a matmul or a convolution with
  one multiply-add per kernel entry and output position). Shapes only (`jax.eval_shape`).
  """
  counted = []

  def intercept(next_fun, f_args, f_kwargs, context):
    out = next_fun(*f_args, **f_kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
      kernel = context.module.get_variable("params", "kernel")
      counted.append(2.0 * math.prod(out.shape[:-1]) * math.prod(kernel.shape))
    return out

  def run():
    variables = module.init(jax.random.PRNGKey(0), *args)
    with nn.intercept_methods(intercept):
      return module.apply(variables, *args)

  jax.eval_shape(run)
  return float(sum(counted))


@functools.lru_cache(maxsize=64)
def exit_head_flops(model: Any) -> float:
  """FLOPs of one exit head per sample (`kernel_flops` of `bb.exit_head_module()`)."""
  tokens, ctx, _ = _example(model)
  return kernel_flops(make_head(model), tokens, ctx)


@functools.lru_cache(maxsize=64)
def uem_flops(model: Any, kind: str) -> float:
  """FLOPs of one UEM per sample: N·D products (token_mean), 2D (timestep_aware), or
  N·D·p²C + D² + D·p²C (paper_map: the per-token map and the two time generators)."""
  tokens, _, t_emb = _example(model)
  return kernel_flops(make_uem(model, kind), tokens, t_emb)


def predict_exits(model: Any, ee_params: Any, uem: str, threshold, nfe_times,
                  layout: str = "inputs"):
  """Exit index per NFE when the exits cannot depend on the tokens, else None.

  That is the case for timestep-aware UEMs whose weights on the pooled tokens are all zero
  (`scripted_uem_params`): u_k is then a function of t only and the whole batch exits at the
  same layer. Computed on the host in float64 (a θ hit within float32 rounding of a layer's u
  could flip at run time); None when the params or θ are traced.
  """
  if uem != "timestep_aware" or plan_lib.is_traced((ee_params, threshold)):
    return None
  kernel = np.asarray(ee_params["uems"]["linear"]["kernel"], np.float64)[..., 0]  # (L, 2D)
  bias = np.asarray(ee_params["uems"]["linear"]["bias"], np.float64)[..., 0]  # (L,)
  d = width(model)
  if np.any(kernel[:, :d] != 0):
    return None
  freqs = layers.timestep_frequencies(d // 2).astype(np.float32)
  times = np.asarray(nfe_times, np.float32)
  args = (times[:, None] * freqs[None]).astype(np.float64)
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  if d % 2:
    emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
  u = 1.0 / (1.0 + np.exp(-(emb @ kernel[:, d:].T + bias[None])))  # (NFE, L)
  hit = u <= float(threshold)
  off = check_layout(layout)
  return np.where(hit.any(axis=1), np.argmax(hit, axis=1) + off,
                  kernel.shape[0] + off).astype(np.int64)


def scripted_uem_params(model: Any, ee_params: Any, threshold: float, depth_at_noise: float,
                        depth_at_clean: Optional[float] = None, sharpness: float = 8.0,
                        schedule: Optional[str] = None, layout: str = "inputs") -> dict:
  """Timestep-aware UEM params whose exit layer is a chosen linear function of τ (benchmarks).

  With random backbones u carries no information, so a benchmark of the batched runner needs a
  controlled exit pattern. The UEM u_k = sigmoid(wᵀ[pool, e(t)] + b_k) gets w = 0 on the pooled
  tokens (u is then the same for the whole batch) and weight only on the lowest-frequency sine of
  e(t), sin(f·t) ≈ f·t (f·t ≤ 0.18 for D ≥ 32, so the error is < 0.6 %), which makes the logit
  linear in τ: u_k ≤ θ ⟺ k ≥ K(τ) − 1/2 with K(τ) = depth_at_clean + (depth_at_noise −
  depth_at_clean)·τ, i.e. the batch exits at round(K(τ)) (k ≥ L: the full network).

  Args:
    model: backbone.
    ee_params: params from `init_deediff_params(..., uem='timestep_aware')` (heads are kept).
    threshold: the θ the plan will use, in (0, 1).
    depth_at_noise: exit layer K at τ = 1.
    depth_at_clean: exit layer K at τ = 0 (default L, i.e. no exit near the data).
    sharpness: logit slope per layer.
    schedule: time convention mapping network time to τ (default the model's).
    layout: the exit layout of `ee_params`.

  Returns:
    ee_params with the UEM weights replaced.
  """
  theta = validate_threshold(threshold)
  if not 0.0 < theta < 1.0:
    raise ValueError(f"scripted UEMs need 0 < θ < 1, got {threshold}")
  check_deediff_params(model, ee_params, "timestep_aware", layout)
  num = backbone(model).num_units
  layers_k = np.arange(check_layout(layout), num)  # the exit layer k of each stacked entry
  d = width(model)
  k_clean = float(num if depth_at_clean is None else depth_at_clean)
  per_unit = float(plan_lib.model_time_to_unit(1.0, plan_lib.time_schedule(model, schedule)))
  freqs = layers.timestep_frequencies(d // 2)
  idx = int(np.argmin(freqs))
  f = float(freqs[idx])
  logit_theta = math.log(theta / (1.0 - theta))
  kernel = np.zeros((len(layers_k), 2 * d, 1), np.float32)
  kernel[:, d + d // 2 + idx, 0] = sharpness * (depth_at_noise - k_clean) * per_unit / f
  bias = (sharpness * (k_clean - layers_k - 0.5) + logit_theta).astype(np.float32)
  uems = {"linear": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)[:, None]}}
  return dict(ee_params, uems=uems)
