"""Tests for jaxee.convert.torch_reader: safe torch/safetensors reading.

Synthetic files are written by the torch-free helper `torch_writer`; the real
fixtures were written by torch 2.x.
"""
import argparse
import json
import os
import pickle
import pickletools
import struct

import ml_dtypes
import numpy as np
import pytest

import torch_writer as tw
from jaxee.convert.errors import CheckpointError, CheckpointNotFoundError
from jaxee.convert.torch_reader import load_state_dict, read_safetensors, read_torch_file

FIXTURE_EXPECT = {
    # name: (number of keys, total elements, {key: shape})
    "dit_tiny.pt": (42, 257888, {"pos_embed": (1, 16, 64),
                                 "x_embedder.proj.weight": (64, 4, 2, 2),
                                 "final_layer.adaLN_modulation.1.weight": (128, 64)}),
    "uvit_tiny_cond.pt": (69, 269732, {"pos_embed": (1, 18, 64),
                                       "patch_embed.proj.weight": (64, 4, 2, 2),
                                       "final_layer.weight": (4, 4, 3, 3)}),
    "vae_compvis_tiny.pth": (124, 658375, {"encoder.conv_in.weight": (32, 3, 3, 3),
                                           "post_quant_conv.weight": (4, 4, 1, 1)}),
    "vae_diffusers_tiny.bin": (124, 658375, {"encoder.conv_in.weight": (32, 3, 3, 3),
                                             "post_quant_conv.bias": (4,)}),
    "vae_diffusers_tiny.safetensors": (124, 658375, {"encoder.conv_in.weight": (32, 3, 3, 3)}),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_EXPECT))
def test_reads_real_fixtures(fixtures_dir, name):
  count, total, shapes = FIXTURE_EXPECT[name]
  sd = load_state_dict(fixtures_dir / name)
  assert len(sd) == count
  assert sum(v.size for v in sd.values()) == total
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
  for key, shape in shapes.items():
    assert sd[key].shape == shape
  assert all(np.isfinite(v).all() for v in sd.values())


def test_bin_matches_safetensors_and_safetensors_package(fixtures_dir):
  from safetensors.numpy import load_file  # Cross-check only.
  from_bin = read_torch_file(fixtures_dir / "vae_diffusers_tiny.bin")
  ours = read_safetensors(fixtures_dir / "vae_diffusers_tiny.safetensors")
  ref = load_file(str(fixtures_dir / "vae_diffusers_tiny.safetensors"))
  assert set(from_bin) == set(ours) == set(ref)
  for key in ref:
    assert ours[key].dtype == ref[key].dtype
    np.testing.assert_array_equal(ours[key], ref[key])
    np.testing.assert_array_equal(from_bin[key], ref[key])


def test_safetensors_dtypes_match_package(tmp_path):
  from safetensors.numpy import save_file  # Cross-check only.
  rng = np.random.default_rng(0)
  arrays = {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f16": rng.standard_normal((5,)).astype(np.float16),
      "f64": rng.standard_normal((2, 2, 2)),
      "i64": np.arange(-3, 3, dtype=np.int64), "i32": np.arange(4, dtype=np.int32),
      "i16": np.arange(3, dtype=np.int16), "i8": np.arange(-2, 2, dtype=np.int8),
      "u8": np.arange(7, dtype=np.uint8), "bool": np.array([True, False, True]),
      "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32),
  }
  path = tmp_path / "all.safetensors"
  save_file(arrays, str(path), metadata={"format": "np"})
  ours = read_safetensors(path)
  assert set(ours) == set(arrays)
  for key, value in arrays.items():
    assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
    np.testing.assert_array_equal(ours[key], value)


def _strided_objects():
  """Tensors covering views, shared storage with offset, and dtypes."""
  base = np.arange(24, dtype=np.float32)
  shared = tw.Storage(base)
  bf16 = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
  obj = {
      "weight": tw.Tensor(shared, 0, (4, 6)),
      "weight_t": tw.Tensor(shared, 0, (6, 4), (1, 6)),  # Transposed, non-contiguous.
      "tail": tw.Tensor(shared, 10, (2, 3)),  # Shared storage with an offset.
      "every_other": tw.Tensor(shared, 1, (3,), (2,)),
      "scalar": tw.Tensor(shared, 23, ()),
      "half": tw.tensor(np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)),
      "bf16": tw.tensor(bf16),
      "bf16_v3": tw.tensor(bf16, rebuild="v3"),
      "long": tw.tensor(np.array([[-(2**40), 7]], np.int64)),
      "mask": tw.tensor(np.array([True, False, True])),
      "param": tw.tensor(np.ones((2, 2), np.float32), rebuild="parameter"),
      "untyped": tw.Tensor(tw.Storage(base[:8], untyped=True), 2, (2, 3), rebuild="v3"),
  }
  expected = {
      "weight": base.reshape(4, 6), "weight_t": base.reshape(4, 6).T,
      "tail": base[10:16].reshape(2, 3), "every_other": base[1:7:2],
      "scalar": np.array(23.0, np.float32),
      "half": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
      "bf16": bf16, "bf16_v3": bf16, "long": np.array([[-(2**40), 7]], np.int64),
      "mask": np.array([True, False, True]), "param": np.ones((2, 2), np.float32),
      "untyped": base[2:8].reshape(2, 3),
  }
  return obj, expected


def _check_arrays(got, expected):
  assert set(got) >= set(expected)
  for key, value in expected.items():
    assert isinstance(got[key], np.ndarray), key
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got[key].flags.writeable and got[key].flags.c_contiguous, key


def test_zip_format_views_dtypes_and_copies(tmp_path):
  obj, expected = _strided_objects()
  path = tmp_path / "model.pt"
  tw.save_zip(obj, path, top="some_stem")
  got = read_torch_file(path)
  _check_arrays(got, expected)
  got["weight"][0, 0] = 100.0  # Copies: shared storage does not leak between tensors.
  assert got["weight_t"][0, 0] == 0.0


def test_legacy_format_views_and_dtypes(tmp_path):
  obj, expected = _strided_objects()
  del obj["untyped"], expected["untyped"]  # Legacy files predate UntypedStorage.
  base = np.arange(10, dtype=np.float64)
  root = tw.Storage(base)
  obj["whole"] = tw.Tensor(root, 0, (10,))
  obj["from_view"] = tw.Tensor(tw.Storage(base[3:9], view_of=(root, 3)), 1, (2, 2))
  expected["whole"], expected["from_view"] = base, base[4:8].reshape(2, 2)
  path = tmp_path / "legacy.pth"
  tw.save_legacy(obj, path)
  _check_arrays(read_torch_file(path), expected)


def _training_checkpoint():
  model = {"w": tw.tensor(np.zeros((2, 3), np.float32)), "b": tw.tensor(np.zeros(3, np.float32))}
  ema = {"w": tw.tensor(np.ones((2, 3), np.float32)), "b": tw.tensor(np.ones(3, np.float32))}
  opt = {"state": {0: {"step": 5, "exp_avg": tw.tensor(np.full((2, 3), 0.5, np.float32))}},
         "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}],
         "meta": {"shape": tw.Reduce(tw.Global("torch", "Size"), ((2, 3),)),
                  "dtype": tw.Global("torch", "bfloat16"), "ids": {1, 2}}}
  args = argparse.Namespace(model="DiT-XL/2", lr=1e-4, image_size=256)
  return {"model": model, "ema": ema, "opt": opt, "args": args}


@pytest.mark.parametrize("writer", [tw.save_zip, tw.save_legacy])
def test_nested_training_checkpoint(tmp_path, writer):
  path = tmp_path / "0001000.pt"
  writer(_training_checkpoint(), path)
  raw = read_torch_file(path)
  assert raw["args"] == {"model": "DiT-XL/2", "lr": 1e-4, "image_size": 256}
  assert raw["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
  assert raw["opt"]["meta"] == {"shape": (2, 3), "dtype": "torch.bfloat16", "ids": {1, 2}}
  np.testing.assert_array_equal(raw["opt"]["state"][0]["exp_avg"], np.full((2, 3), 0.5))
  ema = load_state_dict(path)
  assert set(ema) == {"w", "b"} and (ema["w"] == 1).all()
  model = load_state_dict(path, prefer="model")
  assert (model["w"] == 0).all() and model["w"].shape == (2, 3)


def test_module_prefix_and_mappings(tmp_path):
  path = tmp_path / "ddp.pth"
  tw.save_zip({"state_dict": {"module.a.weight": tw.tensor(np.ones(2, np.float32)),
                              "module.a.bias": tw.tensor(np.zeros(1, np.float32))},
               "epoch": 3}, path)
  sd = load_state_dict(path)
  assert sorted(sd) == ["a.bias", "a.weight"]
  assert load_state_dict({"module.x": np.ones(3)})["x"].shape == (3,)
  nested = {"model": {"x": np.zeros(1)}, "ema": {"x": np.ones(1)}, "step": 4}
  assert load_state_dict(nested)["x"][0] == 1
  assert load_state_dict(nested, prefer="model")["x"][0] == 0


def test_uvit_checkpoint_directory(tmp_path):
  ckpt = tmp_path / "50000.ckpt"
  ckpt.mkdir()
  tw.save_zip({"w": tw.tensor(np.zeros(2, np.float32))}, ckpt / "nnet.pth")
  tw.save_zip({"w": tw.tensor(np.ones(2, np.float32))}, ckpt / "nnet_ema.pth")
  tw.save_zip({"param_groups": []}, ckpt / "optimizer.pth")
  assert (load_state_dict(ckpt)["w"] == 1).all()
  assert (load_state_dict(ckpt, prefer="model")["w"] == 0).all()
  empty = tmp_path / "1.ckpt"
  empty.mkdir()
  with pytest.raises(CheckpointError, match="nnet_ema.pth"):
    load_state_dict(empty)


def test_not_a_state_dict_lists_keys(tmp_path):
  path = tmp_path / "odd.pt"
  tw.save_zip({"epoch": 3, "notes": "hello"}, path)
  with pytest.raises(CheckpointError) as err:
    load_state_dict(path)
  assert "odd.pt" in str(err.value) and "'epoch'" in str(err.value)
  with pytest.raises(CheckpointError, match="list"):
    load_state_dict([1, 2])


class _Evil:
  """Real exploit object: pickles as STACK_GLOBAL posix.system + REDUCE."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def _payloads(marker):
  return {
      "posix.system": tw.Reduce(tw.Global("posix", "system"), (f"touch {marker}",)),
      "builtins.eval": tw.Reduce(tw.Global("builtins", "eval"),
                                 (f"open({str(marker)!r}, 'w').close()",)),
      "subprocess.Popen": tw.Reduce(tw.Global("subprocess", "Popen"), (["touch", str(marker)],)),
      "os.system": _Evil(f"touch {marker}"),
  }


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.Popen",
                                  "os.system"])
def test_malicious_pickles_are_refused(tmp_path, fmt, name):
  marker = tmp_path / "pwned"
  payload = {"w": tw.tensor(np.ones(2, np.float32)), "x": _payloads(marker)[name]}
  path = tmp_path / f"evil_{fmt}.pt"
  if fmt == "zip":
    tw.save_zip(payload, path)
  else:
    tw.save_legacy(payload, path)
  with pytest.raises(CheckpointError) as err:
    load_state_dict(path)
  assert not marker.exists()
  message = str(err.value)
  assert path.name in message and "safetensors" in message
  module, func = name.split(".")
  assert func in message and (module in message or name == "os.system")


def test_payload_really_reaches_reduce():
  """The test payloads are real exploits: GLOBAL/STACK_GLOBAL then REDUCE."""
  for payload in _payloads("/nonexistent/x").values():
    data = (tw.dumps(payload)[0] if isinstance(payload, tw.Reduce)
            else pickle.dumps(payload, protocol=4))
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "REDUCE" in ops and ("GLOBAL" in ops or "STACK_GLOBAL" in ops)


def test_bare_pickles_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  harmless, evil = tmp_path / "plain.pt", tmp_path / "evil.pt"
  harmless.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
  evil.write_bytes(pickle.dumps(_Evil(f"touch {marker}"), protocol=4))
  with pytest.raises(CheckpointError, match="not a torch checkpoint") as err:
    read_torch_file(harmless)
  assert "plain.pt" in str(err.value)
  with pytest.raises(CheckpointError, match="system"):
    read_torch_file(evil)
  assert not marker.exists()


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
    load_state_dict(tmp_path / "nope.pt")
  with pytest.raises(FileNotFoundError):
    read_safetensors(tmp_path / "nope.safetensors")
  empty = tmp_path / "empty.pt"
  empty.write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty.pt.*empty"):
    read_torch_file(empty)
  text = tmp_path / "notes.bin"
  text.write_text("hello world, not a checkpoint")
  with pytest.raises(CheckpointError, match="notes.bin.*not a torch checkpoint"):
    load_state_dict(text)


def test_truncated_zip(tmp_path, fixtures_dir):
  data = (fixtures_dir / "dit_tiny.pt").read_bytes()
  for cut in (len(data) // 2, len(data) - 30):
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="cut.pt.*zip"):
      read_torch_file(path)


def test_truncated_storage_and_bad_view(tmp_path):
  short = tw.Storage(np.arange(6, dtype=np.float32), nbytes=20)
  path = tmp_path / "short.pt"
  tw.save_zip({"w": tw.Tensor(short, 0, (6,))}, path)
  with pytest.raises(CheckpointError, match="short.pt.*truncated"):
    read_torch_file(path)
  path = tmp_path / "short_legacy.pt"
  tw.save_legacy({"w": tw.Tensor(short, 0, (6,))}, path)
  with pytest.raises(CheckpointError, match="short_legacy.pt.*truncated"):
    read_torch_file(path)
  path = tmp_path / "view.pt"  # The storage is whole but the view runs past it.
  tw.save_zip({"w": tw.Tensor(tw.Storage(np.zeros(6, np.float32)), 2, (2, 3))}, path)
  with pytest.raises(CheckpointError, match="view.pt.*too short"):
    read_torch_file(path)
  path = tmp_path / "missing_entry.pt"
  tw.save_zip({"w": tw.tensor(np.zeros(2, np.float32))}, path,
              data_pkl=tw.dumps({"w": tw.tensor(np.zeros(2, np.float32)),
                                 "v": tw.tensor(np.zeros(2, np.float32))})[0])
  with pytest.raises(CheckpointError, match="missing_entry.pt.*missing"):
    read_torch_file(path)


def test_truncated_and_corrupt_safetensors(tmp_path, fixtures_dir):
  data = (fixtures_dir / "vae_diffusers_tiny.safetensors").read_bytes()
  cases = {"cut_data": data[:-100], "cut_header": data[:200], "cut_length": data[:5],
           "bad_json": data[:8] + b"x" * (len(data) - 8)}
  for name, blob in cases.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=f"{name}.safetensors") as err:
      load_state_dict(path)
    if name.startswith("cut"):
      assert "truncated" in str(err.value)


def test_safetensors_are_read_through_the_package(tmp_path, monkeypatch, fixtures_dir):
  """Issue 16 item 9: the `safetensors` package does the parsing; bf16 stays ml_dtypes.bfloat16."""
  import ml_dtypes
  import safetensors
  from jaxee.convert import torch_reader
  calls = []
  real = safetensors.safe_open

  def spy(path, *args, **kwargs):
    calls.append((str(path), kwargs.get("framework", args[0] if args else None)))
    return real(path, *args, **kwargs)

  monkeypatch.setattr(safetensors, "safe_open", spy)
  values = np.array([0.5, -2.0, 3.25], ml_dtypes.bfloat16)
  header = json.dumps({"b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                       "__metadata__": {"format": "np"}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
  out = read_safetensors(path)
  assert calls == [(str(path), "numpy")]
  assert out["b"].dtype == ml_dtypes.bfloat16 and out["b"].flags.owndata
  np.testing.assert_array_equal(out["b"].astype(np.float32), [0.5, -2.0, 3.25])
  assert torch_reader.read_safetensors(fixtures_dir / "vae_diffusers_tiny.safetensors")
  bad = tmp_path / "bad_offsets.safetensors"
  header = json.dumps({"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
  bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
  with pytest.raises(CheckpointError, match="bad_offsets.safetensors.*corrupt safetensors"):
    read_safetensors(bad)
