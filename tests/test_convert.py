"""Strict, safe conversion: nested checkpoints, offenders listed, CLI round trip, bad files."""
import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from jaxee import convert, models
from jaxee.cli import convert as cli
from jaxee.convert import torch_reader

TINY = dict(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def dit_state(request):
  import pathlib
  path = pathlib.Path(__file__).parent / "fixtures" / "dit_tiny.pt"
  return torch_reader.load_state_dict(path)


def test_training_checkpoint_prefers_ema(dit_state):
  raw = {k: v + 1.0 for k, v in dit_state.items() if k != "pos_embed"}
  raw["pos_embed"] = dit_state["pos_embed"]
  ckpt = {"model": raw, "ema": dit_state, "opt": {"state": {}}, "args": {"lr": 1e-4}}
  ema = convert.from_torch(ckpt, "dit", **TINY)
  model = convert.from_torch(ckpt, "dit", prefer="model", **TINY)
  direct = convert.from_torch(dit_state, "dit", **TINY)
  jax.tree.map(np.testing.assert_array_equal, ema, direct)
  np.testing.assert_array_equal(model["blocks"]["attn"]["qkv"]["bias"],
                                direct["blocks"]["attn"]["qkv"]["bias"] + 1.0)


def test_every_offender_is_listed(dit_state):
  bad = dict(dit_state)
  del bad["blocks.1.mlp.fc1.weight"]
  bad["blocks.0.attn.qkv.weight"] = np.zeros((5, 64), np.float32)
  bad["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.CheckpointError) as info:
    convert.from_torch(bad, "dit", **TINY)
  msg = str(info.value)
  assert "blocks/mlp/fc1/kernel rows [1]" in msg
  assert "blocks.0.attn.qkv.weight (5, 64)" in msg
  assert "unexpected: extra.weight" in msg


def test_other_architecture_is_refused(fixtures_dir):
  with pytest.raises(convert.CheckpointError, match="looks like: U-ViT"):
    convert.from_torch(fixtures_dir / "uvit_tiny_cond.pt", "dit", **TINY)
  with pytest.raises(convert.CheckpointError, match="pos_embed"):
    convert.from_torch(fixtures_dir / "dit_tiny.pt", "dit", **{**TINY, "input_size": 16})


def test_missing_truncated_and_malicious_files(tmp_path, fixtures_dir):
  with pytest.raises((convert.CheckpointError, FileNotFoundError), match="nope.pt"):
    convert.from_torch(tmp_path / "nope.pt", "dit", **TINY)
  data = (fixtures_dir / "dit_tiny.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(convert.CheckpointError, match="cut.pt"):
    convert.from_torch(tmp_path / "cut.pt", "dit", **TINY)
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      import os
      return (os.system, (f"touch {marker}",))

  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
    z.writestr("evil/version", "3\n")
  with pytest.raises(convert.CheckpointError, match="system"):
    convert.from_torch(tmp_path / "evil.pt", "dit", **TINY)
  assert not marker.exists()


def test_cli_round_trip_and_atomic_failure(tmp_path, fixtures_dir, capsys):
  out = tmp_path / "dit_tiny"
  sets = [f"--set={k}={v}" for k, v in TINY.items()]
  assert cli.main(["--arch", "dit", "--src", str(fixtures_dir / "dit_tiny.pt"),
                   "--out", str(out), *sets]) == 0
  assert json.loads(capsys.readouterr().out)["params"] == 256864
  model, params = convert.load_converted(out)
  assert model == models.create("dit", **TINY)
  direct = convert.from_torch(fixtures_dir / "dit_tiny.pt", "dit", **TINY)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, direct)
  # A failing conversion writes nothing, and an existing output is not clobbered.
  bad_out = tmp_path / "bad"
  assert cli.main(["--arch", "dit_s_2", "--src", str(fixtures_dir / "uvit_tiny_cond.pt"),
                   "--out", str(bad_out)]) == 2
  assert not bad_out.exists()
  assert cli.main(["--arch", "dit", "--src", str(fixtures_dir / "dit_tiny.pt"),
                   "--out", str(out), *sets]) == 2
  assert "not empty" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dit_tiny"]


def test_load_converted_rejects_other_dirs(tmp_path):
  with pytest.raises(convert.CheckpointError, match="not a jaxee converted checkpoint"):
    convert.load_converted(tmp_path)


def test_cli_converts_vae(tmp_path, fixtures_dir, capsys):
  from jaxee.models import vae as vae_lib
  out = tmp_path / "vae"
  assert cli.main(["--arch", "vae", "--src", str(fixtures_dir / "vae_diffusers_tiny.safetensors"),
                   "--out", str(out)]) == 0
  model, params = convert.load_converted(out)
  assert isinstance(model, vae_lib.AutoencoderKL)
  io = np.load(fixtures_dir / "vae_diffusers_tiny_io.npz")
  z = jax.numpy.asarray(io[[k for k in io.files if k.startswith("z")][0]].transpose(0, 2, 3, 1))
  dec = model.apply({"params": params}, z, method="decode_unscaled")
  ref = io["decoded"].transpose(0, 2, 3, 1)
  assert np.max(np.abs(np.asarray(dec) - ref)) <= 1e-5


# Issue 16 item 2: --overwrite replaces only a converted checkpoint, atomically, with a sane mode.
# Item 6: NaN/Inf weights are refused naming the tensors, unless --allow-nonfinite.

def _convert(src, out, *extra):
  sets = [f"--set={k}={v}" for k, v in TINY.items()]
  return cli.main(["--arch", "dit", "--src", str(src), "--out", str(out), *sets, *extra])


def test_overwrite_refuses_directories_that_are_not_checkpoints(tmp_path, fixtures_dir,
                                                                monkeypatch, capsys):
  src = fixtures_dir / "dit_tiny.pt"
  work = tmp_path / "work"
  work.mkdir()
  (work / "notes.txt").write_text("precious")
  assert _convert(src, work, "--overwrite") == 2
  assert "not a jaxee converted checkpoint" in capsys.readouterr().err
  monkeypatch.chdir(work)
  assert _convert(src, ".", "--overwrite") == 2  # `--out .` once wiped the working directory
  assert (work / "notes.txt").read_text() == "precious"
  # A checkpoint with a user file added is not "just a checkpoint" either.
  ckpt = tmp_path / "ckpt"
  assert _convert(src, ckpt) == 0
  (ckpt / "my_results.csv").write_text("1,2,3")
  assert _convert(src, ckpt, "--overwrite") == 2
  assert (ckpt / "my_results.csv").is_file()
  capsys.readouterr()


def test_overwrite_replaces_a_checkpoint_with_the_usual_mode(tmp_path, fixtures_dir, capsys):
  src = fixtures_dir / "dit_tiny.pt"
  out = tmp_path / "ckpt"
  old_umask = os.umask(0o022)
  try:
    assert _convert(src, out) == 0
    assert (out.stat().st_mode & 0o777) == 0o755
    before = json.loads((out / "config.json").read_text())
    assert _convert(src, out, "--overwrite", "--prefer", "model") == 0
  finally:
    os.umask(old_umask)
  assert (out.stat().st_mode & 0o777) == 0o755
  assert json.loads((out / "config.json").read_text())["prefer"] == "model" != before["prefer"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old dirs left
  convert.load_converted(out)
  capsys.readouterr()


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, fixtures_dir, capsys):
  src = fixtures_dir / "dit_tiny.pt"
  target = tmp_path / "file"
  target.write_text("x")
  assert _convert(src, target, "--overwrite") == 2
  err = capsys.readouterr().err
  assert "is a file" in err and "Traceback" not in err and target.read_text() == "x"
  assert _convert(src, "/proc/jaxee_no_such_dir/ckpt") == 2
  err = capsys.readouterr().err
  assert err.startswith("error: cannot write") and "Traceback" not in err


def test_nonfinite_weights_are_refused_naming_tensors(tmp_path, dit_state, capsys):
  from safetensors.numpy import save_file
  bad = {k: np.array(v) for k, v in dit_state.items()}
  bad["blocks.1.mlp.fc1.weight"][0, 0] = np.nan
  bad["final_layer.linear.bias"][:] = np.inf
  src = tmp_path / "nan.safetensors"
  save_file(bad, str(src))
  assert _convert(src, tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert "2 tensor(s) hold NaN/Inf: blocks.1.mlp.fc1.weight, final_layer.linear.bias" in err
  assert "--allow-nonfinite" in err and not (tmp_path / "out").exists()
  assert _convert(src, tmp_path / "out", "--allow-nonfinite") == 0
  assert "warning:" in capsys.readouterr().err
