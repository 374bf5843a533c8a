"""The backbone contract: DiT, U-ViT and a toy backbone behind one interface, and every runner
written against it (`jaxee/models/backbone.py`, issue "backbones × plans × runners × samplers").
"""
import gc
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import exits
from jaxee import sampling
from jaxee import testing
from jaxee.eval import flops as flops_lib
from jaxee.models import backbone as bb_lib

from toy_backbone import toy  # pylint: disable=g-bad-import-order


def _models():
  return {"dit": testing.tiny_dit(), "uvit": testing.tiny_uvit(), "toy": toy()}


@pytest.mark.parametrize("name", ["dit", "uvit", "toy"])
@pytest.mark.parametrize("granularity", ["block", "branch"])
def test_units_compose_to_the_exact_forward(name, granularity):
  model, params = _models()[name]
  bb = bb_lib.as_backbone(model, granularity)
  x, y = testing.example_inputs(model, 2) if name != "toy" else (
      jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 2)), jnp.array([0, 2]))
  t = jnp.array([10.0, 700.0])
  want = model.apply({"params": params}, x, t, y)
  got = jax.jit(lambda p: bb_lib.forward_units(bb, p, x, t, y))(params)
  testing.assert_outputs_close(got, want, 1e-6)
  unrolled = bb.embed(params, x, t, y)
  for ref in bb.refs():
    unrolled = bb.run_unit(params, ref, unrolled)
  testing.assert_outputs_close(bb.head(params, unrolled), want, 1e-6)
  assert bb.num_units == bb.num_blocks * (1 if granularity == "block" else 2)


@pytest.mark.parametrize("name", ["dit", "uvit"])
def test_unit_flops_add_up_to_the_backbone_count(name):
  model, _ = _models()[name]
  for granularity in ("block", "branch"):
    bb = bb_lib.as_backbone(model, granularity)
    assert bb.full_flops == pytest.approx(flops_lib.backbone_flops(model), rel=1e-12)
    assert np.all(bb.enter_flops <= bb.unit_flops) and np.all(bb.drop_flops <= bb.unit_flops)


def _toy_plans(model, params, times):
  shallow, shallow_p = toy(seed=5, n_a=1, n_b=1)
  mask = exits.random_mask(len(times), 4, 0.6, seed=1)
  branch_mask = exits.random_mask(len(times), 8, 0.6, seed=2)
  return {
      "ase_loop": exits.ASEPlan((2, 2, 2, 1, 1, 1, 1, 0, 0, 0)),
      "ase_switch": exits.ASEPlan((2, 2, 2, 1, 1, 1, 1, 0, 0, 0), runner="switch"),
      "mask_block": exits.MaskPlan(mask),
      "mask_block_branch_cache": exits.MaskPlan(mask, "block", "branch"),
      "mask_branch": exits.MaskPlan(branch_mask, "branch", "branch"),
      "duodiff": exits.DuoDiffPlan(shallow, shallow_p, t_switch=400),
  }


@pytest.mark.parametrize("kind", ["ase_loop", "ase_switch", "mask_block",
                                  "mask_block_branch_cache", "mask_branch", "duodiff"])
def test_every_runner_accepts_the_toy_backbone_and_matches_its_reference(kind):
  model, params = toy()
  kw = dict(num=2, sampler="ddim", steps=6, labels=jnp.array([1, 2]), guidance=1.5)
  times = sampling.nfe_times(model, "ddim", 6)
  plan = _toy_plans(model, params, times)[kind]
  x, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, return_stats=True,
                          **kw)
  x_ref, stats_ref = jaxee.sample(model, params, jax.random.PRNGKey(0),
                                  plan=testing.ReferencePlan(plan), return_stats=True, **kw)
  testing.assert_outputs_close(x, x_ref, 1e-6)
  np.testing.assert_allclose(stats["flops"], stats_ref["flops"])
  full = jaxee.sample(model, params, jax.random.PRNGKey(0), **kw)
  assert not np.allclose(np.asarray(x), np.asarray(full))  # the plan changed something
  info = plan.bind(model, params, times).info
  assert 0.0 < info["ideal_saving"] < 1.0
  np.testing.assert_allclose(np.asarray(stats["flops"]), info["flops_per_nfe"], rtol=1e-6)


def test_toy_runners_lower_to_loops_and_conditionals():
  model, params = toy()
  times = sampling.nfe_times(model, "ddim", 6)
  plans = _toy_plans(model, params, times)
  x = jnp.zeros((2, 4, 4, 2))
  y = jnp.array([0, 1])

  def hlo(plan):
    def f(p, pl, x, i):
      return pl.bind(model, p, times).net(x, jnp.zeros(2), y, i,
                                          pl.bind(model, p, times).init_cache(x, y))[0]
    return jax.jit(f).lower(params, plan, x, jnp.int32(1)).compile().as_text()

  assert re.search(r"\bwhile\(", hlo(plans["ase_loop"]))
  assert re.search(r"\bconditional\(", hlo(plans["ase_switch"]))
  for kind in ("mask_block", "mask_branch", "duodiff"):
    assert re.search(r"\bconditional\(", hlo(plans[kind])), kind


def test_same_structure_plans_do_not_recompile():
  model, params = testing.tiny_dit()
  kw = dict(num=2, sampler="ddim", steps=5, labels=jnp.array([1, 2]), guidance=1.5)
  jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.ASEPlan((4,) * 10), **kw)
  before = sampling.trace_count()
  for sched in ((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), (4, 4, 4, 4, 3, 3, 3, 2, 2, 2)):
    jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.ASEPlan(sched), **kw)
  times = sampling.nfe_times(model, "ddim", 5)
  for seed in (0, 1):
    mask = exits.random_mask(len(times), 4, 0.5, seed=seed)
    jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.MaskPlan(mask), **kw)
  assert sampling.trace_count() - before == 1  # the two ASE plans: none; the masks: one


def test_nothing_keeps_a_plan_or_its_params_alive():
  model, params = testing.tiny_dit()
  shallow, shallow_p = testing.tiny_dit(depth=1)
  shallow_p = jax.tree.map(lambda a: a + 0.0, shallow_p)  # fresh arrays, owned by this test
  plan = exits.DuoDiffPlan(shallow, shallow_p, t_switch=500)
  jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, num=1, sampler="ddim", steps=4,
               labels=jnp.array([3]))
  plan_ref = weakref.ref(plan)
  leaf_ref = weakref.ref(jax.tree.leaves(shallow_p)[0])
  del plan, shallow_p
  gc.collect()
  assert plan_ref() is None
  assert leaf_ref() is None
