"""The demo's measurements: samples, quality, exit statistics and wall-clock speed-ups.

For one backbone and its variants (`jaxee.demo.methods.Variant`):

1. **Samples.** Every variant samples the same `num_eval` class-conditional digits (labels
   0..9 in turn) from the same start noise x_T with DDIM (η = 0, deterministic), so differences
   between rows are the method's alone. `jaxee.sample(..., return_stats=True)` also returns the
   per-NFE `blocks` and `flops` the runner really executed.
2. **Quality** (`jaxee.eval.classifier_metric.ClassifierMetric.report`): the Fréchet distance
   between the samples' features and held-out real digits in the feature space of a small
   classifier trained on the real digits (Inception features mean nothing on 8x8 images), the
   classifier's mean confidence and the accuracy of its predictions against the conditioning
   labels; and, per variant, the paired-bootstrap standard deviation of its FD difference to the
   full model (`paired_frechet_noise`), which the report uses to call a difference real.
3. **Exit statistics** (`jaxee.eval.report.exit_summary`): executed blocks per NFE, FLOPs per
   image, layer ratio and the ideal (FLOP) saving.
4. **Realized speed-up.** All variants are timed in this process, *alternately*: `rounds`
   rounds, each calling every variant once (the order rotates per round so no variant always
   follows the same one), each call ended by `block_until_ready`; every variant was compiled and
   run once before (step 1). Speed-up = median full time / median variant time; realized saving
   = 1 − median variant / median full; efficiency = realized saving / ideal saving
   (`shared/DESIGN.md`, "Performance model").
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxee
from jaxee.eval import report as report_lib


def eval_inputs(model, num: int, seed: int) -> tuple[jax.Array, Optional[jax.Array]]:
  """(x_T, labels): the shared start noise and conditioning labels (0..9 repeated; None for an
  unconditional backbone such as the demo's U-Net)."""
  from jaxee.models import backbone as bb_lib  # pylint: disable=g-import-not-at-top
  shape = (num,) + tuple(bb_lib.as_backbone(model, "block").input_shape)
  x_T = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
  labels = jnp.arange(num, dtype=jnp.int32) % 10 if model.num_classes > 0 else None
  return x_T, labels


def make_sampler(model, variant, x_T, labels, steps: int,
                 guidance: Optional[float]) -> Callable[[], Any]:
  """A zero-argument call sampling `variant` (same compiled function every call)."""
  key = jax.random.PRNGKey(0)  # DDIM with η = 0 draws no noise; the key is required only.

  def run():
    return jaxee.sample(model, variant.params, key, x_T=x_T, labels=labels, sampler="ddim",
                        steps=steps, guidance=guidance, plan=variant.plan, return_stats=True)
  return run


def alternating_timing(calls: dict, rounds: int) -> dict:
  """Seconds per call of each entry, measured in alternation (see module docstring).

  Args:
    calls: name → zero-argument function returning JAX arrays (already compiled).
    rounds: number of rounds.

  Returns:
    name → list of `rounds` durations in seconds.
  """
  names = list(calls)
  times = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())
      times[name].append(time.perf_counter() - start)
  return times


def evaluate_arch(result, metric, scale, seed: int, log: Callable[[str], None]) -> dict:
  """Samples, scores and times every variant of one `methods.ArchResult`.

  Returns:
    {'variants': {name: record}, 'samples': {name: (N, H, W, C) array}, 'labels': array,
     'timing_raw': {name: [seconds]}} where a record holds `quality`, `exits`, `timing` and the
    variant's `info`.
  """
  model = result.model
  x_T, labels = eval_inputs(model, scale.num_eval, seed + 1000)
  calls, records, samples, feats = {}, {}, {}, {}
  for variant in result.variants:
    call = make_sampler(model, variant, x_T, labels, scale.sample_steps,
                        scale.arch_value("guidance", result.arch))
    start = time.perf_counter()
    x, stats = jax.block_until_ready(call())
    first_s = time.perf_counter() - start
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    samples[variant.name] = x
    feats[variant.name], probs = metric.features_and_probs(x)
    quality = metric.report_from_outputs(feats[variant.name], probs,
                                         None if labels is None else np.asarray(labels))
    quality.pop("class_histogram", None)
    exits = report_lib.exit_summary(model, stats)
    records[variant.name] = {"method": variant.method, "quality": quality, "exits": exits,
                             "first_call_s": round(first_s, 3), "info": variant.info}
    calls[variant.name] = call
    log(f"[{result.arch}] {variant.name:16s} FD {quality['frechet']:8.2f}  conf "
        f"{quality['confidence']:.3f}  acc {report_lib.fmt(quality.get('class_accuracy'))}  "
        f"layer ratio "
        f"{exits['layer_ratio']:.3f}  ideal saving {exits['ideal_saving']:+.3f}")
  pairs = [(name, "full") for name in feats if name != "full"]
  for a, b in (("ase", "ase_no_finetune"), ("ase_searched", "ase_no_finetune"),
               ("ase_searched_ft", "ase")):
    if a in feats and b in feats:
      pairs.append((a, b))
  for (name, other), std in paired_frechet_noise(metric, feats, pairs).items():
    records[name]["quality"][f"frechet_diff_std_vs_{other}"] = std
  raw = alternating_timing(calls, scale.timing_rounds)
  full = statistics.median(raw["full"])
  for name, secs in raw.items():
    med = statistics.median(secs)
    ideal = records[name]["exits"]["ideal_saving"]
    realized = 1.0 - med / full
    records[name]["timing"] = {
        "median_s": med, "speedup": full / med, "realized_saving": realized,
        # Only meaningful for a variant that skips work (the exact DeeDiff reference adds some).
        "efficiency": (realized / ideal) if ideal > 1e-3 else None,
        "samples_per_s": scale.num_eval / med,
        # Paired by round (the alternating order): rounds in which this variant beat the full
        # model, the sign test behind the report's "faster"/"slower" claims.
        "rounds_faster": int(sum(f > v for f, v in zip(raw["full"], secs))),
        "rounds_slower": int(sum(f < v for f, v in zip(raw["full"], secs))),
        "rounds": len(secs)}
  log(f"[{result.arch}] timing ({scale.timing_rounds} alternating rounds, medians): " + ", ".join(
      f"{n} {r['timing']['median_s']:.3f}s ×{r['timing']['speedup']:.2f}"
      for n, r in records.items()))
  return {"variants": records, "samples": samples,
          "labels": None if labels is None else np.asarray(labels),
          "timing_raw": raw}


def paired_frechet_noise(metric, feats: dict, pairs, draws: int = 50, seed: int = 0) -> dict:
  """Bootstrap std of FD(a) − FD(b) for each (a, b) in `pairs`, resampling rows *paired*.

  Every variant samples from the same start noise and labels, so row i of each variant is the
  same draw; resampling the same row indices for both sides measures the sampling noise of the
  FD difference at this sample size (deterministic: fixed `seed`).

  Args:
    metric: a fitted `ClassifierMetric`.
    feats: name → (N, F) classifier features of that variant's samples (same N).
    pairs: (a, b) name pairs.
    draws: bootstrap resamples.
    seed: resampling seed.

  Returns:
    {(a, b): std}.
  """
  sizes = {len(f) for f in feats.values()}
  if len(sizes) != 1:
    raise ValueError(f"variants have different sample counts {sorted(sizes)}")
  n = sizes.pop()
  idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
  cache = {}

  def fds(name):
    if name not in cache:
      cache[name] = np.array([metric.frechet_from_features(feats[name][i]) for i in idx])
    return cache[name]
  return {(a, b): float(np.std(fds(a) - fds(b), ddof=1)) for a, b in pairs}


def real_reference(metric, images: np.ndarray, labels: np.ndarray) -> dict:
  """The metric on real digits neither the generators nor the classifier saw (the test split):
  what a perfect generator would score with about as many samples."""
  out = metric.report(images, labels)
  out.pop("class_histogram", None)
  return out


def names_in_order(records: dict, order: Sequence[str]) -> list:
  return [n for n in order if n in records] + [n for n in records if n not in order]
