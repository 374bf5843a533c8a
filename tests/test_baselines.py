"""Training-free baselines on jaxee's runners: FORA static caching and TeaCache adaptive caching.

FORA is a fixed mask on `MaskPlan`'s runner (checked against the compute-everything references);
TeaCache (`jaxee/exits/teacache.py`) is checked against an independent where-based reference
(`jaxee/testing/teacache_reference.py`), for its conditional, its batch/CFG rule, its traced
threshold and its threshold-0 identity with the full network.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import convert, exits, models, sampling, testing
from jaxee.exits import baselines, masks, spec, teacache
from jaxee.models import backbone as bb_lib

STEPS = 8


def _run(model, params, plan, **kw):
  return jaxee.sample(model, params, jax.random.PRNGKey(5), plan=plan, return_stats=True, **kw)


def _dit_cfg():
  return dict(num=2, sampler="ddim", steps=STEPS, labels=jnp.array([2, 9]), guidance=1.5)


def _has_conditional(model, params, plan, x, y):
  times = np.linspace(999, 0, STEPS).astype(np.float32)
  cache = plan.bind(model, params, times).init_cache(x, y)

  def f(p, x, t, y, i, c):
    return plan.bind(model, p, times).net(x, t, y, i, c)[0]
  hlo = jax.jit(f).lower(params, x, jnp.zeros(x.shape[0]), y, jnp.int32(1), cache)
  return re.search(r"conditional\(", hlo.compile().as_text()) is not None


# FORA ----------------------------------------------------------------------------------------------
def test_fora_mask_is_the_full_network_every_kth_nfe():
  m = baselines.fora_mask(7, 3, 3)
  assert m.dtype == bool and m.shape == (7, 3)
  np.testing.assert_array_equal(m.all(1), [1, 0, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(m.any(1), m.all(1))
  assert baselines.fora_mask(4, 2, 1).all()
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="interval"):
      baselines.fora_mask(4, 2, bad)
  model, _ = testing.tiny_dit()
  plan = baselines.fora_plan(model, 5, 2)
  assert (plan.unit, plan.cache_mode, plan.mask.shape) == ("branch", "branch", (5, 8))
  plan = baselines.fora_plan(model, 5, 2, unit="block")
  assert (plan.unit, plan.cache_mode, plan.mask.shape) == ("block", "block_output", (5, 4))
  with pytest.raises(ValueError, match="unit"):
    baselines.fora_plan(model, 5, 2, unit="layer")


@pytest.mark.parametrize("family,unit", [("dit", "branch"), ("dit", "block"), ("uvit", "branch")])
def test_fora_equals_the_compute_everything_reference(family, unit):
  model, params = testing.tiny_dit() if family == "dit" else testing.tiny_uvit()
  kw = _dit_cfg() if family == "dit" else dict(num=2, sampler="euler_ode", steps=STEPS)
  num_nfe = len(sampling.nfe_times(model, kw["sampler"], STEPS))
  plan = baselines.fora_plan(model, num_nfe, 3, unit)
  x, stats = _run(model, params, plan, **kw)
  x_ref, stats_ref = _run(model, params, testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref)
  full_blocks = bb_lib.as_backbone(model).num_blocks
  np.testing.assert_array_equal(stats["blocks"], full_blocks * (np.arange(num_nfe) % 3 == 0))
  np.testing.assert_allclose(stats["flops"], stats_ref["flops"])
  if family == "dit" and unit == "branch":
    x_in, y = testing.example_inputs(model, batch=2)
    assert _has_conditional(model, params, plan, x_in, y)


def test_fora_on_the_unet_caches_blocks(fixtures_dir):
  cfg = fixtures_dir / "unet_ddpm_tiny_config.json"
  model = models.create("unet", **models.unet_config_json(cfg))
  params = convert.from_torch(fixtures_dir / "unet_ddpm_tiny.safetensors", "unet", config_json=cfg)
  with pytest.raises(ValueError, match="fora:K:block"):
    baselines.fora_plan(model, 6, 2)
  kw = dict(num=2, sampler="ddim", steps=6)
  plan = baselines.fora_plan(model, 6, 2, unit="block")
  x, stats = _run(model, params, plan, **kw)
  x_ref, _ = _run(model, params, testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref, 1e-5)
  np.testing.assert_array_equal(stats["blocks"] > 0, [1, 0, 1, 0, 1, 0])
  # TeaCache's fallback signature on the U-Net: threshold 0 is the full network.
  full = jaxee.sample(model, params, jax.random.PRNGKey(5), **kw)
  x0, _ = _run(model, params, exits.TeaCachePlan(0.0), **kw)
  testing.assert_outputs_close(x0, full, 1e-5)


def test_specs_parse_fora_and_teacache():
  model, _ = testing.tiny_dit()
  times = sampling.nfe_times(model, "ddim", STEPS)
  plan = spec.parse_plan("fora:3", model, nfe_times=times)
  np.testing.assert_array_equal(plan.mask, baselines.fora_mask(STEPS, 8, 3))
  assert spec.parse_plan("fora:2:block", model, nfe_times=times).unit == "block"
  with pytest.raises(ValueError, match="NFE grid"):
    spec.parse_plan("fora:3", model)
  for bad in ("fora:x", "fora:0", "fora:2:layer", "fora"):
    with pytest.raises(ValueError):
      spec.parse_plan(bad, model, nfe_times=times)
  plan = spec.parse_plan("teacache:0.2:mean:poly=2,0.5,0", model)
  assert isinstance(plan, teacache.TeaCachePlan) and plan.rule == "mean"
  assert float(plan.threshold) == pytest.approx(0.2)
  np.testing.assert_allclose(plan.coefficients, [2, 0.5, 0])
  assert spec.parse_plan("teacache:0.1", model).rule == "max"
  for bad in ("teacache", "teacache:abc", "teacache:0.1:median", "teacache:-1"):
    with pytest.raises(ValueError):
      spec.parse_plan(bad, model)
  with pytest.raises(TypeError, match="cannot compose a TeaCachePlan"):
    spec.parse_plan("teacache:0.1+fora:2", model, nfe_times=times)


# TeaCache ------------------------------------------------------------------------------------------
def test_teacache_validates_its_inputs():
  with pytest.raises(ValueError, match="rule"):
    teacache.TeaCachePlan(0.1, rule="median")
  with pytest.raises(ValueError, match="threshold"):
    teacache.TeaCachePlan(float("nan"))
  with pytest.raises(ValueError, match="coefficients"):
    teacache.TeaCachePlan(0.1, coefficients=())


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_teacache_equals_the_independent_reference(family):
  model, params = testing.tiny_dit() if family == "dit" else testing.tiny_uvit()
  kw = _dit_cfg() if family == "dit" else dict(num=2, sampler="euler_ode", steps=STEPS)
  plan = teacache.TeaCachePlan(0.2 if family == "dit" else 1.0)
  x, stats = _run(model, params, plan, **kw)
  x_ref, stats_ref = _run(model, params, testing.TeaCacheReference(plan), **kw)
  np.testing.assert_array_equal(stats["blocks"], stats_ref["blocks"])  # the same decisions
  skipped = np.asarray(stats["blocks"]) == 0
  assert 0 < skipped.sum() < STEPS - 2, "the test needs both kinds of NFE"
  assert not skipped[0] and not skipped[-1]
  testing.assert_outputs_close(x, x_ref)
  bb = bb_lib.as_backbone(model)
  sig = bb.step_signature_flops
  np.testing.assert_allclose(stats["flops"], np.where(
      skipped, bb.embed_flops + bb.head_flops + sig, bb.full_flops + sig), rtol=1e-6)


def test_teacache_lowers_to_a_conditional():
  model, params = testing.tiny_dit()
  x, y = testing.example_inputs(model, batch=2)
  assert _has_conditional(model, params, teacache.TeaCachePlan(0.1), x, y)


@pytest.mark.parametrize("rule", teacache.RULES)
def test_teacache_decision_depends_on_every_sample_and_both_cfg_halves(rule):
  """The network sees the CFG-doubled batch [cond; uncond]; changing any one sample, or only
  one half, must flip the batch's skip into a compute."""
  model, params = testing.tiny_dit()
  times = np.linspace(999, 0, 6).astype(np.float32)
  plan = teacache.TeaCachePlan(0.05, rule=rule)
  x, _ = testing.example_inputs(model, batch=2)
  x2 = jnp.concatenate([x, x])                                   # [cond; uncond] as in CFG
  y2 = jnp.concatenate([jnp.array([2, 9]), jnp.full((2,), model.null_class)])
  t = jnp.full((4,), 500.0)

  @jax.jit
  def step(p, xx, i, cache):
    return plan.bind(model, p, times).net(xx, t, y2, i, cache)

  cache = plan.bind(model, params, times).init_cache(x2, y2)
  _, cache, stats0 = step(params, x2, jnp.int32(0), cache)
  assert float(stats0["blocks"]) == 4                            # the first NFE computes
  _, _, same = step(params, x2, jnp.int32(1), cache)
  assert float(same["blocks"]) == 0, "an unchanged input must be skipped"
  noise = 30.0 * jax.random.normal(jax.random.PRNGKey(9), x.shape[1:])
  for k in range(4):                                             # only sample k changes
    _, _, st = step(params, x2.at[k].add(noise), jnp.int32(1), cache)
    assert float(st["blocks"]) == 4, f"sample {k} alone changed a lot and was skipped"
  for half in (slice(0, 2), slice(2, 4)):                        # only one CFG half changes
    _, _, st = step(params, x2.at[half].add(noise), jnp.int32(1), cache)
    assert float(st["blocks"]) == 4, f"CFG half {half} changed a lot and was skipped"


def test_teacache_threshold_sweep_compiles_once_and_zero_is_the_full_network():
  model, params = testing.tiny_dit()
  kw = _dit_cfg()
  full = jaxee.sample(model, params, jax.random.PRNGKey(5), **kw)
  x0, st0 = _run(model, params, teacache.TeaCachePlan(0.0), **kw)
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(full))
  assert (np.asarray(st0["blocks"]) == 4).all()
  before = sampling.trace_count()
  outs = [_run(model, params, teacache.TeaCachePlan(thr), **kw) for thr in (0.05, 1.0)]
  outs.append(_run(model, params, teacache.TeaCachePlan(1.0, coefficients=(3.0, 0.0)), **kw))
  assert sampling.trace_count() == before, "a new threshold / polynomial recompiled"
  skips = [int((np.asarray(s["blocks"]) == 0).sum()) for _, s in outs]
  assert skips[0] < skips[1], skips                              # the traced threshold decides
  assert skips[2] < skips[1], skips                              # so do the coefficients
  assert float(jnp.max(jnp.abs(outs[1][0] - full))) > 0


def test_the_sampling_config_builds_both_baselines(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from jaxee.sharded import run as run_lib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "sample_dit.py"
  module_spec = importlib.util.spec_from_file_location("sample_dit", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.out_dir = str(tmp_path)
  model = models.create("dit", **module.DIT_TINY)
  config.plan = "fora:2:block"
  plan = run_lib.make_plan(config, model)
  num_nfe = len(sampling.nfe_times(model, config.sampler, int(config.steps)))
  np.testing.assert_array_equal(plan.mask, baselines.fora_mask(num_nfe, model.depth, 2))
  config.plan = "teacache:0.3:pooled"
  plan = run_lib.make_plan(config, model)
  assert isinstance(plan, teacache.TeaCachePlan) and plan.rule == "pooled"
