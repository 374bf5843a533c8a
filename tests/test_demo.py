"""The end-to-end demo (`python -m jaxee.demo`): its pieces, and one micro run of the pipeline.

The pieces (DeeDiff θ calibration, exit statistics, alternating timing, the claims of a report,
the stage configs) are tested on synthetic inputs. The smoke run trains a tiny DiT for a few
steps, applies DuoDiff through the library's trainer, samples, scores, times and writes the
report (the full `--scale micro` covers every method on both backbones; it is too slow for CI).
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from jaxee import demo
from jaxee.demo import evaluate as demo_eval
from jaxee.demo import methods as demo_methods
from jaxee.demo import report as demo_report
from jaxee.demo import setup as demo_setup
from jaxee.eval import report as report_lib


def _brute_force_depth(u, theta, min_fraction):
  num, batch = u.shape
  exited = np.zeros(batch, bool)
  for k in range(num):
    exited |= u[k] <= theta
    if exited.mean() >= min_fraction:
      return k
  return num


def test_batched_exit_depths_follow_the_runner_rule():
  rng = np.random.default_rng(0)
  u = rng.uniform(size=(5, 6, 7))
  for theta in (0.0, 0.2, 0.5, 0.9, 1.0):
    for frac in (0.5, 1.0):
      got = demo_methods.batched_exit_depths(u, theta, frac)
      want = [_brute_force_depth(u[i], theta, frac) for i in range(5)]
      np.testing.assert_array_equal(got, want)


def test_calibrated_threshold_hits_the_target_ratio():
  # u falls with depth and with noise level (NFE 0 is the noisiest): exits come earlier there.
  nfe, layers, batch = 8, 6, 32
  rng = np.random.default_rng(1)
  base = np.linspace(0.9, 0.1, layers)[None, :, None] * np.linspace(0.4, 1.0, nfe)[:, None, None]
  u = np.clip(base + 0.02 * rng.normal(size=(nfe, layers, batch)), 0, 1)
  ratios = []
  for target in (0.3, 0.6, 0.9):
    cal = demo_methods.calibrate_threshold(u, target, 1.0)
    got = demo_methods.batched_exit_depths(u, cal["threshold"], 1.0).mean() / layers
    assert got == pytest.approx(cal["predicted_ratio"])
    assert abs(got - target) < 0.1
    ratios.append(got)
  assert ratios == sorted(ratios)
  assert demo_methods.calibrate_threshold(u, 1.0, 1.0)["predicted_ratio"] == 1.0


def test_exit_summary_from_sampler_stats():
  model = demo_setup.create_model("dit", demo_setup.SCALES["micro"])
  from jaxee.eval import flops as flops_lib
  full = flops_lib.backbone_flops(model)
  stats = {"blocks": np.array([2.0, 4.0, 4.0, 4.0]), "flops": np.array([0.5, 1, 1, 1]) * full,
           "nfe_times": np.array([900.0, 600.0, 300.0, 0.0])}
  s = report_lib.exit_summary(model, stats)
  assert s["num_nfe"] == 4 and s["num_blocks"] == 4
  assert s["layer_ratio"] == pytest.approx(14 / 16)
  assert s["flops_per_image"] == pytest.approx(3.5 * full)
  assert s["ideal_saving"] == pytest.approx(1 - 3.5 / 4)
  assert s["tau"] == [0.9, 0.6, 0.3, 0.0]
  with pytest.raises(ValueError, match="disagree"):
    report_lib.exit_summary(model, dict(stats, flops=np.ones(3)))


def test_alternating_timing_rotates_the_order():
  seen = []
  calls = {name: (lambda n=name: seen.append(n) or np.zeros(())) for name in "abc"}
  times = demo_eval.alternating_timing(calls, 3)
  assert seen == list("abcbcacab")
  assert all(len(v) == 3 and min(v) >= 0 for v in times.values())


def _fake_report():
  def rec(fd, speedup, saving, std=None, faster=None):
    quality = {"frechet": fd}
    if std is not None:
      quality["frechet_diff_std_vs_full"] = std
    timing = {"speedup": speedup}
    if faster is not None:
      timing.update(rounds=7, rounds_faster=faster, rounds_slower=7 - faster)
    return {"quality": quality, "timing": timing, "exits": {"ideal_saving": saving}}
  variants = {"full": rec(10.0, 1.0, 0.0), "ase": rec(11.0, 1.3, 0.3, std=0.2, faster=7),
              "ase_no_finetune": rec(30.0, 1.3, 0.3), "masks": rec(9.0, 0.9, 0.2, std=0.1),
              "duodiff": rec(10.3, 1.02, 0.1, std=0.5, faster=4)}
  return {"seed": 0, "archs": {"dit": {"variants": variants}}}


def test_effects_are_the_directions_of_the_claims():
  e = demo_report.effects(_fake_report())["dit"]
  assert e["ase: speed vs full"] == "faster" and e["ase: FD vs full"] == "higher"
  assert e["ase: FD vs the un-tuned schedule"] == "lower"
  assert e["masks: speed vs full"] == "slower" and e["masks: FD vs full"] == "lower"
  assert e["masks: saves FLOPs"] == "yes"
  # 4 of 7 rounds faster is no evidence; +0.3 FD with a 0.5 std is noise.
  assert e["duodiff: speed vs full"] == "no clear difference"
  assert e["duodiff: FD vs full"] == "within noise"
  assert "full: speed vs full" not in e


def test_compare_effects_between_runs():
  first = _fake_report()
  second = json.loads(json.dumps(first))
  v = second["archs"]["dit"]["variants"]
  v["duodiff"]["quality"]["frechet"] = 20.0            # within noise → higher: compatible
  v["masks"]["quality"]["frechet"] = 12.0              # lower → higher: contradicts
  second["seed"] = 1
  cmp = demo_report.compare_effects(first, second)
  status = {claim: s for _, claim, _, _, s in cmp["rows"]}
  assert status["duodiff: FD vs full"] == "compatible"
  assert status["masks: FD vs full"] == "contradicts"
  assert status["ase: speed vs full"] == "same"
  assert cmp["counts"]["contradicts"] == 1
  assert "contradicts" in demo_report.compare_markdown(first, second)


def test_paired_frechet_noise_shrinks_for_identical_pairs():
  class Metric:
    def frechet_from_features(self, f):
      return float(np.sum(f.mean(0) ** 2) + np.trace(np.cov(f, rowvar=False)))
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 3))
  feats = {"full": a, "same": a.copy(), "other": rng.normal(size=(200, 3))}
  std = demo_eval.paired_frechet_noise(Metric(), feats, [("same", "full"), ("other", "full")])
  assert std[("same", "full")] == 0.0 and std[("other", "full")] > 0.01
  with pytest.raises(ValueError, match="different sample counts"):
    demo_eval.paired_frechet_noise(Metric(), {"full": a, "x": a[:10]}, [("x", "full")])


@pytest.mark.parametrize("method", ["baseline", "ase", "deediff", "duodiff", "masks"])
@pytest.mark.parametrize("arch", demo_setup.ARCHS)
def test_stage_configs_pass_the_library_validation(method, arch):
  from jaxee.train import methods
  scale = demo_setup.SCALES["default"]
  if method != "baseline" and method not in scale.methods_for(arch):
    pytest.skip(f"the demo does not run {method} on {arch}")
  section = {"baseline": lambda: None, "ase": lambda: demo_setup.ase_section(arch, scale),
             "deediff": demo_setup.deediff_section,
             "duodiff": lambda: demo_setup.duodiff_section(arch, scale),
             "masks": lambda: demo_setup.masks_section(arch, scale, 0)}[method]()
  c = demo_setup.stage_config(method, arch, scale, 0, num_steps=10, lr=1e-3, section=section)
  methods.validate(c)
  assert c.train.seed == demo_setup.stage_seed(0, method, arch)
  assert c.data.source == "digits" and c.data.image_size == 8


def test_stage_seeds_differ():
  seeds = {demo_setup.stage_seed(s, m, a) for s in (0, 1) for a in demo_setup.ARCHS
           for m in ("baseline", "ase", "deediff", "duodiff", "masks")}
  assert len(seeds) == 2 * len(demo_setup.ARCHS) * 5


def test_run_refuses_a_foreign_output_directory(tmp_path):
  (tmp_path / "keep.txt").write_text("user data")
  with pytest.raises(FileExistsError, match="not a jaxee demo output"):
    demo.run(tmp_path, scale="micro", log=lambda _: None)
  with pytest.raises(ValueError, match="unknown demo scale"):
    demo.run(tmp_path / "x", scale="huge", log=lambda _: None)
  assert (tmp_path / "keep.txt").read_text() == "user data"


def test_micro_pipeline_smoke(tmp_path):
  scale = dataclasses.replace(demo_setup.SCALES["micro"], methods=(("dit", ("duodiff",)),))
  out = tmp_path / "demo"
  report = demo.run(out, seed=0, scale=scale, log=lambda _: None)
  on_disk = json.loads((out / "report.json").read_text())
  assert set(on_disk["archs"]) == {"dit"}
  variants = on_disk["archs"]["dit"]["variants"]
  assert set(variants) == {"full", "duodiff"}
  for name, rec in variants.items():
    for key in ("frechet", "confidence", "class_accuracy"):
      assert math.isfinite(rec["quality"][key]), (name, key)
    assert rec["quality"]["num_samples"] == scale.num_eval
    assert rec["timing"]["median_s"] > 0
    assert rec["exits"]["num_nfe"] == scale.sample_steps
  full, duo = variants["full"], variants["duodiff"]
  assert full["exits"]["layer_ratio"] == 1.0 and full["exits"]["ideal_saving"] == 0.0
  assert full["timing"]["speedup"] == 1.0
  # The shallow (2-block) model ran exactly at the NFEs with t >= 1000 - t_s.
  tau = np.asarray(duo["exits"]["tau"])
  want = np.where(1000 * tau >= 1000 - scale.duodiff_t_switch - 1e-6, 2, scale.dit_depth)
  np.testing.assert_array_equal(duo["exits"]["blocks_per_nfe"], want)
  assert duo["info"]["shallow_nfes"] == int((want == 2).sum()) > 0
  assert duo["exits"]["ideal_saving"] > 0
  files = on_disk["archs"]["dit"]["files"]
  for name in list(files["grids"].values()) + list(files["plots"].values()):
    assert (out / name).stat().st_size > 0, name
  assert (out / "dit" / "backbone" / "export").is_dir()
  assert (out / "dit" / "duodiff" / "duodiff.json").is_file()
  md = (out / "report.md").read_text()
  assert "`duodiff`" in md and "Claims of this run" in md
  assert on_disk["effects"] == report["effects"]
  assert on_disk["effects"]["dit"]["duodiff: saves FLOPs"] == "yes"
  assert "frechet_diff_std_vs_full" in duo["quality"]
  assert duo["timing"]["rounds"] == scale.timing_rounds


def test_refine_threshold_closes_the_loop(monkeypatch):
  # The "real runner" executes 0.15 more of the depth than the open-loop simulation predicts.
  nfe, layers, batch = 8, 6, 32
  rng = np.random.default_rng(2)
  base = np.linspace(0.9, 0.1, layers)[None, :, None] * np.linspace(0.4, 1.0, nfe)[:, None, None]
  u = np.clip(base + 0.02 * rng.normal(size=(nfe, layers, batch)), 0, 1)

  def fake_measured(model, params, ee, uem, threshold, scale, seed, arch, layout="inputs"):
    sim = demo_methods.batched_exit_depths(u, threshold, 1.0).mean() / layers
    return float(min(1.0, sim + 0.15))
  monkeypatch.setattr(demo_methods, "measured_exit_ratio", fake_measured)
  scale = dataclasses.replace(demo_setup.SCALES["micro"], deediff_refine_iters=3,
                              deediff_min_fraction=1.0)
  cal = demo_methods.calibrate_threshold(u, 0.6, 1.0)
  out = demo_methods.refine_threshold(None, None, None, "token_mean", u, cal, scale, 0, "dit",
                                      lambda _: None)
  open_loop = fake_measured(None, None, None, None, cal["threshold"], None, 0, None)
  assert abs(open_loop - 0.6) > 0.1
  assert abs(out["calibration_measured_ratio"] - 0.6) < abs(open_loop - 0.6)
  assert out["open_loop_threshold"] == cal["threshold"] and len(out["refinement"]) >= 2
  assert out["threshold"] > cal["threshold"]       # exits must come earlier than predicted


def test_pareto_front_keeps_only_undominated_variants():
  points = {"full": (1.0, 10.0), "a": (1.5, 9.0), "b": (1.4, 12.0), "c": (2.0, 15.0),
            "d": (2.0, 16.0)}
  assert report_lib.pareto_front(points) == ["a", "c"]


def test_refine_threshold_bisects_when_recalibration_repeats(monkeypatch):
  # The real runner exits far more than the open-loop simulation predicts, so the shifted
  # target recalibrates to a θ already tried; the refinement then bisects θ instead of stopping.
  nfe, layers, batch = 6, 6, 16
  rng = np.random.default_rng(3)
  u = np.clip(np.linspace(0.9, 0.1, layers)[None, :, None]
              + 0.02 * rng.normal(size=(nfe, layers, batch)), 0, 1)

  def fake_measured(model, params, ee, uem, threshold, scale, seed, arch, layout="inputs"):
    return float(np.clip(1.0 - 1.6 * threshold, 0.0, 1.0))   # falls as θ rises
  monkeypatch.setattr(demo_methods, "measured_exit_ratio", fake_measured)
  scale = dataclasses.replace(demo_setup.SCALES["micro"], deediff_refine_iters=6,
                              deediff_min_fraction=1.0)
  cal = demo_methods.calibrate_threshold(u, 0.75, 1.0)
  out = demo_methods.refine_threshold(None, None, None, "token_mean", u, cal, scale, 0, "dit",
                                      lambda _: None)
  first = out["refinement"][0]["measured_ratio"]
  assert abs(out["calibration_measured_ratio"] - 0.75) < abs(first - 0.75)
  assert abs(out["calibration_measured_ratio"] - 0.75) < 0.05
