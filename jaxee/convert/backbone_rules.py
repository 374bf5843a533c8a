"""PyTorch state dict → jaxee params for DiT and U-ViT (strict, all-or-nothing).

Flax param paths mirror the PyTorch module names (`shared/DESIGN.md`), so a torch key maps to a
path by three rules:

1. per-block prefixes `blocks.{i}.` (DiT) and `in_blocks.{i}.` / `out_blocks.{i}.` (U-ViT) lose
   their index, and the tensor becomes row i of a stacked (depth, ...) array;
2. a numeric child index joins its parent (`t_embedder.mlp.0` → `t_embedder/mlp_0`,
   `time_embed.2` → `time_embed_2`), except the SiLU-preceded `adaLN_modulation.1`, which is the
   `adaLN_modulation` Dense;
3. the leaf follows the Flax module it lands in: Linear `weight` (out, in) → `kernel` (in, out);
   Conv2d `weight` OIHW → `kernel` HWIO; LayerNorm `weight` → `scale`; Embedding `weight` →
   `embedding`; `bias` stays.

Every missing key, unexpected key and shape mismatch is collected and raised as one
`CheckpointError`; nothing half-converted is returned.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.convert.errors import CheckpointError
from jaxee.models import layers

STACKED_GROUPS = ("blocks", "in_blocks", "out_blocks")
_RENAMES = {"adaLN_modulation_1": "adaLN_modulation"}
# DiT stores its fixed sin-cos table in the state dict; jaxee recomputes it (a constant).
_POS_EMBED_TOLERANCE = 1e-4


def example_inputs(model) -> tuple[Any, ...]:
  """Tiny inputs with the right shapes for `model.init` / `jax.eval_shape`."""
  if model.family == "dit":
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
  if model.family == "unet":
    x = jnp.zeros((1, model.sample_size, model.sample_size, model.in_channels), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), None
  x = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
  return x, jnp.zeros((1,), jnp.float32), y


def param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened `{path: shape}` of the model's params, without allocating them."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model)))["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], int | None, str]:
  """Splits a torch key into (module path, stacked row index or None, torch leaf name)."""
  parts = key.split(".")
  leaf, mods = parts[-1], parts[:-1]
  index = None
  if len(mods) >= 2 and mods[0] in STACKED_GROUPS and mods[1].isdigit():
    index, mods = int(mods[1]), [mods[0]] + mods[2:]
  joined: list[str] = []
  for m in mods:
    if m.isdigit() and joined:
      joined[-1] = f"{joined[-1]}_{m}"
    else:
      joined.append(m)
  return tuple(_RENAMES.get(m, m) for m in joined), index, leaf


def _convert_leaf(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  if flax_leaf == "kernel":
    if value.ndim == 4:  # Conv2d OIHW → HWIO
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # Linear (out, in) → (in, out)
      return value.T
  return value


def _flax_leaf_for(module_path, torch_leaf, expected) -> str | None:
  if torch_leaf == "bias":
    return "bias"
  if torch_leaf == "weight":
    for candidate in ("kernel", "scale", "embedding"):
      if module_path + (candidate,) in expected:
        return candidate
  return None


def _check_dit_pos_embed(value: np.ndarray, model, problems: list[str]) -> None:
  grid = model.input_size // model.patch_size
  want = layers.sincos_pos_embed_2d(model.hidden_size, grid)[None]
  if value.shape != want.shape:
    problems.append(f"shape mismatch: pos_embed is {value.shape} in the checkpoint, expected "
                    f"{want.shape} (input_size={model.input_size}, patch_size={model.patch_size})")
    return
  err = float(np.max(np.abs(value.astype(np.float64) - want)))
  if err > _POS_EMBED_TOLERANCE:
    problems.append(f"pos_embed differs from the fixed sin-cos table by {err:.3g} (> "
                    f"{_POS_EMBED_TOLERANCE}); is this checkpoint for another input_size?")


def _family_hint(keys) -> str:
  keys = set(keys)
  if any(k.startswith("in_blocks.") for k in keys):
    return "U-ViT"
  if any(k.startswith("blocks.") and "adaLN_modulation" in k for k in keys):
    return "DiT"
  if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
    return "UNet2DModel"
  if any(k.startswith(("encoder.", "decoder.")) for k in keys):
    return "VAE"
  if any(k.startswith("Mixed_") for k in keys):
    return "Inception-v3"
  return "unknown"


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model, *,
                           source: str = "state dict") -> dict[str, Any]:
  """Converts a flat PyTorch state dict of a DiT or U-ViT into the model's jaxee params.

  Args:
    state_dict: flat name → array mapping (see `torch_reader.load_state_dict`).
    model: the target module from `jaxee.models.create` (its config decides every shape).
    source: a name for error messages (usually the file path).

  Returns:
    The nested params dict (NumPy float32 arrays, block params stacked).

  Raises:
    CheckpointError: listing every missing key, unexpected key and shape mismatch at once.
  """
  if model.family == "unet":
    from jaxee.convert import unet_rules  # pylint: disable=g-import-not-at-top
    return unet_rules.params_from_state_dict(state_dict, model, source=source)
  expected = param_shapes(model)
  filled: dict[tuple[str, ...], np.ndarray] = {}
  rows_seen: dict[tuple[str, ...], set[int]] = {}
  problems: list[str] = []
  unexpected: list[str] = []
  for key in sorted(state_dict):
    value = np.asarray(state_dict[key])
    if model.family == "dit" and key == "pos_embed":
      _check_dit_pos_embed(value, model, problems)
      continue
    module_path, index, torch_leaf = torch_key_to_path(key)
    if key == "pos_embed":
      flax_path = ("pos_embed",)
    else:
      flax_leaf = _flax_leaf_for(module_path, torch_leaf, expected)
      flax_path = module_path + (flax_leaf,) if flax_leaf else None
    if flax_path is None or flax_path not in expected or (index is not None) != (
        flax_path[0] in STACKED_GROUPS):
      unexpected.append(key)
      continue
    torch_shape = value.shape
    value = _convert_leaf(value, flax_path[-1]).astype(np.float32)
    want = expected[flax_path]
    if index is None:
      if value.shape != want:
        problems.append(f"shape mismatch: {key} {torch_shape} (as {value.shape}) → "
                        f"{'/'.join(flax_path)} wants {want}")
        continue
      filled[flax_path] = value
      continue
    if index >= want[0] or value.shape != want[1:]:
      problems.append(f"shape mismatch: {key} {torch_shape} (as {value.shape}) does not fit "
                      f"row {index} of {'/'.join(flax_path)} {want}")
      continue
    if flax_path not in filled:
      filled[flax_path] = np.zeros(want, np.float32)
      rows_seen[flax_path] = set()
    filled[flax_path][index] = value
    rows_seen[flax_path].add(index)
  missing = []
  for path, shape in expected.items():
    if path not in filled:
      missing.append("/".join(path))
    elif path in rows_seen and len(rows_seen[path]) != shape[0]:
      rows = sorted(set(range(shape[0])) - rows_seen[path])
      missing.append(f"{'/'.join(path)} rows {rows}")
  if model.family == "dit" and "pos_embed" not in state_dict:
    missing.append("pos_embed")
  raise_mismatch(source, f"{type(model).__name__}", missing, unexpected, problems, state_dict,
                 f"the checkpoint looks like: {_family_hint(state_dict)}")
  return nest(filled)


def raise_mismatch(source: str, target: str, missing, unexpected, problems, state_dict,
                   note: str) -> None:
  """One `CheckpointError` listing every missing key, unexpected key and other problem."""
  if not (missing or unexpected or problems):
    return
  lines = [f"{source} does not match {target} ({len(missing)} missing, {len(unexpected)} "
           f"unexpected, {len(problems)} other; {note})"]
  lines += [f"  missing: {m}" for m in missing]
  lines += [f"  unexpected: {u} {tuple(np.shape(state_dict[u]))}" for u in unexpected]
  lines += [f"  {p}" for p in problems]
  raise CheckpointError("\n".join(lines))


def nest(filled: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """{('a', 'b', 'kernel'): v} → {'a': {'b': {'kernel': v}}}."""
  out: dict[str, Any] = {}
  for path, value in filled.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def count_params(params) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))

