"""ASE static schedules: the paper's tables, time → interval mapping, runners vs. reference."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models
from jaxee import sampling
from jaxee.exits import ase
from jaxee import testing

# ASE paper Table 5, as written in the exits issue: blocks per interval [0, 0.1] → [0.9, 1.0].
PAPER_TABLE5 = {
    "D2-DiT": [28, 28, 25, 25, 22, 22, 19, 19, 16, 16],
    "D3-DiT": [28, 28, 24, 24, 20, 20, 16, 16, 12, 12],
    "D4-DiT": [28, 28, 26, 24, 20, 18, 12, 10, 8, 8],
    "D7-DiT": [28, 28, 24, 21, 18, 15, 10, 10, 8, 8],
    "D1-U-ViT": [6, 6, 4, 4, 2, 2, 2, 2, 1, 1],
    "D2-U-ViT": [5, 5, 4, 4, 2, 2, 1, 1, 1, 1],
    "D3-U-ViT": [3, 3, 2, 2, 2, 2, 1, 1, 1, 1],
    "D6-U-ViT": [2, 2, 2, 2, 1, 1, 1, 1, 1, 1],
}
PAPER_SPEEDUP = {"D2-DiT": 0.2343, "D3-DiT": 0.3046, "D4-DiT": 0.3456, "D7-DiT": 0.3892,
                 "D1-U-ViT": 0.213, "D2-U-ViT": 0.248, "D3-U-ViT": 0.297, "D6-U-ViT": 0.326}
# One network time per interval, noise end first (DiT: original chain index).
DIT_TIMES = np.array([950, 850, 750, 650, 550, 450, 350, 250, 150, 50], np.float32)


def test_eight_tables_exactly():
  assert set(ase.ASE_TABLES) == set(PAPER_TABLE5)
  for name, row in PAPER_TABLE5.items():
    plan = ase.ase_plan(name)
    assert list(plan.schedule) == row, name
    assert plan.speedup == PAPER_SPEEDUP[name]
    assert plan.family == ("dit" if name.endswith("DiT") else "uvit")


def test_interval_bins_follow_original_timestep_bins():
  # drop_scheduler.get_early_exit_idx: [0,100) → entry 1, ..., ≥ 900 → entry 10.
  t = np.array([0, 99, 100, 199.5, 500, 899, 900, 999], np.float64)
  np.testing.assert_array_equal(ase.interval_index(t / 1000), [0, 0, 1, 1, 5, 8, 9, 9])
  assert ase.interval_index(1.0) == 9


@pytest.mark.parametrize("sampler,steps,per_bin", [("ddpm", 250, 25), ("ddim", 50, 5)])
def test_dit_grids_put_equal_steps_in_each_interval(sampler, steps, per_bin):
  model = models.create("dit", input_size=8, depth=4, hidden_size=32, num_heads=4)
  times = sampling.nfe_times(model, sampler, steps)
  plan = ase.ASEPlan(PAPER_TABLE5["D3-DiT"], name="D3")
  depths = plan.depths(model, times)
  assert len(depths) == steps
  values, counts = np.unique(depths, return_counts=True)
  # Each table value covers two intervals, each holding `per_bin` steps.
  np.testing.assert_array_equal(values, [12, 16, 20, 24, 28])
  np.testing.assert_array_equal(counts, [2 * per_bin] * 5)
  assert depths[0] == 12 and depths[-1] == 28  # noise end first


@pytest.mark.parametrize("sampler", ["dpm_solver", "euler_maruyama"])
def test_continuous_samplers_use_time_of_each_evaluation(sampler):
  model = models.create("uvit", img_size=8, depth=6, embed_dim=32, num_heads=4)
  times = sampling.nfe_times(model, sampler, 12)
  plan = ase.ASEPlan((3, 3, 2, 2, 2, 2, 1, 1, 0, 0))
  depths = plan.depths(model, times)
  tau = times.astype(np.float64) / 999.0  # vp_continuous: t_net = 999 t
  assert tau[0] > 0.9 and depths[0] == 0  # starts at the noise end
  assert tau[-1] < 0.1 and depths[-1] == 3
  # Every evaluation (intermediate solver points included) uses the interval of its own time.
  bins = np.searchsorted(np.arange(1, 10) / 10, tau, side="right")
  np.testing.assert_array_equal(depths, np.asarray(plan.schedule)[bins])
  assert len(set(bins)) >= 6


def test_scale_schedule_documented_rule():
  # n' = round-half-up(n · 12 / 28), clamped to [1, 12].
  assert ase.scale_schedule(PAPER_TABLE5["D3-DiT"], 28, 12) == (12, 12, 10, 10, 9, 9, 7, 7, 5, 5)
  assert ase.scale_schedule(PAPER_TABLE5["D7-DiT"], 28, 4) == (4, 4, 3, 3, 3, 2, 1, 1, 1, 1)
  plan = ase.ase_plan("D3-DiT", depth=12)
  assert plan.schedule == (12, 12, 10, 10, 9, 9, 7, 7, 5, 5) and plan.name == "D3-DiT@12"


def test_bad_schedules_are_rejected():
  model, params = testing.tiny_dit()
  with pytest.raises(ValueError, match="10 entries"):
    ase.ASEPlan((1, 2, 3))
  with pytest.raises(ValueError, match="rescale"):
    ase.ase_plan("D3-DiT").bind(model, params, DIT_TIMES)
  with pytest.raises(ValueError, match="uvit"):
    ase.ase_plan("D3-U-ViT").bind(model, params, DIT_TIMES)
  with pytest.raises(ValueError, match="unknown ASE schedule"):
    ase.ase_plan("D9")


# The reference, jitted once per model (n traced) and shared by the tests below.
_reference = jax.jit(testing.reference_prefix, static_argnums=0)


def _compiled_net(model, params, plan, times):
  """The bound net, compiled once for all NFEs (the NFE index is an argument), and its HLO."""
  x, y = testing.example_inputs(model, batch=2)

  def f(p, x, t, y, i):
    return plan.bind(model, p, times).net(x, t, y, i, ())[0]

  compiled = jax.jit(f).lower(params, x, jnp.zeros(2), y, jnp.int32(0)).compile()
  return compiled, compiled.as_text()


def _check_every_nfe(model, params, plan, times, compiled):
  x, y = testing.example_inputs(model, batch=2)
  depths = plan.depths(model, times)
  outs = []
  for i, t in enumerate(times):
    tv = jnp.full((2,), t)
    got = compiled(params, x, tv, y, jnp.int32(i))
    np.testing.assert_allclose(got, _reference(model, params, x, tv, y, int(depths[i])),
                               atol=1e-6, rtol=0)
    outs.append(got)
  # Different depths give different outputs (the test can tell which blocks ran).
  assert not np.allclose(outs[0], outs[-1], atol=1e-4)


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_switch_runner_equals_reference_and_compiles_to_one_branch_per_depth(family):
  if family == "dit":
    (model, params), times = testing.tiny_dit(), DIT_TIMES
    plan = ase.ASEPlan((4, 4, 3, 3, 2, 2, 1, 1, 0, 0), runner="switch")
  else:  # 3 out-blocks; the network gets 999 t
    (model, params), times = testing.tiny_uvit(), DIT_TIMES * 0.999
    plan = ase.ASEPlan((3, 3, 3, 2, 2, 1, 1, 0, 0, 0), runner="switch")
  compiled, hlo = _compiled_net(model, params, plan, times)
  _check_every_nfe(model, params, plan, times, compiled)
  branches = re.findall(r"conditional\(.*branch_computations=\{([^}]*)\}", hlo)
  assert len(branches) == 1
  assert len(branches[0].split(",")) == len(set(plan.schedule))


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_loop_runner_equals_reference_and_has_a_runtime_trip_count(family):
  if family == "dit":
    (model, params), times = testing.tiny_dit(), DIT_TIMES
    plan = ase.ASEPlan((4, 4, 3, 3, 2, 2, 1, 1, 0, 0))  # the default runner
  else:
    (model, params), times = testing.tiny_uvit(), DIT_TIMES * 0.999
    plan = ase.ASEPlan((3, 3, 3, 2, 2, 1, 1, 0, 0, 0))
  assert plan.runner == "loop"
  compiled, hlo = _compiled_net(model, params, plan, times)
  _check_every_nfe(model, params, plan, times, compiled)
  assert " while(" in hlo and "conditional(" not in hlo
  # The loop condition compares the counter with a loop-carried value (the depth read from the
  # per-NFE table), not with a constant as a fixed-length scan does.
  assert re.search(r"compare\(%param[^,]*, %param[^)]*\).*while/cond", hlo)


def test_masked_training_forward_matches_per_sample_prefix():
  model, params = testing.tiny_dit()
  x, y = testing.example_inputs(model, batch=2)
  t = jnp.array([900.0, 20.0])
  n = jnp.array([1, 3])
  out = jax.jit(lambda p: ase.ase_forward_masked(model, p, x, t, y, n))(params)
  for i in range(2):
    ref = _reference(model, params, x, t, y, int(n[i]))
    np.testing.assert_allclose(out[i], ref[i], atol=1e-6, rtol=0)


def test_dit_sampler_with_cfg_equals_reference_and_reports_stats():
  model, params = testing.tiny_dit()
  plan = ase.ASEPlan((4, 4, 3, 3, 2, 2, 1, 1, 0, 0), name="test")
  kw = dict(num=2, sampler="ddim", steps=10, labels=jnp.array([1, 7]), guidance=1.5,
            return_stats=True)
  x, stats = jaxee.sample(model, params, jax.random.PRNGKey(3), plan=plan, **kw)
  x_ref, _ = jaxee.sample(model, params, jax.random.PRNGKey(3),
                          plan=testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref)
  depths = plan.depths(model, np.asarray(stats["nfe_times"]))
  np.testing.assert_array_equal(stats["blocks"], depths)
  info = plan.bind(model, params, np.asarray(stats["nfe_times"])).info
  np.testing.assert_allclose(stats["flops"], info["flops_per_nfe"], rtol=1e-6)
  assert 0 < info["ideal_saving"] < 1
