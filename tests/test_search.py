"""Plan search under a budget (`jaxee.exits.search`, `jaxee-search`; project issue 14).

Budget met (host FLOP tables and the sampler's own stats agree), one compiled evaluator for a
whole search (and none for a second search), determinism for a seed, the objective equal to
`jaxee.sample`'s drift, a searched mask better than random masks of equal FLOPs, plan files
round-tripping through `load_plan`, the `search:` spec, `jaxee.sample` and the sampling CLI, the
`jaxee-search` command, and ASE fine-tuning reading a searched schedule. Tiny DiT (4 blocks,
DDIM-6, 3 calibration samples) so each search takes seconds.
"""
import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import jaxee
from jaxee import sampling
from jaxee.exits import ase, composition, io as plan_io, masks, search, spec as spec_lib
from jaxee.models.backbone import as_backbone
from jaxee.testing import tiny_dit

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTING = dict(sampler="ddim", steps=6, guidance=1.5)
CALIB = search.Calibration(num=3, seed=0)


@pytest.fixture(scope="module")
def dit():
  return tiny_dit(depth=4)


@pytest.fixture(scope="module")
def ase_result(dit):
  model, params = dit
  return search.search_plan(model, params, budget=0.6, family="ase", calibration=CALIB,
                            **SETTING)


@pytest.fixture(scope="module")
def mask_result(dit):
  model, params = dit
  return search.search_plan(model, params, budget=0.6, family="mask", calibration=CALIB,
                            **SETTING)


def _drift(model, params, plan):
  """The documented objective, recomputed with `jaxee.sample` (and the plan's FLOP fraction)."""
  x_T, labels, rng = CALIB.arrays(model)
  ref = jaxee.sample(model, params, rng, labels=labels, x_T=x_T, **SETTING)
  x, stats = jaxee.sample(model, params, rng, labels=labels, x_T=x_T, plan=plan,
                          return_stats=True, **SETTING)
  full = as_backbone(model).full_flops
  frac = float(np.mean(stats["flops"]) / full)
  return float(np.mean(np.square(np.asarray(x) - np.asarray(ref)))), frac


def test_ase_search_meets_the_budget_with_a_monotone_schedule(dit, ase_result):
  model, params = dit
  r = ase_result
  assert isinstance(r.plan, ase.ASEPlan) and r.meta["budget_met"]
  assert r.flops_fraction <= 0.6 + 1e-9
  table = r.plan.table
  assert all(a >= b for a, b in zip(table, table[1:])), table
  assert min(table) >= 1 and max(table) <= ase.capacity(model)
  assert r.log[0]["phase"] == "start" and r.log[0]["objective"] == pytest.approx(0.0, abs=1e-10)
  drift, frac = _drift(model, params, r.plan)
  assert frac == pytest.approx(r.flops_fraction, rel=1e-5)   # host tables = sampler stats
  assert drift == pytest.approx(r.objective, rel=1e-4, abs=1e-9)
  assert r.objective > 0.0                                     # the plan changed the samples


def test_one_compiled_evaluator_for_every_candidate(dit, ase_result):
  """Searches evaluate many candidates through one trace; a second search adds none."""
  model, params = dit
  assert ase_result.meta["candidates_evaluated"] > ase_result.meta["chunk"]
  evals, samples = search.eval_trace_count(), sampling.trace_count()
  r = search.search_plan(model, params, budget=0.8, family="ase", calibration=CALIB, **SETTING)
  assert r.meta["candidates_evaluated"] > r.meta["chunk"]
  assert (search.eval_trace_count(), sampling.trace_count()) == (evals, samples)
  # A new plan structure (ase+mask) traces the evaluator (and the sampling program inside it)
  # once for all its candidates.
  r = search.search_plan(model, params, budget=0.8, family="ase+mask", calibration=CALIB,
                         refine_rounds=1, **SETTING)
  assert r.meta["candidates_evaluated"] > 2 * r.meta["chunk"]
  assert (search.eval_trace_count(), sampling.trace_count()) == (evals + 1, samples + 1)


def test_search_is_deterministic_for_a_seed(dit, ase_result):
  model, params = dit
  again = search.search_plan(model, params, budget=0.6, family="ase", calibration=CALIB,
                             **SETTING)
  assert again.plan.table == ase_result.plan.table
  assert again.log == ase_result.log
  other = search.search_plan(model, params, budget=0.6, family="ase", seed=5,
                             calibration=CALIB, **SETTING)
  assert other.meta["calibration"]["seed"] == 5 and other.objective != ase_result.objective


def test_mask_search_beats_random_masks_of_equal_flops(dit, mask_result):
  model, params = dit
  r = mask_result
  assert isinstance(r.plan, masks.MaskPlan) and r.flops_fraction <= 0.6 + 1e-9
  mask = np.asarray(r.plan.mask)
  assert mask[0].all() and mask.shape == (6, 4)
  drift, frac = _drift(model, params, r.plan)
  assert drift == pytest.approx(r.objective, rel=1e-4, abs=1e-9)
  assert frac == pytest.approx(r.flops_fraction, rel=1e-5)
  zeros = int((~mask).sum())
  rng = np.random.default_rng(0)
  for _ in range(3):   # block units have equal FLOPs: the same count of zeros, the same FLOPs
    m = np.ones_like(mask)
    flat = rng.choice(np.arange(4, mask.size), zeros, replace=False)  # rows >= 1
    m.reshape(-1)[flat] = False
    rand_drift, rand_frac = _drift(model, params, masks.MaskPlan(m))
    assert rand_frac == pytest.approx(frac, rel=1e-6)
    assert r.objective <= rand_drift, (r.objective, rand_drift)


def test_speedup_target_and_bad_inputs(dit):
  model, params = dit
  with pytest.raises(ValueError, match="budget must be a FLOP fraction"):
    search.search_plan(model, params, budget=0.0, **SETTING)
  with pytest.raises(ValueError, match="speedup must be > 1"):
    search.search_plan(model, params, speedup=0.5, **SETTING)
  with pytest.raises(ValueError, match="unknown plan family"):
    search.search_plan(model, params, family="deediff", **SETTING)
  with pytest.raises(ValueError, match=r"a ase plan file is \.json"):
    search.search_plan(model, params, family="ase", out="plan.npz", **SETTING)
  with pytest.raises(ValueError, match="calibration labels must have length 3"):
    search.search_plan(model, params, calibration=search.Calibration(3, 0, (1, 2)), **SETTING)
  r = search.search_plan(model, params, speedup=1.25, family="ase", calibration=CALIB,
                         refine_rounds=0, **SETTING)
  assert r.meta["budget"] == pytest.approx(0.8) and r.flops_fraction <= 0.8 + 1e-9
  assert r.meta["budget_from"].startswith("speedup")


def test_plan_files_round_trip_through_load_plan_and_jaxee_sample(dit, ase_result,
                                                                  mask_result, tmp_path):
  model, params = dit
  path = ase_result.save(tmp_path / "ase.json")
  loaded = spec_lib.parse_plan(f"search:{path}", model)
  assert isinstance(loaded, ase.ASEPlan) and loaded.table == ase_result.plan.table
  meta = json.loads(pathlib.Path(path).read_text())["search"]
  assert meta["budget_met"] and meta["log"] == json.loads(json.dumps(ase_result.log))
  path = mask_result.save(tmp_path / "mask.npz")
  loaded = plan_io.load_plan(path)
  np.testing.assert_array_equal(loaded.mask, mask_result.plan.mask)
  assert loaded.metadata["search"]["flops_fraction"] == mask_result.flops_fraction
  drift, _ = _drift(model, params, loaded)
  assert drift == pytest.approx(mask_result.objective, rel=1e-4, abs=1e-9)
  with pytest.raises(ValueError, match=r"mask plan file is \.npz"):
    mask_result.save(tmp_path / "mask.json")


def _sample_config(out_dir, plan):
  spec = importlib.util.spec_from_file_location("sample_dit", ROOT / "configs" / "sample_dit.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.ckpt = str(ROOT / "tests" / "fixtures" / "dit_tiny.pt")
  config.out_dir, config.plan = str(out_dir), plan
  config.progress, config.multi_device, config.num_samples = False, False, 4
  return config


def test_jaxee_search_cli_output_runs_in_the_sampling_cli(tmp_path, capsys):
  """`jaxee-search` on the runlocal fixture (ase+mask at DDIM-10), then `jaxee-sample` on it."""
  from jaxee.cli import sample as sample_cli
  from jaxee.cli import search as search_cli
  from jaxee.sharded import run as run_lib
  config = _sample_config(tmp_path / "samples", None)
  out = tmp_path / "plan.npz"
  args = ["--ckpt", config.ckpt, "--arch", "dit", "--model-overrides",
          json.dumps(dict(config.model_overrides)), "--steps", "10", "--guidance", "1.5",
          "--budget", "0.7", "--family", "ase+mask", "--num", "2", "--refine-rounds", "1",
          "--out", str(out)]
  assert search_cli.main(args) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["budget_met"] and summary["flops_fraction"] <= 0.7 + 1e-9
  assert summary["plan_spec"] == f"search:{out}"
  model, _ = run_lib.load_backbone(config)
  plan = run_lib.make_plan(_sample_config(tmp_path / "s", f"search:{out}"), model)
  assert isinstance(plan, composition.ComposedPlan)
  assert sample_cli.main(["jaxee-sample"], config=_sample_config(tmp_path / "s",
                                                                   f"search:{out}")) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["plan_ideal_saving"] == pytest.approx(1.0 - summary["flops_fraction"], rel=1e-5)
  assert search_cli.main(args[:-1] + [str(tmp_path / "plan.json")]) == 2
  assert "plan file is .npz" in capsys.readouterr().err


def test_ase_fine_tuning_reads_a_searched_schedule(ase_result, mask_result, tmp_path):
  from jaxee.train import methods
  spec = importlib.util.spec_from_file_location("ase_dit", ROOT / "configs" /
                                                "ase_dit_imagenet256.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  model = methods._model_of(c, [])  # pylint: disable=protected-access
  c.ase.schedule_file = ase_result.save(tmp_path / "ase.json")
  plan = methods._ase_schedule(c.ase, model)  # pylint: disable=protected-access
  assert plan.table == ase_result.plan.table
  methods.validate(c)
  c.ase.schedule_file = mask_result.save(tmp_path / "mask.npz")
  with pytest.raises(ValueError, match="holds no ASE depth schedule"):
    methods._ase_schedule(c.ase, model)  # pylint: disable=protected-access
  c.ase.schedule_file = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="config.ase.schedule_file"):
    methods.validate(c)
  c.ase.schedule_file = None
  assert dataclasses.is_dataclass(methods._ase_schedule(c.ase, model))  # the paper table again
