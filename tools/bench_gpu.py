"""One-call GPU benchmark: throughput, model FLOP utilisation, exit efficiency (issue 13 item 5).

    # H200 (sized for about 6 minutes; --quick about 3):
    python tools/bench_gpu.py --arch dit_xl_2 --sampler ddpm --steps 250 --guidance 1.5 \
        --compute-dtype bfloat16 --batch 64 --peak-tflops 989
    # CPU check of the same code path with a tiny model:
    python tools/bench_gpu.py --arch dit_s_8 --input-size 16 --depth 2 --steps 3 --batch 2 --quick \
        --plans 'ase:D3-DiT; deediff:scripted=1,2'

Runs on whatever backend JAX finds (`--platform ''`, the default). Params are random
(`jaxee.testing.random_params`; speed does not depend on their values). Prints one JSON line per
measurement, each with the device:

* `kind: "throughput"` — the full model sampling `--batch` images with `--sampler/--steps`
  (+ CFG `--guidance`, which doubles the network batch) in `--compute-dtype`
  (`jaxee.sample(..., compute_dtype=...)`): `s_per_call` (median of `--throughput-calls` timed
  calls after one compile call), `images_per_s`, `s_per_image`, `forwards_per_image`
  (NFE × 2 with CFG), `gflop_per_forward` (`jaxee.eval.flops.backbone_flops`, one sample), the
  achieved `tflops` = forwards × GFLOP × images / time, and `mfu` = tflops / `--peak-tflops`.
* `kind: "exit"` — one per plan of `--plans`, the paired-round estimator of
  `tools/bench_exits.py` (same implementation, imported), at `--exit-steps` sampler steps so that
  all plans fit the budget: `ideal_saving`, `realized_saving`, `efficiency` with its bootstrap
  `efficiency_ci95`, `rounds`.
* `kind: "goals"` — the issue's goals (MFU ≥ 0.40, s/image ≤ 0.30 with the limit 0.12 reported,
  exit efficiency ≥ 0.95, DeeDiff ≥ 0.85) as pass/fail on a GPU; on a CPU backend every goal reads
  "not measured" (the CPU numbers only check that the command works).

`--batch auto` doubles the batch from `--batch-start` up to `--batch-cap` with a short probe
(`--probe-steps` steps) and keeps the fastest images/s (stops at the first out-of-memory or when
images/s improves by less than 5 %). `--deadline-s` skips the remaining measurements (printed
with `"skipped": true`) once the run has used that many seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_exits  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_PLANS = "ase:D3-DiT; duodiff:300:random=3; mask:skip=0.5; deediff:scripted=14,28"
GOALS = {"mfu_min": 0.40, "s_per_image_goal": 0.30, "s_per_image_limit": 0.12,
         "exit_efficiency_min": 0.95, "deediff_efficiency_min": 0.85}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="dit_xl_2", help="registry arch (jaxee.models.create)")
  p.add_argument("--input-size", type=int, default=None, help="override latent side")
  p.add_argument("--depth", type=int, default=None, help="override the block count (tiny runs)")
  p.add_argument("--sampler", default="ddpm")
  p.add_argument("--steps", type=int, default=250, help="sampler steps of the throughput rows")
  p.add_argument("--guidance", type=float, default=1.5, help="CFG scale (0: none)")
  p.add_argument("--compute-dtype", default="bfloat16", help="'' = the model's dtype")
  p.add_argument("--batch", default="64", help="images per call, or 'auto'")
  p.add_argument("--batch-start", type=int, default=16)
  p.add_argument("--batch-cap", type=int, default=256)
  p.add_argument("--probe-steps", type=int, default=10, help="sampler steps of the auto probe")
  p.add_argument("--throughput-calls", type=int, default=1, help="timed calls after compile")
  p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak (H200 bf16: 989)")
  p.add_argument("--plans", default=DEFAULT_PLANS, help="exit plans, ';'-separated ('' = none)")
  p.add_argument("--exit-steps", type=int, default=20, help="sampler steps of the exit rows")
  p.add_argument("--exit-batch", type=int, default=None, help="default: the throughput batch")
  p.add_argument("--repeats", type=int, default=3, help="minimum paired rounds per plan")
  p.add_argument("--max-repeats", type=int, default=7)
  p.add_argument("--target-halfwidth", type=float, default=0.025)
  p.add_argument("--budget-s", type=float, default=60.0, help="paired-timing budget")
  p.add_argument("--bootstrap", type=int, default=2000)
  p.add_argument("--deadline-s", type=float, default=300.0,
                 help="skip what is left after this many seconds")
  p.add_argument("--quick", action="store_true",
                 help="shorter: throughput at min(steps, 50), exit rows at min(exit-steps, 10), "
                      "3 rounds, 1 timed call")
  p.add_argument("--platform", default="", help="JAX_PLATFORMS value ('' = JAX's default)")
  args = p.parse_args(argv)
  if args.batch != "auto":
    try:
      args.batch = int(args.batch)
    except ValueError:
      p.error(f"--batch must be an integer or 'auto', got {args.batch!r}")
    if args.batch < 1:
      p.error(f"--batch must be positive, got {args.batch}")
  if args.quick:
    args.steps = min(args.steps, 50)
    args.exit_steps = min(args.exit_steps, 10)
    args.repeats, args.max_repeats = min(args.repeats, 3), min(args.max_repeats, 3)
    args.throughput_calls = 1
    args.bootstrap = min(args.bootstrap, 500)
  args.guidance = args.guidance or None
  args.compute_dtype = args.compute_dtype or None
  return args


def _sig(x: float, digits: int = 5) -> float:
  """`x` to `digits` significant digits (tiny CPU MFUs stay visible)."""
  return float(f"{x:.{digits}g}")


def _device() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return {"device": f"{d.platform}:{getattr(d, 'device_kind', '')}", "platform": d.platform,
          "device_count": jax.device_count()}


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class _Sampler:
  """The full model at one batch size (built once; `calls` compiled samplers per steps value)."""

  def __init__(self, args, model, params, steps: int, batch: int):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.args, self.model, self.params, self.steps, self.batch = args, model, params, steps, batch
    ncls = model.num_classes if model.num_classes > 0 else 0
    self.labels = (jnp.arange(batch, dtype=jnp.int32) % min(ncls, 1000)) if ncls else None

  def __call__(self, seed: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jaxee  # pylint: disable=g-import-not-at-top
    out = jaxee.sample(self.model, self.params, jax.random.PRNGKey(seed), num=self.batch,
                       sampler=self.args.sampler, steps=self.steps, labels=self.labels,
                       guidance=self.args.guidance, compute_dtype=self.args.compute_dtype,
                       check_finite=False)
    return jax.block_until_ready(out)

  def timed(self, calls: int) -> tuple[float, float]:
    """(compile-call seconds, median of `calls` timed calls)."""
    t0 = time.perf_counter()
    self(0)
    first = time.perf_counter() - t0
    times = []
    for i in range(calls):
      t0 = time.perf_counter()
      self(1 + i)
      times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def throughput_row(args, model, params, steps: int, batch: int, calls: int) -> dict:
  """Images/s, s/image and MFU of the full model (CFG counted as the doubled batch)."""
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  first, sec = _Sampler(args, model, params, steps, batch).timed(calls)
  nfe = len(sampling.nfe_times(model, args.sampler, steps))
  forwards = nfe * (2 if args.guidance else 1)
  gflop = flops_lib.backbone_flops(model) / 1e9
  tflops = forwards * gflop * batch / sec / 1e3
  return {"kind": "throughput", "arch": args.arch, "sampler": args.sampler, "steps": steps,
          "guidance": args.guidance, "compute_dtype": args.compute_dtype, "batch": batch,
          "nfe": nfe, "forwards_per_image": forwards, "gflop_per_forward": round(gflop, 3),
          "s_per_call": _sig(sec), "compile_call_s": round(first, 3),
          "images_per_s": _sig(batch / sec), "s_per_image": _sig(sec / batch),
          "tflops": _sig(tflops), "peak_tflops": args.peak_tflops,
          "mfu": _sig(tflops / args.peak_tflops), "timed_calls": calls}


def auto_batch(args, model, params, emit) -> int:
  """Doubles the batch while images/s improves ≥ 5 % and memory lasts; returns the best."""
  best, best_ips, batch = None, 0.0, args.batch_start
  while batch <= args.batch_cap:
    try:
      row = throughput_row(args, model, params, args.probe_steps, batch, 1)
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        raise
      emit({"kind": "batch_probe", "batch": batch, "oom": True})
      break
    emit(dict(row, kind="batch_probe"))
    if best is not None and row["images_per_s"] < 1.05 * best_ips:
      if row["images_per_s"] > best_ips:
        best, best_ips = batch, row["images_per_s"]
      break
    best, best_ips = batch, row["images_per_s"]
    batch *= 2
  if best is None:
    raise RuntimeError(f"--batch auto: even batch {args.batch_start} ran out of memory")
  return best


def exit_rows(args, batch: int) -> list[dict]:
  """The paired-round exit efficiency of every plan (`bench_exits.run`, same estimator)."""
  ns = argparse.Namespace(
      arch=args.arch, plan=[args.plans], sampler=args.sampler, steps=args.exit_steps,
      batch=args.exit_batch or batch, guidance=args.guidance, input_size=args.input_size,
      depth=args.depth,
      dtype=None, compute_dtype=args.compute_dtype, warmup=1, repeats=args.repeats,
      max_repeats=args.max_repeats, target_halfwidth=args.target_halfwidth,
      budget_s=args.budget_s, bootstrap=args.bootstrap)
  rows = []
  for rec in bench_exits.run(ns):
    rec.pop("round_ratios", None)
    rows.append(dict(rec, kind="exit"))
  return rows


def goals_row(dev: dict, throughput: dict | None, exits: list[dict]) -> dict:
  """Pass/fail of the issue's goals on a GPU; 'not measured' on a CPU backend or when skipped."""
  row = {"kind": "goals", **GOALS}
  gpu = dev["platform"] == "gpu" or dev["platform"] == "cuda"
  nm = "not measured" if not gpu else "not measured (skipped)"
  if not gpu:
    row["note"] = "CPU backend: the GPU goals are not measured (no device lent to this task)"
  row["mfu"] = nm if not gpu or throughput is None else throughput["mfu"] >= GOALS["mfu_min"]
  row["s_per_image"] = (nm if not gpu or throughput is None
                        else throughput["s_per_image"] <= GOALS["s_per_image_goal"])
  row["s_per_image_within_limit"] = (nm if not gpu or throughput is None
                                     else throughput["s_per_image"] <= GOALS["s_per_image_limit"])
  eff = {}
  for rec in exits:
    floor = GOALS["deediff_efficiency_min" if rec["plan"].startswith("deediff")
                  else "exit_efficiency_min"]
    eff[rec["plan"]] = (nm if not gpu or rec.get("efficiency") is None
                        else rec["efficiency"] >= floor)
  row["exit_efficiency"] = eff or nm
  return row


def run(args, emit) -> list[dict]:
  start = time.perf_counter()
  dev = _device()
  out = []

  def put(row):
    row = {**row, **dev, "elapsed_s": round(time.perf_counter() - start, 1)}
    out.append(row)
    emit(row)

  model, params, _, _ = bench_exits.build(argparse.Namespace(
      arch=args.arch, input_size=args.input_size, depth=args.depth, dtype=None, batch=1,
      sampler=args.sampler, steps=args.steps))
  batch = auto_batch(args, model, params, put) if args.batch == "auto" else args.batch
  throughput = None
  try:
    throughput = throughput_row(args, model, params, args.steps, batch, args.throughput_calls)
    put(throughput)
  except Exception as err:  # pylint: disable=broad-except
    if not _is_oom(err):
      raise
    put({"kind": "throughput", "batch": batch, "oom": True})
  exits = []
  plans = bench_exits.split_plans(args.plans) if args.plans else []
  if plans and time.perf_counter() - start < args.deadline_s:
    for rec in exit_rows(args, batch):
      put(rec)
      exits.append(rec)
  elif plans:
    for spec in plans:
      put({"kind": "exit", "plan": spec, "skipped": True, "efficiency": None})
  put(goals_row(dev, throughput, exits))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  run(args, lambda row: print(json.dumps(row), flush=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
