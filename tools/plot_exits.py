"""Executed depth vs. diffusion time for a set of exit plans, as a PNG.

    python tools/plot_exits.py --arch dit_xl_2 --sampler ddim --steps 50 \
        --plans "ase:D3-DiT; ase:D7-DiT; duodiff:300:random=3; mask:skip=0.5" --out exits.png
    python tools/plot_exits.py --arch dit_s_2 --plans ase:D3-DiT,deediff:4 --run --out d.png

One line per plan: the number of transformer blocks executed per sample at each network
evaluation (y) against τ = t / T of that evaluation (x, from the noise end τ = 1 on the left to
the data end on the right). By default the depths are the plans' host tables
(`BoundPlan.info['blocks_per_nfe']`: exact for static plans, an upper bound for dynamic ones);
`--run` instead samples once with random params and plots the measured per-NFE `blocks` stats
(`jaxee.sample(..., return_stats=True)`), which is what a dynamic plan (DeeDiff) really ran.
Plan specs are those of `tools/bench_exits.py` (`jaxee.exits.spec`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="dit_xl_2")
  p.add_argument("--plans", default="ase:D2-DiT; ase:D3-DiT; ase:D4-DiT; ase:D7-DiT",
                 help="plan specs separated by ';' ('+' composes within one spec)")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--input-size", type=int, default=None)
  p.add_argument("--run", action="store_true", help="plot measured stats of one sampling run")
  p.add_argument("--batch", type=int, default=2, help="batch of the --run sampling")
  p.add_argument("--out", default="exits.png")
  p.add_argument("--platform", default="cpu")
  return p.parse_args(argv)


def depth_curves(args) -> dict:
  """{spec: (tau per NFE, blocks per NFE)} plus the model's full block count under 'full'."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from jaxee import testing  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_exits  # pylint: disable=g-import-not-at-top

  specs = bench_exits.split_plans(args.plans)
  # Host tables need no values: bind static plans to parameter shapes only.
  abstract = not args.run and not any(s.startswith("deediff") for s in specs)
  model, params, labels, times = bench_exits.build(args, abstract=abstract)
  tau = plan_lib.model_time_to_unit(times.astype(np.float64), model.default_schedule)
  curves = {"full": (tau, np.full(len(times), float(flops_lib.num_blocks(model))))}
  for spec in specs:
    plan, plan_params = testing.plan_from_spec(spec, model, params, times)
    if args.run:
      _, stats = jaxee.sample(model, plan_params, jax.random.PRNGKey(0), num=args.batch,
                              sampler=args.sampler, steps=args.steps, labels=(
                                  None if labels is None else labels[:args.batch]),
                              plan=plan, return_stats=True)
      blocks = np.asarray(stats["blocks"], np.float64)
    else:
      blocks = np.asarray(plan.bind(model, plan_params, times).info["blocks_per_nfe"])
    curves[spec] = (tau, blocks)
  return curves


def plot(curves: dict, title: str, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for spec, (tau, blocks) in curves.items():
    style = dict(color="black", linestyle=":", linewidth=1) if spec == "full" else {}
    ax.step(tau, blocks, where="mid", label=spec, **style)
  ax.set_xlim(1.0, 0.0)
  ax.set_xlabel("τ = t / T of the network evaluation (noise → data)")
  ax.set_ylabel("blocks executed per sample")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  tmp = out + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, out)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  curves = depth_curves(args)
  plot(curves, f"{args.arch}, {args.sampler}-{args.steps}", args.out)
  summary = {spec: round(float(b.mean()), 3) for spec, (_, b) in curves.items()}
  print(json.dumps({"out": args.out, "mean_blocks": summary}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
