"""Wall-clock saving of exit plans against the full model, timed alternately in one process.

    python tools/bench_exits.py --arch dit_s_2 --plan ase:D3-DiT --sampler ddim --steps 50 \
        --batch 8 --json
    python tools/bench_exits.py --arch dit_s_2 \
        --plan 'ase:D3-DiT; ase:D7-DiT; duodiff:300:random=3; mask:skip=0.5; ase:D3-DiT+mask:skip=0.3'

Plan specs are the library's one spec language (`jaxee.exits.spec`; paper ASE tables rescaled to
the model): `full`, `ase:D3-DiT[:switch]`, `duodiff:<t_s>:random=<shallow depth>`,
`mask:skip=<fraction>[:branch]`, `deediff:scripted=<exit layer at noise>[,<at clean>]`, `file:PATH`,
and compositions joined with '+'. Several plans are separated by ';' (or repeat --plan). Params
are random (timing does not depend on their values; DiT's zero-initialised adaLN is perturbed so
no block is an identity).

Protocol (paired, adaptive): every variant (the full model, then each plan) is called once
(trace + compile + run) and `--warmup` more times untimed. Then rounds: in each round, for every
plan, the full model and the plan are called back to back (order alternating between rounds), each
call ended by `jax.block_until_ready`; the round's ratio plan_s / full_s compares two calls a few
hundred milliseconds apart, so slow drifts of the machine's load cancel. The estimate is the
median of the per-round ratios, with a bootstrap 95 % interval of that median (`--bootstrap`
resamples of the rounds). Rounds continue from `--repeats` up to `--max-repeats` until every
plan's interval of the *efficiency* is narrower than ±`--target-halfwidth` (default 0.025, so two
runs agree within ±0.05) or `--budget-s` seconds of timing have passed. Prints one JSON object per
plan:

    {"plan", "ideal_saving", "realized_saving", "efficiency", "efficiency_ci95", "rounds", ...}

* ideal_saving = 1 − mean FLOPs per NFE of the plan / full-model FLOPs (`jaxee.eval.flops`; the
  plan's own per-NFE `flops` stats of a real run, so dynamic plans are measured, not predicted);
* realized_saving = 1 − median per-round ratio; efficiency = realized_saving / ideal_saving;
* the same from the process CPU time of each call (`*_cpu`, all threads), and the older
  estimators for comparison: ratio of the medians (`realized_saving_medians`) and of the fastest
  calls (`*_min`);
* compile_s = first call − median call of the plan (`full_compile_s` the same for the full model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="dit_s_2", help="registry arch (jaxee.models.create)")
  p.add_argument("--plan", action="append",
                 help="plan spec (default ase:D3-DiT); several plans separated by ';' or "
                      "repeated (timed in one process)")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--guidance", type=float, default=None, help="CFG scale (doubles the batch)")
  p.add_argument("--input-size", type=int, default=None, help="override latent side")
  p.add_argument("--depth", type=int, default=None, help="override the block count (tiny runs)")
  p.add_argument("--dtype", default=None, help="model dtype override, e.g. bfloat16")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=7, help="minimum paired rounds")
  p.add_argument("--max-repeats", type=int, default=61, help="maximum paired rounds")
  p.add_argument("--target-halfwidth", type=float, default=0.025,
                 help="stop once every plan's efficiency 95%% interval is ± this")
  p.add_argument("--budget-s", type=float, default=600.0, help="timing budget in seconds")
  p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS value ('' = JAX's default)")
  p.add_argument("--json", action="store_true", help="print only the JSON lines")
  return p.parse_args(argv)


def split_plans(text) -> list[str]:
  """'ase:D3-DiT; mask:skip=0.5' (or a list of such strings) → specs; '+' composes within one."""
  texts = [text] if isinstance(text, str) else list(text)
  return [s.strip() for t in texts for s in t.split(";") if s.strip()]


def bootstrap_median_ci(values, draws: int, seed: int = 0) -> tuple[float, float]:
  """95 % bootstrap interval of the median of `values` (deterministic for `seed`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  idx = np.random.default_rng(seed).integers(0, len(v), size=(draws, len(v)))
  meds = np.median(v[idx], axis=1)
  return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def ci_halfwidth(rec: dict, ideal: float, draws: int) -> float:
  """Half-width of the efficiency's 95 % interval from one plan's paired round times."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if ideal <= 0:
    return 0.0
  lo, hi = bootstrap_median_ci(np.asarray(rec["plan"]) / np.asarray(rec["full"]), draws)
  return (hi - lo) / 2 / ideal


def timed_call(call, variant, seed) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one `call(variant, seed)` (which must block)."""
  c0, t0 = time.process_time(), time.perf_counter()
  call(variant, seed)
  return time.perf_counter() - t0, time.process_time() - c0


def paired_rounds(call, base, others, *, ideal: dict, repeats: int, max_repeats: int,
                  budget_s: float, target_halfwidth: float, draws: int, seed0: int = 100):
  """The paired, adaptive timing protocol of the module docstring (shared with bench_gpu).

  Args:
    call: `call(variant, seed)` runs one variant to completion (`block_until_ready`).
    base: the reference variant (the full model).
    others: [(name, variant)] timed against `base`, each in its own pair per round.
    ideal: name → ideal saving (the efficiency interval's denominator; ≤ 0: no CI stop).
    repeats / max_repeats: minimum / maximum rounds; budget_s: stop after this much timing.
    target_halfwidth: stop once every efficiency 95 % interval is ± this.
    draws: bootstrap resamples.
    seed0: the first round's sampling seed (round r uses seed0 + r).

  Returns:
    (pairs, rounds, timing_s): pairs[name] = {'full', 'plan', 'full_cpu', 'plan_cpu'} lists of
    per-round seconds.
  """
  pairs = {name: {"full": [], "plan": [], "full_cpu": [], "plan_cpu": []} for name, _ in others}
  start = time.perf_counter()
  rounds = 0
  while True:
    for name, var in others:
      rec = pairs[name]
      order = [("full", base), ("plan", var)]
      if rounds % 2:
        order.reverse()
      for role, v in order:
        wall, cpu = timed_call(call, v, seed0 + rounds)
        rec[role].append(wall)
        rec[f"{role}_cpu"].append(cpu)
    rounds += 1
    if rounds < repeats:
      continue
    widths = [ci_halfwidth(pairs[n], ideal.get(n, 0.0), draws) for n in pairs]
    if (rounds >= max_repeats or time.perf_counter() - start > budget_s
        or all(w <= target_halfwidth for w in widths)):
      break
  return pairs, rounds, time.perf_counter() - start


def summarize_pair(rec_t: dict, idl: float, draws: int) -> dict:
  """Savings and efficiencies of one plan's paired rounds (the fields of the module docstring)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ratios = np.asarray(rec_t["plan"]) / np.asarray(rec_t["full"])
  cpu_ratios = np.asarray(rec_t["plan_cpu"]) / np.asarray(rec_t["full_cpu"])
  lo, hi = bootstrap_median_ci(ratios, draws)
  realized = 1.0 - float(np.median(ratios))
  eff = (lambda saving: round(saving / idl, 4) if idl > 0 else None)
  plan_s = statistics.median(rec_t["plan"])
  full_s = statistics.median(rec_t["full"])
  cpu_saving = 1.0 - float(np.median(cpu_ratios))
  med_saving = 1.0 - plan_s / full_s
  min_saving = 1.0 - min(rec_t["plan"]) / min(rec_t["full"])
  return {"ideal_saving": round(idl, 4), "realized_saving": round(realized, 4),
          "efficiency": eff(realized),
          "efficiency_ci95": [eff(1.0 - hi), eff(1.0 - lo)] if idl > 0 else None,
          "realized_saving_ci95": [round(1.0 - hi, 4), round(1.0 - lo, 4)],
          "full_s": round(full_s, 4), "plan_s": round(plan_s, 4),
          "round_ratios": [round(float(r), 4) for r in ratios],
          "realized_saving_cpu": round(cpu_saving, 4), "efficiency_cpu": eff(cpu_saving),
          "realized_saving_medians": round(med_saving, 4), "efficiency_medians": eff(med_saving),
          "realized_saving_min": round(min_saving, 4), "efficiency_min": eff(min_saving)}


def build(args, abstract: bool = False):
  """Model, random params (shapes only when `abstract`), labels, NFE times."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxee import models, sampling  # pylint: disable=g-import-not-at-top
  from jaxee import testing  # pylint: disable=g-import-not-at-top
  overrides = {}
  if args.input_size:
    side = {"dit": "input_size", "uvit": "img_size", "unet": "sample_size"}
    family = next((f for f in side if args.arch.startswith(f)), "uvit")
    overrides[side[family]] = args.input_size
  if getattr(args, "depth", None):
    overrides["depth"] = args.depth
  if getattr(args, "dtype", None):
    overrides["dtype"] = getattr(jnp, args.dtype)
  model = models.create(args.arch, **overrides)
  if abstract:
    params = jax.eval_shape(lambda k: testing.random_params(model, k), jax.random.PRNGKey(0))
  else:
    params = testing.random_params(model, jax.random.PRNGKey(0))
  ncls = model.num_classes if model.num_classes > 0 else 0
  labels = (jnp.arange(args.batch, dtype=jnp.int32) % min(ncls, 1000)) if ncls else None
  times = sampling.nfe_times(model, args.sampler, args.steps)
  return model, params, labels, times


def run(args) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jaxee import testing  # pylint: disable=g-import-not-at-top

  model, params, labels, times = build(args)
  specs = split_plans(args.plan or ["ase:D3-DiT"])
  variants = [("full", None, params)]
  for spec in specs:
    plan, plan_params = testing.plan_from_spec(spec, model, params, times)
    variants.append((spec, plan, plan_params))

  def call(variant, seed):
    _, plan, p = variant
    out = jaxee.sample(model, p, jax.random.PRNGKey(seed), num=args.batch,
                       sampler=args.sampler, steps=args.steps, labels=labels,
                       guidance=args.guidance, plan=plan, return_stats=True,
                       compute_dtype=getattr(args, "compute_dtype", None))
    return jax.block_until_ready(out)

  first, stats = {}, {}
  for v in variants:
    t0 = time.perf_counter()
    _, stats[v[0]] = call(v, 0)
    first[v[0]] = time.perf_counter() - t0
    for w in range(args.warmup):
      call(v, 1 + w)
  full_flops = flops_lib.backbone_flops(model)
  ideal = {v[0]: float(1.0 - np.mean(np.asarray(stats[v[0]]["flops"], np.float64)) / full_flops)
           for v in variants[1:]}
  others = [(v[0], v) for v in variants[1:]]
  pairs, rounds, timing_s = paired_rounds(
      call, variants[0], others, ideal=ideal, repeats=args.repeats,
      max_repeats=args.max_repeats, budget_s=args.budget_s,
      target_halfwidth=args.target_halfwidth, draws=args.bootstrap)

  all_full = [t for rec in pairs.values() for t in rec["full"]]
  full_s = statistics.median(all_full)
  device = jax.devices()[0]
  common = {
      "arch": args.arch, "sampler": args.sampler, "steps": args.steps, "batch": args.batch,
      "guidance": args.guidance, "compute_dtype": getattr(args, "compute_dtype", None),
      "rounds": rounds, "warmup": args.warmup,
      "timing_s": round(timing_s, 1),
      "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
      "host": platform.node(), "cpus": os.cpu_count(),
      "loadavg": [round(v, 2) for v in os.getloadavg()],
      "gflops_per_sample_nfe": round(full_flops / 1e9, 4),
      "full_compile_s": round(first["full"] - full_s, 3),
  }
  results = []
  for spec, _, _ in variants[1:]:
    rec = {"plan": spec}
    rec.update(summarize_pair(pairs[spec], ideal[spec], args.bootstrap))
    rec["compile_s"] = round(first[spec] - rec["plan_s"], 3)
    rec["mean_blocks"] = round(float(np.mean(np.asarray(stats[spec]["blocks"]))), 3)
    rec.update(common)
    results.append(rec)
  return results


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  for rec in run(args):
    if not args.json:
      print(f"# {rec['plan']}: ideal {rec['ideal_saving']:.3f}, realized "
            f"{rec['realized_saving']:.3f}, efficiency {rec['efficiency']}", file=sys.stderr)
    print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
