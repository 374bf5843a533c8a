"""One plan-spec language for the command line, the tools and the demo.

    parse_plan('ase:D3-DiT', model)                     # a paper table (depth=... rescales)
    parse_plan('ase:12,12,10,10,9,9,7,7,5,5:switch', model)
    parse_plan('mask:plan.npz', model)                   # a saved mask (or any plan file)
    parse_plan('mask:skip=0.3:branch', model, nfe_times=times)   # a rotating benchmark mask
    parse_plan('mask:skip=0.3:branch:unit_output', model, nfe_times=times)  # TABM per unit
    parse_plan('duodiff:300', model, load_shallow=fn)    # shallow model from the caller
    parse_plan('duodiff:300:random=3', model, rng=key)   # a random 3-block shallow copy
    parse_plan('deediff:WORKDIR', model)                 # trained heads/UEMs and θ
    parse_plan('deediff:scripted=4,12', model, params=p, rng=key)  # timing: exits at 4..12
    parse_plan('deepcache:3', model)                     # DeepCache, N = 3, shallowest branch
    parse_plan('deepcache:5:branch=2', model)            # a deeper branch (U-Net only)
    parse_plan('file:PLAN', model)                       # any saved plan file (`exits.io`)
    parse_plan('fora:3', model, nfe_times=times)         # FORA: full network every 3rd NFE
    parse_plan('fora:3:block', model, nfe_times=times)   #   ... caching block outputs
    parse_plan('teacache:0.1', model)                    # TeaCache, threshold 0.1 (rule max)
    parse_plan('teacache:0.1:mean:poly=4.9,-2.8,0.3', model)  # rule and rescale polynomial
    parse_plan('search:PLAN', model)                     # the same: a `jaxee-search` output
    parse_plan('ase:D3-DiT+mask:skip=0.3', model, nfe_times=times) # composition (`compose`)

Grammar: `SPEC := PART ('+' PART)*`; `PART := KIND[:ARG[:ARG...]]`; `none`/`full` is the full
network (None). Keyword options that the spec cannot carry (`depth`, `runner`, `rectify`,
`threshold`, `mode`, `min_fraction`, `rule`) come in `options`.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Optional

import jax

KINDS = ("full", "ase", "mask", "file", "search", "duodiff", "deediff", "fora", "teacache",
         "deepcache")


def _kv(arg: str) -> tuple[Optional[str], str]:
  key, eq, value = arg.partition("=")
  return (key, value) if eq else (None, arg)


def _float(text: str, spec: str, what: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"plan {spec!r}: {what} must be a number, got {text!r}") from None


def _ase(args, spec, model, options):
  from jaxee.exits import ase  # pylint: disable=g-import-not-at-top
  if not args:
    raise ValueError(f"plan {spec!r}: give a table name or ten block counts (ase:D3-DiT)")
  runner = options.get("runner") or "loop"
  if len(args) > 1:
    runner = args[1]
  depth = options.get("depth")
  if "," in args[0]:
    try:
      table = tuple(int(v) for v in args[0].split(","))
    except ValueError:
      raise ValueError(f"plan {spec!r}: block counts must be integers") from None
    plan = ase.ASEPlan(table, runner=runner)
    return plan.scaled(int(depth)) if depth not in (None, "auto") else plan
  name = args[0]
  if depth == "auto":
    depth = ase.capacity(model)
  plan = ase.ase_plan(name, depth=None if depth is None else int(depth), runner=runner)
  plan.validate(model)
  return plan


def _mask(args, spec, model, nfe_times, options):
  from jaxee.exits import io as io_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import masks  # pylint: disable=g-import-not-at-top
  if not args:
    raise ValueError(f"plan {spec!r}: give a file (mask:PATH) or a fraction (mask:skip=0.3)")
  key, value = _kv(args[0])
  if key in ("skip", "keep"):
    if nfe_times is None:
      raise ValueError(f"plan {spec!r}: a generated mask needs the sampler's NFE grid")
    frac = _float(value, spec, key)
    if not 0.0 <= frac <= 1.0:
      raise ValueError(f"plan {spec!r}: {key} must be in [0, 1]")
    unit, cache_mode = _mask_layout(args[1:], spec, masks)
    keep = frac if key == "keep" else 1.0 - frac
    mask = masks.keep_fraction_mask(len(nfe_times), masks.num_units(model, unit), keep)
    return masks.MaskPlan(mask, unit, cache_mode, {"spec": spec})
  if key is not None:
    raise ValueError(f"plan {spec!r}: unknown mask option {key!r} (skip=, keep= or a file)")
  plan = io_lib.load_plan(_existing(":".join(args), spec))
  if not isinstance(plan, masks.MaskPlan):
    raise ValueError(f"plan {spec!r}: {args[0]} is a {type(plan).__name__} file, not a mask")
  return plan.rectified(model) if options.get("rectify") else plan


def _fora(args, spec, model, nfe_times):
  from jaxee.exits import baselines  # pylint: disable=g-import-not-at-top
  if not args or len(args) > 2:
    raise ValueError(f"plan {spec!r}: use fora:INTERVAL[:block|branch]")
  if nfe_times is None:
    raise ValueError(f"plan {spec!r}: FORA needs the sampler's NFE grid")
  try:
    interval = int(args[0])
  except ValueError:
    raise ValueError(f"plan {spec!r}: INTERVAL must be an integer ≥ 1") from None
  if len(args) > 1 and args[1] not in baselines.UNITS:
    raise ValueError(f"plan {spec!r}: unit must be one of {baselines.UNITS}, got {args[1]!r}")
  unit = args[1] if len(args) > 1 else "branch"
  plan = baselines.fora_plan(model, len(nfe_times), interval, unit)
  plan.metadata["spec"] = spec
  return plan


def _teacache(args, spec):
  from jaxee.exits import teacache  # pylint: disable=g-import-not-at-top
  if not args or not args[0]:
    raise ValueError(f"plan {spec!r}: use teacache:THRESHOLD[:max|mean|pooled][:poly=C,...]")
  threshold = _float(args[0], spec, "THRESHOLD")
  rule, coefficients = "max", teacache.IDENTITY
  for arg in args[1:]:
    key, value = _kv(arg)
    if key == "poly":
      coefficients = tuple(_float(v, spec, "a polynomial coefficient") for v in value.split(","))
    elif key is None and value in teacache.RULES:
      rule = value
    else:
      raise ValueError(f"plan {spec!r}: unknown TeaCache option {arg!r} "
                       f"(a rule {teacache.RULES} or poly=C,...)")
  return teacache.TeaCachePlan(threshold, coefficients, rule, {"spec": spec})


def _mask_layout(words, spec, masks):
  """(unit, cache_mode) from the words after `skip=F`: a unit and/or a cache mode, any order.

  Defaults: unit 'block'; cache mode 'block_output' for block units, L2C's 'branch' for branch
  units (`mask:skip=0.3:branch`); `mask:skip=0.3:branch:unit_output` is TABM's per-unit output
  replacement.
  """
  unit = cache_mode = None
  for w in words:
    if w in masks.UNITS and unit is None:
      unit = w
    elif w in masks.CACHE_MODES and cache_mode is None:
      cache_mode = w
    else:
      raise ValueError(f"plan {spec!r}: unknown mask option {w!r} (a unit {masks.UNITS} and/or "
                       f"a cache mode {masks.CACHE_MODES})")
  unit = unit or "block"
  return unit, cache_mode or masks.cache_mode_for(unit)


def _existing(path: str, spec: str) -> pathlib.Path:
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"plan {spec!r}: {p} does not exist")
  return p


def _duodiff(args, spec, model, options, rng, load_shallow):
  from jaxee.exits import duodiff  # pylint: disable=g-import-not-at-top
  t_switch = _float(args[0], spec, "T_SWITCH") if args and args[0] else float(
      options.get("t_switch") or 300.0)
  rule = options.get("rule") or "threshold"
  key, value = _kv(args[1]) if len(args) > 1 else (None, "")
  if key == "random":
    from jaxee import testing  # pylint: disable=g-import-not-at-top
    if not hasattr(model, "depth"):
      raise ValueError(f"plan {spec!r}: a random shallow copy takes the backbone's first blocks "
                       f"(`depth`), which a {type(model).__name__} does not have; pass a "
                       "shallow denoiser of your own (DuoDiffPlan(shallow_model, params))")
    shallow = model.clone(depth=int(value), parent=None)
    rng = jax.random.PRNGKey(11) if rng is None else rng
    shallow_params = testing.random_params(shallow, rng)
  elif load_shallow is not None:
    shallow, shallow_params = load_shallow(args[1] if len(args) > 1 else None)
  else:
    raise ValueError(f"plan {spec!r}: no shallow model: give one (the CLI's "
                     "plan_options.shallow_ckpt) or use duodiff:T_S:random=DEPTH for timing")
  return duodiff.DuoDiffPlan(shallow, shallow_params, t_switch=t_switch, rule=rule)


def _deediff(args, spec, model, params, options, rng):
  from jaxee.exits import deediff  # pylint: disable=g-import-not-at-top
  from jaxee.exits import io as io_lib  # pylint: disable=g-import-not-at-top
  key, value = _kv(args[0]) if args else (None, options.get("heads") or "")
  extra = {k: options[k] for k in ("mode", "min_fraction") if options.get(k) is not None}
  if key == "scripted":
    if params is None:
      raise ValueError(f"plan {spec!r}: scripted exits need the backbone params")
    layers = [_float(v, spec, "exit layer") for v in value.split(",") if v]
    kw = {"exit_layer_at_noise": layers[0]} if layers else {}
    if len(layers) > 1:
      kw["exit_layer_at_clean"] = layers[1]
    rng = jax.random.PRNGKey(11) if rng is None else rng
    return deediff.benchmark_plan(model, params, rng, **kw, **extra)[0]
  if key is not None or not value:
    raise ValueError(f"plan {spec!r}: give a DeeDiff workdir or heads file "
                     "(deediff:WORKDIR) or scripted exits (deediff:scripted=NOISE,CLEAN)")
  ee, meta = io_lib.load_deediff_heads(_existing(value, spec))
  threshold = options.get("threshold")
  return deediff.DeeDiffPlan(ee, threshold=float(meta["threshold"] if threshold is None
                                                 else threshold),
                             uem=meta.get("uem", "token_mean"), layout=meta["layout"],
                             **extra)


def _deepcache(args, spec, model):
  from jaxee.exits import deepcache  # pylint: disable=g-import-not-at-top
  if not args or not args[0]:
    raise ValueError(f"plan {spec!r}: give the interval N (deepcache:N[:branch=B])")
  interval, branch = _float(args[0], spec, "N"), 0.0
  for arg in args[1:]:
    key, value = _kv(arg)
    if key != "branch":
      raise ValueError(f"plan {spec!r}: unknown DeepCache option {arg!r} (branch=B)")
    branch = _float(value, spec, "branch")
  if not interval.is_integer() or not branch.is_integer():
    raise ValueError(f"plan {spec!r}: N and branch must be integers")
  plan = deepcache.DeepCachePlan(int(interval), int(branch), {"spec": spec})
  deepcache.branches(model)  # refuses backbones without skip branches here, with the reason
  return plan


def parse_plan(spec: Optional[str], model: Any, *, params: Any = None, nfe_times=None,
               options: Optional[dict] = None, rng=None,
               load_shallow: Optional[Callable[[Optional[str]], tuple]] = None):
  """The plan a spec names (see the module docstring); None for the full network.

  Args:
    spec: the spec string.
    model: the backbone the plan is for.
    params: backbone params (only scripted DeeDiff exits need them, for head copies).
    nfe_times: the sampler's NFE grid (`jaxee.sampling.nfe_times`; generated masks need it).
    options: keyword options (`depth`, `runner`, `rectify`, `threshold`, `mode`,
      `min_fraction`, `rule`, `t_switch`, `heads`).
    rng: key for random extras (benchmark shallow models and heads).
    load_shallow: `fn(arg) -> (shallow_model, shallow_params)` for `duodiff:T_S[:ARG]`.

  Returns:
    A plan (`jaxee.exits`), or None.
  """
  if spec is None or str(spec).strip().lower() in ("", "none", "full"):
    return None
  spec, options = str(spec).strip(), dict(options or {})
  parts = [p.strip() for p in spec.split("+")]
  if len(parts) > 1:
    from jaxee.exits import composition as compose  # pylint: disable=g-import-not-at-top
    plans = [parse_plan(p, model, params=params, nfe_times=nfe_times, options=options, rng=rng,
                        load_shallow=load_shallow) for p in parts]
    return compose.compose(*[p for p in plans if p is not None])
  kind, _, rest = spec.partition(":")
  args = rest.split(":") if rest else []
  from jaxee.exits import ase  # pylint: disable=g-import-not-at-top
  if kind == "ase" or spec in ase.ASE_TABLES:
    return _ase(args if kind == "ase" else [spec], spec, model, options)
  if kind == "mask":
    return _mask(args, spec, model, nfe_times, options)
  if kind in ("file", "search") or (kind not in KINDS and spec.endswith((".npz", ".json"))):
    from jaxee.exits import io as io_lib  # pylint: disable=g-import-not-at-top
    plan = io_lib.load_plan(_existing(rest if kind in ("file", "search") else spec, spec),
                            **{k: options[k] for k in ("threshold", "mode", "min_fraction")
                               if options.get(k) is not None})
    if options.get("rectify") and hasattr(plan, "rectified"):
      plan = plan.rectified(model)
    return plan
  if kind == "duodiff":
    return _duodiff(args, spec, model, options, rng, load_shallow)
  if kind == "deediff":
    return _deediff(args, spec, model, params, options, rng)
  if kind == "fora":
    return _fora(args, spec, model, nfe_times)
  if kind == "teacache":
    return _teacache(args, spec)
  if kind == "deepcache":
    return _deepcache(args, spec, model)
  raise ValueError(f"unknown plan spec {spec!r}: use none/full, ase:TABLE|COUNTS[:switch], "
                   "mask:FILE|skip=F[:branch][:CACHE_MODE], file:PATH, search:PATH, "
                   "duodiff:T_S[:random=DEPTH], deediff:WORKDIR|scripted=NOISE[,CLEAN], "
                   "fora:K[:block|branch], teacache:THRESHOLD[:RULE][:poly=C,...], "
                   "deepcache:N[:branch=B], joined with '+' to compose")


def referenced_files(spec: Optional[str]) -> list[pathlib.Path]:
  """The files a spec reads (plan files, DeeDiff heads), for provenance hashes."""
  out = []
  for part in str(spec or "").split("+"):
    part = part.strip()
    kind, _, rest = part.partition(":")
    key, _ = _kv(rest)
    if kind in ("mask", "file", "search") and rest and key is None:
      out.append(pathlib.Path(rest).expanduser())
    elif kind == "deediff" and rest and key is None:
      p = pathlib.Path(rest).expanduser()
      out.append(p / "deediff_heads.npz" if p.is_dir() else p)
    elif part.endswith((".npz", ".json")) and kind not in ("ase", "duodiff"):
      out.append(pathlib.Path(part).expanduser())
  return out
