"""Conversion of FID Inception-v3 PyTorch state dicts to ``InceptionV3FID`` variables.

The source is the torchvision-style state dict of the FID Inception-v3 (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's ``weights-inception-2015-12-05``), the
PyTorch port of the TensorFlow graph used by Heusel et al. (2017) for FID. Key names are
``<module>.conv.weight`` and ``<module>.bn.{weight,bias,running_mean,running_var}`` for every
BasicConv2d (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ...) plus ``fc.{weight,bias}``;
``num_batches_tracked`` buffers carry no information and are ignored.

Mapping (Flax module names mirror the torch ones, see ``jaxee/eval/inception.py``):

* ``X.conv.weight`` (O, I, kh, kw) -> ``params[X]['conv']['kernel']`` (kh, kw, I, O);
* ``X.bn.weight`` / ``X.bn.bias`` -> ``params[X]['bn']['scale' / 'bias']``;
* ``X.bn.running_mean`` / ``running_var`` -> ``batch_stats[X]['bn']['mean' / 'var']``;
* ``fc.weight`` (1008, 2048) -> ``params['fc']['kernel']`` (2048, 1008); ``fc.bias`` as is.

BatchNorm is kept unfolded (running statistics in ``batch_stats``, eps 1e-3 in the module) so
that the forward pass follows the original arithmetic. Every tensor is cast to float32 (fp16
checkpoints are exactly representable in fp32).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.convert.errors import CheckpointError
from jaxee.eval.inception import InceptionV3FID

_IGNORED_SUFFIXES = ('num_batches_tracked',)

# torch leaf name -> (collection, flax leaf name, transform).
_LEAVES = {
    ('conv', 'weight'): ('params', 'kernel', lambda a: np.transpose(a, (2, 3, 1, 0))),
    ('bn', 'weight'): ('params', 'scale', None),
    ('bn', 'bias'): ('params', 'bias', None),
    ('bn', 'running_mean'): ('batch_stats', 'mean', None),
    ('bn', 'running_var'): ('batch_stats', 'var', None),
}


def expected_variable_shapes(model: InceptionV3FID | None = None) -> dict[str, Any]:
  """Shapes of every variable of ``InceptionV3FID`` (no computation: ``jax.eval_shape``).

  Args:
    model: the module (default ``InceptionV3FID()``).

  Returns:
    A nested dict ``{'params': ..., 'batch_stats': ...}`` of ``jax.ShapeDtypeStruct``.
  """
  model = model or InceptionV3FID()
  dummy = jnp.zeros((1, 75, 75, 3), jnp.uint8)
  return dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy))


def _torch_to_flax_key(key: str):
  """Maps a torch key to (collection, path tuple, transform), or None when not recognised."""
  parts = key.split('.')
  if parts == ['fc', 'weight']:
    return 'params', ('fc', 'kernel'), lambda a: np.transpose(a)
  if parts == ['fc', 'bias']:
    return 'params', ('fc', 'bias'), None
  if len(parts) < 3 or tuple(parts[-2:]) not in _LEAVES:
    return None
  collection, leaf, transform = _LEAVES[tuple(parts[-2:])]
  return collection, tuple(parts[:-1]) + (leaf,), transform


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flat_paths(tree: Mapping[str, Any], prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flat_paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def inception_params_from_state_dict(state_dict: Mapping[str, Any],
                                     model: InceptionV3FID | None = None) -> dict[str, Any]:
  """Converts a FID Inception-v3 state dict into ``InceptionV3FID`` variables (strict).

  Args:
    state_dict: flat mapping from torch key to array (NumPy or anything ``np.asarray`` takes),
      e.g. from ``jaxee.convert.torch_reader.load_state_dict``.
    model: the target module (default ``InceptionV3FID()``), only used for its variable shapes.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 ``jnp`` arrays, ready for
    ``model.apply(variables, images)``.

  Raises:
    CheckpointError: listing, in one message, every unexpected key, every mis-shaped tensor and
      every variable the state dict does not provide.
  """
  expected = expected_variable_shapes(model)
  out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  unexpected, misshaped = [], []
  for key in sorted(state_dict):
    if key.rsplit('.', 1)[-1] in _IGNORED_SUFFIXES:
      continue
    mapped = _torch_to_flax_key(key)
    if mapped is None:
      unexpected.append(key)
      continue
    collection, path, transform = mapped
    target = _get(expected.get(collection, {}), path)
    if target is None or isinstance(target, Mapping):
      unexpected.append(key)
      continue
    value = np.asarray(state_dict[key])
    if transform is not None:
      value = transform(value)
    if tuple(value.shape) != tuple(target.shape):
      misshaped.append(f'{key}: got {tuple(np.shape(state_dict[key]))} -> {tuple(value.shape)}, '
                       f'expected {tuple(target.shape)} ({collection}/{"/".join(path)})')
      continue
    _set(out[collection], path, jnp.asarray(value.astype(np.float32)))
  missing = []
  for collection in ('params', 'batch_stats'):
    for path, _ in _flat_paths(expected.get(collection, {})):
      if _get(out[collection], path) is None:
        missing.append(f'{collection}/{"/".join(path)}')
  if unexpected or misshaped or missing:
    lines = ['state dict does not match the FID Inception-v3:']
    if missing:
      lines.append(f'  missing ({len(missing)}): ' + ', '.join(missing))
    if unexpected:
      lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
    if misshaped:
      lines.append(f'  mis-shaped ({len(misshaped)}): ' + '; '.join(misshaped))
    raise CheckpointError('\n'.join(lines))
  return out


def load_inception(path: str | os.PathLike,
                   model: InceptionV3FID | None = None) -> dict[str, Any]:
  """Reads a FID Inception-v3 checkpoint (``.pth`` etc.) and converts it.

  Args:
    path: checkpoint file, read with ``jaxee.convert.torch_reader.load_state_dict`` (no torch).
    model: the target module (default ``InceptionV3FID()``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``InceptionV3FID``.

  Raises:
    CheckpointError: when the file cannot be read or does not match the network.
  """
  from jaxee.convert.torch_reader import load_state_dict  # pylint: disable=g-import-not-at-top
  state_dict = load_state_dict(path)
  try:
    return inception_params_from_state_dict(state_dict, model)
  except CheckpointError as e:
    raise e.with_path(path) from None
