"""DuoDiff details (issue 12, item 3): β̃ DDPM, t/1000 input, DuoDiff's DDIM grid, no label
dropout for the shallow model, attribution.

The references are written here independently of `jaxee.diffusion`: the DDPM posterior variance
(Ho et al. Eq. 7; IDDPM `posterior_variance`, `posterior_log_variance_clipped`) in float64, the
ancestral step x_{t−1} = μ̃ + sqrt(β̃)·z with μ̃ = (x − β/sqrt(1 − ᾱ)·ε)/sqrt(α) (DDPM Eq. 11,
DuoDiff `predict_noise_postprocessing`) and DuoDiff's deterministic DDIM update
x_s = sqrt(ᾱ_s/ᾱ_t)(x − sqrt(1 − ᾱ_t) ε) + sqrt(1 − ᾱ_s) ε (`sampler.py`).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models
from jaxee import sampling
from jaxee.diffusion import gaussian
from jaxee.diffusion import schedules
from jaxee.train.objectives import duodiff as duodiff_obj

ROOT = pathlib.Path(__file__).resolve().parents[1]
B = 2


def _tiny_uvit(**kw):
  cfg = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2,
             num_classes=-1, default_schedule="linear_discrete")
  cfg.update(kw)
  return models.create("uvit", **cfg)


def _params(model, seed=0):
  x = jnp.zeros((1, 8, 8, 1), jnp.float32)
  y = None if model.num_classes <= 0 else jnp.zeros((1,), jnp.int32)
  return model.init(jax.random.PRNGKey(seed), x, jnp.zeros((1,)), y)["params"]


def _chain64():
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  return betas, np.cumprod(1.0 - betas)


def _eps(model, params, x, t):
  return np.asarray(model.apply({"params": params}, jnp.asarray(x, jnp.float32),
                                jnp.full((x.shape[0],), t, jnp.float32)), np.float64)


# ------------------------------------------------------------------------------------------------
# (1) β̃ DDPM on the linear chain for U-ViT.


def test_uvit_linear_chain_posterior_variance_matches_ddpm_closed_form():
  model = _tiny_uvit()
  sched = sampling.default_schedule(model, "ddpm", 1000)
  assert sched.var_type == "fixed_large"          # the default is unchanged: β
  betas, abar = _chain64()
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)          # DDPM Eq. 7, β̃_t
  post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
  np.testing.assert_allclose(sched.tables64["posterior_variance"], post_var, rtol=1e-10, atol=0)
  np.testing.assert_allclose(sched.tables64["posterior_log_variance_clipped"],
                             post_logvar_clipped, rtol=1e-10)
  assert post_var[0] == 0.0
  # what the fixed_small sampler uses, gathered in float32 at every step
  x = jnp.zeros((1, 2, 2, 1), jnp.float32)
  for t in (0, 1, 2, 500, 999):
    var, log_var = gaussian.model_log_variance(sched.at(jnp.array([t])), None, x, "fixed_small")
    np.testing.assert_allclose(float(log_var[0, 0, 0, 0]), post_logvar_clipped[t], rtol=1e-6)
    np.testing.assert_allclose(float(var[0, 0, 0, 0]), post_var[t], rtol=1e-6)
    _, log_large = gaussian.model_log_variance(sched.at(jnp.array([t])), None, x, "fixed_large")
    np.testing.assert_allclose(float(log_large[0, 0, 0, 0]),
                               np.log(post_var[1] if t == 0 else betas[t]), rtol=1e-6)


def _ddpm_reference(model, params, x_T, noise, var_type):
  """Hand-written 2-step DDPM on the respaced chain {0, 999}: x ← μ̃ + 1[i≠0]·σ·z."""
  _, abar_full = _chain64()
  kept = [0, 999]
  abar = abar_full[kept]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / abar_prev
  x = np.asarray(x_T, np.float64)
  for k, i in enumerate((1, 0)):
    eps = _eps(model, params, x, kept[i])
    mean = (x - betas[i] / np.sqrt(1.0 - abar[i]) * eps) / np.sqrt(1.0 - betas[i])
    if var_type == "fixed_small":
      var = betas[i] * (1.0 - abar_prev[i]) / (1.0 - abar[i])
    else:  # fixed_large: β_i (β̃_1 at i = 0, masked anyway)
      var = betas[i]
    x = mean + (np.sqrt(var) * np.asarray(noise[k], np.float64) if i != 0 else 0.0)
  return x


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_two_step_ddpm_with_recorded_noise_matches_numpy(var_type):
  model = _tiny_uvit()
  params = _params(model)
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal((B, 8, 8, 1)).astype(np.float32)
  noise = rng.standard_normal((2, B, 8, 8, 1)).astype(np.float32)
  got = jaxee.sample(model, params, jax.random.PRNGKey(1), x_T=x_T, sampler="ddpm", steps=2,
                     noise=noise, var_type=var_type)
  want = _ddpm_reference(model, params, x_T, noise, var_type)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-5 * scale)


def test_ddpm_var_type_default_and_errors():
  model = _tiny_uvit()
  params = _params(model)
  rng = np.random.default_rng(1)
  x_T = rng.standard_normal((B, 8, 8, 1)).astype(np.float32)
  noise = rng.standard_normal((2, B, 8, 8, 1)).astype(np.float32)
  kw = dict(x_T=x_T, sampler="ddpm", steps=2, noise=noise)
  default = jaxee.sample(model, params, jax.random.PRNGKey(0), **kw)
  large = jaxee.sample(model, params, jax.random.PRNGKey(0), var_type="fixed_large", **kw)
  small = jaxee.sample(model, params, jax.random.PRNGKey(0), var_type="fixed_small", **kw)
  np.testing.assert_array_equal(np.asarray(default), np.asarray(large))
  assert not np.allclose(np.asarray(small), np.asarray(large))
  with pytest.raises(ValueError, match="var_type must be one of"):
    jaxee.sample(model, params, jax.random.PRNGKey(0), var_type="beta_tilde", **kw)
  with pytest.raises(ValueError, match="takes no option"):
    jaxee.sample(model, params, jax.random.PRNGKey(0), x_T=x_T, sampler="ddim", steps=2,
                 var_type="fixed_small")


# ------------------------------------------------------------------------------------------------
# (2) t/1000 input (DuoDiff's `normalize_timesteps`).


def test_normalize_timesteps_feeds_t_over_1000():
  plain = _tiny_uvit()
  norm = _tiny_uvit(normalize_timesteps=True)
  assert plain.normalize_timesteps is False
  params = _params(plain)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8, 1)), jnp.float32)
  t = jnp.array([0.0, 499.0, 999.0], jnp.float32)
  got = norm.apply({"params": params}, x, t)
  want = plain.apply({"params": params}, x, t / jnp.float32(1000.0))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not np.allclose(np.asarray(got), np.asarray(plain.apply({"params": params}, x, t)))
  # through the unit contract (what every plan runs) too
  from jaxee.models.backbone import as_backbone, forward_units  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(np.asarray(forward_units(as_backbone(norm), params, x, t)),
                             np.asarray(got), rtol=1e-5, atol=1e-5)


def _load_config(arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("duodiff_cfg", ROOT / "configs" / "duodiff.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_duodiff_configs_time_input():
  for dataset, want in (("cifar10", True), ("celeba", True), ("imagenet64", False),
                        ("imagenet256", False)):
    c = _load_config(dataset)
    model = models.create(c.model.arch, **c.model.overrides)
    assert model.normalize_timesteps is want, dataset
    assert model.default_schedule == "linear_discrete"
    assert c.loss.label_dropout is None       # the objective's default (0) applies


# ------------------------------------------------------------------------------------------------
# (3) DuoDiff's DDIM grid.


def test_linspace_grid():
  g = schedules.space_timesteps(1000, "linspace50")
  assert g == [int(v) for v in np.linspace(0, 999, 50).astype(int)]
  assert g[:5] == [0, 20, 40, 61, 81] and g[-2:] == [978, 999] and len(set(g)) == 50
  assert schedules.space_timesteps(1000, "linspace3") == [0, 499, 999]
  assert schedules.space_timesteps(1000, "ddim50")[:3] == [0, 20, 40]   # DiT's: stride 20
  model = _tiny_uvit()
  times = sampling.nfe_times(model, "ddim", 50, grid="duodiff")
  np.testing.assert_array_equal(times, np.asarray(g[::-1][:-1], np.float32))   # 49 NFEs
  assert len(sampling.nfe_times(model, "ddim", 50)) == 50
  # DuoDiff's lagged switch on its own grid: 16/21/26 shallow NFEs of 49 (ee_methods.md §3.3)
  from jaxee.exits import duodiff  # pylint: disable=g-import-not-at-top
  shallow = _tiny_uvit(depth=0)
  assert [duodiff.DuoDiffPlan(shallow, t_switch=t, rule="lagged").split_index(model, times)
          for t in (300, 400, 500)] == [16, 21, 26]
  with pytest.raises(ValueError, match="grid"):
    sampling.nfe_times(model, "ddim", 50, grid="uniform")


def test_duodiff_ddim_grid_matches_numpy():
  model = _tiny_uvit()
  params = _params(model, seed=3)
  x_T = np.random.default_rng(3).standard_normal((B, 8, 8, 1)).astype(np.float32)
  got = jaxee.sample(model, params, jax.random.PRNGKey(0), x_T=x_T, sampler="ddim", steps=3,
                     grid="duodiff")
  _, abar = _chain64()
  grid = np.linspace(0, 999, 3).astype(int)[::-1]      # [999, 499, 0]
  x = np.asarray(x_T, np.float64)
  for t, s in zip(grid[:-1], grid[1:]):
    eps = _eps(model, params, x, t)
    x = (np.sqrt(abar[s] / abar[t]) * (x - np.sqrt(1 - abar[t]) * eps)
         + np.sqrt(1 - abar[s]) * eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), x, rtol=0,
                             atol=2e-5 * np.abs(x).max())


# ------------------------------------------------------------------------------------------------
# (4) No label dropout for DuoDiff's shallow model unless configured.


def test_shallow_loss_has_no_label_dropout_by_default():
  model = _tiny_uvit(num_classes=11, cfg_null_class=10)
  params = _params(model)
  rng = np.random.default_rng(4)
  batch = {"image": rng.standard_normal((8, 8, 8, 1)).astype(np.float32),
           "label": np.arange(8, dtype=np.int32)}
  key = jax.random.PRNGKey(5)
  default = duodiff_obj.make_duodiff_loss(model)(params, batch, key)[0]
  zero = duodiff_obj.make_duodiff_loss(model, label_dropout=0.0)(params, batch, key)[0]
  always = duodiff_obj.make_duodiff_loss(model, label_dropout=1.0)(params, batch, key)[0]
  null = dict(batch, label=np.full((8,), 10, np.int32))
  null_loss = duodiff_obj.make_duodiff_loss(model)(params, null, key)[0]
  assert float(default) == float(zero)
  assert float(always) == float(null_loss) and float(always) != float(default)


# ------------------------------------------------------------------------------------------------
# (5) Attribution.


@pytest.mark.parametrize("path", ["configs/duodiff.py", "docs/methods/duodiff.md"])
def test_duodiff_attribution(path):
  text = (ROOT / path).read_text(encoding="utf-8")
  assert "Fang" not in text
  for name in ("Gallo Fernández", "Matişan", "Monroy Muñoz", "Vasilcoiu", "Partyka",
               "Hadži Veljković", "Jazbec"):
    assert name in text, name
