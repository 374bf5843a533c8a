r"""`jaxee-sample`: sampling from the command line (`python -m jaxee.cli.sample` is the same).

    jaxee-sample --config=configs/sample_dit.py:runlocal
    jaxee-sample --config=configs/sample_dit.py --config.ckpt=ckpt/dit_xl_2_256 \
        --config.vae_ckpt=ckpt/sd_vae_ft_ema --config.out_dir=runs/dit_xl_2_fid50k
    jaxee-sample --config=configs/sample_uvit.py:runlocal --config.sampler=euler_ode \
        --config.steps=25 --config.seed=3

Sharded by default: each batch is split over every local device (`config.multi_device`, on by
default) and, in a multi-process run, process p samples and writes the shards k ≡ p (mod P)
(disjoint; process 0 writes the manifest once all are on disk):

    jaxee-sample --config=... --multihost --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=$RANK

`--config.compute_dtype=bfloat16` runs the network in bf16 with its float32 params.

Every field of the config can be overridden as `--config.FIELD=VALUE` (ml_collections
`config_flags`; the config is locked, so a misspelt field is an error). The run writes resumable
shards, a PNG grid and the throughput to `config.out_dir` (see `jaxee.sharded.run`), shows a
progress bar and prints the throughput record as JSON; bad input exits with status 2 and a
one-line message. Re-running the same command resumes an interrupted run. From Python:
`jaxee.sharded.run.run_sampling(config)`; one batch in memory: `jaxee.sample(...)`.
"""
from __future__ import annotations

import json
import sys

from jaxee import cli

CONFIG_HELP = "Sampling config file, e.g. configs/sample_dit.py[:runlocal]."


def main(argv, config=None) -> int:
  """Runs `jaxee.sharded.run.run_sampling` on the `--config` flag's config (or `config`).

  Args:
    argv: the arguments left after flag parsing (must be just the program name).
    config: the config to run instead of the flag's (tests).

  Returns:
    0 on success, 2 on bad input (message on stderr).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxee.sharded import run as run_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if config is None and "config" in flags.FLAGS:
    config = flags.FLAGS["config"].value
  if config is None:
    raise app.UsageError("--config=configs/sample_dit.py[:arg] is required")
  f = flags.FLAGS
  if "multihost" in f and f.multihost:
    from jaxee import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  try:
    result = run_lib.run_sampling(config)
  except (ValueError, FileNotFoundError) as e:  # bad config, checkpoint, plan or out_dir
    print(f"error: {e}", file=sys.stderr)
    return 2
  result.pop("manifest")
  rate = result["images_per_s"]
  print(f"{result['shards_computed']} shard(s) sampled, {result['shards_skipped']} already "
        f"present; throughput {'n/a' if rate is None else f'{rate:.2f} images/s'}; "
        f"output in {result['out_dir']}", file=sys.stderr)
  print(json.dumps(result, indent=2, sort_keys=True))
  return 0


def run() -> None:
  """The `jaxee-sample` entry point: defines `--config`, runs `main` under `absl.app`, exits."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  cli.show_doc_in_absl_help(__doc__)
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True)
  if "multihost" not in flags.FLAGS:
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first; each "
                      "process then samples its own disjoint shards.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  started = []

  def run_main(argv):
    started.append(True)
    sys.exit(main(argv))

  try:
    app.run(run_main)
  except SystemExit as e:
    if e.code == 1 and cli.HELP_FLAGS & set(sys.argv[1:]):  # absl exits 1 after printing help
      sys.exit(0)
    raise
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no config field
    if started:
      raise
    print(f"error: a --config.FIELD override names no field of the config: {e}",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
