"""Per-forward cost of the exit runners: one jitted network call per variant, timed alternately.

    python tools/bench_forward.py --arch dit_s_2 --batch 8 --depths 12,9,6 --rounds 12

The sampler-level benchmark (`tools/bench_exits.py`) times whole sampling loops; this one isolates
one network evaluation at a fixed time, so a runner's overhead shows directly: the full
`model.apply`, the ASE runner (`ASEPlan`, constant schedule of depth k) and the DeeDiff batched
while-loop runner (`deediff.benchmark_plan`, whole batch exiting at layer k) for each k in
`--depths`. Random weights; prints one JSON object per variant with median / fastest wall and
median process-CPU seconds, the realized saving against the full forward and the ideal (FLOP)
saving of the variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="dit_s_2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--depths", default="12,9,6")
  p.add_argument("--rounds", type=int, default=12)
  p.add_argument("--t", type=float, default=999.0, help="network time of the evaluation")
  p.add_argument("--platform", default="cpu")
  args = p.parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxee import models  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import ase, deediff, testing  # pylint: disable=g-import-not-at-top

  model = models.create(args.arch)
  if model.family != "dit":
    raise SystemExit("bench_forward: DiT archs only (the runners are compared at a fixed depth)")
  params = testing.random_params(model, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1),
                        (args.batch, model.input_size, model.input_size, model.in_channels))
  t = jnp.full((args.batch,), args.t, jnp.float32)
  y = jnp.arange(args.batch, dtype=jnp.int32) % max(model.num_classes, 1)
  times = np.array([args.t])
  full_flops = flops_lib.backbone_flops(model)
  variants = {"full": (jax.jit(lambda x: model.apply({"params": params}, x, t, y)), 0.0)}
  for k in (int(v) for v in args.depths.split(",")):
    bound = ase.ASEPlan((k,) * 10).bind(model, params, times)
    variants[f"ase@{k}"] = (jax.jit(lambda x, b=bound: b.net(x, t, y, jnp.int32(0), ())[0]),
                            1.0 - float(np.mean(bound.info["flops_per_nfe"])) / full_flops)
    plan, _ = deediff.benchmark_plan(model, params, jax.random.PRNGKey(3),
                                     exit_layer_at_noise=k, exit_layer_at_clean=k)
    bound = plan.bind(model, params, times)
    variants[f"deediff@{k}"] = (
        jax.jit(lambda x, b=bound: b.net(x, t, y, jnp.int32(0), ())[0]),
        1.0 - float(np.mean(bound.info["flops_per_nfe"])) / full_flops)
  for f, _ in variants.values():
    jax.block_until_ready(f(x))
  wall = {k: [] for k in variants}
  cpu = {k: [] for k in variants}
  names = list(variants)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(variants[name][0](x))
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  full_s = statistics.median(wall["full"])
  for name, (_, ideal) in variants.items():
    med = statistics.median(wall[name])
    realized = 1.0 - med / full_s
    print(json.dumps({
        "variant": name, "median_s": round(med, 4), "min_s": round(min(wall[name]), 4),
        "cpu_s": round(statistics.median(cpu[name]), 4), "ideal_saving": round(ideal, 4),
        "realized_saving": round(realized, 4),
        "efficiency": round(realized / ideal, 3) if ideal > 1e-6 else None,
        "arch": args.arch, "batch": args.batch, "rounds": args.rounds,
        "device": str(jax.devices()[0])}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
