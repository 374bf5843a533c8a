"""Samplers against `uvit_samplers_golden.npz` (official U-ViT samplers) and the scan contract.

The golden trajectories were produced with the fake noise-prediction network
`eps(x, t_in) = 0.3 x + 0.001 t_in`, where t_in is the time the real network would receive.
"""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.diffusion import dpm_solver
from jaxee.diffusion import guidance
from jaxee.diffusion import sampler_core
from jaxee.diffusion import samplers
from jaxee.diffusion import samplers_discrete
from jaxee.diffusion import schedules

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURES / "uvit_samplers_golden.npz"))


def fake_eps(x, t_net, nfe_index, cache):
  del nfe_index
  return 0.3 * x + 0.001 * t_net[:, None, None, None], cache, {}


def rel_err(ours, ref_nchw):
  ref = np.transpose(ref_nchw, (0, 2, 3, 1))
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name,schedule,steps,key", [
    ("euler_ode", "vp", 10, "em_ode_10"),
    ("euler_ode", "vp", 50, "em_ode_50"),
    ("dpm_solver", "vp", 10, "dpm_solver_fast_10"),
    ("dpm_solver", "vp", 25, "dpm_solver_fast_25"),
    ("dpm_solver", "vp", 50, "dpm_solver_fast_50"),
    ("dpm_solver_pp", "sd", 10, "dpm_solver_pp_10"),
    ("dpm_solver_pp", "sd", 25, "dpm_solver_pp_25"),
    ("dpm_solver_pp", "sd", 50, "dpm_solver_pp_50"),
])
def test_uvit_golden(golden, name, schedule, steps, key):
  if schedule == "vp":
    sched = schedules.VPSDE()
  else:
    sched = schedules.SDDiscreteSchedule(golden["sd_betas"])
  x_T = jnp.asarray(np.transpose(golden["x_T"], (0, 2, 3, 1)))
  sampler = samplers.get_sampler(name)
  x, _, stats = sampler.sample(fake_eps, sched, jax.random.PRNGKey(0), x_T, steps=steps)
  err = rel_err(x, golden[key])
  assert err <= TOL, (key, err)
  assert len(sampler.nfe_times(sched, steps=steps)) == steps
  assert stats == {}


def test_fast_orders_and_grids():
  assert dpm_solver.fast_orders(50) == [3] * 16 + [2]
  assert dpm_solver.fast_orders(25) == [3] * 8 + [1]
  assert dpm_solver.fast_orders(12) == [3] * 3 + [2, 1]
  t = samplers.nfe_times("dpm_solver_pp", schedules.SDDiscreteSchedule(), steps=50) / 1000
  np.testing.assert_allclose(t[:3], [1.0, 0.98002, 0.96004], atol=2e-5)
  t = samplers.nfe_times("euler_ode", schedules.VPSDE(), steps=1000) / 999
  np.testing.assert_allclose(t[[0, 1, -1]], [1.0, 0.999, 0.001], atol=1e-6)


def constant_model(x, t_net, nfe_index, cache):
  del t_net, nfe_index
  return jnp.concatenate([0.1 * jnp.ones_like(x), 0.2 * jnp.ones_like(x)], -1), cache, {}


@pytest.mark.parametrize("name,spec", [("ddpm", "25"), ("ddim", "ddim25")])
def test_ddpm_ddim_finite(name, spec):
  d = schedules.create_dit_diffusion(spec)
  x, _, _ = samplers.get_sampler(name).sample(constant_model, d, jax.random.PRNGKey(1),
                                              shape=(2, 4, 4, 4))
  assert x.shape == (2, 4, 4, 4)
  assert bool(jnp.all(jnp.isfinite(x)))


def _normalized_hlo(lowered):
  return re.sub(r"\d+", "N", lowered.as_text())


@pytest.mark.parametrize("loop", ["ddpm", "ddim"])
def test_hlo_independent_of_step_count(loop):
  x = jnp.zeros((2, 4, 4, 4))
  texts = []
  for spec in ("25", "250"):
    tables = sampler_core.as_jnp(
        samplers_discrete.step_tables(schedules.create_dit_diffusion(spec)))
    if loop == "ddpm":
      low = samplers_discrete.ddpm_loop.lower(constant_model, x, jax.random.PRNGKey(0), None,
                                              tables)
    else:
      low = samplers_discrete.ddim_loop.lower(constant_model, x, jax.random.PRNGKey(0), None,
                                              tables, jnp.float32(0.0))
    texts.append(_normalized_hlo(low))
  assert len(texts[0]) == len(texts[1])
  assert texts[0] == texts[1]


def test_dpm_solver_hlo_independent_of_step_count():
  x = jnp.zeros((2, 4, 4, 3))
  texts = []
  for steps in (20, 50):  # both end with an order-2 step.
    tables = sampler_core.as_jnp(
        dpm_solver.pack_tables(dpm_solver.dpm_solver_fast_steps(schedules.VPSDE(), steps)))
    texts.append(_normalized_hlo(dpm_solver.solver_loop.lower(fake_eps, x, None, tables)))
  assert texts[0] == texts[1]


def counting_denoiser(x, t_net, nfe_index, cache):
  stats = {"nfe": nfe_index.astype(jnp.float32), "t": t_net[0], "count": cache.astype(jnp.float32)}
  return 0.3 * x, cache + 1, stats


@pytest.mark.parametrize("name,schedule,opts", [
    ("ddpm", "dit10", {}),
    ("ddim", "dit10", {"eta": 1.0}),
    ("euler_maruyama", "vp", {"steps": 7}),
    ("euler_ode", "vp", {"steps": 7}),
    ("dpm_solver", "vp", {"steps": 12}),  # orders [3, 3, 3, 2, 1].
    ("dpm_solver_pp", "sd", {"steps": 11}),  # orders [3, 3, 3, 2].
])
def test_nfe_index_cache_and_stats(name, schedule, opts):
  sched = {"dit10": schedules.create_dit_diffusion("10", learn_sigma=False),
           "vp": schedules.VPSDE(), "sd": schedules.SDDiscreteSchedule()}[schedule]
  sampler = samplers.get_sampler(name)
  n = sampler.num_nfe(sched, **opts)
  x, cache, stats = sampler.sample(counting_denoiser, sched, jax.random.PRNGKey(2),
                                   shape=(2, 4, 4, 3), cache=jnp.int32(0), **opts)
  assert int(cache) == n
  for key in ("nfe", "t", "count"):
    assert stats[key].shape == (n,)
  np.testing.assert_array_equal(np.asarray(stats["nfe"]), np.arange(n))
  np.testing.assert_array_equal(np.asarray(stats["count"]), np.arange(n))
  np.testing.assert_array_equal(np.asarray(stats["t"]), sampler.nfe_times(sched, **opts))
  assert bool(jnp.all(jnp.isfinite(x)))


def fake_net(x, t_net, y, nfe_index, cache):
  """Output channels depend on the label, so cond and uncond halves differ."""
  del t_net, nfe_index
  c = jnp.arange(x.shape[-1] * 2, dtype=jnp.float32)
  out = jnp.concatenate([x, x], -1) + y.astype(jnp.float32)[:, None, None, None] * (1.0 + c)
  return out, cache, {"batch": jnp.float32(x.shape[0])}


def test_guidance_wrappers():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 2, 4))
  labels = jnp.array([3, 5])
  t = jnp.zeros((2,))
  cond = fake_net(x, t, labels, 0, None)[0]
  uncond = fake_net(x, t, jnp.full((2,), 1000), 0, None)[0]
  out, _, stats = guidance.dit_cfg(fake_net, labels, 1000, 4.0)(x, t, 0, None)
  assert out.shape == (2, 2, 2, 8) and float(stats["batch"]) == 4.0
  guided = uncond[..., :3] + 4.0 * (cond[..., :3] - uncond[..., :3])
  np.testing.assert_allclose(out[..., :3], guided)
  np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])
  out, _, _ = guidance.uvit_cfg(fake_net, labels, 1000, 0.4)(x, t, 0, None)
  np.testing.assert_allclose(out, cond + 0.4 * (cond - uncond))
  out, _, stats = guidance.no_guidance(fake_net, labels)(x, t, 0, None)
  np.testing.assert_array_equal(out, cond)
  assert float(stats["batch"]) == 2.0
