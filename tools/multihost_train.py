"""Multi-host training on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices.

    python tools/multihost_train.py --root=/tmp/multihost \
        [--config=configs/train_baseline.py:runlocal] [--steps=6]

Runs `jaxee-train --config=CONFIG --workdir=ROOT/multi --multihost
--coordinator_address=localhost:PORT --num_processes=2 --process_id=i` twice (i = 0, 1), each
process with `--xla_force_host_platform_device_count=4`, joined by `jax.distributed.initialize`
with gloo CPU collectives (`jax_cpu_collectives_implementation`), and, concurrently, the same
config in ONE process with 8 devices in `ROOT/single`. Checks:

* both runs finish and end with the same parameters and EMA (max |diff| <= --atol, default
  1e-6; gloo and the in-process all-reduce may sum in a different order) and the same logged
  losses;
* each process read its own part of every global batch: the record ids the two processes log
  for their first batch are disjoint and together are exactly the single-process first batch;
* only process 0 wrote the logs: `metrics.jsonl` has exactly one line per step;
* the checkpoint was saved from the global arrays, without a host gather: each process wrote its
  own OCDBT store (`ocdbt.process_{0,1}`; Orbax splits the writing of the replicated arrays
  between the processes, every slice once) and the step restores (fingerprints checked) to the
  values of the one-process run (the parameter comparison above reads the checkpoints).

Compile-bound like every tiny run: the runs use `--xla_backend_optimization_level=0` unless
`--no-fast`. Prints one JSON object; exit status 1 on any failed check.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIRST_BATCH = re.compile(r"input: process (\d+)/(\d+) reads rows (\d+):(\d+) .*next batch "
                         r"records ([\d,]+)")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def device_flags(n: int, base: str, fast: bool) -> str:
  flags = [f for f in base.split() if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  if fast:
    flags.append("--xla_backend_optimization_level=0")
  return " ".join(flags)


def first_batch(log: str) -> dict:
  m = FIRST_BATCH.search(log)
  if not m:
    raise RuntimeError("no 'input: process ...' line in the log")
  return {"process": int(m.group(1)), "rows": [int(m.group(3)), int(m.group(4))],
          "records": [int(r) for r in m.group(5).split(",")]}


def final_state(workdir: pathlib.Path) -> tuple:
  from jaxee.train import checkpoint  # pylint: disable=g-import-not-at-top
  mgr = checkpoint.TrainCheckpointer(workdir / "checkpoints", async_save=False)
  try:
    step = mgr.latest_step()
    return step, mgr.restore_flat(step, mgr.read_meta(step))
  finally:
    mgr.close()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--config", default="configs/train_baseline.py:runlocal")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--atol", type=float, default=1e-6)
  parser.add_argument("--timeout", type=float, default=600)
  parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  root = pathlib.Path(args.root).absolute()
  multi_dir, single_dir = root / "multi", root / "single"
  for d in (multi_dir, single_dir):
    if d.exists() and any(d.iterdir()):
      raise SystemExit(f"{d} is not empty")
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.time()

  # Prepare the bundled data once, here: the workers then only read it.
  from jaxee.data import digits  # pylint: disable=g-import-not-at-top
  digits.prepare_digits()

  common = [f"--config={args.config}", f"--config.train.num_steps={args.steps}",
            f"--config.train.ckpt_every={max(1, args.steps // 2)}"]
  base_env = dict(os.environ, JAX_PLATFORMS="cpu")
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(base_env, XLA_FLAGS=device_flags(4, base_env.get("XLA_FLAGS", ""), args.fast))
    cmd = [sys.executable, "-m", "jaxee.cli.train", *common, f"--workdir={multi_dir}",
           "--multihost", f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={pid}"]
    log = open(root / f"multi_p{pid}.log", "w")
    procs.append((f"multi_p{pid}", subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                                                    stderr=subprocess.STDOUT), log))
  env = dict(base_env, XLA_FLAGS=device_flags(8, base_env.get("XLA_FLAGS", ""), args.fast))
  log = open(root / "single.log", "w")
  procs.append(("single", subprocess.Popen(
      [sys.executable, "-m", "jaxee.cli.train", *common, f"--workdir={single_dir}"], env=env,
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
  deadline = time.time() + args.timeout
  failed = []
  for name, proc, log in procs:
    try:
      proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
    if proc.returncode != 0:
      failed.append(name)
  if failed:
    for name in failed:
      print(f"--- {name}.log (tail)\n" + (root / f"{name}.log").read_text()[-4000:],
            file=sys.stderr)
    raise SystemExit(f"runs failed: {failed}")

  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  problems = []
  step_m, multi = final_state(multi_dir)
  step_s, single = final_state(single_dir)
  if step_m != args.steps or step_s != args.steps:
    problems.append(f"final steps {step_m} (multi) and {step_s} (single), expected {args.steps}")
  diffs = {}
  for group in ("params.", "ema_params."):
    keys = sorted(k for k in single if k.startswith(group))
    if keys != sorted(k for k in multi if k.startswith(group)):
      problems.append(f"{group} leaves differ")
      continue
    diffs[group[:-1]] = max(float(np.max(np.abs(multi[k].astype(np.float64)
                                                 - single[k].astype(np.float64)), initial=0.0))
                            for k in keys)
    if diffs[group[:-1]] > args.atol:
      problems.append(f"{group[:-1]} differ by {diffs[group[:-1]]:.3g} > {args.atol}")
  moved = max(float(np.max(np.abs(single["params." + k[len("ema_params."):]]
                                  - single[k]), initial=0.0))
              for k in single if k.startswith("ema_params."))
  m_multi, m_single = trainer.read_metrics(multi_dir), trainer.read_metrics(single_dir)
  steps_multi = [m["step"] for m in m_multi]
  if steps_multi != list(range(1, args.steps + 1)):
    problems.append(f"multi-host metrics.jsonl steps {steps_multi}: expected one line per step "
                    "(a second writer would duplicate them)")
  loss_diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(m_multi, m_single)), default=0.0)
  if len(m_multi) != len(m_single) or loss_diff > args.atol:
    problems.append(f"logged losses differ (max {loss_diff:.3g})")
  ckpt_parts = sorted({p.name for p in (multi_dir / "checkpoints").rglob("ocdbt.process_*")})
  if not ckpt_parts or not set(ckpt_parts) <= {"ocdbt.process_0", "ocdbt.process_1"}:
    problems.append(f"checkpoint array stores {ckpt_parts}: expected per-process OCDBT stores")
  p0, p1 = (first_batch((root / f"multi_p{i}.log").read_text()) for i in range(2))
  s0 = first_batch((root / "single.log").read_text())
  if set(p0["records"]) & set(p1["records"]) or p0["records"] + p1["records"] != s0["records"]:
    problems.append(f"per-process input split wrong: {p0} + {p1} vs {s0}")
  result = {"ok": not problems, "problems": problems, "steps": args.steps,
            "max_abs_diff": diffs, "ema_vs_params_max_diff": moved,
            "loss_max_abs_diff": loss_diff, "losses_multi": [m["loss"] for m in m_multi],
            "checkpoint_writers": ckpt_parts,
            "first_batch": {"process_0": p0, "process_1": p1, "single": s0["records"]},
            "wall_s": round(time.time() - t0, 1)}
  print(json.dumps(result, indent=2))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
