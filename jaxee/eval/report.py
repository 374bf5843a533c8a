"""Exit statistics of real sampling runs, their plots, and the demo report writers.

Statistics (`exit_summary`) come from the per-NFE stats that `jaxee.sample(...,
return_stats=True)` returns (`blocks`: transformer blocks executed per sample at that network
evaluation; `flops`: FLOPs executed per sample, `jaxee.eval.flops`; plans may add `exit`), and
reproduce the quantities of the papers' figures:

* executed depth per step vs τ = t/T (ASE Fig. 1/5 "blocks per interval", DeeDiff/DuoDiff
  "exit layer vs timestep", TABM/L2C router maps);
* FLOPs per image = Σ over NFEs of the per-sample FLOPs (DeeDiff's GFLOPs column), next to the
  full model's NFE × backbone FLOPs; ideal saving = 1 − plan / full;
* layer ratio = mean executed blocks / total blocks (DeeDiff's "layer ratio", mean exit / L).

Plots (matplotlib, Agg): `plot_exit_depth` (blocks vs τ, one line per variant),
`plot_flops` (FLOPs per image with layer ratios), `plot_quality_speed` (Fréchet distance vs
realized speed-up), `plot_mask` (a steps × blocks mask). Files are written atomically (temporary
file + `os.replace`), as are `write_json` / `write_text`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from jaxee import atomic_io
from jaxee.eval import flops as flops_lib


def exit_summary(model: Any, stats: dict) -> dict:
  """Exit statistics of one sampling run.

  Args:
    model: the backbone that was sampled (the deep one for DuoDiff).
    stats: `jaxee.sample(..., return_stats=True)[1]`: per-NFE `blocks`, `flops`, `nfe_times`.

  Returns:
    dict of JSON-ready values: `tau`, `blocks_per_nfe`, `flops_per_nfe` (lists), `num_nfe`,
    `num_blocks`, `flops_per_image`, `full_flops_per_image`, `ideal_saving`, `layer_ratio`,
    `mean_blocks` and, when the plan reports it, `exit_per_nfe`.
  """
  if "blocks" not in stats or "flops" not in stats or "nfe_times" not in stats:
    raise ValueError(f"stats need 'blocks', 'flops' and 'nfe_times', got {sorted(stats)}")
  blocks = np.asarray(stats["blocks"], np.float64).reshape(-1)
  flops = np.asarray(stats["flops"], np.float64).reshape(-1)
  times = np.asarray(stats["nfe_times"], np.float64).reshape(-1)
  if not blocks.shape == flops.shape == times.shape:
    raise ValueError(f"per-NFE stats disagree in length: blocks {blocks.shape}, flops "
                     f"{flops.shape}, nfe_times {times.shape}")
  from jaxee.exits import plan as plan_lib  # pylint: disable=g-import-not-at-top
  tau = plan_lib.model_time_to_unit(times, model.default_schedule)
  total = flops_lib.num_blocks(model)
  full = flops_lib.backbone_flops(model) * len(times)
  out = {
      "tau": np.round(tau, 6).tolist(),
      "blocks_per_nfe": np.round(blocks, 4).tolist(),
      "flops_per_nfe": flops.tolist(),
      "num_nfe": int(len(times)),
      "num_blocks": int(total),
      "mean_blocks": float(blocks.mean()),
      "layer_ratio": float(blocks.mean() / total),
      "flops_per_image": float(flops.sum()),
      "full_flops_per_image": float(full),
      "ideal_saving": float(1.0 - flops.sum() / full),
  }
  if "exit" in stats:
    out["exit_per_nfe"] = np.round(np.asarray(stats["exit"], np.float64), 4).reshape(-1).tolist()
  return out


def write_text(path, text: str) -> pathlib.Path:
  """Writes `text` atomically."""
  return atomic_io.atomic_write_text(path, text)


def write_json(path, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented JSON atomically (NumPy scalars/arrays converted)."""
  def default(o):
    if isinstance(o, np.ndarray):
      return o.tolist()
    if isinstance(o, np.generic):
      return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
  return write_text(path, json.dumps(obj, indent=2, default=default, sort_keys=False) + "\n")


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path) -> pathlib.Path:
  plt = _pyplot()
  out = atomic_io.atomic_write_via_path(path, lambda tmp: fig.savefig(tmp, format="png"))
  plt.close(fig)
  return out


def plot_exit_depth(summaries: dict, path, title: str = "") -> pathlib.Path:
  """Executed blocks per sample vs τ (noise → data, left to right), one line per variant.

  Args:
    summaries: name → `exit_summary` dict.
    path: PNG path.
    title: figure title.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  curves: list = []  # identical curves are drawn once, with their names joined
  for name, s in summaries.items():
    key = (tuple(s["tau"]), tuple(s["blocks_per_nfe"]))
    for curve in curves:
      if curve[0] == key:
        curve[1].append(name)
        break
    else:
      curves.append((key, [name]))
  for i, ((tau, blocks), names) in enumerate(curves):
    full = "full" in names
    style = (dict(color="black", linestyle=":", linewidth=1.4) if full
             else dict(marker="o", markersize=3))
    # A small vertical offset per curve keeps overlapping segments visible.
    shift = 0.0 if full else 0.04 * (i - (len(curves) - 1) / 2)
    ax.step(tau, np.asarray(blocks) + shift, where="mid", label=" = ".join(names), **style)
  ax.set_xlim(1.0, 0.0)
  ax.set_xlabel("τ = t / T of the network evaluation (noise → data)")
  ax.set_ylabel("blocks executed per sample")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  return _save(fig, path)


def plot_flops(summaries: dict, path, title: str = "") -> pathlib.Path:
  """MFLOPs per image for each variant, annotated with the layer ratio."""
  plt = _pyplot()
  names = list(summaries)
  values = [summaries[n]["flops_per_image"] / 1e6 for n in names]
  fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
  bars = ax.bar(range(len(names)), values, color=["#555555" if n == "full" else "#4c72b0"
                                                  for n in names])
  for bar, name in zip(bars, names):
    ax.annotate(f"ratio {summaries[name]['layer_ratio']:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=7)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=20, fontsize=8)
  ax.set_ylabel("MFLOPs per image (all NFEs)")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def pareto_front(points: dict) -> list:
  """Names of the variants no other variant beats on both speed-up (higher) and FD (lower),
  in order of increasing speed-up."""
  names = [n for n, (sp, fd) in points.items()
           if not any((s2 >= sp and f2 <= fd) and (s2 > sp or f2 < fd)
                      for m, (s2, f2) in points.items() if m != n)]
  return sorted(names, key=lambda n: points[n][0])


def plot_quality_speed(points: dict, path, title: str = "", floor: Optional[float] = None
                       ) -> pathlib.Path:
  """Fréchet distance (y) vs realized wall-clock speed-up (x), one marker per variant.

  Args:
    points: name → (speed-up, Fréchet distance).
    path: PNG path.
    title: figure title.
    floor: the real-data Fréchet distance (drawn as a horizontal line) or None.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
  for name, (speedup, fd) in points.items():
    ax.scatter([speedup], [fd], s=36, color="black" if name == "full" else None)
    ax.annotate(name, (speedup, fd), textcoords="offset points", xytext=(4, 4), fontsize=8)
  front = pareto_front(points)
  if len(front) > 1:
    xs, ys = zip(*(points[n] for n in front))
    ax.step(xs, ys, where="post", color="tab:red", linewidth=1, alpha=0.7,
            label="Pareto front (faster and better)")
  if floor is not None:
    ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="real held-out digits")
  if floor is not None or len(front) > 1:
    ax.legend(fontsize=8)
  ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.5)
  ax.set_xlabel("realized speed-up (wall clock, median, ×)")
  ax.set_ylabel("Fréchet distance (classifier features, lower is better)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def plot_mask(mask, path, title: str = "", tau: Optional[Sequence[float]] = None
              ) -> pathlib.Path:
  """A (steps × blocks) compute mask as an image: dark = computed, light = cached."""
  plt = _pyplot()
  m = np.asarray(mask, np.float64)
  fig, ax = plt.subplots(figsize=(6, 4.0), dpi=110)
  ax.imshow(m.T, aspect="auto", cmap="Greys", vmin=0, vmax=1, origin="lower",
            interpolation="nearest")
  ax.set_xlabel("network evaluation (noise → data)")
  ax.set_ylabel("block")
  if tau is not None:
    ticks = np.linspace(0, m.shape[0] - 1, min(6, m.shape[0])).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{tau[i]:.2f}" for i in ticks])
    ax.set_xlabel("τ of the network evaluation (noise → data); dark = computed")
  ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)


def fmt(value, digits: int = 3, signed: bool = False) -> str:
  """A table cell: '–' for None/NaN, else the rounded number."""
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "–"
  return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
