"""Plans on the DDPM U-Net: rectification with several skip consumers, TABM mask optimisation end
to end, the plan kinds a U-Net refuses (and why), FLOP summary and the testing helpers."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import exits, sampling, testing
from jaxee.eval import flops as flops_lib
from jaxee.exits import mask_tools, spec as spec_lib
from jaxee.models import backbone as bb_lib
from jaxee.train.objectives import masks as masks_obj

KW = dict(num=2, sampler="ddim", steps=8)


@pytest.fixture(scope="module")
def unet():
  return testing.tiny_unet()


def test_rectify_clears_only_when_every_consumer_is_skipped():
  mask = np.array([[1, 1, 1, 1],
                   [1, 0, 0, 1],
                   [1, 1, 1, 1]], bool)
  # Unit 0 is read by unit 1 (skipped at row 1) and by units 2 and 3; unit 3 runs, so keep it.
  assert mask_tools.rectify(mask, {0: (2, 3)})[1, 0]
  assert mask_tools.rectify(mask, {0: (3, 2)})[1, 0]
  assert not mask_tools.rectify(mask, {0: 2})[1, 0]       # an int consumer, as for U-ViT
  assert not mask_tools.rectify(mask, {0: (2,)})[1, 0]
  assert not mask_tools.rectify(mask, None)[1, 0]
  both_off = mask.copy()
  both_off[1, 3] = False
  out = mask_tools.rectify(both_off, {0: (2, 3)})
  assert not out[1, 0] and out[0].all() and out[2].all()
  with pytest.raises(ValueError, match="outside"):
    mask_tools.rectify(mask, {0: (2, 7)})


def test_unet_skip_consumers(unet):
  model, _ = unet
  bb = bb_lib.as_backbone(model)
  # down0.res0 → its skip (up1.res0) and, through down1's downsample, up0.res1;
  # down1.attn0 → up0.res0.
  assert bb.skip_consumers() == {0: (8, 10), 2: (6,)}


def test_rectified_unet_masks_sample_identically(unet):
  model, params = unet
  bb = bb_lib.as_backbone(model)
  times = sampling.nfe_times(model, "ddim", KW["steps"])
  cleared_any = differs_bare = False
  for seed in range(3):
    raw = exits.MaskPlan(exits.random_mask(len(times), bb.num_units, 0.5, seed=seed))
    fixed = raw.rectified(model)
    assert np.all(fixed.mask <= raw.mask)
    cleared_any |= bool(np.any(fixed.mask != raw.mask))
    x_raw, s_raw = jaxee.sample(model, params, jax.random.PRNGKey(seed), plan=raw,
                                return_stats=True, **KW)
    x_fix, s_fix = jaxee.sample(model, params, jax.random.PRNGKey(seed), plan=fixed,
                                return_stats=True, **KW)
    testing.assert_outputs_close(x_fix, x_raw, 1e-6)
    assert np.sum(s_fix["flops"]) <= np.sum(s_raw["flops"])
    bare = mask_tools.rectify(raw.mask, None)  # ignoring the skip readers changes the output
    if np.any(bare != fixed.mask):
      x_bare = jaxee.sample(model, params, jax.random.PRNGKey(seed),
                            plan=exits.MaskPlan(bare), **KW)
      differs_bare |= not np.allclose(x_bare, x_raw, atol=1e-4)
  assert cleared_any and differs_bare


def test_mask_optimisation_runs_on_a_unet(unet, tmp_path):
  model, params = unet
  opts = masks_obj.options_from_config(dict(
      sampler="ddim", steps=3, num_samples=2, iters_per_step=2, lr=0.05, labels="none",
      lambda1=1.0, lambda2=0.1, init_score=0.55))
  traj = masks_obj.record_teacher(model, params, opts, jax.random.PRNGKey(0))
  assert traj.x.shape == (3, 2, 8, 8, 3) and traj.y is None
  # δ against the next executed NFE (TABM's t−1, `delta_direction='next'`): every entry > 0.
  assert np.all(np.isfinite(traj.delta)) and np.all(traj.delta > 0)
  bb = bb_lib.as_backbone(model)
  state = bb_lib.run_all(bb, params, bb.embed(params, jnp.asarray(traj.x[0]),
                                              jnp.full((2,), traj.t[0]), None))
  assert bb.final_feature(state).shape == (2, 8, 8, 8)    # x_end: the head's input map
  result = masks_obj.optimise_masks(model, params, traj, opts, jax.random.PRNGKey(1),
                                    workdir=str(tmp_path))
  assert result["scores"].shape == (3, bb.num_units) and result["mask"][0].all()
  assert not result["mask"][1:].all()  # a strong λ₁ from s = 0.55 switches units off
  plan = masks_obj.build_plan(model, result, opts)
  plan.save(str(tmp_path / "plan.npz"))
  loaded = exits.load_mask_plan(str(tmp_path / "plan.npz"))
  x = jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim", steps=3,
                   plan=loaded)
  assert np.all(np.isfinite(np.asarray(x)))


def test_plan_kinds_the_unet_refuses(unet):
  model, params = unet
  times = sampling.nfe_times(model, "ddim", KW["steps"])
  n = len(times)
  with pytest.raises(NotImplementedError, match="depth schedules"):
    jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.ASEPlan((6,) * 10), **KW)
  with pytest.raises(ValueError, match="is for dit, model is unet"):
    spec_lib.parse_plan("ase:D3-DiT", model, options={"depth": "auto"})
  for unit, cache_mode in (("branch", "branch"), ("block", "branch")):
    with pytest.raises(NotImplementedError, match="no attention/MLP branch split"):
      jaxee.sample(model, params, jax.random.PRNGKey(0),
                   plan=exits.MaskPlan(np.ones((n, 24 if unit == "branch" else 12)), unit,
                                       cache_mode), **KW)
  with pytest.raises(ValueError, match="uniform_tokens"):
    spec_lib.parse_plan("deediff:scripted=4,12", model, params=params)
  with pytest.raises(ValueError, match="does not have"):
    spec_lib.parse_plan("duodiff:300:random=3", model)
  with pytest.raises(TypeError, match="cannot compose a DeepCachePlan"):
    exits.compose(exits.MaskPlan(np.ones((n, 12))), exits.DeepCachePlan(2))


def test_duodiff_with_a_smaller_unet_runs(unet):
  model, params = unet
  shallow, shallow_p = testing.tiny_unet(block_out_channels=(8, 8))
  plan = exits.DuoDiffPlan(shallow, shallow_p, t_switch=500)
  x = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, **KW)
  x_ref = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=testing.ReferencePlan(plan),
                       **KW)
  testing.assert_outputs_close(x, x_ref, 1e-5)


def test_flops_summary_and_testing_helpers(unet):
  model, params = unet
  s = flops_lib.summary(model)
  assert s["total"] == pytest.approx(flops_lib.backbone_flops(model), rel=1e-12)
  assert s["blocks"] == pytest.approx(s["res"] + s["attn"] + s["resample"], rel=1e-12)
  assert s["total"] == pytest.approx(s["embed"] + s["blocks"] + s["head"], rel=1e-12)
  assert min(s.values()) > 0
  x, y = testing.example_inputs(model, batch=3)
  assert x.shape == (3, 8, 8, 3) and y is None
  again = testing.random_params(model, jax.random.PRNGKey(3))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert np.asarray(model.apply({"params": params}, x, jnp.zeros(3))).shape == (3, 8, 8, 3)


def test_unet_runners_lower_to_conditionals(unet):
  model, params = unet
  times = sampling.nfe_times(model, "ddim", KW["steps"])
  shallow, shallow_p = testing.tiny_unet(block_out_channels=(8, 8))
  plans = {"mask": exits.MaskPlan(exits.random_mask(len(times), 12, 0.5)),
           "duodiff": exits.DuoDiffPlan(shallow, shallow_p, t_switch=500)}
  x = jnp.zeros((2, 8, 8, 3))
  for name, plan in plans.items():
    def f(p, pl, x, i):
      bound = pl.bind(model, p, times)
      return bound.net(x, jnp.zeros(2), None, i, bound.init_cache(x))[0]
    hlo = jax.jit(f).lower(params, plan, x, jnp.int32(1)).compile().as_text()
    want = 12 if name == "mask" else 1
    assert len(re.findall(r"\bconditional\(", hlo)) >= want, name


def test_sharded_sampling_reads_the_unet_sample_space():
  """The sampling engine sizes its noise from the contract (a U-Net has no img_size/in_chans)."""
  from jaxee import testing
  from jaxee.sharded import run as run_lib
  model, _ = testing.tiny_unet()
  assert run_lib._sample_space(model) == (0, model.sample_size, model.in_channels)
  dit, _ = testing.tiny_dit()
  assert run_lib._sample_space(dit) == (dit.num_classes, dit.input_size, dit.in_channels)
