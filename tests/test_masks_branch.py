"""TABM at the paper's MHA/MLP granularity: per-unit output replacement (`cache_mode=
'unit_output'`), its runner, rectification, optimisation and the δ direction of w(t)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import testing
from jaxee.eval import flops as flops_lib
from jaxee.exits import mask_tools
from jaxee.exits import masks
from jaxee.exits import plan as plan_lib
from jaxee.exits import spec as spec_lib
from jaxee.models import backbone as bb_lib
from jaxee.train.objectives import masks as masks_opt
from jaxee.train.objectives import masks_teacher

STEPS = 6


def _plan(mask):
  return masks.MaskPlan(np.asarray(mask), "branch", "unit_output")


# ---- independent references: a Python loop over units, compute everything, then `where` --------


def _dit_reference_net(model, params, row, x, t, y, cache):
  """DiT `DiTBlock.forward` split into its two residual sub-layers, each output replaced:
  u = h + gate·branch(modulate(norm(h))); h ← where(m_u, u, cache_u)."""
  tokens, c = model.apply({"params": params}, x, t, y, method="embed")
  blk = model.block_module()
  h, new = tokens, []
  for layer in range(model.depth):
    p = {"params": jax.tree.map(lambda a, i=layer: a[i], params["blocks"])}
    mod = blk.apply(p, c, method="modulation")
    for sub, (method, gate) in enumerate((("attn_branch", 2), ("mlp_branch", 5))):
      u = 2 * layer + sub
      out = h + mod[gate][:, None, :] * blk.apply(p, h, mod, method=method)
      h = jnp.where(row[u], out, cache[u])
      new.append(h)
  return model.apply({"params": params}, h, c, method="head"), new


def _uvit_reference_net(model, params, row, x, t, y, cache):
  """U-ViT `UViT.forward` with un-gated residual sub-layers, each output replaced; an in-block's
  (replaced) output is pushed as its long skip, an out-block fuses the popped skip first."""
  h = model.apply({"params": params}, x, t, y, method="embed")
  n, skips, new = model.num_in_blocks, [], []
  blocks = ([("in", jax.tree.map(lambda a, i=i: a[i], params["in_blocks"])) for i in range(n)]
            + [("mid", params["mid_block"])]
            + [("out", jax.tree.map(lambda a, i=i: a[i], params["out_blocks"])) for i in range(n)])
  for b, (kind, p) in enumerate(blocks):
    blk = model.block_module(kind == "out")
    if kind == "out":
      h = blk.apply({"params": p}, h, skips.pop(), method="merge_skip")
    for sub, method in enumerate(("attn_branch", "mlp_branch")):
      u = 2 * b + sub
      h = jnp.where(row[u], h + blk.apply({"params": p}, h, method=method), cache[u])
      new.append(h)
    if kind == "in":
      skips.append(h)
  return model.apply({"params": params}, h, method="head"), new


@plan_lib.pytree_plan(data=("mask",), static=("fn",))
class _Reference:
  """A plan running `fn` (one of the references above) with the real plan's stats tables."""
  mask: object
  fn: object = None

  def check(self, model, nfe_times):
    _plan(self.mask).check(model, nfe_times)

  def bind(self, model, params, nfe_times):
    bound = masks.MaskPlan(self.mask, "branch", "unit_output").bind(model, params, nfe_times)
    mask, fn = jnp.asarray(self.mask), self.fn

    def init_cache(x_batch, y=None):
      tokens = jax.eval_shape(lambda xx: bb_lib.as_backbone(model).embed(
          params, xx, jnp.zeros((xx.shape[0],)), y)["h"], x_batch)
      return [jnp.zeros(tokens.shape, tokens.dtype) for _ in range(mask.shape[1])]

    def net(x, t_net, y, nfe_index, cache):
      out, new = fn(model, params, mask[nfe_index], x, t_net, y, cache)
      return out, new, bound.net(x, t_net, y, nfe_index, bound.init_cache(x, y))[2]
    return plan_lib.BoundPlan(net, init_cache, bound.info)


def _sample(model, params, plan, **kw):
  return jaxee.sample(model, params, jax.random.PRNGKey(5), plan=plan, return_stats=True, **kw)


DIT_KW = dict(num=2, sampler="ddim", steps=STEPS, labels=jnp.array([2, 9]), guidance=1.5)


def test_dit_unit_output_runner_equals_compute_everything_reference():
  model, params = testing.tiny_dit()
  plan = _plan(mask_tools.random_mask(STEPS, 2 * model.depth, 0.5, seed=11))
  x, stats = _sample(model, params, plan, **DIT_KW)
  fn = _dit_reference_net
  x_ref, _ = _sample(model, params, _Reference(jnp.asarray(plan.mask), fn), **DIT_KW)
  testing.assert_outputs_close(x, x_ref)
  np.testing.assert_allclose(stats["blocks"], plan.mask.sum(1) / 2)
  # Output replacement is not L2C's branch cache: the same mask gives other samples there.
  x_l2c, _ = _sample(model, params, masks.MaskPlan(plan.mask, "branch", "branch"), **DIT_KW)
  assert float(jnp.max(jnp.abs(x_l2c - x))) > 1e-3


def test_uvit_unit_output_runner_equals_compute_everything_reference():
  model, params = testing.tiny_uvit()
  units = masks.num_units(model, "branch")
  plan = _plan(mask_tools.random_mask(STEPS, units, 0.5, seed=4))
  kw = dict(num=2, sampler="euler_ode", steps=STEPS)
  x, _ = _sample(model, params, plan, **kw)
  x_ref, _ = _sample(model, params, _Reference(jnp.asarray(plan.mask), _uvit_reference_net), **kw)
  testing.assert_outputs_close(x, x_ref)


def test_unit_output_skip_lowers_to_conditionals():
  model, params = testing.tiny_dit()
  times = np.linspace(999, 0, STEPS).astype(np.float32)
  plan = _plan(mask_tools.random_mask(STEPS, 2 * model.depth, 0.5))
  x, y = testing.example_inputs(model, batch=2)
  cache = plan.bind(model, params, times).init_cache(x, y)

  def f(p, x, t, y, i, c):
    return plan.bind(model, p, times).net(x, t, y, i, c)[0]

  hlo = jax.jit(f).lower(params, x, jnp.zeros(2), y, jnp.int32(1), cache).compile().as_text()
  # One conditional per sub-layer kind inside the scanned loop body (attention, MLP).
  assert len(re.findall(r"conditional\(", hlo)) >= 2


def test_flops_tables_charge_the_modulation_of_a_skipped_attention():
  model, params = testing.tiny_dit()
  depth = model.depth
  mask = np.ones((3, 2 * depth), bool)
  mask[1] = False                       # everything reused
  mask[2, 0::2] = False                 # every MHA reused, every MLP computed
  info = _plan(mask).bind(model, params, np.linspace(999, 0, 3)).info
  base = flops_lib.embed_flops(model) + flops_lib.head_flops(model)
  mod = depth * flops_lib.modulation_flops(model)
  np.testing.assert_allclose(info["flops_per_nfe"], [
      flops_lib.backbone_flops(model), base + mod,
      base + mod + depth * flops_lib.mlp_flops(model)], rtol=1e-12)
  np.testing.assert_allclose(info["blocks_per_nfe"], [depth, 0, depth / 2])


def test_plan_layouts_validation_and_spec(tmp_path):
  model, params = testing.tiny_dit()
  with pytest.raises(ValueError, match="unit='branch' needs cache_mode"):
    masks.MaskPlan(np.ones((2, 8)), "branch", "block_output")
  with pytest.raises(ValueError, match="rectification is defined for output replacement"):
    masks.MaskPlan(np.ones((2, 8)), "branch", "branch").rectified(model)
  times = np.linspace(999, 0, STEPS)
  p = spec_lib.parse_plan("mask:skip=0.5:branch:unit_output", model, nfe_times=times)
  assert (p.unit, p.cache_mode, p.mask.shape) == ("branch", "unit_output", (STEPS, 8))
  assert spec_lib.parse_plan("mask:skip=0.5:branch", model, nfe_times=times).cache_mode == "branch"
  with pytest.raises(ValueError, match="unknown mask option 'mlp'"):
    spec_lib.parse_plan("mask:skip=0.5:mlp", model, nfe_times=times)
  path = str(tmp_path / "m.npz")
  _plan(p.mask).save(path)
  back = spec_lib.parse_plan(f"mask:{path}", model)
  assert (back.unit, back.cache_mode) == ("branch", "unit_output")
  np.testing.assert_array_equal(back.mask, p.mask)
  # At block units, 'unit_output' is block-output caching.
  blk = masks.MaskPlan(np.ones((2, 4)), "block", "unit_output")
  assert blk.granularity == "block"
  with pytest.raises(ValueError, match="runs alone"):
    jaxee.exits.compose(jaxee.exits.ase_plan("D3-DiT", depth=4), _plan(p.mask))


# ---- rectification at branch granularity ---------------------------------------------------


def test_rectification_on_a_hand_made_branch_mask_is_exact():
  """Units of a 4-block DiT: 2ℓ = MHA of block ℓ, 2ℓ+1 = its MLP. Eq. 12 (rows in execution
  order): m[r, u] = 0 if m[r, u+1] = 0 and m[r+1, u] = 1."""
  model, params = testing.tiny_dit()
  mask = np.ones((STEPS, 8), bool)
  mask[1, [3, 5, 6]] = False   # NFE 1: MLP 1, MLP 2, MHA 3 reused
  mask[2, 6] = False           # NFE 2: MHA 3 reused
  mask[3, 0] = False           # NFE 3: MHA 0 reused
  mask[4, 3] = False           # NFE 4: MLP 1 reused, but MHA 1 (unit 2) is not recomputed ...
  mask[5, 2] = False           # ... at NFE 5, so unit 2 of NFE 4 is still read by its cache
  rect = _plan(mask).rectified(model)
  cleared = sorted((int(r), int(u)) for r, u in zip(*np.nonzero(mask & ~np.asarray(rect.mask))))
  # NFE 2 (swept before NFE 1): unit 6 off and unit 5 recomputed at NFE 3 → unit 5 cleared; the
  # zeros cascade down the step to unit 1; unit 0 stays (MHA 0 is reused at NFE 3, so its cache
  # must be refreshed now). NFE 1: units 4 and 2 precede reused units but are no longer
  # recomputed at NFE 2 (just cleared there), so they stay. NFE 4: unit 2 stays (see above).
  assert cleared == [(2, 1), (2, 2), (2, 3), (2, 4), (2, 5)]
  kw = dict(DIT_KW, steps=STEPS)
  x, stats = _sample(model, params, _plan(mask), **kw)
  x_rect, stats_rect = _sample(model, params, rect, **kw)
  np.testing.assert_array_equal(np.asarray(x_rect), np.asarray(x))   # bit-identical
  assert float(jnp.sum(stats_rect["flops"])) < float(jnp.sum(stats["flops"]))


def test_uvit_branch_rectification_respects_skip_consumers_and_is_exact():
  model, params = testing.tiny_uvit()
  bb = bb_lib.as_backbone(model, "branch")
  consumers = bb.skip_consumers()
  units = bb.num_units
  mask = mask_tools.random_mask(STEPS, units, 0.6, seed=2)
  rect = _plan(mask).rectified(model)
  np.testing.assert_array_equal(rect.mask, mask_tools.rectify(mask, consumers))
  cleared = np.asarray(mask) & ~np.asarray(rect.mask)
  assert cleared.any()
  for r, u in zip(*np.nonzero(cleared)):
    if u in consumers:   # cleared only where every reader of its long skip is skipped too
      assert not np.any(rect.mask[r, np.atleast_1d(consumers[u])])
  kw = dict(num=2, sampler="euler_ode", steps=STEPS)
  x, _ = _sample(model, params, _plan(mask), **kw)
  x_rect, _ = _sample(model, params, rect, **kw)
  np.testing.assert_array_equal(np.asarray(x_rect), np.asarray(x))


# ---- optimisation at branch granularity -----------------------------------------------------


OPT = dict(sampler="ddim", steps=3, num_samples=2, iters_per_step=4, lr=0.1, lambda1=5e-2,
           lambda2=1e-2, labels="random", unit="branch")


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_training_mix_with_binary_gates_is_the_runner(family):
  """`run_units(unit='branch')` with a binary row computes what the unit_output runner runs."""
  model, params = testing.tiny_dit(depth=2) if family == "dit" else testing.tiny_uvit(depth=2)
  times = np.linspace(999, 0, 3).astype(np.float32)
  units = masks.num_units(model, "branch")
  mask = mask_tools.random_mask(3, units, 0.5, seed=9)
  bound = _plan(mask).bind(model, params, times)
  x, y = testing.example_inputs(model, batch=2)
  cache = masks_teacher.zeros_unit_cache(model, params, x.shape, y, "branch")
  for k in range(3):
    t = jnp.full((2,), times[k])
    out, cache_run, _ = bound.net(x, t, y, jnp.int32(k), cache)
    bb = masks_teacher.unit_backbone(model, "branch")
    st, cache_mix = masks_teacher.run_units(bb, params, bb.embed(params, x, t, y),
                                            jnp.asarray(mask[k], jnp.float32), cache, "branch")
    testing.assert_outputs_close(bb.head(params, st), out)
    for a, b in zip(cache_mix, cache_run):
      testing.assert_outputs_close(a, b)
    cache = cache_run


def test_branch_optimisation_runs_end_to_end_and_writes_a_loadable_plan(tmp_path):
  model, params = testing.tiny_dit(depth=2)
  path = masks_opt.run({"masks": dict(OPT), "train": {"seed": 1}}, str(tmp_path), model, params)
  plan = masks.load_mask_plan(path)
  assert (plan.unit, plan.cache_mode, plan.mask.shape) == ("branch", "unit_output", (3, 4))
  meta = plan.metadata
  assert meta["delta_direction"] == "next" and meta["rectified"]
  assert np.asarray(meta["scores"]).shape == (3, 4)
  np.testing.assert_array_equal(
      plan.mask, mask_tools.rectify(plan.mask, bb_lib.as_backbone(model, "branch").skip_consumers()))
  same = spec_lib.parse_plan(f"mask:{path}", model)
  np.testing.assert_array_equal(same.mask, plan.mask)
  out, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim", steps=3,
                            labels=jnp.array([1, 2]), plan=plan, return_stats=True)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(stats["blocks"]), plan.mask.sum(1) / 2, atol=1e-6)
  # Progress is tied to the unit granularity (and the δ direction) through the fingerprint.
  fp = masks_opt.options_from_config(OPT).fingerprint(model)
  assert fp != masks_opt.options_from_config(dict(OPT, unit="block")).fingerprint(model)
  assert fp != masks_opt.options_from_config(
      dict(OPT, delta_direction="previous")).fingerprint(model)
  with pytest.raises(ValueError, match="belongs to a run with different options"):
    masks_opt.run({"masks": dict(OPT, unit="block"), "train": {"seed": 1}}, str(tmp_path), model,
                  params)


# ---- δ direction -------------------------------------------------------------------------------


def test_delta_directions_on_a_hand_made_feature_sequence():
  """x_end norms 1, 3, 3, 7 with consecutive distances 2, 0, 4 (one sample, one channel)."""
  f = np.array([1.0, 3.0, 3.0, 7.0]).reshape(4, 1, 1)
  # 'next' (paper: t−1 is the next step executed): δ_k = ‖F_k − F_k+1‖ / ‖F_k‖; the last NFE
  # falls back to its previous pair.
  np.testing.assert_allclose(masks_teacher.feature_deltas(f, "next"), [2.0, 0.0, 4 / 3, 4 / 7])
  np.testing.assert_allclose(masks_teacher.feature_deltas(f, "previous"), [0.0, 2 / 3, 0.0, 4 / 7])
  # The weights follow: r over the optimised NFEs 1..3.
  np.testing.assert_array_equal(
      masks_opt.time_weights(masks_teacher.feature_deltas(f, "next")), [1.0, 2.0, 1.0, 1.5])
  np.testing.assert_array_equal(
      masks_opt.time_weights(masks_teacher.feature_deltas(f, "previous")), [1.0, 1.0, 2.0, 1.0])
  with pytest.raises(ValueError, match="delta_direction"):
    masks_teacher.feature_deltas(f, "backwards")


def test_recorded_delta_matches_the_teacher_features():
  model, params = testing.tiny_dit(depth=2)
  opts = masks_opt.options_from_config(dict(OPT, delta_direction="next"))
  traj = masks_teacher.record_teacher(model, params, opts, jax.random.PRNGKey(0))
  bb = bb_lib.as_backbone(model)
  y = None if traj.y is None else jnp.asarray(traj.y)
  feats = [bb_lib.run_all(bb, params, bb.embed(params, jnp.asarray(traj.x[k]),
                                                jnp.full((traj.x.shape[1],), traj.t[k]), y))["h"]
           for k in range(traj.x.shape[0])]
  np.testing.assert_allclose(traj.delta, masks_teacher.feature_deltas(np.stack(feats), "next"),
                             rtol=1e-4)
