"""DeeDiff / AdaDiff early exits with per-layer heads and uncertainty modules, three runners.

Reproduces the inference rule of `razvanmatisan/duodiff` `eesampler.py:get_samples`
(`research/ee_methods.md` §2.1, §2.6–2.8), written once against the backbone contract
(`jaxee/models/backbone.py`) at `'block'` granularity. Exit k = number of blocks executed
(L = `bb.num_units` in execution order; U-ViT: in-blocks, mid, out-blocks), and k = L is the
backbone's own head (`bb.head`). Two exit layouts (`deediff_heads.LAYOUTS`): 'inputs' (the public
code: one head g_k and one UEM u_k at the INPUT of every unit k, k = 0..L−1, so exit 0 runs no
block) and 'outputs' (the DeeDiff paper: exits k = 1..L−1 at the output of block k, then the
backbone head; no exit runs zero blocks). A sample exits at the first available k with u_k ≤ θ
(θ ∈ [0, 1]). An exit reads only the token stream `state['h']` (and `bb.exit_context(state)`), so a
U-ViT exit discards the pending encoder skips: no `skip_linear` runs for an out-block that is not
executed (§2.8). Heads and UEMs (the public per-token linear + sigmoid averaged over tokens, a
pooled timestep-aware u = sigmoid(wᵀ[pool(L_i), e(t)] + b), and the paper's per-element map with
generated w_t, b_t, reduced to its mean for the decision) are in `deediff_heads.py`.

Runners (`research/jax_style.md` §4.3):

* `mode='exact'`: the original's "simulated" exit (§2.7) — every block, head and UEM runs, then
  each sample selects its own exit. The quality reference; nothing is skipped.
* `mode='batched'`: one `lax.while_loop` per `bb.segments` segment over its groups, running
  `bb.run_unit(params, UnitRef(seg, g), state)` with a traced g. After each block the UEM of the
  next exit is evaluated; the loop stops (a scalar, batch-level predicate) once a fraction
  ≥ `min_fraction` of the batch has exited, so the remaining blocks are never run. A sample keeps
  the output of its own first exit; with `min_fraction < 1`, the samples still running when the
  loop stops exit there (forced exit at the current layer). An exit head runs (on the whole
  batch, under a scalar `lax.cond`) only at layers where some sample exits; the backbone head
  only if some sample reaches k = L. With `min_fraction=1` the output equals `exact` (≤ 1e-6).
* `mesh=...`: the chosen runner under `jax.shard_map` over the batch axis (`plan.shard_net`), so
  every device stops at its own layer; stats are averaged over devices.

`DeeDiffPlan` is a pytree (`plan.pytree_plan`): the head/UEM params, θ and `min_fraction` are
leaves, traced inside `jaxee.sample`, so a θ sweep compiles once; `check` validates on the host.
`jaxee.sample(model, backbone_params, rng, plan=DeeDiffPlan(ee_params, ...))` works with every
sampler and with CFG (the exit is then decided per row of the doubled batch [cond; uncond]).

Stats per network call: `blocks` (blocks run per sample), `exit` (mean exit index), `heads`
(exit-head evaluations), `flops` (per sample: embedding, blocks, UEMs, heads). Backbone FLOPs are
the contract's `embed_flops`, `unit_flops`, `head_flops`; an exit head's or UEM's FLOPs are counted
generically (`kernel_flops`): 2·(positions)·(kernel size) for every Dense/Conv kernel the module
applies to a batch-1 input (positions = the output's non-feature, non-batch extent: tokens,
pixels, or 1 for a pooled/conditioning vector); normalisations and activations are not counted,
as in `eval/flops.py`.

`benchmark_plan` builds a plan with scripted timestep-aware UEMs (exits that depend only on t, the
same for the whole batch) for timing the batched runner with random or converted backbones.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.exits import deediff_heads as heads_lib
from jaxee.exits import plan as plan_lib
from jaxee.models import backbone as bb_lib
from jaxee.models.backbone import UnitRef, take

MODES = ("exact", "batched")
# Head/UEM helpers live in `deediff_heads.py`; re-exported here, their historical home.
init_deediff_params = heads_lib.init_deediff_params
validate_threshold = heads_lib.validate_threshold
kernel_flops = heads_lib.kernel_flops
exit_head_flops = heads_lib.exit_head_flops
uem_flops = heads_lib.uem_flops
predict_exits = heads_lib.predict_exits
scripted_uem_params = heads_lib.scripted_uem_params


def _validate_min_fraction(value) -> float:
  try:
    frac = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"min_fraction must be a number in (0, 1], got {value!r}") from None
  if not 0.0 < frac <= 1.0:
    raise ValueError(f"min_fraction must be in (0, 1], got {value}")
  return frac


def blocks_flops_upto(model: Any, k: int) -> float:
  """FLOPs of the first k blocks in execution order (`bb.unit_flops`; U-ViT out-blocks include
  `skip_linear`)."""
  return float(np.sum(heads_lib.backbone(model).unit_flops[:k]))


def exit_flops(model: Any, k: int, uem: str, layout: str = "inputs") -> float:
  """Per-sample FLOPs of a batch that all exits at k in the batched runner."""
  bb = heads_lib.backbone(model)
  num = bb.num_units
  off = heads_lib.check_layout(layout)
  tests = min(k + 1, num) - off  # UEMs at the exits off..min(k, L−1)
  out_head = exit_head_flops(model) if k < num else bb.head_flops
  return float(bb.embed_flops + blocks_flops_upto(model, k) + tests * uem_flops(model, uem)
               + out_head)


def hidden_states(model: Any, params: Any, x, t, y):
  """Runs every block; returns (final state, block-input tokens (L, B, N, D), exit contexts).

  Entry k of the tokens (and of the exit contexts, stacked on a leading L axis; None when the
  backbone has none) is taken at the input of unit k, i.e. after k blocks. One `lax.scan` per
  segment, so training differentiates through it.
  """
  bb = heads_lib.backbone(model)
  state = bb.embed(params, x, t, y)
  hs, ctxs = [], []
  for seg in bb.segments:
    if seg.groups == 0:
      continue

    def body(st, g, seg=seg):
      outs = []
      for s in range(len(seg.pattern)):
        outs.append((st["h"], bb.exit_context(st)))
        st = bb.run_unit(params, UnitRef(seg, g, s), st)
      return st, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    state, (h, ctx) = jax.lax.scan(body, state, jnp.arange(seg.groups, dtype=jnp.int32))
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  (groups, subs) -> units
    hs.append(flat(h))
    ctxs.append(jax.tree.map(flat, ctx))
  cat = lambda *a: jnp.concatenate(a, axis=0)  # noqa: E731
  return state, cat(*hs), jax.tree.map(cat, *ctxs)


def forward_all_exits(model: Any, params: Any, ee_params: Any, x, t, y,
                      uem: str = "token_mean", layout: str = "inputs", uem_maps: bool = False):
  """Every block, every exit head and every UEM (training and the `exact` runner).

  Args:
    model: backbone (any implementation of the contract).
    params: backbone params.
    ee_params: `init_deediff_params(...)` pytree.
    x, t, y: network inputs ((B, H, W, C), (B,), labels or None).
    uem: the UEM kind of `ee_params`.
    layout: the exit layout of `ee_params` ('inputs': E = L exits, 'outputs': E = L − 1).
    uem_maps: return a map UEM's per-element map (E, B, H, W, C) instead of its exit score.

  Returns:
    (final output (B, H, W, C_out), exit head outputs (E, B, H, W, C_out), u (E, B) or maps).
  """
  bb = heads_lib.backbone(model)
  off = heads_lib.check_layout(layout)
  final, states, ctxs = hidden_states(model, params, x, t, y)
  if off:  # stacked entry j reads the input of block j + off
    states, ctxs = states[off:], jax.tree.map(lambda a: a[off:], ctxs)
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, uem)
  t_emb = heads_lib.time_features(model, t)
  outs = jax.vmap(lambda p, s, c: head.apply({"params": p}, s, c))(ee_params["heads"], states,
                                                                   ctxs)
  method = "uncertainty_map" if uem_maps and uem in heads_lib.MAP_UEMS else None
  u = jax.vmap(lambda p, s: probe.apply({"params": p}, s, t_emb, method=method))(
      ee_params["uems"], states)
  return bb.head(params, final), outs, u


def first_exit(u, threshold):
  """Per-sample first k with u_k ≤ θ, or L when there is none; `u` is (L, B), θ may be traced."""
  hit = u <= threshold
  return jnp.where(hit.any(axis=0), jnp.argmax(hit, axis=0), u.shape[0]).astype(jnp.int32)


def select_exit(final, outs, k):
  """Per-sample output of exit k[b] from the L head outputs and the backbone output."""
  cands = jnp.concatenate([outs, final[None]], axis=0)
  idx = k.reshape((1, -1) + (1,) * (final.ndim - 1))
  return jnp.take_along_axis(cands, idx, axis=0)[0]


@plan_lib.pytree_plan(data=("ee_params", "threshold", "min_fraction"),
                      static=("mode", "uem", "mesh", "axis_name", "layout"))
class DeeDiffPlan:
  """Early exit on per-layer uncertainty; a pytree (θ, `min_fraction`, params are leaves).

  Attributes:
    ee_params: heads and UEMs (`init_deediff_params`), leaves stacked over the L exits.
    threshold: θ ∈ [0, 1]; a sample exits at the first layer with u ≤ θ.
    mode: 'exact' (all layers run, per-sample selection) or 'batched' (while-loop exit).
    min_fraction: batched mode stops once this fraction of the (per-device) batch has exited.
    uem: UEM kind of `ee_params`: 'token_mean' (public code), 'timestep_aware' (pooled) or
      'paper_map' (the paper's per-element map; its mean is compared with θ).
    mesh: optional mesh (static); the runner then runs per device under `jax.shard_map`.
    axis_name: the mesh axis the batch is split over.
    layout: exit layout of `ee_params`: 'inputs' (public, exits 0..L−1) or 'outputs' (paper,
      exits 1..L−1); see the module docstring.
  """
  ee_params: Any
  threshold: Any = 0.08
  mode: str = "batched"
  min_fraction: Any = 1.0
  uem: str = "token_mean"
  mesh: Optional[jax.sharding.Mesh] = None
  axis_name: str = "data"
  layout: str = "inputs"

  def __post_init__(self):
    # Concrete θ / min_fraction are validated and stored as Python floats (one weak-f32 leaf
    # type, so plans built from Python or NumPy numbers share a compiled sampler); traced
    # values (a plan built inside a trace) are left alone.
    if not plan_lib.is_traced(self.threshold):
      object.__setattr__(self, "threshold", validate_threshold(self.threshold))
    if not plan_lib.is_traced(self.min_fraction):
      object.__setattr__(self, "min_fraction", _validate_min_fraction(self.min_fraction))
    if self.mode not in MODES:
      raise ValueError(f"unknown DeeDiff mode {self.mode!r}; choose from {MODES}")
    if self.uem not in heads_lib.UEM_KINDS:
      raise ValueError(f"unknown UEM {self.uem!r}; choose from {heads_lib.UEM_KINDS}")
    heads_lib.check_layout(self.layout)
    if self.mesh is not None and self.axis_name not in self.mesh.axis_names:
      raise ValueError(f"mesh has no axis {self.axis_name!r} (axes {self.mesh.axis_names})")

  @property
  def name(self) -> str:
    theta = "traced" if plan_lib.is_traced(self.threshold) else self.threshold
    name = f"deediff:{self.mode}:{self.uem}:theta={theta}"
    return name if self.layout == "inputs" else f"{name}:exits=1..L"

  def check(self, model: Any, nfe_times) -> None:
    """Host validation before tracing: the NFE grid, the head/UEM params, θ, min_fraction."""
    plan_lib.check_nfe_times(nfe_times)
    heads_lib.check_deediff_params(model, self.ee_params, self.uem, self.layout)
    if not plan_lib.is_traced(self.threshold):
      validate_threshold(self.threshold)
    if not plan_lib.is_traced(self.min_fraction):
      _validate_min_fraction(self.min_fraction)

  def bind(self, model: Any, params: Any, nfe_times, unit_mask=None) -> plan_lib.BoundPlan:
    """Binds the runner (θ, min_fraction and the head/UEM params may be traced).

    `unit_mask` ((NFE × blocks) bool, from a block-output `MaskPlan`; used by
    `exits.compose(deediff_plan, mask_plan)`) makes the batched runner reuse a block's cached
    output where the mask is 0; blocks after the batch's exit keep their stale cache entries.

    `info` (None when the plan is traced) has `exits_predicted`; when True (t-only UEMs)
    `exits_per_nfe`, `blocks_per_nfe`, `flops_per_nfe` and `ideal_saving` are exact for the
    batched runner; otherwise the tables are upper bounds (all layers) and `ideal_saving` is NaN
    — take it from the run's stats with `ideal_saving_from_stats`.
    """
    times = plan_lib.check_nfe_times(nfe_times)
    heads_lib.check_deediff_params(model, self.ee_params, self.uem, self.layout)  # shapes only
    num = heads_lib.num_exits(model, self.layout)
    full = heads_lib.backbone(model).full_flops
    exact_flops = full + num * (exit_head_flops(model) + uem_flops(model, self.uem))
    if unit_mask is not None:
      if self.mode != "batched" or self.mesh is not None:
        raise ValueError("DeeDiff with a cache runs the batched runner on one device")
      net = _batched_net(self, model, params, unit_mask)
      bb = heads_lib.backbone(model)

      def zeros(x_batch, y=None):
        return bb_lib.zeros_cache(bb, params, jnp.shape(x_batch), y)
      return plan_lib.BoundPlan(net, zeros, None)
    if self.mode == "exact":
      net = _exact_net(self, model, params, exact_flops)
    else:
      net = _batched_net(self, model, params)
    if self.mesh is not None:
      net = plan_lib.shard_net(net, self.mesh, self.axis_name)
    info = plan_lib.host_info(self, lambda: self._info(model, times, exact_flops))
    return plan_lib.BoundPlan(net, plan_lib.no_cache, info)

  def _info(self, model: Any, times: np.ndarray, exact_flops: float) -> dict:
    num = heads_lib.backbone(model).num_units
    exits = predict_exits(model, self.ee_params, self.uem, self.threshold, times, self.layout)
    if self.mode == "exact":
      blocks = np.full(len(times), num, np.float64)
      flops = np.full(len(times), exact_flops)
    elif exits is None:
      blocks = np.full(len(times), num, np.float64)
      flops = np.full(len(times), exit_flops(model, num, self.uem, self.layout))
    else:
      blocks = exits.astype(np.float64)
      flops = np.array([exit_flops(model, int(k), self.uem, self.layout) for k in exits])
    info = plan_lib.make_info(model, blocks, flops, plan=self.name, dynamic=True,
                              exits_predicted=exits is not None)
    if exits is not None:
      info["exits_per_nfe"] = exits
    elif self.mode == "batched":
      info["ideal_saving"] = float("nan")
    return info


def ideal_saving_from_stats(model: Any, stats: dict) -> float:
  """1 − mean executed FLOPs / full backbone FLOPs, from a run's per-NFE `stats['flops']`."""
  return float(1.0 - np.mean(np.asarray(stats["flops"], np.float64))
               / heads_lib.backbone(model).full_flops)


def _exact_net(plan: DeeDiffPlan, model: Any, params: Any, flops: float):
  num = heads_lib.backbone(model).num_units
  off = heads_lib.check_layout(plan.layout)

  def net(x, t_net, y, nfe_index, cache):
    del nfe_index
    final, outs, u = forward_all_exits(model, params, plan.ee_params, x, t_net, y, plan.uem,
                                       plan.layout)
    j = first_exit(u, jnp.asarray(plan.threshold, jnp.float32))  # stacked index; exit k = j + off
    stats = {"blocks": jnp.float32(num), "exit": (j + off).astype(jnp.float32).mean(),
             "heads": jnp.float32(num - off), "flops": jnp.float32(flops)}
    return select_exit(final, outs, j), cache, stats

  return net


def _batched_net(plan: DeeDiffPlan, model: Any, params: Any, unit_mask=None):
  """The while-loop runner (see the module docstring), optionally with a block-output cache."""
  bb = heads_lib.backbone(model)
  if any(len(seg.pattern) != 1 for seg in bb.segments):
    raise ValueError("the DeeDiff runner needs one unit per block ('block' granularity)")
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, plan.uem)
  hp, up = plan.ee_params["heads"], plan.ee_params["uems"]
  num = bb.num_units
  off = heads_lib.check_layout(plan.layout)  # exit k uses stacked entry k − off
  f_head, f_uem = exit_head_flops(model), uem_flops(model, plan.uem)
  unit_flops = np.asarray(bb.unit_flops, np.float32)
  enter_flops = np.asarray(bb.enter_flops, np.float32)
  cached = unit_mask is not None
  m_j = jnp.asarray(unit_mask) if cached else None

  def net(x, t_net, y, nfe_index, cache):
    row = m_j[nfe_index] if cached else None
    theta = jnp.asarray(plan.threshold, jnp.float32)
    min_frac = jnp.asarray(plan.min_fraction, jnp.float32)
    f_units = jnp.asarray(unit_flops)
    t_emb = heads_lib.time_features(model, t_net) if plan.uem in heads_lib.TIME_UEMS else None

    def exit_test(k, st, dec):
      """UEM k on the stream; newly exited samples (and, when stopping, the rest) take head k."""
      out, exited, exit_k, flops, heads = dec
      h, ctx = st["h"], bb.exit_context(st)
      u = probe.apply({"params": take(up, k - off)}, h, t_emb)
      new = (u <= theta) & ~exited
      exited = exited | new
      done = jnp.mean(exited.astype(jnp.float32)) >= min_frac
      chosen = new | (done & ~exited)
      any_taken = jnp.any(chosen)
      mask = chosen.reshape((-1,) + (1,) * (out.ndim - 1))
      out = jax.lax.cond(
          any_taken,
          lambda o: jnp.where(mask, head.apply({"params": take(hp, k - off)}, h, ctx), o),
          lambda o: o, out)
      used = any_taken.astype(jnp.float32)
      dec = (out, exited | chosen, jnp.where(chosen, k, exit_k), flops + f_uem + f_head * used,
             heads + used)
      return dec, done

    st = bb.embed(params, x, t_net, y)
    bsz = x.shape[0]
    out_shape = jax.eval_shape(
        lambda: head.apply({"params": take(hp, 0)}, st["h"], bb.exit_context(st)))
    dec = (jnp.zeros(out_shape.shape, out_shape.dtype), jnp.zeros((bsz,), bool),
           jnp.full((bsz,), num, jnp.int32), jnp.float32(bb.embed_flops), jnp.float32(0))
    if off == 0:
      dec, done = exit_test(jnp.int32(0), st, dec)
    else:  # no exit before the first block ('outputs' layout)
      done = jnp.asarray(False)
    carry = (jnp.int32(0), st, dec, done, tuple(cache) if cached else ())

    for seg in bb.segments:
      if seg.groups == 0:
        continue

      def cond_fn(s, seg=seg):
        j, (_, _, _, done, _) = s
        return jnp.logical_and(~done, j < seg.groups)

      def body_fn(s, seg=seg):
        j, (k, st, dec, done, c) = s
        ref = UnitRef(seg, j, 0)
        if cached:  # compute or reuse (scalar predicate), refresh the cache where computed
          st = bb.enter(params, ref, st)
          value = jax.lax.cond(row[ref.index], lambda s_: bb.compute(params, ref, s_),
                               lambda s_: bb_lib.cache_get(bb, c, ref), st)
          c = bb_lib.cache_set(bb, c, ref, value)
          st = bb.apply(params, ref, st, value)
          f_unit = jnp.where(row[ref.index], f_units[ref.index],
                             jnp.asarray(enter_flops)[ref.index])
        else:
          st = bb.run_unit(params, ref, st)
          f_unit = f_units[ref.index]
        k = k + 1
        out, exited, exit_k, flops, heads = dec
        dec = (out, exited, exit_k, flops + f_unit, heads)
        dec, done = jax.lax.cond(k < num, lambda d: exit_test(k, st, d),
                                 lambda d: (d, done), dec)
        return j + 1, (k, st, dec, done, c)

      carry = jax.lax.while_loop(cond_fn, body_fn, (jnp.int32(0), carry))[1]

    k, st, (out, exited, exit_k, flops, heads), _, new_cache = carry
    cache = new_cache if cached else cache
    # Samples that never exited ran all L blocks and take the backbone's own head (which reads
    # only the stream: U-ViT's pending skips are discarded, §2.8).
    need_final = ~jnp.all(exited)
    mask = exited.reshape((-1,) + (1,) * (out.ndim - 1))
    out = jax.lax.cond(need_final, lambda o: jnp.where(mask, o, bb.head(params, st)),
                       lambda o: o, out)
    flops = flops + bb.head_flops * need_final.astype(jnp.float32)
    stats = {"blocks": k.astype(jnp.float32), "exit": exit_k.astype(jnp.float32).mean(),
             "heads": heads, "flops": flops}
    return out, cache, stats

  return net


def benchmark_plan(model: Any, params: Any, rng, *, exit_layer_at_noise: Optional[float] = None,
                   exit_layer_at_clean: Optional[float] = None, threshold: float = 0.5,
                   mode: str = "batched", min_fraction: float = 1.0, sharpness: float = 8.0,
                   heads_from_backbone: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
                   axis_name: str = "data", layout: str = "inputs") -> tuple[DeeDiffPlan, dict]:
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
    layout: exit layout ('inputs' or the paper's 'outputs'; exits 1..L−1 then).

  Returns:
    (plan, meta) with meta = {'exit_layer_at_noise', 'exit_layer_at_clean', 'threshold',
    'num_exits', 'uem'}.
  """
  num = heads_lib.backbone(model).num_units
  noise = float(round(num / 3) if exit_layer_at_noise is None else exit_layer_at_noise)
  clean = float(num if exit_layer_at_clean is None else exit_layer_at_clean)
  for name, value in (("exit_layer_at_noise", noise), ("exit_layer_at_clean", clean)):
    if not 0.0 <= value <= num:
      raise ValueError(f"{name} must be in [0, {num}] for this model, got {value}")
  ee = init_deediff_params(model, rng, "timestep_aware",
                           backbone_params=params if heads_from_backbone else None,
                           layout=layout)
  ee = scripted_uem_params(model, ee, threshold, noise, clean, sharpness, layout=layout)
  plan = DeeDiffPlan(ee, threshold=threshold, mode=mode, min_fraction=min_fraction,
                     uem="timestep_aware", mesh=mesh, axis_name=axis_name, layout=layout)
  meta = {"exit_layer_at_noise": noise, "exit_layer_at_clean": clean, "threshold": threshold,
          "num_exits": num, "uem": "timestep_aware"}
  return plan, meta
