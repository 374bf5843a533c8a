"""Kill -9 in the middle of a tiny training run, rerun the same command: same loss sequence.

Runs `tools/train_kill_resume.py` (three `jaxee-train` runs of
`configs/train_baseline.py:runlocal` on CPU; see its docstring) and checks its verdict.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kill_9_and_resume_matches_uninterrupted_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_kill_resume.py"),
                         f"--root={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.stdout.strip(), proc.stderr[-3000:]
  result = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert proc.returncode == 0 and result["ok"], result["problems"]
  # Killed after a checkpoint and after logging past it, resumed from that checkpoint.
  assert result["resumed_from_step"] in result["killed_at"]["checkpoints"]
  assert result["killed_at"]["last_logged_step"] > result["resumed_from_step"]
  assert result["final_step"] == result["ref_final_step"] == len(result["steps"])
  assert result["max_abs_diff"]["loss"] == 0.0
  assert result["final_state_max_abs_diff"] == 0.0
