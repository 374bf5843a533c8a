"""`jaxee-sample --multihost`: two localhost processes (jax.distributed, gloo, CPU) split a run.

Process p samples and writes the shards k ≡ p (mod 2): every shard is written exactly once (the
per-process `shards_written` lists are disjoint and cover all shards), the manifest lists them
all, and the bytes equal a one-process run's (same seed). Both runs use the CLI's default
`multi_device=True` with 2 local CPU devices per process (each batch split over them), so the
per-device work is the same and the comparison is byte for byte. The one-process comparison with
8 devices splitting each batch vs 1 device is
`test_sample_cli.py::test_batch_sharded_over_devices_matches_one_device`.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(out, *extra):
  return [sys.executable, "-m", "jaxee.cli.sample", "--config=configs/sample_dit.py:runlocal",
          f"--config.ckpt={FIXTURES / 'dit_tiny.pt'}", f"--config.out_dir={out}",
          "--config.progress=False", "--config.steps=2", *extra]


def _env(devices: int):
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
              PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _result(stdout: str) -> dict:
  return json.loads(stdout[stdout.index("{"):])


@pytest.mark.slow
def test_two_processes_write_every_shard_exactly_once(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = _port()
  procs = [subprocess.Popen(
      _args(multi, "--multihost", f"--coordinator_address=localhost:{port}",
            "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [_result(o) for o, _ in outs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["process_count"] == 2 and r["num_devices"] == 2 for r in results)
  written = [r["shards_written"] for r in results]
  assert written == [[0, 2], [1]]  # k mod 2 == p, disjoint, together all three
  manifest = json.loads((multi / "manifest.json").read_text())
  names = [e["file"] for e in manifest["shards"]]
  assert names == [f"shards/shard_{k:05d}.npz" for k in range(3)]
  assert not list(multi.glob("provenance.part*.json"))  # folded into provenance.json
  provenance = json.loads((multi / "provenance.json").read_text())
  assert sorted(provenance["shards"]) == [pathlib.Path(n).name for n in names]

  one = subprocess.run(_args(single), cwd=ROOT, env=_env(2), capture_output=True, text=True,
                       timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  assert _result(one.stdout)["shards_written"] == [0, 1, 2]
  for name in names:
    assert (multi / name).read_bytes() == (single / name).read_bytes(), name
