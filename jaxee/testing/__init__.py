"""Random backbones and reference forwards for tests and benchmarks of the exit runners.

DiT's adaLN modulations and final layer are zero-initialised (adaLN-Zero, DiT `initialize_weights`),
which makes every block an identity at init; `random_params` perturbs all leaves with Gaussian
noise so that each block, gate and head changes the output and a runner that skips the wrong block
is caught by an equality test.

`ReferencePlan(plan)` binds the same per-NFE tables as `plan` but computes EVERY block at every
NFE and then selects (ASE, DuoDiff) or masks (block masks) with `jnp.where`: the reference the
really-skipping runners must match, NFE by NFE and through whole sampler runs.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

import numpy as np

from jaxee import models
from jaxee.testing import family_ops as ops  # noqa: F401
from jaxee.testing.references import (ReferencePlan, block_mask_rows,  # noqa: F401
                                      reference_masked, reference_prefix)
from jaxee.testing.teacache_reference import TeaCacheReference  # noqa: F401
from jaxee.exits import plan as plan_lib


def random_params(model: Any, rng, scale: float = 0.05, x_shape: Optional[tuple] = None):
  """Initialises `model` and adds N(0, scale²) noise to every leaf."""
  k_init, k_noise = jax.random.split(rng)
  shape = x_shape or (1,) + _input_shape(model)
  y = jnp.zeros((shape[0],), jnp.int32) if model.num_classes > 0 else None
  params = jax.jit(model.init)(k_init, jnp.zeros(shape), jnp.zeros((shape[0],)), y)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(k_noise, len(leaves))
  leaves = [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _input_shape(model: Any) -> tuple:
  """(H, W, C) of one sample, from the backbone contract (every family)."""
  from jaxee.models import backbone as bb_lib  # pylint: disable=g-import-not-at-top
  return tuple(bb_lib.as_backbone(model).input_shape)


@functools.lru_cache(maxsize=16)
def _tiny(family: str, seed: int, depth: int, overrides: tuple):
  if family == "dit":
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth,
               num_heads=4, num_classes=10)
  elif family == "unet":
    cfg = dict(TINY_UNET)
  else:
    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=depth, num_heads=4)
  cfg.update(overrides)
  model = models.create(family, **cfg)
  return model, random_params(model, jax.random.PRNGKey(seed))


def tiny_dit(rng=None, depth: int = 4, **overrides):
  """A tiny class-conditional DiT (8×8×4 input, width 32) and perturbed params.

  `rng` is an int seed or a key (default seed 0); models with int seeds are cached, so tests
  share one init compile.
  """
  if rng is None or isinstance(rng, int):
    return _tiny("dit", rng or 0, depth, tuple(sorted(overrides.items())))
  model = _tiny("dit", 0, depth, tuple(sorted(overrides.items())))[0]
  return model, random_params(model, rng)


def tiny_uvit(rng=None, depth: int = 6, **overrides):
  """A tiny unconditional U-ViT (8×8×3, patch 2, width 32; depth 6 = 3 in, mid, 3 out).

  `rng` as in `tiny_dit` (default seed 1).
  """
  if rng is None or isinstance(rng, int):
    return _tiny("uvit", 1 if rng is None else rng, depth, tuple(sorted(overrides.items())))
  model = _tiny("uvit", 1, depth, tuple(sorted(overrides.items())))[0]
  return model, random_params(model, rng)


def tiny_unet(rng=None, **overrides):
  """A tiny unconditional DDPM U-Net (8×8×3; levels of 8 and 16 channels, attention at the
  second level and in the mid block; 12 units: 3 down, 3 mid, 6 up).

  `rng` as in `tiny_dit` (default seed 3); `overrides` are `UNet` (diffusers config) fields.
  """
  if rng is None or isinstance(rng, int):
    return _tiny("unet", 3 if rng is None else rng, 0, tuple(sorted(overrides.items())))
  model = _tiny("unet", 3, 0, tuple(sorted(overrides.items())))[0]
  return model, random_params(model, rng)


# The `tiny_unet` configuration (diffusers `UNet2DModel` config keys).
TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 norm_num_groups=4, attention_head_dim=None, freq_shift=1,
                 flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)


def example_inputs(model: Any, batch: int = 2, rng=None):
  """(x, y) for a model; y is None for unconditional models."""
  rng = jax.random.PRNGKey(2) if rng is None else rng
  shape = (batch,) + _input_shape(model)
  y = (jnp.arange(batch, dtype=jnp.int32) % model.num_classes
       if model.num_classes > 0 else None)
  return jax.random.normal(rng, shape), y


def plan_from_spec(spec: str, model: Any, params: Any, nfe_times, rng=None):
  """A plan from the one spec language (`jaxee.exits.spec.parse_plan`), for tools and tests.

  Paper ASE tables are rescaled to the model (`depth='auto'`); benchmark extras are explicit in
  the spec (`mask:skip=0.5`, `duodiff:300:random=3`, `deediff:scripted=4,12`).

  Returns:
    (plan, params to pass to `jaxee.sample` with it) — the params are unchanged (plans carry
    their own extra params as pytree leaves).
  """
  from jaxee.exits import spec as spec_lib  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(11) if rng is None else rng
  plan = spec_lib.parse_plan(spec, model, params=params, nfe_times=nfe_times,
                             options={"depth": "auto"}, rng=rng)
  return (plan_lib.FullPlan() if plan is None else plan), params


def assert_outputs_close(actual, desired, tol: float = 1e-6) -> None:
  """max |actual − desired| ≤ tol · max(1, max |desired|): 1e-6 at the output's own scale.

  Whole sampler runs of random tiny models reach values of O(10–100); fused and unfused float32
  programs then differ by a few ulps of that scale, which an absolute 1e-6 would flag.
  """
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  if actual.shape != desired.shape:
    raise AssertionError(f"shapes differ: {actual.shape} vs {desired.shape}")
  scale = max(1.0, float(np.max(np.abs(desired))))
  err = float(np.max(np.abs(actual - desired)))
  if not err <= tol * scale:
    raise AssertionError(f"max |difference| {err:.3g} > {tol:g} × scale {scale:.3g}")
