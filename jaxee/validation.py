"""Input checks of the public sampling API and non-finite output checks.

`jaxee.sample` (`jaxee/sampling.py`) calls `check_sample_args` before it builds or runs anything,
so a bad argument is one `ValueError` that says what was wrong and how to fix it, instead of
silently wrapped labels, all-NaN samples or an internal `TypeError` from inside the sampler:

* `sampler` is known and integrates the schedule it is given (the pairs of
  sampler registry, `jaxee.diffusion.samplers`);
* `steps` is an integer >= 1 that the schedule can realise (DDIM: an integer stride of the
  1000-step chain, DDPM: at most 1000 steps);
* `labels` are integers in `[0, num real classes)`; the model's CFG null label is accepted only
  without guidance (it then asks for unconditional samples, as the original label tables allow);
  floats such as 1.7 are refused instead of truncated;
* `guidance` is a finite number and needs labels on a class-conditional model;
* `noise` (the Gaussian draws of a stochastic sampler) is given only to a sampler that draws,
  with shape (draws, num, H, W, C) (`check_noise`).

`check_finite` turns a NaN/Inf output (samples, features, statistics) into a `NonFiniteError`
naming what held it; a caller adds where (the shard, the batch).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Schedule classes by the name `SAMPLER_SCHEDULES` uses (looked up lazily: no import cycle).
_SCHEDULE_CLASSES = {"DiscreteDiffusion": "linear_discrete", "VPSDE": "vp_continuous",
                     "SDDiscreteSchedule": "sd_discrete"}


class NonFiniteError(ValueError):
  """An output (samples, features, statistics) holds NaN or Inf values."""


def _sampler_schedules() -> dict:
  from jaxee.diffusion import samplers  # pylint: disable=g-import-not-at-top
  return {n: samplers.get_sampler(n).schedule for n in samplers.SAMPLERS}


def schedule_name(schedule: Any) -> Optional[str]:
  """The `SAMPLER_SCHEDULES` name of a schedule name or object (None when not recognised)."""
  if isinstance(schedule, str):
    return schedule
  for cls in type(schedule).__mro__:
    if cls.__name__ in _SCHEDULE_CLASSES:
      return _SCHEDULE_CLASSES[cls.__name__]
  return None


def check_sampler_schedule(model, sampler: str, schedule: Any = None) -> None:
  """Raises a ValueError naming the accepted samplers when `sampler` cannot run on `schedule`.

  Args:
    model: the backbone (its `default_schedule` is used when `schedule` is None).
    sampler: a sampler name.
    schedule: a schedule name or object, or None.
  """
  table = _sampler_schedules()
  if sampler not in table:
    raise ValueError(f"unknown sampler {sampler!r}; choose from {tuple(table)}")
  name = schedule_name(schedule if schedule is not None else model.default_schedule)
  if name is None:  # a custom schedule object: the sampler decides
    return
  if name not in table.values():
    raise ValueError(f"unknown schedule {name!r}; choose from {sorted(set(table.values()))}")
  accepted = [s for s, sch in table.items() if sch == name]
  if table[sampler] != name:
    origin = "given" if schedule is not None else f"{type(model).__name__}'s default"
    raise ValueError(f"sampler {sampler!r} runs on the {table[sampler]!r} schedule, not the "
                     f"{origin} {name!r} schedule; use one of {accepted} or pass "
                     f"schedule={table[sampler]!r}")


def check_steps(steps: Any, sampler: str) -> int:
  """`steps` as an int >= 1 (a ValueError otherwise)."""
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
    if not (isinstance(steps, numbers.Real) and float(steps).is_integer()):
      raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  steps = int(steps)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 for sampler {sampler!r}, got {steps}")
  return steps


def num_real_classes(model) -> int:
  """Classes a user may ask for (0 for an unconditional model); the null row is not one.

  A null label inside the label table (U-ViT's ImageNet row `num_classes − 1`) is not a class;
  one outside it (DiT's `num_classes`) leaves every row a class.
  """
  null = model.null_class
  if null is not None and null < int(model.num_classes):
    return int(null)
  return max(int(model.num_classes), 0)


def check_labels(model, labels: Any, guided: bool) -> None:
  """Labels must be integers in [0, num real classes) (+ the null label when unguided)."""
  if labels is None:
    return
  n_real = num_real_classes(model)
  if n_real <= 0:
    raise ValueError(f"this {type(model).__name__} is unconditional; pass labels=None")
  dtype = getattr(labels, "dtype", None)
  dtype = np.dtype(dtype if dtype is not None else np.asarray(labels).dtype)
  if dtype.kind not in "iu":
    raise ValueError(f"labels must be integer class ids, got dtype {dtype} (e.g. 1.7 is not a "
                     f"class); cast them to int32 deliberately if that is what you mean")
  if isinstance(labels, jax.core.Tracer):  # under an outer jit: only the dtype is known
    return
  values = np.asarray(jax.device_get(labels))
  null = model.null_class
  allowed_null = null is not None and not guided
  bad = (values < 0) | (values >= n_real)
  if allowed_null:
    bad &= values != null
  if bad.any():
    hint = f" or {null} (the null label, unguided only)" if null is not None else ""
    raise ValueError(f"labels must be in [0, {n_real}){hint} for this "
                     f"{type(model).__name__}; got {sorted(set(values[bad].tolist()))[:8]}")


def check_guidance(model, guidance: Any, labels: Any) -> None:
  """Guidance must be a finite number and needs labels (and a null class)."""
  if guidance is None:
    return
  is_number = isinstance(guidance, numbers.Real) or np.ndim(guidance) == 0
  if isinstance(guidance, bool) or not is_number:
    raise ValueError(f"guidance must be a number or None, got {guidance!r}")
  if not math.isfinite(float(guidance)):
    raise ValueError(f"guidance must be finite, got {float(guidance)}")
  if labels is None and num_real_classes(model) > 0:
    raise ValueError(f"guidance={float(guidance)} needs labels on this class-conditional "
                     f"{type(model).__name__}; pass labels=... or guidance=None")


def check_sample_args(model, *, num: Optional[int], labels: Any, guidance: Any, sampler: str,
                      steps: Any, schedule: Any = None) -> int:
  """All input checks of `jaxee.sample`; returns `steps` as an int.

  Args:
    model: the backbone.
    num: the batch size (None when `x_T` gives it).
    labels: class labels or None.
    guidance: the CFG scale or None.
    sampler: the sampler name.
    steps: sampling steps.
    schedule: a schedule name/object or None (model default).

  Raises:
    ValueError: the first problem found, with how to fix it.
  """
  check_sampler_schedule(model, sampler, schedule)
  steps = check_steps(steps, sampler)
  if num is not None and (isinstance(num, bool) or int(num) != num or int(num) < 1):
    raise ValueError(f"num must be an integer >= 1, got {num!r}")
  check_guidance(model, guidance, labels)
  check_labels(model, labels, guided=guidance is not None and labels is not None)
  if schedule is None or isinstance(schedule, str):  # realisable step count (DDPM/DDIM)
    from jaxee import sampling  # pylint: disable=g-import-not-at-top
    try:
      sampling.default_schedule(model, sampler, steps, schedule)
    except ValueError as e:
      raise ValueError(f"steps={steps} is not possible for sampler {sampler!r} on the "
                       f"1000-step chain ({e}); pick fewer steps") from None
  return steps


def check_noise(noise: Any, sampler: str, draws: Optional[int], shape: tuple,
                options: Optional[dict] = None) -> None:
  """`noise` must fit the sampler: (draws, num, H, W, C), refused for a deterministic one.

  Args:
    noise: the given draws, or None (nothing to check).
    sampler: the sampler name.
    draws: the Gaussian draws the sampler takes for these steps/options (`Sampler.num_draws`);
      None or 0 when it draws nothing.
    shape: (num, H, W, C), the shape of one draw.
    options: the sampler options (named in the message).

  Raises:
    ValueError: saying what shape was expected, or that this sampler draws no noise.
  """
  if noise is None:
    return
  if not draws:
    why = " (ddim draws only with eta > 0)" if sampler == "ddim" else ""
    raise ValueError(f"sampler {sampler!r} with options {dict(options or {})} is deterministic "
                     f"and takes no noise{why}; noise= is for ddpm, ddim with eta > 0 and "
                     f"euler_maruyama")
  got = tuple(np.shape(noise))
  expected = (int(draws),) + tuple(int(d) for d in shape)
  if got != expected:
    raise ValueError(f"noise for sampler {sampler!r} must have shape (draws, num, H, W, C) = "
                     f"{expected} (NHWC, one draw per stochastic update), got {got}")
  dtype = getattr(noise, "dtype", None)
  dtype = np.dtype(dtype if dtype is not None else np.asarray(noise).dtype)
  if dtype.kind != "f" and not dtype.name.startswith("bfloat"):
    raise ValueError(f"noise must be floating point, got dtype {dtype}")


def check_finite(array: Any, what: str) -> None:
  """Raises `NonFiniteError` naming `what` when `array` holds NaN or Inf.

  Args:
    array: a NumPy/JAX array (fetched to the host).
    what: what it is and where it came from, e.g. 'samples of shard 3, batch 0'.
  """
  if isinstance(array, jax.core.Tracer):  # under an outer jit: nothing concrete to check
    return
  if isinstance(array, jax.Array):
    if not jnp.issubdtype(array.dtype, jnp.inexact) or bool(jnp.isfinite(array).all()):
      return  # one boolean comes back to the host, not the array
  values = np.asarray(jax.device_get(array))
  if values.dtype.kind not in "fc":
    return
  finite = np.isfinite(values)
  if not finite.all():
    n_bad = int(values.size - finite.sum())
    raise NonFiniteError(f"{what} holds {n_bad} non-finite value(s) of {values.size} (NaN/Inf): "
                         f"check the checkpoint weights (convert warns about NaN/Inf tensors), "
                         f"the guidance scale and the sampler settings")


def nonfinite_tensors(tensors: dict) -> list[str]:
  """Names of the floating-point arrays of a flat `{name: array}` dict that hold NaN or Inf."""
  bad = []
  for name, value in tensors.items():
    value = np.asarray(value)
    if value.dtype.kind not in "fc" and not value.dtype.name.startswith(("bfloat", "float8")):
      continue
    if value.dtype.kind not in "fc":  # ml_dtypes (bf16, fp8): compare as float32
      value = value.astype(np.float32)
    if not np.isfinite(value).all():
      bad.append(name)
  return sorted(bad)
