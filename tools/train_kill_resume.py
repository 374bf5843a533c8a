"""Kill -9 a training run mid-way, rerun the same command, and compare with an uninterrupted run.

    python tools/train_kill_resume.py --root=/tmp/kill_resume \
        [--config=configs/train_baseline.py:runlocal]

Three runs of `jaxee-train --config=CONFIG --workdir=...` (CPU):

1. `victim/`: the command with `--config.train.debug_step_sleep_s` (so that the kill lands
   mid-run). As soon as a checkpoint is committed and `metrics.jsonl` shows a step past it,
   the process gets SIGKILL; the tool checks it was still running (not finished);
2. the identical command again in `victim/`: it must resume from the checkpoint (its summary's
   `start_step` > 0) and finish;
3. `ref/`: the command without the sleep, uninterrupted (concurrently with 2).

Tiny runs are compile-bound, so by default the runs share a persistent JAX compilation cache
(`ROOT/jax_cache`; runs 2 and 3 load the executable run 1 compiled) and use
`--xla_backend_optimization_level=0` (half the CPU compile time). All three runs use the same
settings, so the comparison is unaffected; `--no-fast` turns both off.

Pass: the step list and the per-step `loss`, `grad_norm` and `param_norm` of `victim/`
equal those of `ref/` exactly (bitwise on the same machine), and the final EMA/params
checkpoints are identical. Prints one JSON object; exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMPARED = ("loss", "grad_norm", "param_norm")


def command(config: str, workdir: pathlib.Path, extra=()) -> list:
  return [sys.executable, "-m", "jaxee.cli.train", f"--config={config}", f"--workdir={workdir}",
          *extra]


def committed_steps(workdir: pathlib.Path) -> list:
  """Orbax step directories that finished (temporary ones carry a suffix until renamed)."""
  root = workdir / "checkpoints"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def logged_steps(workdir: pathlib.Path) -> list:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(int(json.loads(line)["step"]))
    except (ValueError, KeyError):
      pass
  return out


def run_to_end(cmd: list, env: dict, log: pathlib.Path, timeout: float) -> dict:
  with open(log, "w") as f:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True,
                          timeout=timeout, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}:\n"
                       + log.read_text()[-3000:])
  return json.loads(proc.stdout[proc.stdout.index("{"):])


def final_state(workdir: pathlib.Path) -> dict:
  from jaxee.train import checkpoint  # pylint: disable=g-import-not-at-top
  mgr = checkpoint.TrainCheckpointer(workdir / "checkpoints", async_save=False)
  try:
    step = mgr.latest_step()
    return mgr.restore_flat(step, mgr.read_meta(step))
  finally:
    mgr.close()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="empty or new directory for the runs")
  parser.add_argument("--config", default="configs/train_baseline.py:runlocal")
  parser.add_argument("--sleep", type=float, default=0.25,
                      help="seconds slept per step by the killed run (not by the reference)")
  parser.add_argument("--timeout", type=float, default=600)
  parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                      help="shared compilation cache + XLA -O0 for all runs (default on)")
  args = parser.parse_args()
  root = pathlib.Path(args.root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  ref_dir, victim_dir = root / "ref", root / "victim"
  for d in (ref_dir, victim_dir):
    if d.exists() and any(d.iterdir()):
      raise SystemExit(f"{d} is not empty")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if args.fast:
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  t0 = time.time()

  victim_cmd = command(args.config, victim_dir,
                       [f"--config.train.debug_step_sleep_s={args.sleep}"])
  with open(root / "victim_killed.log", "w") as vlog:
    victim = subprocess.Popen(victim_cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=vlog)
    killed_at = None
    deadline = time.time() + args.timeout
    while time.time() < deadline:
      if victim.poll() is not None:
        break
      steps = committed_steps(victim_dir)
      logged = logged_steps(victim_dir)
      if steps and logged and max(logged) > steps[-1]:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = {"checkpoints": steps, "last_logged_step": max(logged)}
        break
      time.sleep(0.02)
    else:
      victim.kill()
      victim.wait()
  if killed_at is None:
    raise SystemExit(f"the run ended (rc={victim.returncode}) or timed out before it could be "
                     f"killed mid-run; raise --sleep; see {root / 'victim_killed.log'}")
  if victim.returncode != -signal.SIGKILL:
    raise SystemExit(f"victim exit status {victim.returncode}, expected SIGKILL")
  ref_log = open(root / "ref.log", "w")
  ref = subprocess.Popen(command(args.config, ref_dir), env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=ref_log, text=True)
  try:
    resumed = run_to_end(victim_cmd, env, root / "victim_resumed.log", args.timeout)
    ref_out, _ = ref.communicate(timeout=args.timeout)
  finally:
    if ref.poll() is None:
      ref.kill()
    ref_log.close()
  if ref.returncode != 0:
    raise SystemExit(f"reference run failed ({ref.returncode}); see {root / 'ref.log'}")
  ref_summary = json.loads(ref_out[ref_out.index("{"):])

  sys.path.insert(0, str(REPO))
  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  ref_metrics = trainer.read_metrics(ref_dir)
  got_metrics = trainer.read_metrics(victim_dir)
  problems = []
  if resumed["start_step"] <= 0:
    problems.append(f"the rerun did not resume (start_step={resumed['start_step']})")
  ref_steps = [m["step"] for m in ref_metrics]
  got_steps = [m["step"] for m in got_metrics]
  if ref_steps != got_steps:
    problems.append(f"logged steps differ: {got_steps} vs {ref_steps}")
  max_diff = {}
  for key in COMPARED:
    a = np.array([m[key] for m in got_metrics], np.float64)
    b = np.array([m[key] for m in ref_metrics], np.float64)
    if a.shape != b.shape:
      continue
    max_diff[key] = float(np.max(np.abs(a - b))) if a.size else 0.0
    if max_diff[key] != 0.0:
      problems.append(f"{key} sequences differ (max |diff| {max_diff[key]:.3g})")
  ref_state, got_state = final_state(ref_dir), final_state(victim_dir)
  state_diff = max(float(np.max(np.abs(ref_state[k].astype(np.float64)
                                       - got_state[k].astype(np.float64)), initial=0.0))
                   for k in ref_state)
  if sorted(ref_state) != sorted(got_state) or state_diff != 0.0:
    problems.append(f"final checkpoints differ (max |diff| {state_diff:.3g})")
  result = {
      "ok": not problems, "problems": problems, "killed_at": killed_at,
      "resumed_from_step": resumed["start_step"], "final_step": resumed["step"],
      "steps": got_steps, "losses": [m["loss"] for m in got_metrics],
      "max_abs_diff": max_diff, "final_state_max_abs_diff": state_diff,
      "ref_final_step": ref_summary["step"], "wall_s": round(time.time() - t0, 1),
  }
  print(json.dumps(result, indent=2))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
