r"""`jaxee-train`: training from the command line (`python -m jaxee.cli.train` is the same).

    jaxee-train --config=configs/train_baseline.py:runlocal --workdir=/tmp/run
    jaxee-train --config=configs/ase_dit_imagenet256.py:D3 --workdir=runs/ase_d3 \
        --config.init=ckpt/dit_xl_2_256 --config.train.parallel=pmap
    # multi-host (TPU pod / SLURM: auto-detected; elsewhere give the three flags):
    jaxee-train --config=... --workdir=SHARED_DIR --multihost \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=$RANK

absl flags with `ml_collections.config_flags` (`lock_config=True`, so `--config.a.b=v` may only
override existing fields; the schema is documented in `jaxee/train/launch.py`). Re-running the
same command resumes from the workdir's latest checkpoint. The work is
`jaxee.train.launch.train_and_evaluate(config, workdir)`; this module only reads flags and maps
errors to exit codes: 0 done, 2 bad config/input, 3 non-finite loss (nothing saved after it),
4 corrupt checkpoint. The summary is printed as JSON (process 0). `python -m jaxee.main` is the
old spelling of this command.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from jaxee import cli
from jaxee.train import launch



class _QuietOrbax:
  """absl-handler filter: drops Orbax's per-save INFO chatter (warnings and errors pass)."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  """absl entry point (flags from `define_flags`); exits with the codes above on failure."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config=configs/<exp>.py[:arg] is required")
  if not f.workdir:
    raise app.UsageError("--workdir=DIR is required")
  if f.multihost or bool(config.get("train", {}).get("multihost", False)):
    launch.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  from jaxee.train import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    summary = launch.train_and_evaluate(config, os.path.expanduser(f.workdir))
  except trainer.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except checkpoint.CorruptCheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(4)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  if trainer.is_main_process():
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


def define_flags() -> None:
  """Defines `--config`, `--workdir` and the multi-host flags (once per process)."""
  if "config" in flags.FLAGS:
    return
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/train_baseline.py:runlocal.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, export).")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def run() -> None:
  """The `jaxee-train` entry point: defines the flags and runs `main` under `absl.app`."""
  cli.show_doc_in_absl_help(__doc__)
  define_flags()
  try:
    app.run(main)
  except SystemExit as e:
    if e.code == 1 and cli.HELP_FLAGS & set(sys.argv[1:]):  # absl exits 1 after printing help
      sys.exit(0)
    raise


if __name__ == "__main__":
  run()
