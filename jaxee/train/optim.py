"""Optimizer construction: AdamW, learning-rate schedules, gradient clipping, frozen groups.

`make_optimizer(config, params)` reads these config fields (all optional):

* `lr` (1e-4, DiT's constant rate), `b1` (0.9), `b2` (0.999) or `betas` (a pair), `eps` (1e-8),
  `weight_decay` (0.0, DiT);
* `schedule`: `'constant'` (default; a linear warm-up over `warmup_steps` when > 0) or
  `'cosine'` (linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `num_steps`);
* `grad_clip_norm`: clip the global norm of the *trainable* gradients (None/0: no clipping);
* `frozen_patterns`: regexes over parameter paths. A parameter is frozen when any pattern
  **fully** matches its `/`-joined path (`re.fullmatch`), e.g. `'t_embedder/.*'` (ASE freezes
  the timestep embedder), `'^(?!deediff).*'` (everything but DeeDiff's heads: a frozen
  backbone) or `'^(?!masks).*'` (mask training).

Frozen parameters are routed through `optax.set_to_zero()` with `optax.multi_transform`, so they
receive an exactly-zero update: AdamW's weight decay, the schedule and clipping never touch
them, and clipping is computed over the trainable gradients only.
"""
import re
from typing import Any, Iterable, Optional, Sequence, Union

import jax
import optax

from jaxee.exits import io as plan_io

PyTree = Any

TRAINABLE = "trainable"
FROZEN = "frozen"


def config_get(config, name: str, default=None):
  """Reads `config.name` from a ConfigDict, a dict or any object; `default` when absent/None."""
  if config is None:
    return default
  if isinstance(config, dict) or hasattr(config, "get"):
    try:
      value = config.get(name, default)
    except (KeyError, AttributeError):
      value = default
  else:
    value = getattr(config, name, default)
  return default if value is None else value


def param_path(path) -> str:
  """The `/`-joined name of a pytree key path (`blocks/attn/qkv/kernel`; `jaxee.exits.io`)."""
  return plan_io.param_path(path, "/")


def _compile(patterns: Union[str, Iterable[str], None]) -> Sequence[re.Pattern]:
  if patterns is None:
    return ()
  if isinstance(patterns, str):
    patterns = [patterns]
  return tuple(re.compile(p) for p in patterns)


def trainable_mask(params: PyTree, frozen_patterns: Union[str, Iterable[str], None]) -> PyTree:
  """A pytree of bools like `params`: True for trainable leaves, False for frozen ones.

  Args:
    params: the parameter pytree.
    frozen_patterns: regex or list of regexes; a leaf is frozen when one fully matches its
      `/`-joined path.

  Returns:
    The boolean mask pytree.
  """
  compiled = _compile(frozen_patterns)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.fullmatch(param_path(path)) for p in compiled), params)


def param_labels(params: PyTree, frozen_patterns) -> PyTree:
  """`'trainable'` / `'frozen'` labels for `optax.multi_transform`."""
  return jax.tree.map(lambda t: TRAINABLE if t else FROZEN, trainable_mask(params, frozen_patterns))


def frozen_paths(params: PyTree, frozen_patterns) -> list:
  """The sorted list of frozen parameter paths (for logging)."""
  mask = trainable_mask(params, frozen_patterns)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return sorted(param_path(p) for p, trainable in flat if not trainable)


def make_schedule(config) -> Union[float, optax.Schedule]:
  """The learning-rate schedule described by `config` (see the module docstring).

  Args:
    config: ConfigDict/dict with `lr`, `schedule`, `warmup_steps`, `num_steps`,
      `min_lr_ratio`.

  Returns:
    A float (constant, no warm-up) or an optax schedule.
  """
  lr = float(config_get(config, "lr", 1e-4))
  kind = config_get(config, "schedule", "constant")
  warmup = int(config_get(config, "warmup_steps", 0))
  if kind == "constant":
    if warmup <= 0:
      return lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind in ("cosine", "warmup_cosine"):
    total = int(config_get(config, "num_steps", 0))
    if total <= warmup:
      raise ValueError(f"cosine schedule needs num_steps ({total}) > warmup_steps ({warmup})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
        end_value=lr * float(config_get(config, "min_lr_ratio", 0.0)))
  raise ValueError(f"unknown schedule {kind!r}; expected 'constant' or 'cosine'")


def make_optimizer(config, params: Optional[PyTree] = None) -> optax.GradientTransformation:
  """AdamW with an optional schedule, gradient clipping and frozen parameter groups.

  Args:
    config: ConfigDict/dict (fields in the module docstring).
    params: the parameter pytree (or its shapes); needed when `frozen_patterns` is set, to
      build the labels.

  Returns:
    An `optax.GradientTransformation`.
  """
  b1, b2 = config_get(config, "betas", (config_get(config, "b1", 0.9),
                                        config_get(config, "b2", 0.999)))
  chain = []
  clip = config_get(config, "grad_clip_norm", 0.0)
  if clip and clip > 0:
    chain.append(optax.clip_by_global_norm(float(clip)))
  chain.append(optax.adamw(learning_rate=make_schedule(config), b1=float(b1), b2=float(b2),
                           eps=float(config_get(config, "eps", 1e-8)),
                           weight_decay=float(config_get(config, "weight_decay", 0.0))))
  inner = optax.chain(*chain) if len(chain) > 1 else chain[0]
  patterns = config_get(config, "frozen_patterns", ())
  if not patterns:
    return inner
  if params is None:
    raise ValueError("make_optimizer needs `params` to label frozen_patterns")
  labels = param_labels(params, patterns)
  if not any(l == TRAINABLE for l in jax.tree.leaves(labels)):
    raise ValueError(f"frozen_patterns {patterns!r} freeze every parameter")
  return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)
