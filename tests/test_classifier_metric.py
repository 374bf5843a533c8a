"""The digits-classifier quality metric (`jaxee.eval.classifier_metric`).

One small classifier is trained once per module (a couple of hundred steps on the bundled digits)
and shared; every other test is NumPy-level.
"""
import numpy as np
import pytest

from jaxee.eval import classifier_metric as cm
from jaxee.eval import fid


@pytest.fixture(scope="module")
def digits():
  return cm.load_digits_arrays(8, split="train")


@pytest.fixture(scope="module")
def metric(digits):
  images, labels = digits
  return cm.ClassifierMetric.fit(images, labels, seed=0, holdout_fraction=0.4, steps=200)


def test_load_digits_arrays_matches_the_tfds_source():
  x8, y8 = cm.load_digits_arrays(8, split="test")
  x16, y16 = cm.load_digits_arrays(16, split="test")
  assert x8.shape == (297, 8, 8, 1) and x16.shape == (297, 16, 16, 1)
  assert x8.dtype == np.float32 and x8.min() >= -1.0 and x8.max() <= 1.0
  np.testing.assert_array_equal(y8, y16)
  np.testing.assert_array_equal(x16[:, ::2, ::2], x8)   # nearest upsampling
  with pytest.raises(ValueError, match="multiple of 8"):
    cm.load_digits_arrays(12)


def test_classifier_input_maps_upsampled_and_rgb_images_back_exactly():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  rgb = np.repeat(up, 3, axis=-1)
  np.testing.assert_allclose(np.asarray(cm.to_classifier_input(rgb)), x, atol=1e-6)
  assert cm.to_classifier_input(rng.normal(size=(2, 12, 12, 1))).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match="NHWC"):
    cm.to_classifier_input(np.zeros((8, 8, 1)))


def test_training_is_deterministic_and_learns(digits):
  images, labels = digits
  a = cm.train_classifier(images[:300], labels[:300], seed=3, steps=20, batch_size=32)[1]
  b = cm.train_classifier(images[:300], labels[:300], seed=3, steps=20, batch_size=32)[1]
  c = cm.train_classifier(images[:300], labels[:300], seed=4, steps=20, batch_size=32)[1]
  flat = lambda p: np.concatenate([np.ravel(v) for v in __import__("jax").tree.leaves(p)])
  np.testing.assert_array_equal(flat(a), flat(b))
  assert not np.array_equal(flat(a), flat(c))
  with pytest.raises(ValueError, match="labels must lie"):
    cm.train_classifier(images[:10], labels[:10] + 10, steps=1)


def test_metric_separates_real_digits_from_noise(metric, digits):
  test_x, test_y = cm.load_digits_arrays(8, split="test")
  assert metric.heldout_accuracy > 0.85
  real = metric.report(test_x, test_y)
  noise = np.random.default_rng(1).uniform(-1, 1, test_x.shape).astype(np.float32)
  fake = metric.report(noise, test_y)
  assert real["frechet"] < 0.25 * fake["frechet"]
  assert real["confidence"] > fake["confidence"]
  assert real["class_accuracy"] > 0.85 > fake["class_accuracy"] + 0.3
  assert 0 <= real["reference_frechet"] < fake["frechet"]
  assert real["num_samples"] == len(test_x)
  assert abs(sum(real["class_histogram"]) - 1) < 1e-9
  # Shuffled labels keep FD and confidence but not the class accuracy.
  shuffled = metric.report(test_x, np.roll(test_y, 1))
  assert shuffled["frechet"] == pytest.approx(real["frechet"])
  assert shuffled["class_accuracy"] < 0.5
  # The single-quantity helpers agree with the report.
  assert metric.frechet(test_x) == pytest.approx(real["frechet"])
  assert metric.confidence(test_x) == pytest.approx(real["confidence"])
  assert metric.class_accuracy(test_x, test_y) == pytest.approx(real["class_accuracy"])


def test_frechet_of_features_matches_the_gaussian_closed_form(metric):
  """FD(N(m1, diag s1), N(m2, diag s2)) = |m1 - m2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
  d = metric.mu.shape[0]
  rng = np.random.default_rng(2)
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  # 2d points whose sample mean is m2 and whose sample covariance (ddof 1) is diag(s2).
  n = 2 * d
  offsets = np.concatenate([np.eye(d), -np.eye(d)]) * np.sqrt(s2 * (n - 1) / 2.0)
  feats = m2 + offsets
  mu, sigma = fid.stats_from_features(feats)
  np.testing.assert_allclose(mu, m2, atol=1e-12)
  np.testing.assert_allclose(sigma, np.diag(s2), atol=1e-12)
  probe = cm.ClassifierMetric(metric.model, metric.params, m1, np.diag(s1),
                              metric.floor_features, metric.heldout_accuracy)
  want = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert probe.frechet_from_features(feats) == pytest.approx(want, rel=1e-6)


def test_bad_inputs_raise_clear_errors(metric, digits):
  images, labels = digits
  with pytest.raises(ValueError, match="NaN or inf"):
    bad = images[:4].copy()
    bad[2, 0, 0, 0] = np.nan
    metric.report(bad)
  with pytest.raises(ValueError, match="labels shape"):
    metric.report(images[:4], labels[:3])
  with pytest.raises(ValueError, match="non-empty"):
    metric.features_and_probs(np.zeros((0, 8, 8, 1)))
  with pytest.raises(ValueError, match="too few"):
    cm.ClassifierMetric.fit(images[:5], labels[:5], holdout_fraction=0.2, steps=1)
