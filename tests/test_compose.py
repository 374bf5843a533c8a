"""Composed plans (`jaxee.exits.compose`, `composition.py`) and the one plan-spec language (`jaxee.exits.spec`)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import exits
from jaxee import sampling
from jaxee import testing
from jaxee.exits import spec as spec_lib
from jaxee.models import backbone as bb_lib

from toy_backbone import toy  # pylint: disable=g-bad-import-order

KW = dict(num=2, sampler="ddim", steps=6, guidance=1.5)


def _model(name):
  if name == "dit":
    return testing.tiny_dit()
  if name == "uvit":
    model, params = testing.tiny_uvit(num_classes=11, cfg_null_class=10,
                                      default_schedule="linear_discrete")
    return model, params
  return toy()


def _composed(name, model, kind):
  times = sampling.nfe_times(model, "ddim", 6)
  bb = bb_lib.as_backbone(model)
  cap = bb.num_units - bb.tail_start
  depth = exits.ASEPlan(tuple(max(1, cap - k // 3) for k in range(10)))
  unit = "branch" if kind.endswith("branch") else "block"
  units = bb_lib.as_backbone(model, unit).num_units
  mask = exits.MaskPlan(exits.random_mask(len(times), units, 0.6, seed=3), unit,
                        "branch" if unit == "branch" else "block_output")
  shallow = model.clone(**({"n_a": 1, "n_b": 1} if name == "toy" else {"depth": 2}), parent=None)
  shallow_p = testing.random_params(shallow, jax.random.PRNGKey(9)) if name != "toy" else toy(
      seed=9, n_a=1, n_b=1)[1]
  phase = exits.DuoDiffPlan(shallow, shallow_p, t_switch=400)
  return {"ase+mask": exits.compose(depth, mask),
          "ase+mask_branch": exits.compose(mask, depth),
          "duodiff+ase": exits.compose(phase, depth),
          "duodiff+mask": exits.compose(phase, mask),
          "duodiff+ase+mask": exits.compose(phase, depth, mask)}[kind]


@pytest.mark.parametrize("name", ["dit", "uvit", "toy"])
@pytest.mark.parametrize("kind", ["ase+mask", "ase+mask_branch", "duodiff+ase", "duodiff+mask",
                                  "duodiff+ase+mask"])
def test_composed_plans_equal_their_compute_everything_reference(name, kind):
  model, params = _model(name)
  plan = _composed(name, model, kind)
  labels = jnp.array([1, 2])
  x, st = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, labels=labels,
                       return_stats=True, **KW)
  x_ref = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=testing.ReferencePlan(plan),
                       labels=labels, **KW)
  testing.assert_outputs_close(x, x_ref, 1e-6)
  info = plan.bind(model, params, np.asarray(st["nfe_times"])).info
  np.testing.assert_allclose(np.asarray(st["flops"]), info["flops_per_nfe"], rtol=1e-6)
  assert 0.0 < info["ideal_saving"] < 1.0


def test_depth_plus_cache_flops_are_the_sum_of_their_parts():
  model, params = testing.tiny_dit()
  times = sampling.nfe_times(model, "ddim", 6)
  bb = bb_lib.as_backbone(model)
  depth = exits.ASEPlan((4, 4, 3, 3, 2, 2, 1, 1, 1, 1))
  ones = exits.MaskPlan(np.ones((len(times), 4), bool))
  both = exits.compose(depth, ones).bind(model, params, times).info
  alone = depth.bind(model, params, times).info
  np.testing.assert_allclose(both["flops_per_nfe"], alone["flops_per_nfe"])
  half = np.ones((len(times), 4), bool)
  half[1:, 0] = False  # block 0 reused after the first NFE
  info = exits.compose(depth, exits.MaskPlan(half)).bind(model, params, times).info
  np.testing.assert_allclose(alone["flops_per_nfe"] - info["flops_per_nfe"],
                             [0] + [bb.unit_flops[0]] * (len(times) - 1))


def test_composed_runner_lowers_to_loops_and_conditionals_and_compiles_once():
  model, params = testing.tiny_dit()
  times = sampling.nfe_times(model, "ddim", 6)
  depth = exits.ASEPlan((4, 4, 3, 3, 2, 2, 1, 1, 1, 1))
  mask = exits.MaskPlan(exits.random_mask(len(times), 4, 0.5, seed=0))
  plan = exits.compose(depth, mask)
  x, y = testing.example_inputs(model, 2)

  def f(p, pl, x, i):
    bound = pl.bind(model, p, times)
    return bound.net(x, jnp.zeros(2), y, i, bound.init_cache(x, y))[0]
  hlo = jax.jit(f).lower(params, plan, x, jnp.int32(1)).compile().as_text()
  assert re.search(r"\bwhile\(", hlo) and re.search(r"\bconditional\(", hlo)
  labels = jnp.array([1, 2])
  jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, labels=labels, **KW)
  before = sampling.trace_count()
  other = exits.compose(exits.ASEPlan((4,) * 10),
                        exits.MaskPlan(exits.random_mask(len(times), 4, 0.3, seed=1)))
  jaxee.sample(model, params, jax.random.PRNGKey(0), plan=other, labels=labels, **KW)
  assert sampling.trace_count() == before


def test_nonsense_compositions_are_refused():
  model, params = testing.tiny_dit()
  times = sampling.nfe_times(model, "ddim", 6)
  a = exits.ASEPlan((4,) * 10)
  m = exits.MaskPlan(np.ones((len(times), 4), bool))
  with pytest.raises(ValueError, match="two depth schedules"):
    exits.compose(a, a)
  with pytest.raises(ValueError, match="two masks"):
    exits.compose(m, m)
  with pytest.raises(ValueError, match="at least two"):
    exits.compose(a)
  dee, _ = exits.deediff.benchmark_plan(model, params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="DeeDiff"):
    exits.compose(a, dee)
  with pytest.raises(ValueError, match="block-output mask"):
    exits.compose(dee, exits.MaskPlan(np.ones((len(times), 8), bool), "branch", "branch"))
  with pytest.raises(TypeError, match="cannot compose"):
    exits.compose(a, "mask")


def test_spec_language_covers_every_kind_and_compositions(tmp_path):
  model, params = testing.tiny_dit()
  times = sampling.nfe_times(model, "ddim", 6)
  assert spec_lib.parse_plan("none", model) is None
  ase = spec_lib.parse_plan("ase:D3-DiT", model, options={"depth": "auto"})
  assert ase.table == (4, 4, 3, 3, 3, 3, 2, 2, 2, 2)
  assert spec_lib.parse_plan("ase:4,4,3,3,2,2,1,1,1,1:switch", model).runner == "switch"
  mask = spec_lib.parse_plan("mask:skip=0.5", model, nfe_times=times)
  assert mask.mask.shape == (len(times), 4) and mask.unit == "block"
  path = tmp_path / "m.npz"
  mask.save(str(path))
  np.testing.assert_array_equal(spec_lib.parse_plan(f"mask:{path}", model).mask, mask.mask)
  np.testing.assert_array_equal(spec_lib.parse_plan(f"file:{path}", model).mask, mask.mask)
  both = spec_lib.parse_plan("ase:D3-DiT+mask:skip=0.3:branch", model, nfe_times=times,
                             options={"depth": "auto"})
  assert isinstance(both, exits.ComposedPlan) and both.cache.unit == "branch"
  duo = spec_lib.parse_plan("duodiff:300:random=1", model)
  assert duo.t_switch == 300.0 and duo.shallow_model.depth == 1
  dee = spec_lib.parse_plan("deediff:scripted=1,3", model, params=params)
  assert dee.mode == "batched"
  for bad, msg in (("ase", "table name"), ("mask:skip=2", r"\[0, 1\]"), ("nope:1", "unknown plan"),
                   ("mask:/no/such.npz", "does not exist"), ("duodiff:abc", "number"),
                   ("ase:D9-DiT", "unknown ASE schedule")):
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
      spec_lib.parse_plan(bad, model, nfe_times=times)


@pytest.mark.parametrize("name", ["dit", "uvit", "toy"])
def test_deediff_with_a_block_cache_equals_its_reference(name):
  model, params = _model(name)
  times = sampling.nfe_times(model, "ddim", 6)
  bb = bb_lib.as_backbone(model)
  dee, _ = exits.deediff.benchmark_plan(model, params, jax.random.PRNGKey(1),
                                        exit_layer_at_noise=1, exit_layer_at_clean=bb.num_units)
  mask = exits.MaskPlan(exits.random_mask(len(times), bb.num_units, 0.5, seed=4))
  plan = exits.compose(dee, mask)
  labels = jnp.array([1, 2])
  x, st = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, labels=labels,
                       return_stats=True, **KW)
  x_ref = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=testing.ReferencePlan(plan),
                       labels=labels, **KW)
  testing.assert_outputs_close(x, x_ref, 1e-6)
  alone = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=dee, labels=labels,
                       return_stats=True, **KW)[1]
  assert np.all(np.asarray(st["flops"]) <= np.asarray(alone["flops"]) + 1e-3)
  assert np.any(np.asarray(st["flops"]) < np.asarray(alone["flops"]))  # reused blocks are free
