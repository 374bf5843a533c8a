"""Tests of the FID Inception-v3 port, the TF1 resize, FID/IS and reference statistics."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.convert.errors import CheckpointError
from jaxee.eval import fid
from jaxee.eval.inception import resize_like_tf1
from jaxee.eval.inception_convert import inception_params_from_state_dict


@functools.lru_cache(maxsize=1)
def _state_dict(path):
  from jaxee.convert.torch_reader import load_state_dict
  return load_state_dict(path)


@functools.lru_cache(maxsize=1)
def _variables(path):
  return inception_params_from_state_dict(_state_dict(path))


def _io(fixtures_dir):
  with np.load(fixtures_dir / "inception_fid_io.npz") as d:
    return {k: d[k] for k in d.files}


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_parity_with_reference(inception_weights, fixtures_dir):
  io = _io(fixtures_dir)
  images = np.transpose(io["x"], (0, 2, 3, 1))  # NCHW uint8 -> NHWC
  # Three single images regrouped into batches of 2: the last batch is padded and trimmed,
  # and the jitted shape (2, 64, 48, 3) is compiled once for the whole test module.
  out = fid.compute_features([images[0], images[1], images[0]], _variables(inception_weights),
                             batch_size=2, progress=False)
  idx = [0, 1, 0]
  assert out["pool"].shape == (3, 2048) and out["logits_unbiased"].shape == (3, 1008)
  assert _rel(out["pool"], io["pool_2048"][idx]) <= 1e-4
  assert _rel(out["logits_unbiased"], io["logits_unbiased"][idx]) <= 1e-4


def test_reference_stats_from_images(inception_weights, fixtures_dir, tmp_path):
  io = _io(fixtures_dir)
  images = np.transpose(io["x"], (0, 2, 3, 1))
  path = tmp_path / "ref_batch.npz"
  np.savez(path, arr_0=images)
  with pytest.raises(ValueError, match="images only"):
    fid.load_reference_stats(path)
  mu, sigma = fid.load_reference_stats(path, _variables(inception_weights), batch_size=2)
  mu_ref, sigma_ref = fid.stats_from_features(io["pool_2048"])
  np.testing.assert_allclose(mu, mu_ref, rtol=0, atol=1e-4 * np.abs(mu_ref).max())
  np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-3 * np.abs(sigma_ref).max())


def test_conversion_is_strict(inception_weights):
  sd = dict(_state_dict(inception_weights))
  del sd["Mixed_6b.branch7x7_2.bn.running_var"]
  sd["Mixed_5b.branch1x1.conv.bias"] = np.zeros(64, np.float32)
  sd["fc.weight"] = sd["fc.weight"][:1000]
  with pytest.raises(CheckpointError) as err:
    inception_params_from_state_dict(sd)
  msg = str(err.value)
  assert "batch_stats/Mixed_6b/branch7x7_2/bn/var" in msg
  assert "Mixed_5b.branch1x1.conv.bias" in msg
  assert "fc.weight" in msg
  assert "num_batches_tracked" not in msg


def test_resize_like_tf1_identity():
  x = np.random.RandomState(0).randint(0, 256, (2, 7, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resize_like_tf1(jnp.asarray(x), (7, 5))), x)


def test_resize_like_tf1_upscale_by_two():
  # src = dst * in / out = dst / 2; the upper neighbour is clamped at the border.
  x = np.array([[0.0, 4.0], [8.0, 16.0]], np.float32)[None, :, :, None]
  row0 = [0.0, 2.0, 4.0, 4.0]
  row1 = [8.0, 12.0, 16.0, 16.0]
  mid = [(a + b) / 2 for a, b in zip(row0, row1)]
  expected = np.array([row0, mid, row1, row1], np.float32)
  got = np.asarray(resize_like_tf1(jnp.asarray(x), 4))[0, :, :, 0]
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_resize_like_tf1_matches_loop():
  rng = np.random.RandomState(1)
  x = rng.rand(1, 5, 7, 2).astype(np.float32)
  out_h, out_w = 11, 3
  ref = np.zeros((out_h, out_w, 2))
  for i in range(out_h):
    for j in range(out_w):
      sy, sx = i * 5 / out_h, j * 7 / out_w
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
      fy, fx = sy - y0, sx - x0
      top = x[0, y0, x0] * (1 - fx) + x[0, y0, x1] * fx
      bottom = x[0, y1, x0] * (1 - fx) + x[0, y1, x1] * fx
      ref[i, j] = top * (1 - fy) + bottom * fy
  got = np.asarray(resize_like_tf1(jnp.asarray(x), (out_h, out_w)))[0]
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.RandomState(0)
  d = 16
  mu1, mu2 = rng.randn(d), rng.randn(d)
  s1, s2 = rng.rand(d) + 0.1, rng.rand(d) + 0.1
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_distance_full_covariance():
  rng = np.random.RandomState(0)
  a = rng.randn(200, 32) @ rng.randn(32, 32)
  b = rng.randn(300, 32) @ rng.randn(32, 32) + 0.5
  mu_a, sig_a = fid.stats_from_features(a)
  mu_b, sig_b = fid.stats_from_features(b)
  np.testing.assert_allclose(sig_a, np.cov(a, rowvar=False, ddof=1))
  assert abs(fid.frechet_distance(mu_a, sig_a, mu_a, sig_a)) < 1e-8
  ab = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
  ba = fid.frechet_distance(mu_b, sig_b, mu_a, sig_a)
  assert ab > 0
  assert ab == pytest.approx(ba, rel=1e-8)
  assert fid.fid_from_features(a, b) == pytest.approx(ab, rel=1e-12)


def test_frechet_distance_singular_covariances():
  rng = np.random.RandomState(0)
  a, b = rng.randn(5, 20), rng.randn(6, 20)  # rank-deficient covariances
  value = fid.frechet_distance(*fid.stats_from_features(a), *fid.stats_from_features(b))
  assert np.isfinite(value) and value > 0


def test_inception_score():
  n, k = 40, 8
  # Confident predictions spread evenly over k classes: IS = k in every split.
  logits = np.full((n, 1008), -50.0)
  logits[np.arange(n), np.arange(n) % k] = 50.0
  mean, std = fid.inception_score(logits, splits=5)
  assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
  mean, _ = fid.inception_score(np.zeros((n, 1008)), splits=4)
  assert mean == pytest.approx(1.0, abs=1e-12)


def test_save_load_stats_round_trip(tmp_path):
  rng = np.random.RandomState(0)
  mu, sigma = fid.stats_from_features(rng.randn(50, 8))
  path = tmp_path / "sub" / "stats.npz"
  fid.save_reference_stats(path, mu, sigma)
  assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # no temp file left over
  mu2, sigma2 = fid.load_reference_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  bad = tmp_path / "bad.npz"
  np.savez(bad, foo=np.zeros(3))
  with pytest.raises(ValueError, match="mu"):
    fid.load_reference_stats(bad)
