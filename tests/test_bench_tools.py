"""The prepared GPU benchmark (`tools/bench_gpu.py`) and the per-NFE overhead tool
(`tools/bench_overhead.py`) run end to end on CPU with a tiny DiT (issue 13, items 4 and 5).

No wall-clock assertions: the tests check the fields, their consistency and the labels.
"""
import importlib.util
import json
import math
import pathlib

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
TINY = ["--arch", "dit_s_8", "--input-size", "16", "--depth", "2", "--platform", ""]


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _lines(capsys):
  return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_bench_gpu_on_cpu_labels_the_gpu_goals_not_measured(capsys):
  bench = _tool("bench_gpu")
  assert bench.main(TINY + ["--steps", "3", "--exit-steps", "3", "--batch", "2", "--quick",
                            "--plans", "ase:D3-DiT; deediff:scripted=1,2"]) == 0
  rows = _lines(capsys)
  kinds = [r["kind"] for r in rows]
  assert kinds == ["throughput", "exit", "exit", "goals"], kinds
  for r in rows:
    assert r["device"].startswith("cpu") and r["platform"] == "cpu"
  tp = rows[0]
  assert tp["batch"] == 2 and tp["steps"] == 3 and tp["compute_dtype"] == "bfloat16"
  assert tp["forwards_per_image"] == 2 * tp["nfe"] == 6  # CFG 1.5 doubles the network batch
  assert tp["s_per_image"] > 0 and tp["images_per_s"] == pytest.approx(
      1 / tp["s_per_image"], rel=1e-2)
  # MFU = forwards × GFLOP per forward × images / time / peak
  want = tp["forwards_per_image"] * tp["gflop_per_forward"] * 2 / tp["s_per_call"] / 989e3
  assert tp["mfu"] == pytest.approx(want, rel=1e-2, abs=1e-6)
  plans = [r["plan"] for r in rows[1:3]]
  assert plans == ["ase:D3-DiT", "deediff:scripted=1,2"]
  for r in rows[1:3]:
    assert r["steps"] == 3 and r["rounds"] == 3 and 0 < r["ideal_saving"] < 1
    assert math.isfinite(r["efficiency"]) and len(r["efficiency_ci95"]) == 2
  goals = rows[-1]
  assert goals["mfu"] == goals["s_per_image"] == "not measured"
  assert goals["exit_efficiency"] == {p: "not measured" for p in plans}
  assert "not measured" in goals["note"]


def test_bench_gpu_goals_on_a_gpu_are_pass_fail():
  bench = _tool("bench_gpu")
  dev = {"platform": "gpu"}
  tp = {"mfu": 0.45, "s_per_image": 0.2}
  exits = [{"plan": "ase:D3-DiT", "efficiency": 0.96}, {"plan": "mask:skip=0.5",
                                                        "efficiency": 0.9},
           {"plan": "deediff:scripted=14,28", "efficiency": 0.86}]
  row = bench.goals_row(dev, tp, exits)
  assert row["mfu"] is True and row["s_per_image"] is True
  assert row["s_per_image_within_limit"] is False
  assert row["exit_efficiency"] == {"ase:D3-DiT": True, "mask:skip=0.5": False,
                                    "deediff:scripted=14,28": True}
  assert bench.goals_row(dev, None, [])["mfu"] == "not measured (skipped)"


def test_bench_gpu_rejects_a_bad_batch():
  bench = _tool("bench_gpu")
  with pytest.raises(SystemExit):
    bench.parse_args(["--batch", "lots"])
  assert bench.parse_args(["--batch", "auto"]).batch == "auto"
  quick = bench.parse_args(["--quick"])
  assert quick.steps == 50 and quick.exit_steps == 10 and quick.max_repeats == 3


def test_bench_overhead_fields(capsys):
  tool = _tool("bench_overhead")
  assert tool.main(["--models", "dit_s_8", "--input-size", "16", "--depth", "2", "--steps", "3",
                    "--batch", "2", "--repeats", "2", "--bootstrap", "50", "--platform", "",
                    "--json"]) == 0
  (rec,) = _lines(capsys)
  assert rec["model"] == "dit_s_8" and rec["depth"] == 2 and rec["nfe"] == 3
  assert rec["rounds"] == 2 and rec["no_blocks_mean_blocks"] == 0.0
  for key in ("overhead_per_nfe_s", "overhead_per_step_s", "full_s", "no_blocks_s",
              "overhead_fraction"):
    assert math.isfinite(rec[key]) and rec[key] >= 0, key
  assert math.isfinite(rec["blocks_per_nfe_s"]) and math.isfinite(rec["runner_overhead"])
  lo, hi = rec["overhead_per_nfe_s_spread"]
  assert 0 <= lo <= rec["overhead_per_nfe_s"] <= hi
  assert 0 < rec["flop_fraction_outside_blocks"] < 1
