"""Tiny DiT / U-ViT backbones with NumPy-drawn params for the DeeDiff tests.

Input shapes come from the backbone contract (`as_backbone(model).input_shape`). NumPy draws need
no PRNG program to compile, which keeps the test files fast on CPU (a jitted threefry fill of ~50
leaves costs several CPU-seconds of XLA compile).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxee import models
from jaxee.models.backbone import as_backbone


def numpy_params(model, seed):
  """Random params drawn with NumPy (no PRNG program to compile): kernels N(0, 0.25/fan_in),
  LayerNorm scales 1 + N(0, 0.05²), biases N(0, 0.05²), embeddings N(0, 0.3²)."""
  shape = (1,) + tuple(as_backbone(model).input_shape)
  y = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros((1,)),
                          y)["params"]
  rs = np.random.RandomState(seed)

  def one(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    z = rs.standard_normal(leaf.shape).astype(np.float32)
    stacked = names[0] in ("blocks", "in_blocks", "out_blocks")
    if names[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[1 if stacked else 0:-1]))
      return 0.5 * z / np.sqrt(fan_in)
    if names[-1] == "scale":
      return 1.0 + 0.05 * z
    if names[-1] == "bias":
      return 0.05 * z
    return 0.3 * z

  return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(one(p, l)), shapes)


@functools.lru_cache(maxsize=None)
def tiny_backbone(family):
  if family == "dit":
    model = models.create("dit", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                          depth=4, num_heads=4, num_classes=10)
  else:
    model = models.create("uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=6,
                          num_heads=4)
  return model, numpy_params(model, 0 if family == "dit" else 1)


def numpy_inputs(model, batch, seed=2):
  shape = (batch,) + tuple(as_backbone(model).input_shape)
  x = np.random.RandomState(seed).standard_normal(shape).astype(np.float32)
  y = jnp.arange(batch, dtype=jnp.int32) % model.num_classes if model.num_classes > 0 else None
  return jnp.asarray(x), y
