"""The demo's report: `report.json`, `report.md`, image grids and exit plots under `OUT/`.

Every number in the report is computed by the run that writes it (`jaxee.demo`): quality from
`jaxee.eval.classifier_metric`, exit statistics from the samplers' own per-NFE stats
(`jaxee.eval.report.exit_summary`), speed from the alternating wall-clock timing of
`jaxee.demo.evaluate`. `effects(report)` reduces a report to the directions of its claims (is each
method faster than the full model by a sign test over paired timing rounds, is its Fréchet
distance higher or lower than the full model's beyond the paired-bootstrap noise, does ASE's
fine-tuning beat the same schedule without it, ...), which is what is compared between seeds:

    python -m jaxee.demo.report runs/demo/report.json runs/demo_s1/report.json
"""
from __future__ import annotations

import math
import pathlib
import sys
from typing import Any, Optional

import numpy as np

from jaxee.eval import images as images_lib
from jaxee.eval import report as report_lib

ORDER = ("full", "ase", "ase_no_finetune", "ase_searched", "ase_searched_ft", "deediff",
         "deediff_exact", "deediff_backbone", "duodiff", "masks", "masks_block", "masks_searched",
         "fora",
         "teacache", "deepcache")
DESCRIPTIONS = {
    "full": "full backbone, every block at every step",
    "ase": "ASE: fine-tuned backbone + the paper's dropping schedule",
    "ase_no_finetune": "ablation: the ASE schedule on the un-tuned backbone",
    "ase_searched": "searched ASE schedule at the paper schedule's FLOPs, no fine-tuning",
    "ase_searched_ft": "ASE fine-tuning with the searched schedule",
    "deediff": "DeeDiff (paper recipe): joint training, per-element UEMs, batched early exit",
    "deediff_exact": "reference: DeeDiff per-sample exits simulated (every block runs)",
    "deediff_backbone": "the DeeDiff jointly trained backbone without exits",
    "duodiff": "DuoDiff: shallow backbone for the noisiest steps",
    "masks": "TABM: learned mask + output cache (DiT: MHA/MLP units; U-ViT/U-Net: blocks)",
    "masks_block": "TABM with one score per whole block (block-output cache), for comparison",
    "masks_searched": "searched mask at the TABM mask's FLOPs (training-free)",
    "fora": "FORA baseline: full network every k-th step, cached branch outputs between",
    "teacache": "TeaCache baseline: whole-step reuse when the accumulated input change is small",
    "deepcache": "DeepCache baseline: deep U-Net features reused, shallow branch recomputed",
}


NOISE_SIGMAS = 2.0       # an FD difference is a claim only beyond 2 bootstrap stds
SIGN_TEST_FRACTION = 0.85  # "faster"/"slower": at least this fraction of paired rounds agree


def fd_direction(delta: float, std: Optional[float]) -> str:
  """'higher' / 'lower' / 'within noise' for an FD difference and its bootstrap std."""
  if std is None:
    return "higher" if delta > 0 else "lower"
  if delta > NOISE_SIGMAS * std:
    return "higher"
  if delta < -NOISE_SIGMAS * std:
    return "lower"
  return "within noise"


def speed_direction(timing: dict) -> str:
  """'faster' / 'slower' / 'no clear difference' than the full model, by a sign test over the
  paired alternating rounds (falls back to the median speed-up when rounds are not recorded)."""
  rounds = timing.get("rounds")
  if not rounds:
    return "faster" if timing["speedup"] > 1.0 else "slower"
  need = math.ceil(SIGN_TEST_FRACTION * rounds)
  if timing["rounds_faster"] >= need and timing["speedup"] > 1.0:
    return "faster"
  if timing["rounds_slower"] >= need and timing["speedup"] < 1.0:
    return "slower"
  return "no clear difference"


def effects(report: dict) -> dict:
  """The direction of each claim of a report: {arch: {claim: direction}}.

  Speed: 'faster' / 'slower' / 'no clear difference' (`speed_direction`); FLOPs: 'yes'/'no';
  quality: the FD versus the full model's (and ASE's versus the un-tuned ablation's) as
  'higher' / 'lower' / 'within noise' (`fd_direction`, paired bootstrap std of the difference).
  """
  out = {}
  for arch, a in report["archs"].items():
    v = a["variants"]
    full_fd = v["full"]["quality"]["frechet"]
    claims = {}
    for name, rec in v.items():
      if name == "full":
        continue
      if not rec.get("info", {}).get("reference"):  # a reference mode is not meant to be fast
        claims[f"{name}: speed vs full"] = speed_direction(rec["timing"])
        claims[f"{name}: saves FLOPs"] = "yes" if rec["exits"]["ideal_saving"] > 0.0 else "no"
      claims[f"{name}: FD vs full"] = fd_direction(
          rec["quality"]["frechet"] - full_fd, rec["quality"].get("frechet_diff_std_vs_full"))
    if "ase" in v and "ase_no_finetune" in v:
      claims["ase: FD vs the un-tuned schedule"] = fd_direction(
          v["ase"]["quality"]["frechet"] - v["ase_no_finetune"]["quality"]["frechet"],
          v["ase"]["quality"].get("frechet_diff_std_vs_ase_no_finetune"))
    out[arch] = claims
  return out


UNDECIDED = ("within noise", "no clear difference")


def compare_effects(first: dict, second: dict) -> dict:
  """Claim by claim, do two reports (e.g. two seeds) point the same way?

  Returns:
    {'rows': [(arch, claim, first, second, status)], 'counts': {status: n}} where status is
    'same', 'compatible' (one side is undecided: within noise / no clear difference),
    'contradicts' (opposite decided directions) or 'missing' (only in one report).
  """
  a, b = effects(first), effects(second)
  rows = []
  for arch in sorted(set(a) | set(b)):
    ca, cb = a.get(arch, {}), b.get(arch, {})
    for claim in sorted(set(ca) | set(cb)):
      x, y = ca.get(claim), cb.get(claim)
      if x is None or y is None:
        status = "missing"
      elif x == y:
        status = "same"
      elif x in UNDECIDED or y in UNDECIDED:
        status = "compatible"
      else:
        status = "contradicts"
      rows.append((arch, claim, x, y, status))
  counts = {}
  for row in rows:
    counts[row[-1]] = counts.get(row[-1], 0) + 1
  return {"rows": rows, "counts": counts}


def compare_markdown(first: dict, second: dict) -> str:
  """A markdown table of `compare_effects` for two reports."""
  cmp = compare_effects(first, second)
  head = [f"seed {first.get('seed')}", f"seed {second.get('seed')}"]
  table = report_lib.markdown_table(
      ["arch", "claim", *head, "agreement"], [list(r) for r in cmp["rows"]])
  counts = ", ".join(f"{k}: {n}" for k, n in sorted(cmp["counts"].items()))
  return f"{table}\n\n{counts}\n"


def save_grids(out: pathlib.Path, arch: str, samples: dict) -> dict:
  """Per-variant grids (4 rows × 10 samples) and one overview (one labelled row per variant)."""
  files = {}
  names = [n for n in ORDER if n in samples] + [n for n in samples if n not in ORDER]
  for name in names:
    x = samples[name][:40]
    files[name] = str(images_lib.save_grid(out / f"samples_{arch}_{name}.png", x, nrow=10,
                                           scale=6).name)
  overview = np.concatenate([samples[n][:10] for n in names])
  files["overview"] = str(images_lib.save_grid(out / f"samples_{arch}.png", overview, nrow=10,
                                               scale=6, row_labels=names).name)
  return files


def save_plots(out: pathlib.Path, arch: str, record: dict, real_fd: float) -> dict:
  """Exit-depth, FLOPs, quality-vs-speed and (if any) mask plots of one arch."""
  variants = record["variants"]
  names = [n for n in ORDER if n in variants] + [n for n in variants if n not in ORDER]
  summaries = {n: variants[n]["exits"] for n in names}
  title = f"{arch.upper()} ({record['num_blocks']} blocks), DDIM-{record['sample_steps']}"
  files = {
      "exit_depth": report_lib.plot_exit_depth(summaries, out / f"exit_depth_{arch}.png",
                                               title).name,
      "flops": report_lib.plot_flops(summaries, out / f"flops_{arch}.png", title).name,
      "quality_speed": report_lib.plot_quality_speed(
          {n: (variants[n]["timing"]["speedup"], variants[n]["quality"]["frechet"])
           for n in names}, out / f"quality_speed_{arch}.png", title, floor=real_fd).name,
  }
  if "masks" in variants and "mask" in variants["masks"]["info"]:
    files["mask"] = report_lib.plot_mask(
        variants["masks"]["info"]["mask"], out / f"mask_{arch}.png",
        f"TABM mask ({variants['masks']['info'].get('unit', 'block')} units), {arch.upper()}",
        tau=variants["masks"]["exits"]["tau"]).name
  return {k: str(v) for k, v in files.items()}


def _arch_table(record: dict) -> str:
  variants = record["variants"]
  names = [n for n in ORDER if n in variants] + [n for n in variants if n not in ORDER]
  header = ["variant", "FD ↓", f"ΔFD vs full (±{NOISE_SIGMAS:g}σ)", "confidence", "class acc.",
            "layer ratio", "MFLOPs / image",
            "ideal saving", "median s", "speed-up", "realized saving", "efficiency"]
  rows = []
  for n in names:
    r = variants[n]
    q, e, t = r["quality"], r["exits"], r["timing"]
    std = q.get("frechet_diff_std_vs_full")
    delta = q["frechet"] - variants["full"]["quality"]["frechet"]
    dfd = "–" if n == "full" else (f"{delta:+.2f}" if std is None
                                   else f"{delta:+.2f} ± {NOISE_SIGMAS * std:.2f}")
    rows.append([f"`{n}`", report_lib.fmt(q["frechet"], 2), dfd, report_lib.fmt(q["confidence"]),
                 report_lib.fmt(q.get("class_accuracy")), report_lib.fmt(e["layer_ratio"]),
                 report_lib.fmt(e["flops_per_image"] / 1e6, 1),
                 report_lib.fmt(e["ideal_saving"], signed=True),
                 report_lib.fmt(t["median_s"]), f"×{t['speedup']:.2f}",
                 report_lib.fmt(t["realized_saving"], signed=True),
                 report_lib.fmt(t["efficiency"], 2)])
  return report_lib.markdown_table(header, rows)


# One report line per variant whose facts are all in its `info` (name, formatter).
_INFO_FACTS = (
    ("masks", lambda i: f"- TABM ({i.get('unit', 'block')} units, "
                        f"{i.get('cache_mode', 'block_output')} cache): {i['kept_fraction']:.3f} "
                        f"of unit evaluations kept after rectification "
                        f"({i['kept_fraction_raw']:.3f} before)"),
    ("masks_block", lambda i: f"- TABM per block (block-output cache): {i['kept_fraction']:.3f}"
                              f" of block evaluations kept after rectification "
                              f"({i['kept_fraction_raw']:.3f} before)"),
    ("ase_searched", lambda i: f"- searched ASE schedule (`jaxee.exits.search`, calibration "
                               f"set ≠ evaluation noise): {i['schedule']} at "
                               f"{i['flops_fraction']:.3f} of the full FLOPs, for the paper "
                               f"table's {i['budget']:.3f} ({i['paper_schedule']})"),
    ("masks_searched", lambda i: f"- searched mask: {i['flops_fraction']:.3f} of the full FLOPs"
                                 f" (TABM mask {i['budget']:.3f}), {i['unit']} units, "
                                 f"{i['cache_mode']} cache"),
    ("fora", lambda i: f"- FORA: full network every {i['interval']} NFEs, {i['unit']} cache, "
                       f"{i['flops_fraction']:.3f} of the FLOPs (the closest FORA gets to the "
                       f"TABM mask's {i['target']:.3f})"),
    ("teacache", lambda i: f"- TeaCache: threshold {i['threshold']:.4g} (rule '{i['rule']}': "
                           f"the batch's largest relative change decides, both CFG halves "
                           f"included), calibrated to {i['calibration_flops_fraction']:.3f} of "
                           f"the FLOPs (target {i['target']:.3f})"),
    ("deepcache", lambda i: f"- DeepCache: full U-Net every {i['interval']} NFEs, branch "
                            f"{i['branch']}, {i['flops_fraction']:.3f} of the FLOPs (matched "
                            f"to the TABM mask's {i['target']:.3f})"),
)


def _method_facts(record: dict) -> list:
  lines = []
  v = record["variants"]
  if "ase" in v:
    lines.append(f"- ASE schedule ({v['ase']['info']['table']} rescaled to this depth), blocks "
                 f"per τ-interval [0, 0.1) → [0.9, 1]: {v['ase']['info']['schedule']}")
  if "deediff" in v:
    i = v["deediff"]["info"]
    lines.append(f"- DeeDiff: θ = {i['threshold']:.4f} calibrated for an executed-block "
                 f"fraction of {i['target_ratio']} (open-loop prediction on the full model's "
                 f"trajectory {i['predicted_ratio']:.3f}"
                 + (f", closed-loop calibration run {i['calibration_measured_ratio']:.3f}"
                    if "calibration_measured_ratio" in i else "")
                 + f", this evaluation {v['deediff']['exits']['layer_ratio']:.3f}), batch stop "
                 f"fraction {i['min_fraction']}, UEM '{i['uem']}'")
  if "deediff_exact" in v and "exit_per_nfe" in v["deediff_exact"]["exits"]:
    e = v["deediff_exact"]["exits"]
    ratio = float(np.mean(e["exit_per_nfe"])) / e["num_blocks"]
    lines.append(f"- DeeDiff per-sample (simulated) exits: mean exit layer / blocks = "
                 f"{ratio:.3f} (the papers' layer ratio; this mode runs every block)")
  if "duodiff" in v:
    i = v["duodiff"]["info"]
    lines.append(f"- DuoDiff: {i['shallow_blocks']}-block shallow backbone for t ≥ 1000 − "
                 f"{i['t_switch']:g} ({i['shallow_nfes']} of {record['sample_steps']} NFEs), "
                 f"rule '{i['rule']}'")
  lines += [fmt(v[name]["info"]) for name, fmt in _INFO_FACTS if name in v]
  from jaxee.demo import beyond  # pylint: disable=g-import-not-at-top
  lines += beyond.searched_vs_paper(record)
  return lines


def markdown(report: dict) -> str:
  """`report.md`: settings, the tables, the claims and links to the figures."""
  m, tm, clf = report["machine"], report["timing"], report["classifier"]
  lines = [
      "# jaxee demo report", "",
      f"Seed {report['seed']}, scale `{report['scale']['name']}`; {m['platform']} "
      f"({m['cpu_count']} CPUs visible), jax {m['jax']}. Total wall time "
      f"{tm['total_wall_s']:.0f} s, CPU time {tm['total_cpu_s']:.0f} s.", "",
      "Every number below was computed by this run. Quality: Fréchet distance (FD) between "
      "the features of the samples and of held-out real digits under a small digits classifier "
      "trained here, that classifier's mean confidence, and the fraction of samples it assigns "
      "to the class they were conditioned on. Speed: all variants of a backbone timed in "
      f"{report['scale']['timing_rounds']} alternating rounds in this process, medians; "
      "ideal saving = 1 − executed FLOPs / full FLOPs from the samplers' own per-step stats; "
      "efficiency = realized saving / ideal saving.", "",
      f"Real test digits ({clf['real_test']['num_samples']}, unseen by generators and "
      f"classifier): FD {clf['real_test']['frechet']:.2f}, confidence "
      f"{clf['real_test']['confidence']:.3f}, accuracy {clf['real_test']['class_accuracy']:.3f}"
      f" — the scores of a perfect generator. Classifier held-out accuracy "
      f"{clf['heldout_accuracy']:.3f}.", ""]
  for arch, rec in report["archs"].items():
    cfg = rec["model"]
    width = cfg.get("hidden_size", cfg.get("embed_dim", cfg.get("block_out_channels")))
    lines += [f"## {arch.upper()}: {rec['num_blocks']} units, width {width}, "
              f"DDIM-{rec['sample_steps']}, CFG {rec['guidance']}, {rec['num_eval']} samples "
              "per variant", "", _arch_table(rec), ""]
    lines += [f"- `{n}`: {DESCRIPTIONS.get(n, n)}" for n in rec["variants"]]
    lines += _method_facts(rec) + [""]
    files = rec["files"]
    order = [n for n in ORDER if n in rec["variants"]]
    lines += [f"Samples (one labelled row per variant, top to bottom: {', '.join(order)}; "
              "columns: the conditioning class 0–9 (U-Net: unconditional); all rows from the "
              "same noise):", "",
              f"![samples]({files['grids']['overview']}) "
              f"![exit depth]({files['plots']['exit_depth']})",
              f"![flops]({files['plots']['flops']}) "
              f"![quality vs speed]({files['plots']['quality_speed']})"]
    if "mask" in files["plots"]:
      lines.append(f"![mask]({files['plots']['mask']})")
    lines += ["", "Stage times (s): " + ", ".join(
        f"{k} {v['wall_s']:.0f} wall / {v['cpu_s']:.0f} CPU" for k, v in rec["stages"].items()),
        ""]
  lines += ["## Claims of this run", "",
            f"Speed: a sign test over the paired alternating rounds (faster/slower in at least "
            f"{SIGN_TEST_FRACTION:.0%} of them, else no clear difference). FD: the difference "
            f"to the full model beyond ±{NOISE_SIGMAS:g} paired-bootstrap standard deviations, "
            f"else within noise. Compare two runs with `python -m jaxee.demo.report "
            f"A/report.json B/report.json`.", ""]
  for arch, claims in report["effects"].items():
    for claim, direction in claims.items():
      lines.append(f"- {arch}: {claim}: {direction}")
  return "\n".join(lines) + "\n"


def write(out: pathlib.Path, report: dict) -> dict:
  """Writes `report.json` and `report.md`; returns their paths."""
  report["effects"] = effects(report)
  return {"json": str(report_lib.write_json(out / "report.json", report)),
          "markdown": str(report_lib.write_text(out / "report.md", markdown(report)))}


def arch_record(arch: str, result: Any, evaluated: dict, scale: Any) -> dict:
  """The report entry of one arch (without files)."""
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee.models import registry  # pylint: disable=g-import-not-at-top
  return {"model": registry.model_config(result.model),
          "num_blocks": flops_lib.num_blocks(result.model),
          "sample_steps": scale.sample_steps, "guidance": scale.arch_value("guidance", arch),
          "num_eval": scale.num_eval, "stages": result.stages,
          "variants": evaluated["variants"], "timing_raw_s": evaluated["timing_raw"]}


def main(argv=None) -> int:
  """`python -m jaxee.demo.report A/report.json B/report.json`: claim agreement of two runs.

  Exit status 1 when a decided claim of one run is contradicted by the other.
  """
  import json  # pylint: disable=g-import-not-at-top
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 2:
    print("usage: python -m jaxee.demo.report FIRST/report.json SECOND/report.json",
          file=sys.stderr)
    return 2
  reports = [json.loads(pathlib.Path(p).read_text()) for p in args]
  print(compare_markdown(*reports))
  return 1 if compare_effects(*reports)["counts"].get("contradicts") else 0


if __name__ == "__main__":
  sys.exit(main())
