"""The README's first command: every jaxee method, end to end, on real digits, on a CPU.

    python -m jaxee.demo --out runs/demo [--seed 0]        # `make demo`

On the scikit-learn digits that ship inside scikit-learn's wheel (a TFDS dataset built locally,
no download, `jaxee.data`), the demo

1. trains a small digits classifier, the quality metric (`jaxee.eval.classifier_metric`);
2. for a small class-conditional DiT and a small U-ViT (`jaxee.demo.setup`): trains the backbone,
   then applies each method through the library's training entry points
   (`jaxee.demo.methods`): ASE fine-tuning with a dropping schedule, DeeDiff exit heads/UEMs on
   the frozen backbone, a DuoDiff shallow backbone and a TABM learned block mask;
3. samples every variant from the same noise with DDIM + CFG, scores the samples, collects the
   per-step exit statistics and times all variants alternately on the wall clock
   (`jaxee.demo.evaluate`);
4. writes `OUT/report.md` and `OUT/report.json` (quality vs realized speed-up per method next to
   the full model), sample grids and exit-depth / FLOPs / quality-vs-speed / mask plots
   (`jaxee.demo.report`, `jaxee.eval.report`). Each stage's training run (config, metrics,
   checkpoint, export) stays in `OUT/<arch>/<stage>/`.

Deterministic for a seed (training, calibration, samples and every quality number; wall-clock
times vary). `--scale micro` is the seconds-long smoke-test variant. See `docs/DEMO.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

from jaxee.demo import setup as demo_setup

MARKER = ".jaxee_demo"


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version()}


def fit_metric(scale, seed: int, log=_log):
  """The classifier metric (trained on the train split) and the real test-split reference."""
  from jaxee.demo import evaluate as demo_eval  # pylint: disable=g-import-not-at-top
  from jaxee.eval import classifier_metric  # pylint: disable=g-import-not-at-top
  train_x, train_y = demo_setup.load_digits("train")
  test_x, test_y = demo_setup.load_digits("test")
  metric = classifier_metric.ClassifierMetric.fit(
      train_x, train_y, seed=seed, holdout_fraction=0.4, steps=scale.classifier_steps)
  real = demo_eval.real_reference(metric, test_x, test_y)
  info = {"heldout_accuracy": metric.heldout_accuracy,
          "reference_frechet": metric.reference_frechet(), "real_test": real,
          "steps": scale.classifier_steps}
  log(f"classifier: held-out accuracy {metric.heldout_accuracy:.3f}; real test digits FD "
      f"{real['frechet']:.2f}, confidence {real['confidence']:.3f}, accuracy "
      f"{real['class_accuracy']:.3f}")
  return metric, info


def run(out: pathlib.Path, seed: int = 0, scale="default", log=_log) -> dict:
  """Runs the whole demo into `out` (emptied first) and returns the report dict.

  Args:
    out: output directory; refused if it exists and holds something other than a demo output.
    seed: the run seed.
    scale: a `demo_setup.SCALES` name or a `demo_setup.DemoScale`.
    log: progress printer.
  """
  from jaxee.demo import evaluate as demo_eval  # pylint: disable=g-import-not-at-top
  from jaxee.demo import methods as demo_methods  # pylint: disable=g-import-not-at-top
  from jaxee.demo import report as demo_report  # pylint: disable=g-import-not-at-top
  if isinstance(scale, str):
    if scale not in demo_setup.SCALES:
      raise ValueError(f"unknown demo scale {scale!r}; choose from {sorted(demo_setup.SCALES)}")
    scale = demo_setup.SCALES[scale]
  scale_name = scale.name
  out = pathlib.Path(out)
  if out.exists():
    if not (out / MARKER).exists() and any(out.iterdir()):
      raise FileExistsError(f"{out} exists and is not a jaxee demo output; choose another --out")
    shutil.rmtree(out)
  out.mkdir(parents=True)
  (out / MARKER).write_text("written by python -m jaxee.demo; the directory is replaced on rerun\n")
  wall0, cpu0 = time.perf_counter(), demo_methods.cpu_seconds()
  log(f"jaxee demo: seed {seed}, scale {scale_name}, output {out}")
  clock = demo_methods.StageClock()
  metric, clf_info = clock.run("classifier", lambda: fit_metric(scale, seed, log))
  report = {"seed": seed, "scale": scale.to_dict(), "machine": machine_info(),
            "classifier": clf_info, "archs": {}}
  for arch in demo_setup.ARCHS:
    if not scale.methods_for(arch):
      continue
    result = demo_methods.build_variants(arch, scale, seed, out / arch, log)
    evaluated = clock.run(f"evaluate_{arch}",
                          lambda r=result: demo_eval.evaluate_arch(r, metric, scale, seed, log))
    record = demo_report.arch_record(arch, result, evaluated, scale)
    record["stages"][f"evaluate_{arch}"] = clock.stages[f"evaluate_{arch}"]
    record["files"] = {
        "grids": demo_report.save_grids(out, arch, evaluated["samples"]),
        "plots": demo_report.save_plots(out, arch, record,
                                        clf_info["real_test"]["frechet"])}
    report["archs"][arch] = record
  report["timing"] = {"total_wall_s": round(time.perf_counter() - wall0, 1),
                      "total_cpu_s": round(demo_methods.cpu_seconds() - cpu0, 1),
                      "stages": clock.stages}
  paths = demo_report.write(out, report)
  log(f"wrote {paths['markdown']} and {paths['json']} in {report['timing']['total_wall_s']:.0f}"
      f" s (CPU {report['timing']['total_cpu_s']:.0f} s)")
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/demo", type=pathlib.Path,
                      help="output directory (replaced if it holds an earlier demo)")
  parser.add_argument("--seed", default=0, type=int)
  parser.add_argument("--scale", default="default", choices=sorted(demo_setup.SCALES),
                      help="'default' (make demo) or 'micro' (seconds; the smoke test)")
  args = parser.parse_args(argv)
  try:
    report = run(args.out, args.seed, args.scale)
  except (ValueError, FileExistsError) as e:
    print(f"jaxee.demo: error: {e}", file=sys.stderr)
    return 2
  summary = {arch: {n: {"frechet": round(v["quality"]["frechet"], 2),
                        "speedup": round(v["timing"]["speedup"], 3)}
                    for n, v in rec["variants"].items()}
             for arch, rec in report["archs"].items()}
  print(json.dumps(summary, indent=1))
  return 0

