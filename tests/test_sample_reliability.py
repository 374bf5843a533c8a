"""Issue 16 (items 1, 6, 7, 8): resumed sampling trusts only the right shards, bad input leaves
nothing behind, non-finite samples stop the run, provenance per shard, one owner per out_dir.

Same tiny runlocal DiT config as `test_sample_cli.py` (DDIM-10, 12 samples in three shards).
"""
import importlib.util
import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxee import validation
from jaxee.cli import sample as cli
from jaxee.sharded import run as run_lib
from jaxee.sharded import shards as shards_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARDS = [f"shards/shard_{k:05d}.npz" for k in range(3)]


def runlocal(out_dir, **changes):
  spec = importlib.util.spec_from_file_location("sample_dit", ROOT / "configs" / "sample_dit.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.ckpt = str(FIXTURES / "dit_tiny.pt")
  config.out_dir = str(out_dir)
  config.progress = False
  config.multi_device = False
  for key, value in changes.items():
    setattr(config, key, value)
  return config


def _bytes(out, names=SHARDS):
  return {n: (pathlib.Path(out) / n).read_bytes() for n in names}


class _Counter:
  """Counts the batches sampled through `jaxee.sampling.sample`."""

  def __init__(self, monkeypatch):
    self.calls = 0
    self._sample = run_lib.sampling_lib.sample
    monkeypatch.setattr(run_lib.sampling_lib, "sample", self)

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._sample(*args, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  run_lib.run_sampling(runlocal(out))
  return out


def _zeroed(path):
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["latents"] = np.zeros_like(arrays["latents"])
  shards_lib.write_npz(path, arrays)


def _reshaped(path):
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["latents"] = arrays["latents"].reshape(4, 8, 4, 8)
  shards_lib.write_npz(path, arrays)


def _replaced(path):
  shutil.copyfile(path.parent / "shard_00000.npz", path)


@pytest.mark.parametrize("damage", [_replaced, _zeroed, _reshaped])
@pytest.mark.parametrize("keep_manifest", [True, False])
def test_wrong_shards_are_recomputed_not_resigned(reference, tmp_path, monkeypatch, caplog,
                                                  damage, keep_manifest):
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  if not keep_manifest:  # an interrupted run: only provenance.json knows the hashes
    (out / "manifest.json").unlink()
  damage(out / SHARDS[2])
  counter = _Counter(monkeypatch)
  with caplog.at_level(logging.WARNING):
    result = run_lib.run_sampling(runlocal(out))
  assert counter.calls == 1 and result["shards_computed"] == 1
  assert "shard_00002" in caplog.text and "recomputing" in caplog.text
  assert _bytes(out) == _bytes(reference)
  assert (json.loads((out / "manifest.json").read_text())["shards"]
          == json.loads((reference / "manifest.json").read_text())["shards"])


def test_wrong_index_is_caught_without_any_recorded_hash(reference, tmp_path, monkeypatch):
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  (out / "manifest.json").unlink()
  (out / shards_lib.PROVENANCE_FILE).unlink()
  _replaced(out / SHARDS[1])
  counter = _Counter(monkeypatch)
  run_lib.run_sampling(runlocal(out))
  assert counter.calls == 1 and _bytes(out) == _bytes(reference)


def test_bad_steps_leave_nothing_behind_and_the_fix_runs(tmp_path):
  out = tmp_path / "run"
  with pytest.raises(ValueError, match="steps=5000 is not possible"):
    run_lib.run_sampling(runlocal(out, steps=5000))
  assert not out.exists()
  assert cli.main(["prog"], runlocal(out, steps=5000)) == 2
  assert not out.exists()
  result = run_lib.run_sampling(runlocal(out, num_samples=4, steps=2))
  assert result["shards_computed"] == 1


def test_non_finite_samples_stop_the_run_naming_shard_and_batch(tmp_path, monkeypatch):
  def nan_sampler(model, params, rng, *, x_T, **kwargs):
    del model, params, rng, kwargs
    return jnp.full(x_T.shape, jnp.nan)

  monkeypatch.setattr(run_lib.sampling_lib, "sample", nan_sampler)
  out = tmp_path / "run"
  with pytest.raises(validation.NonFiniteError, match="shard 0, batch 0"):
    run_lib.run_sampling(runlocal(out))
  assert not (out / "config.json").exists() and not (out / SHARDS[0]).exists()


def test_forced_resume_records_provenance_per_shard(reference, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  (out / SHARDS[2]).unlink()
  run_lib.run_sampling(runlocal(out, seed=1, force=True))
  manifest = json.loads((out / "manifest.json").read_text())
  ids = [s["config"] for s in manifest["shards"]]
  assert ids[0] == ids[1] != ids[2]
  assert manifest["configs"][ids[0]]["seed"] == 0 and manifest["configs"][ids[2]]["seed"] == 1
  assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_one_process_per_out_dir(tmp_path):
  out = tmp_path / "run"
  with shards_lib.claim_out_dir(out):
    with pytest.raises(shards_lib.OutDirError, match="another process is sampling"):
      run_lib.run_sampling(runlocal(out))
  assert not out.exists()  # nothing was written: the claim is undone


@pytest.mark.parametrize("setup,match", [
    ("file", "is a file, not a directory"),
    ("readonly", "cannot write to out_dir"),
    ("corrupt_config", "config.json is corrupt"),
    ("random_mask", "is not a mask plan"),
    ("nan_guidance", "guidance must be a finite number"),
])
def test_bad_out_dirs_and_plans_are_one_line_errors(tmp_path, capsys, setup, match):
  out = tmp_path / "run"
  changes = {}
  if setup == "file":
    out.write_text("not a directory")
  elif setup == "readonly":
    out = pathlib.Path("/proc/jaxee_cannot_write_here")
  elif setup == "corrupt_config":
    out.mkdir()
    (out / "config.json").write_bytes(b"\x00\x01garbage")
  elif setup == "random_mask":
    mask = tmp_path / "plan.npz"
    mask.write_bytes(np.random.default_rng(0).bytes(256))
    changes["plan"] = f"mask:{mask}"
  elif setup == "nan_guidance":
    changes["guidance"] = float("nan")
  assert cli.main(["prog"], runlocal(out, **changes)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and "Traceback" not in err
