"""Two processes joined by `jax.distributed.initialize` (gloo, 4 CPU devices each) train like
one process with 8 devices; each reads its own rows; only process 0 writes the logs; the
checkpoint is saved from the global arrays (each process writes its own OCDBT store).

Runs `tools/multihost_train.py` (see its docstring for the checks) and checks its verdict.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "tools" / "multihost_train.py"),
                         f"--root={tmp_path}", "--steps=4"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.stdout.strip(), proc.stderr[-3000:]
  result = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert proc.returncode == 0 and result["ok"], result["problems"]
  assert result["max_abs_diff"]["params"] <= 1e-6
  assert result["max_abs_diff"]["ema_params"] <= 1e-6
  assert result["ema_vs_params_max_diff"] > 0  # the runs trained
  assert set(result["checkpoint_writers"]) <= {"ocdbt.process_0", "ocdbt.process_1"}
  assert "ocdbt.process_0" in result["checkpoint_writers"]
  first = result["first_batch"]
  assert first["process_0"]["records"] + first["process_1"]["records"] == first["single"]
  assert not set(first["process_0"]["records"]) & set(first["process_1"]["records"])
