"""Sampling throughput and compile time of `jaxee.sample` per sampler, tiny random-init models.

    python tools/bench_sample.py                       # all six samplers, 50 steps, batch 8
    python tools/bench_sample.py --samplers ddim,dpm_solver --steps 20 --batch 16 --guidance 1.5

DDPM and DDIM run on a tiny DiT (their `linear_discrete` schedule); Euler–Maruyama, the Euler ODE
and DPM-Solver on a tiny U-ViT with the continuous VP-SDE, DPM-Solver++ on the same U-ViT with the
discrete SD schedule (the pairings of the original code, `jaxee/diffusion/samplers.py`). Both
models: depth `--depth`, width `--hidden`, patch 2, `--size`² × `--channels` latents, 10 classes
(U-ViT: plus the null class). Params are random: timing does not depend on their values.

Per sampler: one first call (trace + compile + one run), `--warmup` untimed calls, then
`--repeats` timed calls, each ended by `jax.block_until_ready`. `compile_s` = first call − median
call; `images_per_s` = batch / median call. Prints one JSON document:
`{"machine": {...}, "config": {...}, "results": [{"sampler", "model", "schedule", "steps", "nfe",
"images_per_s", "compile_s", "median_call_s", "min_call_s"}, ...]}`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# sampler -> (backbone family, schedule), as the original code pairs them.
PAIRING = {"ddpm": ("dit", "linear_discrete"), "ddim": ("dit", "linear_discrete"),
           "euler_maruyama": ("uvit", "vp_continuous"), "euler_ode": ("uvit", "vp_continuous"),
           "dpm_solver": ("uvit", "vp_continuous"), "dpm_solver_pp": ("uvit", "sd_discrete")}


def parse_args(argv=None) -> argparse.Namespace:
  """The benchmark options."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--samplers", default=",".join(PAIRING),
                 help=f"comma-separated subset of {','.join(PAIRING)}")
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--hidden", type=int, default=64, help="hidden_size / embed_dim")
  p.add_argument("--size", type=int, default=8, help="latent side")
  p.add_argument("--channels", type=int, default=4)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--guidance", type=float, default=None, help="CFG scale (doubles the batch)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS value ('' = JAX's default)")
  args = p.parse_args(argv)
  args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
  unknown = sorted(set(args.samplers) - set(PAIRING))
  if unknown:
    p.error(f"unknown sampler(s) {unknown}; choose from {list(PAIRING)}")
  return args


def build(args, family: str):
  """A tiny class-conditional backbone of `family` with random params, and its labels."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxee import models  # pylint: disable=g-import-not-at-top
  if family == "dit":
    model = models.create("dit", input_size=args.size, patch_size=2, in_channels=args.channels,
                          hidden_size=args.hidden, depth=args.depth, num_heads=4, num_classes=10)
  else:
    model = models.create("uvit", img_size=args.size, patch_size=2, in_chans=args.channels,
                          embed_dim=args.hidden, depth=args.depth, num_heads=4, num_classes=11,
                          cfg_null_class=10)
  x = jnp.zeros((1, args.size, args.size, args.channels))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,)),
                               jnp.zeros((1,), jnp.int32))["params"]
  return model, params, jnp.arange(args.batch, dtype=jnp.int32) % 10


def time_sampler(args, sampler: str, model, params, labels) -> dict:
  """Times `jaxee.sample` for one sampler and returns its result record."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  schedule = PAIRING[sampler][1]

  def call(i):
    return sampling.sample(model, params, jax.random.key(i), num=args.batch, sampler=sampler,
                           steps=args.steps, labels=labels, guidance=args.guidance,
                           schedule=schedule)

  t0 = time.perf_counter()
  jax.block_until_ready(call(0))
  first = time.perf_counter() - t0
  for i in range(args.warmup):
    jax.block_until_ready(call(1 + i))
  times = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call(100 + i))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  nfe = len(sampling.nfe_times(model, sampler, args.steps, schedule))
  return {
      "sampler": sampler, "model": model.family, "schedule": schedule, "steps": args.steps,
      "nfe": nfe,
      "images_per_s": round(args.batch / median, 2),
      "compile_s": round(max(first - median, 0.0), 3),
      "median_call_s": round(median, 4), "min_call_s": round(min(times), 4),
  }


def machine() -> dict:
  """What the numbers were measured on."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or "?"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
          "num_devices": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
          "jax": jax.__version__, "python": platform.python_version()}


def run(args) -> dict:
  """Benchmarks every requested sampler; returns the JSON document."""
  built, results = {}, []
  for sampler in args.samplers:
    family = PAIRING[sampler][0]
    if family not in built:
      built[family] = build(args, family)
    results.append(time_sampler(args, sampler, *built[family]))
  config = {k: getattr(args, k) for k in ("depth", "hidden", "size", "channels", "steps", "batch",
                                          "guidance", "warmup", "repeats")}
  return {"machine": machine(), "config": config, "results": results}


def main(argv=None) -> int:
  """Parses options, pins the platform before JAX is imported, prints the JSON document."""
  args = parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  print(json.dumps(run(args), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
