"""DeeDiff / AdaDiff early exits with per-layer heads and uncertainty modules, three runners.

Reproduces the inference rule of `razvanmatisan/duodiff` `eesampler.py:get_samples`
(`research/ee_methods.md` §2.1, §2.6–2.8) for DiT and U-ViT: one head g_k and one UEM u_k sit at
the INPUT of every block k, k = 0..L−1 in execution order (U-ViT: in-blocks, mid, out-blocks);
exit k = number of blocks executed, and k = L is the backbone's own head. A sample exits at the
first k with u_k ≤ θ (θ ∈ [0, 1]); there is no minimum exit layer. U-ViT exits discard the pending
encoder skips: no `skip_linear` runs for an out-block that is not executed (§2.8). Heads and UEMs
(the paper's timestep-aware u = sigmoid(wᵀ[L_i, e(t)] + b) and the public per-token
linear + sigmoid averaged over tokens) are in `deediff_heads.py`.

Runners (`research/jax_style.md` §4.3):

* `mode='exact'`: the original's "simulated" exit (§2.7) — every block, head and UEM runs, then
  each sample selects its own exit. The quality reference; nothing is skipped.
* `mode='batched'`: one `lax.while_loop` per block segment (DiT: one; U-ViT: in, mid, out) over
  dynamically indexed stacked params. After each block the UEM of the next exit is evaluated; the
  loop stops (a scalar, batch-level predicate) once a fraction ≥ `min_fraction` of the batch has
  exited, so the remaining blocks are never run. A sample keeps the output of its own first exit;
  with `min_fraction < 1`, the samples still running when the loop stops exit there (forced exit
  at the current layer). An exit head runs (on the whole batch, under a scalar `lax.cond`) only
  at layers where some sample exits; the backbone head only if some sample reaches k = L. With
  `min_fraction=1` the output equals `exact` (≤ 1e-6).
* `mesh=...`: the chosen runner under `jax.shard_map` over the batch axis (`plan.shard_net`), so
  every device stops at its own layer; stats are averaged over devices.

The plan carries its own head/UEM params (`DeeDiffPlan.ee_params`), so
`jaxee.sample(model, backbone_params, rng, plan=DeeDiffPlan(ee_params, ...))` works with every
sampler and with CFG (the exit is then decided per row of the doubled batch [cond; uncond]).

Stats per network call: `blocks` (blocks run per sample), `exit` (mean exit index), `heads`
(exit-head evaluations), `flops` (per sample: embedding, blocks, UEMs, heads; `eval/flops.py`).

`benchmark_plan` builds a plan with scripted timestep-aware UEMs (exits that depend only on t, the
same for the whole batch) for timing the batched runner with random or converted backbones.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.eval import flops as flops_lib
from jaxee.exits import deediff_heads as heads_lib
from jaxee.exits import ops
from jaxee.exits import plan as plan_lib
from jaxee.models import layers

MODES = ("exact", "batched")
init_deediff_params = heads_lib.init_deediff_params


def validate_threshold(threshold) -> float:
  """θ as a float; ValueError unless it is a finite number in [0, 1]."""
  try:
    value = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"DeeDiff threshold θ must be a number in [0, 1], got {threshold!r}") from None
  if not (math.isfinite(value) and 0.0 <= value <= 1.0):
    raise ValueError(f"DeeDiff threshold θ must be in [0, 1], got {threshold!r}")
  return value


def exit_head_flops(model: Any) -> float:
  """FLOPs of one exit head per sample (`DiTExitHead` / `UViTExitHead`)."""
  d, n = heads_lib.width(model), flops_lib.num_tokens(model)
  if model.family == "dit":
    return 2.0 * d * 2 * d + 2.0 * n * d * model.patch_size ** 2 * model.out_channels
  c = model.in_chans
  return (2.0 * model.num_patches * d * model.patch_size ** 2 * c
          + 2.0 * model.img_size ** 2 * 9 * c * c)


def uem_flops(model: Any, kind: str) -> float:
  """FLOPs of one UEM per sample: N·D products (token_mean) or 2D (timestep_aware)."""
  d = heads_lib.width(model)
  return 2.0 * flops_lib.num_tokens(model) * d if kind == "token_mean" else 4.0 * d


def blocks_flops_upto(model: Any, k: int) -> float:
  """FLOPs of the first k blocks in execution order (U-ViT out-blocks include `skip_linear`)."""
  if model.family == "dit":
    return k * flops_lib.block_flops(model)
  plain = min(k, model.num_in_blocks + 1)
  return (plain * flops_lib.block_flops(model)
          + (k - plain) * flops_lib.block_flops(model, "out_block"))


def exit_flops(model: Any, k: int, uem: str) -> float:
  """Per-sample FLOPs of a batch that all exits at k in the batched runner."""
  num = heads_lib.num_exits(model)
  tests = min(k + 1, num)
  out_head = exit_head_flops(model) if k < num else flops_lib.head_flops(model)
  return (flops_lib.embed_flops(model) + blocks_flops_upto(model, k) + tests * uem_flops(model, uem)
          + out_head)


def forward_all_exits(model: Any, params: Any, ee_params: Any, x, t, y,
                      uem: str = "token_mean"):
  """Every block, every exit head and every UEM (training and the `exact` runner).

  Args:
    model: backbone.
    params: backbone params.
    ee_params: `init_deediff_params(...)` pytree.
    x, t, y: network inputs ((B, H, W, C), (B,), labels or None).
    uem: the UEM kind of `ee_params`.

  Returns:
    (final output (B, H, W, C_out), exit head outputs (L, B, H, W, C_out), u (L, B)).
  """
  states, final, ctx = ops.hidden_states(model, params, x, t, y)
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, uem)
  t_emb = heads_lib.time_features(model, t)
  outs = jax.vmap(lambda p, s: head.apply({"params": p}, s, ctx))(ee_params["heads"], states)
  u = jax.vmap(lambda p, s: probe.apply({"params": p}, s, t_emb))(ee_params["uems"], states)
  return ops.head(model, params, final, ctx), outs, u


def first_exit(u, threshold: float):
  """Per-sample first k with u_k ≤ θ, or L when there is none; `u` is (L, B)."""
  hit = u <= threshold
  return jnp.where(hit.any(axis=0), jnp.argmax(hit, axis=0), u.shape[0]).astype(jnp.int32)


def select_exit(final, outs, k):
  """Per-sample output of exit k[b] from the L head outputs and the backbone output."""
  cands = jnp.concatenate([outs, final[None]], axis=0)
  idx = k.reshape((1, -1) + (1,) * (final.ndim - 1))
  return jnp.take_along_axis(cands, idx, axis=0)[0]


def predict_exits(model: Any, ee_params: Any, uem: str, threshold: float, nfe_times):
  """Exit index per NFE when the exits cannot depend on the tokens, else None.

  That is the case for timestep-aware UEMs whose weights on the pooled tokens are all zero
  (`scripted_uem_params`): u_k is then a function of t only and the whole batch exits at the
  same layer. Computed on the host in float64 (a θ hit within float32 rounding of a layer's u
  could flip at run time).
  """
  if uem != "timestep_aware":
    return None
  try:
    kernel = np.asarray(ee_params["uems"]["linear"]["kernel"], np.float64)[..., 0]  # (L, 2D)
    bias = np.asarray(ee_params["uems"]["linear"]["bias"], np.float64)[..., 0]  # (L,)
  except jax.errors.TracerArrayConversionError:  # params traced: nothing to predict on the host
    return None
  d = heads_lib.width(model)
  if np.any(kernel[:, :d] != 0):
    return None
  half = d // 2
  freqs = layers.timestep_frequencies(half).astype(np.float32)
  times = np.asarray(nfe_times, np.float32)
  args = (times[:, None] * freqs[None]).astype(np.float64)
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  if d % 2:
    emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
  logits = emb @ kernel[:, d:].T + bias[None]  # (NFE, L)
  u = 1.0 / (1.0 + np.exp(-logits))
  hit = u <= threshold
  return np.where(hit.any(axis=1), np.argmax(hit, axis=1), kernel.shape[0]).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class DeeDiffPlan:
  """Early exit on per-layer uncertainty (compared and hashed by identity: it holds arrays).

  Attributes:
    ee_params: heads and UEMs (`init_deediff_params`), leaves stacked over the L exits.
    threshold: θ ∈ [0, 1]; a sample exits at the first layer with u ≤ θ.
    mode: 'exact' (all layers run, per-sample selection) or 'batched' (while-loop exit).
    min_fraction: batched mode stops once this fraction of the (per-device) batch has exited.
    uem: UEM kind of `ee_params`: 'token_mean' (public code) or 'timestep_aware' (paper).
    mesh: optional mesh; the runner then runs per device under `jax.shard_map`.
    axis_name: the mesh axis the batch is split over.
  """
  ee_params: Any
  threshold: float = 0.08
  mode: str = "batched"
  min_fraction: float = 1.0
  uem: str = "token_mean"
  mesh: Optional[jax.sharding.Mesh] = None
  axis_name: str = "data"

  def __post_init__(self):
    validate_threshold(self.threshold)
    if self.mode not in MODES:
      raise ValueError(f"unknown DeeDiff mode {self.mode!r}; choose from {MODES}")
    if not 0.0 < float(self.min_fraction) <= 1.0:
      raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
    if self.uem not in heads_lib.UEM_KINDS:
      raise ValueError(f"unknown UEM {self.uem!r}; choose from {heads_lib.UEM_KINDS}")
    if self.mesh is not None and self.axis_name not in self.mesh.axis_names:
      raise ValueError(f"mesh has no axis {self.axis_name!r} (axes {self.mesh.axis_names})")

  @property
  def name(self) -> str:
    return f"deediff:{self.mode}:{self.uem}:theta={self.threshold}"

  def bind(self, model: Any, params: Any, nfe_times) -> plan_lib.BoundPlan:
    """Binds the runner.

    `info` has `exits_predicted`; when True (t-only UEMs) `exits_per_nfe`, `blocks_per_nfe`,
    `flops_per_nfe` and `ideal_saving` are exact for the batched runner; otherwise the tables are
    upper bounds (all layers) and `ideal_saving` is NaN — take it from the run's stats with
    `ideal_saving_from_stats`.
    """
    times = plan_lib.check_nfe_times(nfe_times)
    heads_lib.check_deediff_params(model, self.ee_params, self.uem)
    theta = validate_threshold(self.threshold)
    num = heads_lib.num_exits(model)
    per_exit = exit_head_flops(model) + uem_flops(model, self.uem)
    full = flops_lib.backbone_flops(model)
    exits = predict_exits(model, self.ee_params, self.uem, theta, times)
    if self.mode == "exact":
      net = _exact_net(self, model, params, full + num * per_exit)
      blocks = np.full(len(times), num, np.float64)
      flops = np.full(len(times), full + num * per_exit)
    else:
      net = _batched_net(self, model, params)
      if exits is None:
        blocks = np.full(len(times), num, np.float64)
        flops = np.full(len(times), exit_flops(model, num, self.uem))
      else:
        blocks = exits.astype(np.float64)
        flops = np.array([exit_flops(model, int(k), self.uem) for k in exits])
    if self.mesh is not None:
      net = plan_lib.shard_net(net, self.mesh, self.axis_name)
    info = plan_lib.make_info(model, blocks, flops, plan=self.name, dynamic=True,
                              exits_predicted=exits is not None)
    if exits is not None:
      info["exits_per_nfe"] = exits
    elif self.mode == "batched":
      info["ideal_saving"] = float("nan")
    return plan_lib.BoundPlan(net, plan_lib.no_cache, info)


def ideal_saving_from_stats(model: Any, stats: dict) -> float:
  """1 − mean executed FLOPs / full backbone FLOPs, from a run's per-NFE `stats['flops']`."""
  return float(1.0 - np.mean(np.asarray(stats["flops"], np.float64))
               / flops_lib.backbone_flops(model))


def _exact_net(plan: DeeDiffPlan, model: Any, params: Any, flops: float):
  num = heads_lib.num_exits(model)
  theta = validate_threshold(plan.threshold)

  def net(x, t_net, y, nfe_index, cache):
    del nfe_index
    final, outs, u = forward_all_exits(model, params, plan.ee_params, x, t_net, y, plan.uem)
    k = first_exit(u, theta)
    stats = {"blocks": jnp.float32(num), "exit": k.astype(jnp.float32).mean(),
             "heads": jnp.float32(num), "flops": jnp.float32(flops)}
    return select_exit(final, outs, k), cache, stats

  return net


def _batched_net(plan: DeeDiffPlan, model: Any, params: Any):
  """The while-loop runner (see the module docstring)."""
  blk = ops.Blocks(model)
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, plan.uem)
  hp, up = plan.ee_params["heads"], plan.ee_params["uems"]
  num = heads_lib.num_exits(model)
  f_head, f_uem = exit_head_flops(model), uem_flops(model, plan.uem)
  f_final = flops_lib.head_flops(model)
  theta, min_frac = validate_threshold(plan.threshold), float(plan.min_fraction)
  if model.family == "dit":
    segments = [("dit", params["blocks"], flops_lib.block_flops(model))]
    n_in = 0
  else:
    segments = [("in", params["in_blocks"], flops_lib.block_flops(model)),
                ("mid", ops.stack_one(params["mid_block"]), flops_lib.block_flops(model)),
                ("out", params["out_blocks"], flops_lib.block_flops(model, "out_block"))]
    n_in = model.num_in_blocks

  def run_block(kind, stack, j, h, skips, ctx):
    p = ops.take(stack, j)
    if kind == "dit":
      return blk.dit(p, h, ctx), skips
    if kind == "in":
      h = blk.uvit_in(p, h)
      return h, jax.lax.dynamic_update_index_in_dim(skips, h, j, 0)
    if kind == "mid":
      return blk.uvit_in(p, h), skips
    skip = jax.lax.dynamic_index_in_dim(skips, n_in - 1 - j, 0, keepdims=False)
    return blk.uvit_out(p, h, skip), skips

  def exit_test(k, h, ctx, t_emb, dec):
    """UEM k on h; newly exited samples (and, when stopping, the rest) take head k."""
    out, exited, exit_k, flops, heads = dec
    u = probe.apply({"params": ops.take(up, k)}, h, t_emb)
    new = (u <= theta) & ~exited
    exited = exited | new
    done = jnp.mean(exited.astype(jnp.float32)) >= min_frac
    take = new | (done & ~exited)
    any_take = jnp.any(take)
    mask = take.reshape((-1,) + (1,) * (out.ndim - 1))
    out = jax.lax.cond(any_take,
                       lambda o: jnp.where(mask, head.apply({"params": ops.take(hp, k)}, h, ctx),
                                           o),
                       lambda o: o, out)
    used = any_take.astype(jnp.float32)
    dec = (out, exited | take, jnp.where(take, k, exit_k), flops + f_uem + f_head * used,
           heads + used)
    return dec, done

  def net(x, t_net, y, nfe_index, cache):
    del nfe_index
    tokens, ctx = ops.embed(model, params, x, t_net, y)
    t_emb = heads_lib.time_features(model, t_net) if plan.uem == "timestep_aware" else None
    bsz = x.shape[0]
    out_shape = jax.eval_shape(lambda: head.apply({"params": ops.take(hp, 0)}, tokens, ctx))
    skips = (jnp.zeros((n_in,) + tokens.shape, tokens.dtype) if n_in
             else jnp.zeros((), tokens.dtype))
    dec = (jnp.zeros(out_shape.shape, out_shape.dtype), jnp.zeros((bsz,), bool),
           jnp.full((bsz,), num, jnp.int32), jnp.float32(flops_lib.embed_flops(model)),
           jnp.float32(0))
    dec, done = exit_test(jnp.int32(0), tokens, ctx, t_emb, dec)
    state = (jnp.int32(0), tokens, skips, dec, done)

    for kind, stack, f_block in segments:
      seg_len = ops.stack_len(stack)

      def cond_fn(s, seg_len=seg_len):
        j, (_, _, _, _, done) = s[0], s[1]
        return jnp.logical_and(~done, j < seg_len)

      def body_fn(s, kind=kind, stack=stack, f_block=f_block):
        j, (k, h, skips, dec, done) = s
        h, skips = run_block(kind, stack, j, h, skips, ctx)
        k = k + 1
        out, exited, exit_k, flops, heads = dec
        dec = (out, exited, exit_k, flops + f_block, heads)
        dec, done = jax.lax.cond(k < num, lambda d: exit_test(k, h, ctx, t_emb, d),
                                 lambda d: (d, done), dec)
        return j + 1, (k, h, skips, dec, done)

      state = jax.lax.while_loop(cond_fn, body_fn, (jnp.int32(0), state))[1]

    k, h, _, (out, exited, exit_k, flops, heads), _ = state
    # Samples that never exited ran all L blocks and take the backbone's own head.
    need_final = ~jnp.all(exited)
    mask = exited.reshape((-1,) + (1,) * (out.ndim - 1))
    out = jax.lax.cond(need_final,
                       lambda o: jnp.where(mask, o, ops.head(model, params, h, ctx)),
                       lambda o: o, out)
    flops = flops + f_final * need_final.astype(jnp.float32)
    stats = {"blocks": k.astype(jnp.float32), "exit": exit_k.astype(jnp.float32).mean(),
             "heads": heads, "flops": flops}
    return out, cache, stats

  return net


def scripted_uem_params(model: Any, ee_params: Any, threshold: float, depth_at_noise: float,
                        depth_at_clean: Optional[float] = None, sharpness: float = 8.0,
                        schedule: Optional[str] = None) -> dict:
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

  Returns:
    ee_params with the UEM weights replaced.
  """
  theta = validate_threshold(threshold)
  if not 0.0 < theta < 1.0:
    raise ValueError(f"scripted UEMs need 0 < θ < 1, got {threshold}")
  heads_lib.check_deediff_params(model, ee_params, "timestep_aware")
  num = heads_lib.num_exits(model)
  d = heads_lib.width(model)
  k_clean = float(num if depth_at_clean is None else depth_at_clean)
  per_unit = float(plan_lib.model_time_to_unit(1.0, plan_lib.time_schedule(model, schedule)))
  freqs = layers.timestep_frequencies(d // 2)
  idx = int(np.argmin(freqs))
  f = float(freqs[idx])
  logit_theta = math.log(theta / (1.0 - theta))
  kernel = np.zeros((num, 2 * d, 1), np.float32)
  kernel[:, d + d // 2 + idx, 0] = sharpness * (depth_at_noise - k_clean) * per_unit / f
  bias = (sharpness * (k_clean - np.arange(num) - 0.5) + logit_theta).astype(np.float32)
  uems = {"linear": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)[:, None]}}
  return dict(ee_params, uems=uems)


def benchmark_plan(model: Any, params: Any, rng, *, exit_layer_at_noise: Optional[float] = None,
                   exit_layer_at_clean: Optional[float] = None, threshold: float = 0.5,
                   mode: str = "batched", min_fraction: float = 1.0, sharpness: float = 8.0,
                   heads_from_backbone: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
                   axis_name: str = "data") -> tuple[DeeDiffPlan, dict]:
  """A DeeDiff plan with scripted exits for timing: the batch exits at round(K(τ)).

  K(τ) = exit_layer_at_clean + (exit_layer_at_noise − exit_layer_at_clean)·τ (τ → 1 is noise),
  the same for every sample, so the batched while-loop really stops at that layer (see
  `scripted_uem_params`); `plan.bind(...).info` then holds the exact `exits_per_nfe` and
  `ideal_saving`. The exit heads are copies of the backbone head (or random with
  `heads_from_backbone=False`).

  Args:
    model: backbone (DiT or U-ViT).
    params: backbone params (read only for the head copies).
    rng: PRNG key for the head/UEM init.
    exit_layer_at_noise: exit layer at τ = 1 (default round(L / 3)).
    exit_layer_at_clean: exit layer at τ = 0 (default L: the full network near the data).
    threshold: θ of the plan (any value in (0, 1); the UEMs are scripted around it).
    mode: 'batched' (default) or 'exact'.
    min_fraction: batched-mode stop fraction.
    sharpness: UEM logit slope per layer.
    heads_from_backbone: initialise the exit heads from the backbone head.
    mesh, axis_name: run per device under `shard_map`.

  Returns:
    (plan, meta) with meta = {'exit_layer_at_noise', 'exit_layer_at_clean', 'threshold',
    'num_exits', 'uem'}.
  """
  num = heads_lib.num_exits(model)
  noise = float(round(num / 3) if exit_layer_at_noise is None else exit_layer_at_noise)
  clean = float(num if exit_layer_at_clean is None else exit_layer_at_clean)
  for name, value in (("exit_layer_at_noise", noise), ("exit_layer_at_clean", clean)):
    if not 0.0 <= value <= num:
      raise ValueError(f"{name} must be in [0, {num}] for this model, got {value}")
  ee = init_deediff_params(model, rng, "timestep_aware",
                           backbone_params=params if heads_from_backbone else None)
  ee = scripted_uem_params(model, ee, threshold, noise, clean, sharpness)
  plan = DeeDiffPlan(ee, threshold=threshold, mode=mode, min_fraction=min_fraction,
                     uem="timestep_aware", mesh=mesh, axis_name=axis_name)
  meta = {"exit_layer_at_noise": noise, "exit_layer_at_clean": clean, "threshold": threshold,
          "num_exits": num, "uem": "timestep_aware"}
  return plan, meta
