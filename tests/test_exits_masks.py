"""Block masks with caches (TABM block-output, L2C branch): rectification, runners, plan files."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee.eval import flops as flops_lib
from jaxee.exits import mask_tools
from jaxee.exits import masks
from jaxee import testing
from jaxee.models import backbone as bb_lib

STEPS = 6


def test_rectify_clears_dead_work_within_a_step():
  # Row 1: block 1 is skipped and block 0 is recomputed at the next step (row 2), so block 0's
  # output at row 1 is never read.
  m = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
  np.testing.assert_array_equal(mask_tools.rectify(m), [[1, 1, 1], [0, 0, 1], [1, 1, 1]])


def test_rectify_cascades_from_the_last_block_down():
  m = np.array([[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(mask_tools.rectify(m), [[1, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])


def test_rectify_goes_from_the_last_step_to_the_first():
  # Row 2 is rectified first (its next step computes block 0); that clears m[2, 0], so row 1's
  # condition m[t−1, 0] = 1 no longer holds and m[1, 0] stays.
  m = np.array([[1, 1], [1, 0], [1, 0], [1, 1]])
  np.testing.assert_array_equal(mask_tools.rectify(m), [[1, 1], [1, 0], [0, 0], [1, 1]])


def test_rectify_keeps_blocks_whose_cache_is_read_next():
  m = np.array([[1, 1], [1, 0], [0, 1]])  # block 0 is skipped at row 2: its row-1 output is read
  np.testing.assert_array_equal(mask_tools.rectify(m), m)
  # The last row and the last block are never cleared; row 0 is forced to ones.
  m = np.array([[0, 0], [1, 0]])
  np.testing.assert_array_equal(mask_tools.rectify(m), [[1, 1], [1, 0]])


def test_rectify_uvit_keeps_in_blocks_whose_skip_is_consumed():
  # U-ViT with 1 in-block: units (in0, mid, out0); out0 consumes in0's output as its skip.
  consumers = mask_tools.uvit_skip_consumers(1)
  assert consumers == {0: 2}
  m = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
  np.testing.assert_array_equal(mask_tools.rectify(m, consumers), m)
  m = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 1]])
  np.testing.assert_array_equal(mask_tools.rectify(m, consumers), [[1, 1, 1], [0, 0, 0], [1, 1, 1]])


def test_rectify_reaches_a_fixed_point_on_random_masks():
  for seed in range(5):
    m = mask_tools.random_mask(12, 7, 0.5, seed=seed)
    r = mask_tools.rectify(m)
    np.testing.assert_array_equal(mask_tools.rectify(r), r)
    assert (r <= m).all() and r[0].all()


def test_plan_validation_and_first_row():
  model, params = testing.tiny_dit()
  plan = masks.MaskPlan(np.zeros((STEPS, 4)))
  assert plan.mask[0].all() and not plan.mask[1:].any()
  with pytest.raises(ValueError, match="0/1"):
    masks.MaskPlan(np.full((STEPS, 4), 0.3))
  with pytest.raises(ValueError, match="expected"):
    masks.MaskPlan(np.ones((STEPS, 5))).bind(model, params, np.arange(STEPS, dtype=np.float32))
  with pytest.raises(ValueError, match="cache_mode"):
    masks.MaskPlan(np.ones((STEPS, 8)), unit="branch")
  with pytest.raises(ValueError, match="rectification"):
    masks.MaskPlan(np.ones((STEPS, 4)), cache_mode="branch").rectified(model)


def test_plan_file_round_trip(tmp_path):
  plan = masks.MaskPlan(mask_tools.random_mask(STEPS, 8, 0.5, seed=1), unit="branch",
                        cache_mode="branch", metadata={"arch": "tiny", "sampler": "ddim"})
  path = tmp_path / "sub" / "plan.npz"
  plan.save(str(path), note="x")
  assert os.listdir(path.parent) == ["plan.npz"]  # no temporary file left behind
  back = masks.load_mask_plan(str(path))
  np.testing.assert_array_equal(back.mask, plan.mask)
  assert (back.unit, back.cache_mode) == ("branch", "branch")
  assert back.metadata == {"arch": "tiny", "sampler": "ddim", "steps": STEPS, "note": "x"}
  np.savez(tmp_path / "bad.npz", weights=np.ones(3))
  with pytest.raises(ValueError, match="not a mask plan"):
    masks.load_mask_plan(str(tmp_path / "bad.npz"))


def test_block_skip_compiles_to_conditionals():
  model, params = testing.tiny_dit()
  times = np.linspace(999, 0, STEPS).astype(np.float32)
  plan = masks.MaskPlan(mask_tools.random_mask(STEPS, 4, 0.5))
  x, y = testing.example_inputs(model, batch=2)
  cache = plan.bind(model, params, times).init_cache(x, y)

  def f(p, x, t, y, i, c):
    return plan.bind(model, p, times).net(x, t, y, i, c)[0]

  hlo = jax.jit(f).lower(params, x, jnp.zeros(2), y, jnp.int32(1), cache).compile().as_text()
  assert re.search(r"conditional\(", hlo)


def _run(model, params, plan, **kw):
  return jaxee.sample(model, params, jax.random.PRNGKey(5), plan=plan, return_stats=True, **kw)


def test_dit_block_output_with_cfg_equals_reference_and_rectified_plan():
  model, params = testing.tiny_dit()
  kw = dict(num=2, sampler="ddim", steps=STEPS, labels=jnp.array([2, 9]), guidance=1.5)
  mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 1],
                   [0, 0, 1, 0]])
  plan = masks.MaskPlan(mask, metadata={"arch": "tiny"})
  x, stats = _run(model, params, plan, **kw)
  x_ref, _ = _run(model, params, testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref)
  np.testing.assert_array_equal(stats["blocks"], mask.sum(1))
  # Rectification removes only dead work: same samples, fewer blocks.
  rect = plan.rectified(model)
  assert rect.mask.sum() < plan.mask.sum()
  x_rect, stats_rect = _run(model, params, rect, **kw)
  testing.assert_outputs_close(x_rect, x)
  np.testing.assert_array_equal(stats_rect["blocks"], rect.mask.sum(1))


def test_first_step_computes_everything():
  model, params = testing.tiny_dit()
  plan = masks.MaskPlan(np.zeros((STEPS, 4)), cache_mode="branch")
  _, stats = _run(model, params, plan, num=1, sampler="ddim", steps=STEPS, labels=jnp.array([3]))
  np.testing.assert_array_equal(stats["blocks"], [4, 0, 0, 0, 0, 0])
  base = flops_lib.embed_flops(model) + flops_lib.head_flops(model)
  mod = 4 * flops_lib.modulation_flops(model)  # L2C keeps computing the adaLN modulations
  np.testing.assert_allclose(stats["flops"], [flops_lib.backbone_flops(model)] + [base + mod] * 5,
                             rtol=1e-6)


def test_dit_branch_units_with_cfg_equal_reference():
  model, params = testing.tiny_dit()
  plan = masks.MaskPlan(mask_tools.random_mask(STEPS, 8, 0.5, seed=3), unit="branch",
                        cache_mode="branch")
  kw = dict(num=2, sampler="ddim", steps=STEPS, labels=jnp.array([4, 1]), guidance=4.0)
  x, _ = _run(model, params, plan, **kw)
  x_ref, _ = _run(model, params, testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref)


@pytest.mark.parametrize("unit,cache_mode", [("block", "block_output"), ("branch", "branch"),
                                             ("block", "branch")])
def test_uvit_masks_equal_reference(unit, cache_mode):
  model, params = testing.tiny_uvit()
  units = masks.num_units(model, unit)
  plan = masks.MaskPlan(mask_tools.random_mask(STEPS, units, 0.5, seed=4), unit=unit,
                        cache_mode=cache_mode)
  kw = dict(num=2, sampler="euler_ode", steps=STEPS)
  x, stats = _run(model, params, plan, **kw)
  x_ref, _ = _run(model, params, testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref)
  assert stats["blocks"][0] == 7


# ---- the contract runner: FLOPs tables, skip consumers, traced masks, one compile -------------


def _legacy_tables(model, plan):
  """The pre-contract `masks._tables` (family-specific), kept here as an independent check."""
  m = np.asarray(plan.mask)
  bm = (np.repeat(m, 2, axis=1) if plan.unit == "block" else m).reshape(m.shape[0], -1, 2)
  fa, fm = flops_lib.attn_flops(model), flops_lib.mlp_flops(model)
  flops = (flops_lib.embed_flops(model) + flops_lib.head_flops(model)
           + bm[..., 0].sum(1) * fa + bm[..., 1].sum(1) * fm)
  block_any = bm.any(axis=2)
  if model.family == "dit":
    per = block_any if plan.cache_mode == "block_output" else np.ones_like(block_any)
    flops = flops + per.sum(1) * flops_lib.modulation_flops(model)
  else:
    out = block_any[:, model.num_in_blocks + 1:]
    per = out if plan.cache_mode == "block_output" else np.ones_like(out)
    flops = flops + per.sum(1) * flops_lib.skip_flops(model)
  return bm.mean(axis=2).sum(axis=1), flops


@pytest.mark.parametrize("family", ["dit", "uvit"])
@pytest.mark.parametrize("unit,cache_mode", [("block", "block_output"), ("block", "branch"),
                                             ("branch", "branch")])
def test_flops_tables_match_the_legacy_accounting(family, unit, cache_mode):
  model, params = testing.tiny_dit() if family == "dit" else testing.tiny_uvit()
  times = np.linspace(999, 0, STEPS).astype(np.float32)
  plan = masks.MaskPlan(mask_tools.random_mask(STEPS, masks.num_units(model, unit), 0.5, seed=7),
                        unit=unit, cache_mode=cache_mode)
  info = plan.bind(model, params, times).info
  blocks, flops = _legacy_tables(model, plan)
  np.testing.assert_allclose(info["blocks_per_nfe"], blocks, rtol=1e-12)
  np.testing.assert_allclose(info["flops_per_nfe"], flops, rtol=1e-12)
  assert info["flops_per_nfe"][0] == pytest.approx(flops_lib.backbone_flops(model), rel=1e-12)
  # The traced tables (what `stats` reads inside `jaxee.sample`) agree in float32.
  traced = jax.jit(lambda p: masks.tables(
      bb_lib.as_backbone(model, p.granularity), p.unit_mask()))(plan)
  np.testing.assert_allclose(traced[0], blocks, rtol=1e-6)
  np.testing.assert_allclose(traced[1], flops, rtol=1e-6)


def test_skip_consumers_come_from_the_backbone():
  uvit, _ = testing.tiny_uvit()
  dit, _ = testing.tiny_dit()
  bb = bb_lib.as_backbone(uvit, "block")
  assert bb.skip_consumers() == mask_tools.uvit_skip_consumers(uvit.num_in_blocks)
  assert bb_lib.as_backbone(dit, "block").skip_consumers() is None
  m = mask_tools.random_mask(12, 7, 0.5, seed=2)
  np.testing.assert_array_equal(
      masks.MaskPlan(m).rectified(uvit).mask,
      mask_tools.rectify(m, mask_tools.uvit_skip_consumers(uvit.num_in_blocks)))
  np.testing.assert_array_equal(masks.MaskPlan(m[:, :4]).rectified(dit).mask,
                                mask_tools.rectify(m[:, :4]))


def test_plan_is_a_pytree_with_a_traced_mask():
  model, params = testing.tiny_dit()
  times = np.linspace(999, 0, STEPS).astype(np.float32)
  a = masks.MaskPlan(mask_tools.random_mask(STEPS, 8, 0.5, seed=1), unit="branch",
                     cache_mode="branch", metadata={"arch": "tiny"})
  b = masks.MaskPlan(mask_tools.random_mask(STEPS, 8, 0.5, seed=2), unit="branch",
                     cache_mode="branch")
  leaves, tree = jax.tree.flatten(a)
  assert len(leaves) == 1 and leaves[0] is a.mask
  assert tree == jax.tree.structure(b)            # metadata is not part of the structure
  assert tree != jax.tree.structure(masks.MaskPlan(b.mask[:, :4], cache_mode="branch"))
  a.check(model, times)
  with pytest.raises(ValueError, match="expected"):
    a.check(model, times[:-1])
  x, y = testing.example_inputs(model, batch=2)
  cache = a.bind(model, params, times).init_cache(x, y)
  t = jnp.full((2,), 500.0)

  traces = []

  @jax.jit
  def traced(plan, p, c, i):
    traces.append(1)
    bound = plan.bind(model, p, times)
    assert bound.info is None                     # host facts only for concrete plans
    return bound.net(x, t, y, i, c)

  for plan in (a, b):
    ref_bound = plan.bind(model, params, times)   # concrete mask, eager
    c = cache
    for i in range(3):                            # a few NFEs, so cached values get reused
      out, new_c, stats = traced(plan, params, c, jnp.int32(i))
      ref, ref_c, ref_stats = ref_bound.net(x, t, y, jnp.int32(i), c)
      testing.assert_outputs_close(out, ref)
      jax.tree.map(testing.assert_outputs_close, new_c, ref_c)
      np.testing.assert_allclose(stats["flops"], ref_bound.info["flops_per_nfe"][i], rtol=1e-6)
      np.testing.assert_allclose(stats["blocks"], ref_bound.info["blocks_per_nfe"][i])
      c = ref_c
  assert len(traces) == 1                         # a new mask of the same shape: no retrace


def test_two_plans_of_one_structure_compile_once():
  model, params = testing.tiny_dit()
  sampling = jaxee.sampling
  if not hasattr(sampling, "trace_count"):
    pytest.fail("jaxee.sampling.trace_count() is missing (owned by the sampling refactor)")
  kw = dict(num=2, sampler="ddim", steps=STEPS, labels=jnp.array([2, 9]), guidance=1.5)
  a = masks.MaskPlan(mask_tools.random_mask(STEPS, 4, 0.5, seed=11))
  b = masks.MaskPlan(mask_tools.random_mask(STEPS, 4, 0.5, seed=12), metadata={"other": 1})
  assert not np.array_equal(a.mask, b.mask)
  x_a, stats_a = _run(model, params, a, **kw)
  before = sampling.trace_count()
  x_b, stats_b = _run(model, params, b, **kw)
  assert sampling.trace_count() == before, "a second mask of the same shape recompiled"
  # The mask really is a traced argument: the second plan's own mask decides what runs.
  np.testing.assert_array_equal(stats_b["blocks"], b.mask.sum(1))
  np.testing.assert_array_equal(stats_a["blocks"], a.mask.sum(1))
  assert float(jnp.max(jnp.abs(x_a - x_b))) > 0
