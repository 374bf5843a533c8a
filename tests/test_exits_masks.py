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
from jaxee.exits import testing

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


@pytest.mark.parametrize("unit,cache_mode", [("block", "block_output"), ("branch", "branch")])
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
