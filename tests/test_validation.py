"""Issue 16 item 5/6: `jaxee.sample` validates its inputs at the public API (`jaxee.validation`).

Every bad call fails before anything is compiled, with one ValueError that says what was wrong.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models, validation

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
            num_classes=10)


@pytest.fixture(scope="module")
def dit():
  model = models.create("dit", **TINY)
  return model, None  # params are never reached: every call below fails validation first


def _sample(dit, **kw):
  model, params = dit
  kw.setdefault("num", 2)
  return jaxee.sample(model, params, jax.random.key(0), **kw)


@pytest.mark.parametrize("labels,match", [
    ([1000, 1], r"labels must be in \[0, 10\)"),
    ([-5, 1], r"labels must be in \[0, 10\)"),
    (np.array([1.7, 2.0]), "integer class ids"),
    (jnp.array([1.0, 2.0]), "integer class ids"),
])
def test_bad_labels_are_refused(dit, labels, match):
  with pytest.raises(ValueError, match=match):
    _sample(dit, sampler="ddim", steps=4, labels=labels)


def test_null_label_only_without_guidance(dit):
  model, _ = dit
  assert model.null_class == 10
  validation.check_labels(model, np.array([10, 3]), guided=False)  # unconditional request
  with pytest.raises(ValueError, match="null label"):
    _sample(dit, sampler="ddim", steps=4, labels=[10, 3], guidance=1.5)


@pytest.mark.parametrize("sampler,steps,schedule,match", [
    ("ddim", 0, None, "steps must be >= 1"),
    ("euler_ode", 0, "vp_continuous", "steps must be >= 1"),
    ("dpm_solver", -3, "vp_continuous", "steps must be >= 1"),
    ("ddim", 2.5, None, "steps must be an integer"),
    ("ddim", 5000, None, "steps=5000 is not possible"),
    ("ddpm", 2000, None, "steps=2000 is not possible"),
])
def test_bad_steps_are_refused(dit, sampler, steps, schedule, match):
  with pytest.raises(ValueError, match=match):
    _sample(dit, sampler=sampler, steps=steps, schedule=schedule)


@pytest.mark.parametrize("sampler,schedule,accepted", [
    ("euler_ode", None, "['ddpm', 'ddim']"),
    ("dpm_solver_pp", None, "['ddpm', 'ddim']"),
    ("ddim", "vp_continuous", "['euler_maruyama', 'euler_ode', 'dpm_solver']"),
    ("dpm_solver", "sd_discrete", "['dpm_solver_pp']"),
])
def test_sampler_schedule_mismatch_names_accepted_samplers(dit, sampler, schedule, accepted):
  with pytest.raises(ValueError, match="use one of") as info:
    _sample(dit, sampler=sampler, steps=4, schedule=schedule)
  assert accepted in str(info.value)


def test_mismatch_with_a_schedule_object(dit):
  from jaxee.diffusion import schedules
  with pytest.raises(ValueError, match="'vp_continuous' schedule"):
    _sample(dit, sampler="ddim", steps=4, schedule=schedules.get_schedule("vp_continuous"))


@pytest.mark.parametrize("guidance,labels,match", [
    (float("nan"), [1, 2], "guidance must be finite"),
    (float("inf"), [1, 2], "guidance must be finite"),
    (1.5, None, "needs labels"),
])
def test_bad_guidance_is_refused(dit, guidance, labels, match):
  with pytest.raises(ValueError, match=match):
    _sample(dit, sampler="ddim", steps=4, labels=labels, guidance=guidance)


def test_bad_num_is_refused(dit):
  with pytest.raises(ValueError, match="num must be"):
    _sample(dit, num=0, sampler="ddim", steps=4)


def test_check_finite_names_what():
  validation.check_finite(np.ones(3, np.float32), "ok")
  validation.check_finite(np.arange(3), "ints are always finite")
  with pytest.raises(validation.NonFiniteError, match="samples of shard 3.*2 non-finite"):
    validation.check_finite(np.array([1.0, np.nan, np.inf]), "samples of shard 3, batch 0")


def test_unknown_schedule_name_is_refused(dit):
  with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
    _sample(dit, sampler="ddim", steps=4, schedule="cosine")


def test_non_finite_samples_are_refused_at_the_public_api(fixtures_dir):
  from jaxee import convert
  model = models.create("dit", **TINY)
  params = convert.from_torch(fixtures_dir / "dit_tiny.pt", "dit", **TINY)
  params = jax.tree.map(lambda p: np.full_like(p, np.nan), params)
  kw = dict(num=2, sampler="ddim", steps=2, labels=jnp.array([1, 2]))
  with pytest.raises(validation.NonFiniteError, match=r"samples of jaxee.sample \(ddim, 2 steps\)"):
    jaxee.sample(model, params, jax.random.key(0), **kw)
  out = jaxee.sample(model, params, jax.random.key(0), check_finite=False, **kw)
  assert np.isnan(np.asarray(out)).all()
