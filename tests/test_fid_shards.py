"""FID over a sampling run's shards (`jaxee.eval.fid_shards`, `jaxee-fid`): manifest, streaming."""
import json

import numpy as np
import pytest

from jaxee.cli import fid as fid_cli
from jaxee.eval import fid as fid_lib
from jaxee.eval import fid_shards
from jaxee.eval.inception_convert import load_inception
from jaxee.sharded import shards as shards_lib


def _write_run(root, counts, size=8, kind="images", seed=0):
  rng = np.random.default_rng(seed)
  (root / "shards").mkdir(parents=True)
  images = []
  for k, c in enumerate(counts):
    x = rng.integers(0, 256, size=(c, size, size, 3), dtype=np.uint8)
    images.append(x)
    shards_lib.write_npz(root / "shards" / f"shard_{k:05d}.npz",
                            {kind: x, "labels": np.zeros(c, np.int32),
                             "index": np.arange(c, dtype=np.int64)})
  shards_lib.write_manifest(root, counts, False, kind)
  return np.concatenate(images)


def test_shards_are_checked_and_streamed_in_order(tmp_path):
  images = _write_run(tmp_path / "run", [3, 3, 2])
  shards = fid_shards.check_shards(tmp_path / "run")
  assert [c for _, c in shards] == [3, 3, 2]
  np.testing.assert_array_equal(np.concatenate(list(fid_shards.iter_shard_images(shards))),
                                images)


def test_bad_runs_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="has not finished"):
    fid_shards.check_shards(tmp_path)
  _write_run(tmp_path / "lat", [2], kind="latents")
  with pytest.raises(fid_shards.ShardError, match="not decoded images"):
    fid_shards.check_shards(tmp_path / "lat")
  _write_run(tmp_path / "run", [2, 2])
  shard = tmp_path / "run" / "shards" / "shard_00001.npz"
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(fid_shards.ShardError, match="shard_00001.*checksum"):
    fid_shards.check_shards(tmp_path / "run")
  shard.unlink()
  with pytest.raises(fid_shards.ShardError, match="missing"):
    fid_shards.check_shards(tmp_path / "run")


def test_fid_from_shards_equals_fid_of_the_same_images(tmp_path, inception_weights):
  images = _write_run(tmp_path / "run", [2, 1], size=16)
  variables = load_inception(inception_weights)
  ref = tmp_path / "ref.npz"
  np.savez(ref, arr_0=np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
  out = fid_shards.fid_from_shards(tmp_path / "run", ref, variables, batch_size=2,
                                   progress=False, save_stats=str(tmp_path / "stats.npz"))
  feats = fid_lib.compute_features(images, variables, 2, progress=False)["pool"]
  mu_ref, sigma_ref = fid_lib.load_reference_stats(ref, variables, batch_size=2)
  want = fid_lib.frechet_distance(*fid_lib.stats_from_features(feats), mu_ref, sigma_ref)
  assert out["num_samples"] == 3
  assert out["fid"] == pytest.approx(want, rel=1e-6)
  with np.load(tmp_path / "stats.npz") as z:
    np.testing.assert_allclose(z["mu"], feats.mean(0), rtol=1e-5)
  assert json.dumps(out)


# Issue 16 item 4/6: bad batch sizes and references are refused before any work; NaN never scores.


class _NoWork:
  """Stands in for the expensive steps: any call means work started before validation."""

  def __init__(self, monkeypatch):
    monkeypatch.setattr(fid_lib, "compute_features", self)
    from jaxee.eval import inception_convert
    monkeypatch.setattr(inception_convert, "load_inception", self)

  def __call__(self, *args, **kwargs):
    raise AssertionError("work started before the inputs were validated")


@pytest.mark.parametrize("batch_size", ["0", "-5"])
def test_cli_rejects_bad_batch_size_before_any_work(tmp_path, monkeypatch, capsys, batch_size):
  _write_run(tmp_path / "run", [2])
  _NoWork(monkeypatch)
  code = fid_cli.main(["--samples", str(tmp_path / "run"), "--ref", str(tmp_path / "r.npz"),
                       "--inception", "x.pth", "--batch-size", batch_size])
  err = capsys.readouterr().err
  assert code == 2 and "--batch-size must be >= 1" in err and "Traceback" not in err


def test_library_rejects_bad_batch_size(tmp_path):
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match="batch size must be an integer >= 1"):
      fid_lib.compute_features(iter([np.zeros((1, 8, 8, 3), np.uint8)]), None, bad)
  _write_run(tmp_path / "run", [2])
  with pytest.raises(ValueError, match="batch size"):
    fid_shards.fid_from_shards(tmp_path / "run", tmp_path / "r.npz", None, batch_size=0)


@pytest.mark.parametrize("ref", ["missing", "nan_mu", "nan_sigma", "garbage", "bad_shape"])
def test_bad_reference_is_refused_before_the_inception_pass(tmp_path, monkeypatch, capsys, ref):
  _write_run(tmp_path / "run", [2])
  path = tmp_path / "ref.npz"
  mu, sigma = np.zeros(4), np.eye(4)
  if ref == "nan_mu":
    mu[1] = np.nan
  if ref == "nan_sigma":
    sigma[2, 2] = np.inf
  if ref == "bad_shape":
    sigma = np.eye(3)
  if ref == "garbage":
    path.write_bytes(b"not an npz at all")
  elif ref != "missing":
    np.savez(path, mu=mu, sigma=sigma)
  no_work = _NoWork(monkeypatch)
  with pytest.raises((ValueError, FileNotFoundError), match="ref.npz"):
    fid_shards.fid_from_shards(tmp_path / "run", path, no_work, batch_size=2, progress=False)
  code = fid_cli.main(["--samples", str(tmp_path / "run"), "--ref", str(path),
                       "--inception", "x.pth"])
  err = capsys.readouterr().err
  assert code == 2 and "ref.npz" in err and "Traceback" not in err


def test_non_finite_features_name_the_shard(tmp_path, monkeypatch):
  _write_run(tmp_path / "run", [2, 3])
  np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))

  def nan_features(images, variables, batch_size, **kwargs):
    del variables, batch_size, kwargs
    n = sum(x.shape[0] for x in images)
    pool = np.ones((n, 4), np.float32) * np.arange(n)[:, None]
    pool[3, 0] = np.nan
    return {"pool": pool, "logits_unbiased": np.zeros((n, 10), np.float32)}

  monkeypatch.setattr(fid_lib, "compute_features", nan_features)
  with pytest.raises(ValueError, match=r"NaN/Inf, first in shard .*shard_00001.npz \(sample 1"):
    fid_shards.fid_from_shards(tmp_path / "run", tmp_path / "ref.npz", None, batch_size=2,
                               progress=False)
