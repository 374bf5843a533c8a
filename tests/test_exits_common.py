"""Shared exit-plan pieces: stats from every sampler run, FLOPs tables, compile time, tools."""
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import exits
from jaxee.eval import flops as flops_lib
from jaxee.exits import ase
from jaxee.exits import deediff
from jaxee.exits import duodiff
from jaxee.exits import mask_tools
from jaxee.exits import masks
from jaxee.exits import plan as plan_lib
from jaxee import sampling
from jaxee import testing

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_public_exports():
  for name in ("ase_plan", "ASEPlan", "DuoDiffPlan", "MaskPlan", "load_mask_plan", "FullPlan"):
    assert hasattr(exits, name), name


def test_flops_tables_add_up():
  model, _ = testing.tiny_dit()
  n, d = flops_lib.num_tokens(model), flops_lib.width(model)
  # qkv + out projections (4·N·D²·2), scores and AV (2·2·N²·D), MLP (2·N·D·4D·2), adaLN (D·6D·2).
  block = 8 * n * d * d + 4 * n * n * d + 16 * n * d * d + 12 * d * d
  assert flops_lib.block_flops(model) == block
  assert flops_lib.backbone_flops(model) == pytest.approx(
      flops_lib.embed_flops(model) + 4 * block + flops_lib.head_flops(model))
  uvit, _ = testing.tiny_uvit()
  assert flops_lib.num_blocks(uvit) == 7
  assert flops_lib.full_block_flops(uvit) == pytest.approx(
      7 * flops_lib.block_flops(uvit, "body") + 3 * flops_lib.skip_flops(uvit))


def test_plain_sampling_reports_blocks_and_flops():
  model, params = testing.tiny_dit()
  _, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), num=1, sampler="ddim", steps=4,
                          labels=jnp.array([1]), return_stats=True)
  np.testing.assert_array_equal(stats["blocks"], [4] * 4)
  np.testing.assert_allclose(stats["flops"], [flops_lib.backbone_flops(model)] * 4, rtol=1e-6)
  assert stats["nfe_times"].shape == (4,)


def test_full_plan_matches_plain_sampling():
  model, params = testing.tiny_uvit()
  kw = dict(num=1, sampler="euler_ode", steps=3)
  x = jaxee.sample(model, params, jax.random.PRNGKey(1), **kw)
  x_plan, stats = jaxee.sample(model, params, jax.random.PRNGKey(1), plan=plan_lib.FullPlan(),
                               return_stats=True, **kw)
  testing.assert_outputs_close(x_plan, x)
  np.testing.assert_array_equal(stats["blocks"], [7] * 3)


def _compiled_instructions(model, params, plan, steps: int, guided: bool) -> int:
  """Instructions in the compiled sampler program (a deterministic proxy for compile cost)."""
  sched = sampling.default_schedule(model, "ddim", steps)
  fn, _ = sampling._compiled(model, "ddim", steps, sampling._schedule_key(sched), guided, ())  # pylint: disable=protected-access
  hlo = fn.lower(params, plan, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.array([1]),
                 jnp.float32(1.5)).compile().as_text()
  return sum(1 for line in hlo.splitlines() if re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line))


def test_program_with_a_plan_is_at_most_twice_the_full_program():
  # Compile cost follows program size; its wall-clock measurement is a tool's job
  # (`tools/bench_exits.py` reports `compile_s`), not a test's. Every plan kind's compiled
  # sampler (DDIM-5 with CFG, depth-4 DiT) has at most twice the full model's instructions.
  model, params = testing.tiny_dit(depth=4)
  shallow, shallow_p = testing.tiny_dit(rng=jax.random.PRNGKey(9), depth=1)
  deediff_plan, _ = deediff.benchmark_plan(model, params, jax.random.PRNGKey(3))
  plans = {
      "full": plan_lib.FullPlan(),
      "ase": ase.ase_plan("D7-DiT", depth=4),
      "mask": masks.MaskPlan(mask_tools.keep_fraction_mask(5, 4, 0.5)),
      "duodiff": duodiff.DuoDiffPlan(shallow, shallow_p, t_switch=300),
      "deediff": deediff_plan,
  }
  size = {k: _compiled_instructions(model, params, p, 5, True) for k, p in plans.items()}
  for name in ("ase", "mask", "duodiff", "deediff"):
    assert size["full"] < size[name] <= 2.0 * size["full"], (name, size)


def test_plan_specs():
  model, params = testing.tiny_dit(depth=4)
  times = np.linspace(999, 0, 10).astype(np.float32)
  plan, p = testing.plan_from_spec("ase:D3-DiT", model, params, times)
  assert plan.schedule == ase.scale_schedule(ase.ASE_TABLES["D3-DiT"], 28, 4) and p is params
  plan, _ = testing.plan_from_spec("ase:4,4,3,3,2,2,1,1,1,1:switch", model, params, times)
  assert plan.runner == "switch" and plan.schedule[4] == 2
  assert testing.plan_from_spec("ase:D7-DiT", model, params, times)[0].runner == "loop"
  plan, p = testing.plan_from_spec("duodiff:300:random=2", model, params, times)
  assert plan.shallow_model.depth == 2 and plan.shallow_params is not None and p is params
  plan, _ = testing.plan_from_spec("mask:skip=0.5", model, params, times)
  assert plan.mask.shape == (10, 4) and plan.mask[1:].sum(1).tolist() == [2] * 9
  plan, _ = testing.plan_from_spec("mask:skip=0.25:branch", model, params, times)
  assert plan.unit == "branch" and plan.mask[1:].sum(1).tolist() == [6] * 9
  with pytest.raises(ValueError, match="unknown plan spec"):
    testing.plan_from_spec("nope:1", model, params, times)
  bench = _tool("bench_exits")
  assert bench.split_plans("ase:D3-DiT; ase:1,2,3,4,5,6,7,8,9,9;mask:skip=0.5") == [
      "ase:D3-DiT", "ase:1,2,3,4,5,6,7,8,9,9", "mask:skip=0.5"]
  assert bench.split_plans(["duodiff:300:random=3+mask:skip=0.5", "full"]) == [
      "duodiff:300:random=3+mask:skip=0.5", "full"]
  # The paired-round estimator: a deterministic bootstrap interval around the median ratio,
  # narrower for steadier rounds; the efficiency half-width is that width over the ideal saving.
  steady, noisy = [0.70, 0.71, 0.69, 0.70, 0.70, 0.71, 0.69], [0.5, 0.9, 0.7, 0.6, 0.8, 0.7, 0.95]
  lo, hi = bench.bootstrap_median_ci(steady, 500)
  assert lo <= 0.70 <= hi and (lo, hi) == bench.bootstrap_median_ci(steady, 500)
  nlo, nhi = bench.bootstrap_median_ci(noisy, 500)
  assert nhi - nlo > 5 * (hi - lo)
  rec = {"plan": steady, "full": [1.0] * 7}
  assert bench.ci_halfwidth(rec, 0.3, 500) == pytest.approx((hi - lo) / 2 / 0.3)


def test_plot_exits_writes_a_png(tmp_path):
  plot = _tool("plot_exits")
  out = tmp_path / "exits.png"
  args = plot.parse_args(["--arch", "dit_s_8", "--input-size", "16", "--steps", "10",
                          "--plans", "ase:D3-DiT;ase:D7-DiT;mask:skip=0.5", "--out", str(out),
                          "--platform", ""])
  curves = plot.depth_curves(args)
  assert set(curves) == {"full", "ase:D3-DiT", "ase:D7-DiT", "mask:skip=0.5"}
  tau, blocks = curves["ase:D3-DiT"]
  assert tau[0] > 0.8 and blocks[0] == 5 and blocks[-1] == 12  # D3 scaled to 12 blocks
  plot.plot(curves, "test", str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_vs_torch_statistics_and_refusals(capsys):
  """The torch-vs-jaxee tool: per-round ratio statistics, and clear refusals without inputs."""
  bench = _tool("bench_vs_torch")
  calls = {"a": 0}

  def slow():
    calls["a"] += 1
  rec = bench.alternate(slow, lambda: None, rounds=4)
  assert calls["a"] == 4 and rec["rounds"] == 4 and len(rec["round_ratios"]) == 4
  lo, hi = rec["ci95"]
  assert lo <= rec["jaxee_speed_vs_torch"] <= hi
  args = bench.parse_args(["--dit-src", "/x", "--rounds", "3"])
  assert args.dit_src == "/x" and args.rounds == 3 and args.uvit_src is None
