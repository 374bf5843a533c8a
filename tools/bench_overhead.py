"""Per-NFE cost outside the blocks: embed, head, sampler arithmetic, control flow (issue 13, 4).

    python tools/bench_overhead.py --models 'demo_dit; dit_s_2' --sampler ddim --steps 10 \
        --batch 8 --repeats 7 --json

Every model samples with three variants, timed in the paired rounds of `tools/bench_exits.py`
(same implementation: each round calls the full model and one variant back to back, order
alternating between rounds):

* `full` — the plain sampler (`plan=None`);
* `all_blocks` — an ASE plan that runs every droppable block at every NFE
  (`ASEPlan((depth,)*10)`, `jaxee/exits/ase.py`), i.e. the exit runner's control flow with nothing
  skipped;
* `no_blocks` — the ASE plan of depth 0 (`ASEPlan((0,)*10)`): the loop over blocks runs zero
  times, so the network is the backbone contract's embed + head only (DiT: patch/time/label
  embedding, final adaLN layer, unpatchify).

Prints one JSON line per model with (medians over rounds; seconds):

* `overhead_per_nfe_s` = time(no_blocks) / NFE, `overhead_per_step_s` = time(no_blocks) / steps
  — everything a network evaluation costs besides its blocks (embed + head + the sampler's
  update + the scan/cond control flow + dispatch), for the whole batch (CFG: the doubled batch);
* `blocks_per_nfe_s` = median over rounds of (time(full) − time(no_blocks)) / NFE — what the
  blocks cost;
* `overhead_fraction` = median of time(no_blocks) / time(full) per round, with `_spread`
  [min, max] over rounds and a bootstrap 95 % interval; `flop_fraction_outside_blocks` =
  FLOPs of embed + head / full FLOPs (`jaxee.eval.flops`) — the ideal of the same ratio;
* `runner_overhead` = median of time(all_blocks) / time(full) − 1 (cost of the exit runner's
  control flow when it skips nothing).

`demo_dit` is the demo's DiT (`jaxee.demo.setup.create_model('dit', SCALES['default'])`: width 64,
4 tokens); any other name is a registry arch (`jaxee.models.create`). Params are random.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_exits  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="demo_dit; dit_s_2",
                 help="';'-separated: 'demo_dit' or registry archs")
  p.add_argument("--input-size", type=int, default=None, help="override latent side (archs)")
  p.add_argument("--depth", type=int, default=None, help="override the block count (archs)")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--guidance", type=float, default=None, help="CFG scale (doubles the batch)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=7, help="paired rounds (at least 7 on a shared "
                 "machine)")
  p.add_argument("--bootstrap", type=int, default=2000)
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS value ('' = JAX's default)")
  p.add_argument("--json", action="store_true", help="print only the JSON lines")
  args = p.parse_args(argv)
  if args.repeats < 1 or args.steps < 1 or args.batch < 1:
    p.error("--repeats, --steps and --batch must be positive")
  return args


def make_model(name: str, args):
  """The demo DiT ('demo_dit') or a registry arch with the size overrides."""
  if name == "demo_dit":
    from jaxee.demo import setup  # pylint: disable=g-import-not-at-top
    return setup.create_model("dit", setup.SCALES["default"])
  from jaxee import models  # pylint: disable=g-import-not-at-top
  overrides = {}
  if args.input_size:
    overrides["input_size"] = args.input_size
  if args.depth:
    overrides["depth"] = args.depth
  return models.create(name, **overrides)


def measure(name: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee import sampling, testing  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import ase  # pylint: disable=g-import-not-at-top

  model = make_model(name, args)
  params = testing.random_params(model, jax.random.PRNGKey(0))
  ncls = model.num_classes if model.num_classes > 0 else 0
  labels = (jnp.arange(args.batch, dtype=jnp.int32) % min(ncls, 1000)) if ncls else None
  nfe = len(sampling.nfe_times(model, args.sampler, args.steps))
  cap = ase.capacity(model)
  variants = {"full": None,
              "all_blocks": ase.ASEPlan((cap,) * ase.NUM_INTERVALS, name="all"),
              "no_blocks": ase.ASEPlan((0,) * ase.NUM_INTERVALS, name="none")}

  def call(plan, seed):
    out = jaxee.sample(model, params, jax.random.PRNGKey(seed), num=args.batch,
                       sampler=args.sampler, steps=args.steps, labels=labels,
                       guidance=args.guidance, plan=plan, return_stats=True)
    return jax.block_until_ready(out)

  stats = {}
  for key, plan in variants.items():
    for w in range(1 + args.warmup):
      _, stats[key] = call(plan, w)
  pairs, rounds, timing_s = bench_exits.paired_rounds(
      call, None, [(k, variants[k]) for k in ("all_blocks", "no_blocks")], ideal={},
      repeats=args.repeats, max_repeats=args.repeats, budget_s=float("inf"),
      target_halfwidth=0.0, draws=args.bootstrap)
  none = pairs["no_blocks"]
  zero_s = np.asarray(none["plan"])
  full_s = np.asarray(none["full"])
  frac = zero_s / full_s
  lo, hi = bench_exits.bootstrap_median_ci(frac, args.bootstrap)
  full_flops = flops_lib.backbone_flops(model)
  outside = float(np.mean(np.asarray(stats["no_blocks"]["flops"], np.float64)))
  runner = np.asarray(pairs["all_blocks"]["plan"]) / np.asarray(pairs["all_blocks"]["full"])
  device = jax.devices()[0]
  return {
      "model": name, "family": model.family, "depth": cap,
      "width": getattr(model, "hidden_size", None),
      "tokens": flops_lib.num_tokens(model) if model.family != "unet" else None,
      "sampler": args.sampler, "steps": args.steps, "nfe": nfe, "batch": args.batch,
      "guidance": args.guidance, "rounds": rounds,
      "full_s": round(float(np.median(full_s)), 5),
      "no_blocks_s": round(float(np.median(zero_s)), 5),
      "overhead_per_nfe_s": float(np.median(zero_s)) / nfe,
      "overhead_per_step_s": float(np.median(zero_s)) / args.steps,
      "overhead_per_nfe_s_spread": [float(zero_s.min()) / nfe, float(zero_s.max()) / nfe],
      "blocks_per_nfe_s": float(np.median(full_s - zero_s)) / nfe,
      "overhead_fraction": round(float(np.median(frac)), 4),
      "overhead_fraction_spread": [round(float(frac.min()), 4), round(float(frac.max()), 4)],
      "overhead_fraction_ci95": [round(lo, 4), round(hi, 4)],
      "flop_fraction_outside_blocks": round(outside / full_flops, 6),
      "no_blocks_mean_blocks": float(np.mean(np.asarray(stats["no_blocks"]["blocks"]))),
      "runner_overhead": round(float(np.median(runner)) - 1.0, 4),
      "timing_s": round(timing_s, 1),
      "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
      "host": platform.node(), "cpus": os.cpu_count(),
      "loadavg": [round(v, 2) for v in os.getloadavg()],
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  for name in bench_exits.split_plans(args.models):
    rec = measure(name, args)
    if not args.json:
      print(f"# {name}: overhead {rec['overhead_per_nfe_s'] * 1e3:.3f} ms/NFE "
            f"({rec['overhead_fraction']:.3f} of the time, "
            f"{rec['flop_fraction_outside_blocks']:.4f} of the FLOPs)", file=sys.stderr)
    print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
