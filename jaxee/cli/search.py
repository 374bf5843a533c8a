r"""`jaxee-search`: search an exit plan under a compute budget (`python -m jaxee.cli.search`).

    jaxee-search --ckpt=ckpt/dit_s2 --sampler=ddim --steps=20 --guidance=1.5 --budget=0.6 \
        --family=ase --num=16 --seed=0 --out=runs/search/ase_060.json
    jaxee-search --ckpt=model.pt --arch=dit_s_2 --family=mask --unit=branch --speedup=1.5 \
        --out=plan.npz
    jaxee-sample --config=configs/sample_dit.py --config.plan=search:runs/search/ase_060.json

`--ckpt` is a converted checkpoint directory (`jaxee-convert`) or a PyTorch/safetensors file
converted on the fly with `--arch` (as `jaxee-sample` loads it). The search
(`jaxee.exits.search.search_plan`) writes the plan file (`.json` for `--family=ase`, `.npz`
otherwise) with its log and the budget it met, and prints a JSON summary; bad input exits with
status 2 and a one-line message. See `docs/methods/search.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
  from jaxee.exits import search  # pylint: disable=g-import-not-at-top
  # Unset options are left out (SUPPRESS), so the defaults are `search_plan`'s and
  # `Calibration`'s: one source of defaults.
  p = argparse.ArgumentParser(prog="jaxee-search", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              argument_default=argparse.SUPPRESS)
  p.add_argument("--ckpt", required=True, help="converted checkpoint dir or .pt/.safetensors")
  p.add_argument("--arch", help="architecture of a .pt checkpoint")
  p.add_argument("--model-overrides", default="{}",
                 help="JSON constructor overrides for a .pt checkpoint (as jaxee-sample's)")
  p.add_argument("--sampler", help="sampler (default ddim)")
  p.add_argument("--steps", type=int, help="sampling steps (default 20)")
  p.add_argument("--guidance", type=float, help="CFG scale (default: none)")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--budget", type=float,
                     help="largest FLOP fraction of the full model (default 0.7)")
  group.add_argument("--speedup", type=float,
                     help="target speed-up S, converted to the FLOP fraction 1/S")
  p.add_argument("--family", choices=search.FAMILIES, help="plan family (default ase)")
  p.add_argument("--unit", choices=search.masks_lib.UNITS, help="mask units (default block)")
  p.add_argument("--no-monotone", dest="monotone", action="store_false",
                 help="allow ASE depths that grow toward noise")
  p.add_argument("--num", type=int, help="calibration samples (default 16)")
  p.add_argument("--labels", help="comma-separated calibration labels")
  p.add_argument("--seed", type=int, help="calibration seed (default 0)")
  p.add_argument("--refine-rounds", type=int, help="swap rounds (default 2)")
  p.add_argument("--out", required=True, help="plan file to write (.json for ase, else .npz)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses `argv` (without the program name), runs the search, writes the plan file.

  Returns:
    0 on success, 2 on bad input (message on stderr).
  """
  args = _parser().parse_args(argv)
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from jaxee.exits import search  # pylint: disable=g-import-not-at-top
  from jaxee.sharded import run as run_lib  # pylint: disable=g-import-not-at-top
  opts = vars(args)
  ckpt, arch, out = opts.pop("ckpt"), opts.pop("arch", None), opts.pop("out")
  overrides = opts.pop("model_overrides")
  calib = {k: opts.pop(k) for k in ("num", "seed", "labels") if k in opts}
  try:
    if "labels" in calib:
      calib["labels"] = [int(v) for v in calib["labels"].split(",")]
    try:
      overrides = json.loads(overrides)
    except json.JSONDecodeError as e:
      raise ValueError(f"--model-overrides is not JSON: {e}") from None
    model, params = run_lib.load_backbone(config_dict.ConfigDict(
        {"ckpt": ckpt, "arch": arch, "model_overrides": overrides}))
    result = search.search_plan(model, params, calibration=search.Calibration(**calib),
                                out=out, **opts)
    path = result.meta["plan_file"]
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = {"plan_file": path, "flops_fraction": result.flops_fraction,
             "objective": result.objective, "plan_spec": f"search:{path}",
             **{k: result.meta[k] for k in ("family", "budget", "budget_met", "sampler",
                                            "steps", "guidance", "candidates_evaluated",
                                            "seconds")}}
  if result.meta["family"] == "ase":
    summary["schedule"] = list(result.plan.table)
  print(json.dumps(summary, indent=2, sort_keys=True))
  return 0


def run() -> None:
  """The `jaxee-search` entry point."""
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  run()
