"""FID / Inception Score over the sample shards written by `jaxee-sample`.

    jaxee-fid --samples runs/sample_dit_xl_2_256 \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 100] [--save-stats runs/sample_dit_xl_2_256/fid_stats.npz] [--json OUT]

The sampling run's `manifest.json` lists every shard with its sample count and SHA-256; the shards
are checked against it before any network runs (a missing, truncated or modified shard is an
error naming the file — rerun the sampler, which recomputes exactly that shard), then streamed
through the FID Inception-v3 (`jaxee.eval.fid.compute_features`, one compiled batch shape, a
progress bar) so 50,000 images never sit in memory at once. Reference statistics are any `.npz`
`jaxee.eval.fid.load_reference_stats` reads (pytorch-fid `mu`/`sigma`, ADM reference batches).
Only `images` shards (uint8 NHWC, written when the sampler decodes) can be scored; latent shards
are refused with a message. Everything cheap is checked before the Inception pass: the batch size
(>= 1), the shards, and the reference file (readable, finite `mu`/`sigma`). NaN/Inf Inception
features are an error naming the shard that produced them, and a non-finite FID is never
reported as a score.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator, Optional

import numpy as np

from jaxee import validation
from jaxee.eval import fid as fid_lib
from jaxee.sharded import shards as shards_lib


class ShardError(ValueError):
  """A sample directory whose shards do not match its manifest."""


def check_shards(samples_dir) -> list[tuple[pathlib.Path, int]]:
  """Verifies every shard of a sampling run against its `manifest.json`.

  Args:
    samples_dir: the sampler's `out_dir`.

  Returns:
    [(shard path, count)] in order.

  Raises:
    FileNotFoundError: no manifest (the run has not finished: rerun it to complete it).
    ShardError: a shard is missing, has another checksum, or holds latents instead of images.
  """
  root = pathlib.Path(samples_dir)
  manifest_path = root / "manifest.json"
  if not manifest_path.is_file():
    raise FileNotFoundError(f"{manifest_path} not found: the sampling run has not finished "
                            f"(rerun the same `jaxee-sample` command to resume it)")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("kind") not in (None, "images"):
    raise ShardError(f"{root} holds {manifest.get('kind')!r}, not decoded images; sample with a "
                     f"VAE (`--config.vae_ckpt=...`) to score FID")
  out = []
  for entry in manifest["shards"]:
    path = root / entry["file"]
    if not path.is_file():
      raise ShardError(f"shard {path} listed in the manifest is missing")
    if shards_lib.sha256(path) != entry["sha256"]:
      raise ShardError(f"shard {path} does not match its manifest checksum (modified or "
                       f"truncated); delete it and rerun the sampler to recompute it")
    out.append((path, int(entry["count"])))
  return out


def iter_shard_images(shards: list[tuple[pathlib.Path, int]]) -> Iterator[np.ndarray]:
  """Yields the (count, H, W, C) uint8 image batch of each checked shard, in order."""
  for path, count in shards:
    with np.load(path, allow_pickle=False) as z:
      if "images" not in z.files:
        raise ShardError(f"shard {path} has no 'images' (keys {sorted(z.files)})")
      images = z["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count:
      raise ShardError(f"shard {path}: expected ({count}, H, W, C) uint8 images, got "
                       f"{images.shape} {images.dtype}")
    yield images


def fid_from_shards(samples_dir, ref_path, inception_variables: Any, *, batch_size: int = 100,
                    progress: bool = True, save_stats: Optional[str] = None) -> dict:
  """FID (and Inception Score) of a sampling run's shards against reference statistics.

  Args:
    samples_dir: the sampler's `out_dir` (with `manifest.json` and `shards/`).
    ref_path: reference statistics `.npz`.
    inception_variables: from `jaxee.eval.inception_convert.load_inception`.
    batch_size: Inception batch size.
    progress: show the progress bar.
    save_stats: optionally write the samples' `mu`/`sigma` there (pytorch-fid layout).

  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'num_samples'}.
  """
  batch_size = fid_lib.check_batch_size(batch_size)
  shards = check_shards(samples_dir)
  total = sum(c for _, c in shards)
  # The reference first: a bad --ref must not cost the whole Inception pass over the samples.
  ref_mu, ref_sigma = fid_lib.load_reference_stats(ref_path, inception_variables,
                                                   batch_size=batch_size)
  feats = fid_lib.compute_features(iter_shard_images(shards), inception_variables, batch_size,
                                   total=total, progress=progress)
  _check_features(feats, shards)
  mu, sigma = fid_lib.stats_from_features(feats["pool"])
  if save_stats:
    fid_lib.save_reference_stats(save_stats, mu, sigma)
  # The usual 10 splits; fewer for small runs (each split needs at least one sample).
  score, score_std = fid_lib.inception_score(feats["logits_unbiased"], splits=min(10, total))
  fid = fid_lib.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  validation.check_finite(np.asarray([fid, score, score_std]),
                          f"the FID / Inception Score of {samples_dir} against {ref_path}")
  return {"fid": fid, "inception_score": float(score), "inception_score_std": float(score_std),
          "num_samples": int(total)}


def _check_features(feats: dict, shards: list[tuple[pathlib.Path, int]]) -> None:
  """NaN/Inf Inception outputs: an error naming the first shard (and sample) that has them."""
  bad = ~np.isfinite(feats["pool"]).all(axis=1) | ~np.isfinite(feats["logits_unbiased"]).all(
      axis=1)
  if not bad.any():
    return
  first = int(np.argmax(bad))
  start = 0
  for path, count in shards:
    if first < start + count:
      raise validation.NonFiniteError(
          f"Inception features of {int(bad.sum())} sample(s) are NaN/Inf, first in shard {path} "
          f"(sample {first - start} of it): check the Inception weights")
    start += count


if __name__ == "__main__":  # `python -m jaxee.eval.fid_shards`: the same command as `jaxee-fid`
  from jaxee.cli import fid  # pylint: disable=g-import-not-at-top
  fid.run()
