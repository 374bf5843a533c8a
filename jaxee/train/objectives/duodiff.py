"""DuoDiff objective: the shallow backbone, its size and its initialisation from the deep one.

DuoDiff (§3.1–3.2, `research/ee_methods.md` §3): a shallow backbone (3 layers by default) trained
with the plain diffusion loss over all t (`diffusion.make_diffusion_loss`), from scratch or
initialised from the deep model's embeddings, head and first blocks. The objective follows the
contract of `jaxee.train.objectives` (package docstring).
"""
from __future__ import annotations

from typing import Any, Optional

from jaxee.models.backbone import as_backbone
from jaxee.train.objectives import diffusion as diffusion_obj

# DuoDiff trains its class-conditional (ImageNet) backbones without label dropout.
DEFAULT_LABEL_DROPOUT = 0.0


def make_duodiff_loss(shallow_model, *, schedule=None,
                      label_dropout: Optional[float] = None) -> diffusion_obj.LossFn:
  """DuoDiff: the shallow backbone trained with the plain diffusion loss over all t (§3.2).

  With a U-ViT whose `default_schedule` is 'linear_discrete' (DuoDiff's linear β chain, t in
  {0..999}) this is exactly DuoDiff's ε-MSE `_loss_fn`; a learned-σ DiT also gets the VLB term.

  Labels: DuoDiff's `trainer.py` feeds the ImageNet models their true labels at every step (no
  classifier-free label dropout), so `label_dropout=None` means 0 here, not the backbone's CFG
  rate; set `config.loss.label_dropout` to train with dropout anyway.
  """
  if label_dropout is None:
    label_dropout = DEFAULT_LABEL_DROPOUT
  return diffusion_obj.make_diffusion_loss(shallow_model, schedule=schedule,
                                           label_dropout=label_dropout)


def shallow_depth(deep_model, num_layers: int) -> int:
  """The `depth` constructor value of a shallow copy with `num_layers` transformer blocks.

  The backbone decides (`Backbone.shallow_depth`): DuoDiff counts U-ViT layers as in-blocks +
  mid + out-blocks ("3 layers" = 1 + 1 + 1, §3.1), i.e. `depth = num_layers − 1`; a DiT has
  `depth = num_layers`.
  """
  return as_backbone(deep_model).shallow_depth(num_layers)


def init_shallow_from_deep(deep_params: Any, deep_model, shallow_model) -> Any:
  """Initialises a shallow backbone from the deep one's embeddings, head and first blocks.

  The backbone decides which blocks (`Backbone.shallow_params`): DiT `blocks[:depth]`; U-ViT the
  first in-blocks, the mid block and the LAST out-blocks (those that consume the kept
  in-blocks' skips, LIFO); everything else is copied as is.
  """
  if type(deep_model) is not type(shallow_model):
    raise ValueError("shallow and deep backbones must be the same family")
  return as_backbone(deep_model).shallow_params(deep_params, shallow_model)
