"""DuoDiff: the switch step on any sampler grid, the scalar-cond runner and the two-scan sampler."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models
from jaxee import sampling
from jaxee.eval import flops as flops_lib
from jaxee.exits import duodiff
from jaxee import testing


@pytest.fixture(scope="module")
def models_and_params():
  deep, deep_p = testing.tiny_dit(depth=4)
  shallow, shallow_p = testing.tiny_dit(rng=jax.random.PRNGKey(7), depth=1)
  return deep, deep_p, shallow, shallow_p


def _times(model, sampler, steps):
  return sampling.nfe_times(model, sampler, steps)


def test_ddpm_1000_runs_t_switch_shallow_steps(models_and_params):
  deep, _, shallow, _ = models_and_params
  times = _times(deep, "ddpm", 1000)
  for t_s in (300, 400, 500):
    plan = duodiff.DuoDiffPlan(shallow, t_switch=t_s)
    assert plan.split_index(deep, times) == t_s  # t = 999 … 1000 − t_s
  assert duodiff.DuoDiffPlan(shallow, t_switch=0).split_index(deep, times) == 0
  assert duodiff.DuoDiffPlan(shallow, t_switch=1000).split_index(deep, times) == 1000


def test_original_ddim_grid_with_lagged_switch(models_and_params):
  # duodiff sampler.py DDIM: grid linspace(0, 999, 50).astype(int) reversed, 49 evaluations,
  # switch tested after the update: 16/21/26 shallow evaluations for t_s = 300/400/500.
  deep, _, shallow, _ = models_and_params
  times = np.linspace(0, 999, 50).astype(int)[::-1][:-1].astype(np.float32)
  got = [duodiff.DuoDiffPlan(shallow, t_switch=t, rule="lagged").split_index(deep, times)
         for t in (300, 400, 500)]
  assert got == [16, 21, 26]


def test_dit_ddim_50_grid(models_and_params):
  deep, _, shallow, _ = models_and_params
  times = _times(deep, "ddim", 50)  # 980, 960, …, 0
  assert duodiff.DuoDiffPlan(shallow, t_switch=300).split_index(deep, times) == 15  # 980…700
  assert duodiff.DuoDiffPlan(shallow, t_switch=300, rule="lagged").split_index(deep, times) == 16


@pytest.mark.parametrize("sampler", ["dpm_solver", "euler_maruyama"])
def test_continuous_grids_switch_at_the_same_chain_time(sampler):
  deep = models.create("uvit", img_size=8, depth=6, embed_dim=32, num_heads=4)
  shallow = deep.clone(depth=2, parent=None)
  times = _times(deep, sampler, 20)
  tau = times.astype(np.float64) / 999.0  # vp_continuous: t_net = 999 t
  k = duodiff.DuoDiffPlan(shallow, t_switch=400).split_index(deep, times)
  assert 0 < k < len(times)
  assert (tau[:k] >= 0.6 - 1e-9).all() and (tau[k:] < 0.6).all()


def test_params_binding_and_errors(models_and_params):
  deep, deep_p, shallow, shallow_p = models_and_params
  times = _times(deep, "ddim", 10)
  plan = duodiff.DuoDiffPlan(shallow, t_switch=300)
  with pytest.raises(ValueError, match="no shallow params"):
    plan.bind(deep, deep_p, times)
  info = plan.bind(deep, plan.pack(deep_p, shallow_p), times).info
  np.testing.assert_array_equal(info["blocks_per_nfe"], [1, 1, 1, 4, 4, 4, 4, 4, 4, 4])
  full, small = flops_lib.backbone_flops(deep), flops_lib.backbone_flops(shallow)
  assert info["ideal_saving"] == pytest.approx(0.3 * (full - small) / full)
  assert info["split_index"] == 3
  uvit, _ = testing.tiny_uvit()
  with pytest.raises(ValueError, match="same family"):
    duodiff.DuoDiffPlan(uvit, t_switch=300).bind(deep, plan.pack(deep_p, shallow_p), times)
  with pytest.raises(ValueError, match="t_switch"):
    duodiff.DuoDiffPlan(shallow, t_switch=1200)


def test_net_compiles_to_a_two_branch_conditional(models_and_params):
  deep, deep_p, shallow, shallow_p = models_and_params
  plan = duodiff.DuoDiffPlan(shallow, t_switch=300)
  times = _times(deep, "ddim", 10)
  x, y = testing.example_inputs(deep)

  def f(p, x, t, y, i):
    return plan.bind(deep, p, times).net(x, t, y, i, ())[0]

  hlo = jax.jit(f).lower(plan.pack(deep_p, shallow_p), x, jnp.zeros(2), y,
                         jnp.int32(0)).compile().as_text()
  branches = re.findall(r"conditional\(.*branch_computations=\{([^}]*)\}", hlo)
  assert len(branches) == 1 and len(branches[0].split(",")) == 2


def test_sampler_with_cfg_equals_reference_and_split_scan(models_and_params):
  deep, deep_p, shallow, shallow_p = models_and_params
  plan = duodiff.DuoDiffPlan(shallow, t_switch=400)
  params = plan.pack(deep_p, shallow_p)
  labels = jnp.array([1, 6])
  kw = dict(num=2, sampler="ddim", steps=8, labels=labels, guidance=1.5)
  x, stats = jaxee.sample(deep, params, jax.random.PRNGKey(2), plan=plan, return_stats=True, **kw)
  x_ref = jaxee.sample(deep, params, jax.random.PRNGKey(2), plan=testing.ReferencePlan(plan),
                       **kw)
  testing.assert_outputs_close(x, x_ref)
  split = plan.split_index(deep, np.asarray(stats["nfe_times"]))
  np.testing.assert_array_equal(stats["blocks"], [1] * split + [4] * (8 - split))
  assert 0 < split < 8


def test_plan_params_and_t_switch_are_traced_arguments(models_and_params):
  """Shallow params inside the plan are a traced leaf: a t_s sweep compiles once, and the
  result equals passing them packed with the deep params."""
  deep, deep_p, shallow, shallow_p = models_and_params
  kw = dict(num=1, sampler="ddpm", steps=6, labels=jnp.array([0]), return_stats=True)
  packed = duodiff.DuoDiffPlan(shallow, t_switch=500)
  x_ref, _ = jaxee.sample(deep, packed.pack(deep_p, shallow_p), jax.random.PRNGKey(0),
                          plan=packed, **kw)
  before = sampling.trace_count()
  for t_s in (500.0, 300.0, 700.0):
    plan = duodiff.DuoDiffPlan(shallow, shallow_p, t_switch=t_s)
    x, stats = jaxee.sample(deep, deep_p, jax.random.PRNGKey(0), plan=plan, **kw)
    k = plan.split_index(deep, np.asarray(stats["nfe_times"]))
    np.testing.assert_array_equal(stats["blocks"], [1] * k + [4] * (6 - k))
    if t_s == 500.0:
      testing.assert_outputs_close(x, x_ref)
  assert sampling.trace_count() - before <= 1  # at most the first (params-in-plan) structure
