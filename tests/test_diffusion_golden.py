"""DiT Gaussian diffusion against `dit_diffusion_golden.npz` (official DiT `diffusion/`).

The fixture holds respacing maps and betas, p_mean_variance with learned-range sigma, one DDIM
step (eta = 0) and per-sample hybrid training losses for a constant model output. Arrays in the
fixture are NCHW; jaxee is NHWC.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.diffusion import gaussian
from jaxee.diffusion import schedules

SPECS = ("250", "ddim50", "ddim25", "1000")
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURES / "dit_diffusion_golden.npz"))


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def rel_err(ours, ref_nchw):
  """max |ours - ref| / max |ref| (normwise), ours NHWC."""
  ref = np.transpose(ref_nchw, (0, 2, 3, 1)) if ref_nchw.ndim == 4 else ref_nchw
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_space_timesteps_examples():
  assert schedules.space_timesteps(1000, "250")[:6] == [0, 4, 8, 12, 16, 20]
  assert schedules.space_timesteps(1000, "250")[-4:] == [987, 991, 995, 999]
  assert schedules.space_timesteps(1000, "50")[:5] == [0, 20, 41, 61, 82]
  assert schedules.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
  assert len(schedules.space_timesteps(1000, "10,15,20")) == 45
  with pytest.raises(ValueError):
    schedules.space_timesteps(1000, "ddim999")


@pytest.mark.parametrize("spec", SPECS)
def test_respacing_and_betas(golden, spec):
  d = schedules.create_dit_diffusion(spec)
  np.testing.assert_array_equal(d.timestep_map, golden[f"timestep_map_{spec}"])
  ref = golden[f"betas_{spec}"]
  assert d.betas.dtype == np.float64
  assert np.max(np.abs(d.betas - ref) / ref) <= 1e-12


@pytest.mark.parametrize("spec", SPECS)
def test_p_mean_variance_and_ddim_step(golden, spec):
  d = schedules.create_dit_diffusion(spec)
  x, model_out = nhwc(golden["x_t"]), nhwc(golden["model_out"])
  t = golden[f"pmv_t_{spec}"]
  out = gaussian.p_mean_variance(d, model_out, x, t)
  for key in ("mean", "variance", "log_variance", "pred_xstart"):
    err = rel_err(out[key], golden[f"pmv_{key}_{spec}"])
    assert err <= TOL, (spec, key, err)
  x_next = gaussian.ddim_step(d, out, x, t, eta=0.0)
  err = rel_err(x_next, golden[f"ddim_step_{spec}"])
  assert err <= TOL, (spec, "ddim", err)


def test_training_losses(golden):
  d = schedules.create_dit_diffusion("")
  x0, noise, model_out = nhwc(golden["x0"]), nhwc(golden["noise"]), nhwc(golden["model_out"])
  t = golden["train_t"]
  losses = gaussian.training_losses(d, model_out, x0, t, noise)
  for key in ("mse", "vb", "loss"):
    ref = golden[f"train_{key}"]
    assert losses[key].shape == (2,)
    err = float(np.max(np.abs(np.asarray(losses[key]) - ref) / np.abs(ref)))
    assert err <= TOL, (key, err)
  # The callable form sees x_t and the original time index and gives the same losses.
  seen = {}

  def model(x_t, t_net):
    seen["t"] = t_net
    return model_out

  again = gaussian.training_losses(d, model, x0, t, noise)
  np.testing.assert_array_equal(np.asarray(seen["t"]), t.astype(np.float32))
  np.testing.assert_allclose(again["loss"], losses["loss"], rtol=0, atol=0)


def test_vb_term_trains_only_the_variance(golden):
  d = schedules.create_dit_diffusion("")
  x0, noise, model_out = nhwc(golden["x0"]), nhwc(golden["noise"]), nhwc(golden["model_out"])
  t = golden["train_t"]
  grad = jax.grad(lambda m: jnp.sum(gaussian.training_losses(d, m, x0, t, noise)["vb"]))(
      model_out)
  assert float(jnp.max(jnp.abs(grad[..., :4]))) == 0.0
  assert float(jnp.max(jnp.abs(grad[..., 4:]))) > 0.0


def test_q_sample_and_eps_losses():
  d = schedules.create_dit_diffusion("")
  x0 = jnp.ones((2, 2, 2, 4))
  noise = jnp.zeros_like(x0)
  xt = gaussian.q_sample(d, x0, jnp.array([0, 999]), noise)
  expect = np.sqrt(np.cumprod(1 - schedules.linear_betas()))[[0, 999]].astype(np.float32)
  np.testing.assert_allclose(np.asarray(xt[:, 0, 0, 0]), expect, rtol=1e-6)
  sde = schedules.VPSDE()
  out = gaussian.vp_eps_loss(sde, lambda x, tn: jnp.zeros_like(x) + tn[:, None, None, None],
                             x0, jnp.array([0.0, 0.5]), noise)
  np.testing.assert_allclose(np.asarray(out["loss"]), [0.0, 499.5 ** 2], rtol=1e-6)
  sd = schedules.SDDiscreteSchedule()
  out = gaussian.sd_eps_loss(sd, lambda x, tn: jnp.zeros_like(x) + tn[:, None, None, None],
                             x0, jnp.array([1, 1000]), noise)
  np.testing.assert_allclose(np.asarray(out["loss"]), [1.0, 1000.0 ** 2], rtol=1e-6)
