"""`jaxee-fid`: FID / Inception Score of a `jaxee-sample` run's shards.

`python -m jaxee.cli.fid` and `python -m jaxee.eval.fid_shards` are the same command.

    jaxee-fid --samples runs/sample_dit_xl_2_256 \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 100] [--save-stats runs/sample_dit_xl_2_256/fid_stats.npz] [--json OUT]

The work is `jaxee.eval.fid_shards.fid_from_shards` (shards checked against the run's
`manifest.json`, streamed through the FID Inception-v3). Everything cheap is checked before the
Inception weights are even read: `--batch-size` >= 1, the shards, and a `mu`/`sigma` reference
file. Prints the result as JSON (also written to `--json`); bad input exits 2 with a one-line
message.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxee import atomic_io
from jaxee.eval import fid as fid_lib
from jaxee.eval import fid_shards


def main(argv=None) -> int:
  """Parses `argv`, checks everything cheap, scores; returns 0, or 2 with a one-line error."""
  p = argparse.ArgumentParser(prog="jaxee-fid", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--samples", required=True, help="the sampler's out_dir")
  p.add_argument("--ref", required=True, help="reference statistics .npz")
  p.add_argument("--inception", required=True,
                 help="pt_inception-2015-12-05-6726825d.pth (read without torch)")
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--save-stats", default=None)
  p.add_argument("--json", default=None, help="also write the result to this file")
  args = p.parse_args(argv)
  if args.batch_size < 1:
    print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
    return 2
  from jaxee.eval import inception_convert  # pylint: disable=g-import-not-at-top
  try:
    fid_shards.check_shards(args.samples)  # cheap checks before the Inception weights are read
    if _has_stats(args.ref):
      fid_lib.load_reference_stats(args.ref)
    variables = inception_convert.load_inception(args.inception)
    result = fid_shards.fid_from_shards(args.samples, args.ref, variables,
                                        batch_size=args.batch_size, save_stats=args.save_stats)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = json.dumps(result)
  print(text)
  if args.json:
    atomic_io.atomic_write_text(args.json, text + "\n")
  return 0


def _has_stats(path: str) -> bool:
  """Whether `path` looks like a `mu`/`sigma` file (then it is checked before anything runs);
  missing or unreadable files count as such, so that their error comes first too."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return "arr_0" not in z.files
  except Exception:  # pylint: disable=broad-except
    return True


def run() -> None:
  """The `jaxee-fid` entry point: `main(sys.argv[1:])`, exiting with its status."""
  sys.exit(main())


if __name__ == "__main__":
  run()
