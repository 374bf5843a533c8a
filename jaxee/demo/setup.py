"""Settings of the end-to-end demo (`python -m jaxee.demo`) and the training configs it runs.

The demo reproduces every method of jaxee at a scale that fits a laptop CPU: two small backbones
(a DiT and a U-ViT, 8x8 single-channel, class-conditional) and a small unconditional DDPM U-Net
(diffusers `UNet2DModel` layout) trained on the bundled scikit-learn digits (`jaxee.data.get_source('digits')`), then each method applied through the library's own
training entry points (`jaxee.train.trainer.train` with a `config.method` of 'baseline', 'ase',
'deediff', 'duodiff', and `jaxee.train.objectives.masks` for the block masks). This module holds:

* `DemoScale`: every size, step count and method constant of one demo scale. `SCALES['default']`
  is what `make demo` runs; `SCALES['micro']` is a seconds-long variant for the smoke test.
* `stage_config(...)`: the `ml_collections` training config of one stage, in the schema of
  `jaxee/train/config_base.py` (documented in `jaxee/train/launch.py`), with the method sections
  named as in `jaxee/configs_common.py`, so a stage is exactly what `jaxee-train --config=...`
  would run.
* `load_digits(split, size)`: the digits as arrays in model space ([-1, 1], NHWC).

Method constants at demo scale and how they map to the papers (`research/ee_methods.md` §5):
ASE uses the paper's D3-DiT / D2-U-ViT tables rescaled to the demo depth (`scale_to_model`), the
graded λ(t) re-weighting in 'cycle' mode over the first half of fine-tuning; DeeDiff is the
paper recipe (per-element uncertainty maps, exits 1..N, backbone + heads + UEMs trained jointly,
λ = β = 1, AdamW betas (0.99, 0.99)); DuoDiff trains a shallow copy (DiT 2
blocks, U-ViT 3 layers) initialised from the deep model; TABM optimises a block mask for the
demo's own sampler (DDIM-`sample_steps`) with the sparsity weight scaled to these tiny features.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
from ml_collections import config_dict

from jaxee.train import config_base

ARCHS = ("dit", "uvit", "unet")
METHOD_NAMES = ("ase", "deediff", "duodiff", "masks")
# Beyond the papers (`jaxee.demo.beyond`): plan search and the training-free baselines.
BEYOND_NAMES = ("search", "fora", "teacache")
UNET_METHODS = ("masks", "deepcache")   # the U-Net takes block masks and DeepCache (no ASE/exits)


@dataclasses.dataclass(frozen=True)
class DemoScale:
  """Sizes and step counts of one demo scale (see module docstring)."""
  name: str
  # Backbones (8x8x1 digits; patch 4: 4 image tokens, which trains ~3x faster than patch 2 on a
  # CPU and reached a lower FD and full class accuracy in the same number of steps).
  patch_size: int = 4
  width: int = 64
  dit_depth: int = 6
  uvit_depth: int = 6            # U-ViT constructor depth: 3 in-blocks + mid + 3 out-blocks
  num_heads: int = 4
  # Data and backbone training.
  batch_size: int = 64
  backbone_steps: int = 1500
  backbone_lr: float = 2e-3
  warmup_steps: int = 100
  ema_decay: float = 0.999
  # Sampling and evaluation.
  sample_steps: int = 20         # DDIM steps (NFEs of the CFG-doubled batch)
  guidance: tuple = (("dit", 3.0), ("uvit", 2.0), ("unet", None))  # the same CFG strength in
  # each convention; the U-Net is unconditional
  num_eval: int = 300            # samples per method (30 per class)
  timing_rounds: int = 7         # alternating rounds over all methods; medians reported
  classifier_steps: int = 400
  # ASE.
  ase_steps: int = 300
  ase_lr: float = 3e-4
  ase_schedule: tuple = (("dit", "D3-DiT"), ("uvit", "D2-U-ViT"))
  # DeeDiff.
  deediff_steps: int = 400
  deediff_lr: float = 2e-4             # the paper's lr: joint training moves the backbone too
  deediff_target_ratio: float = 0.75   # θ is calibrated to this mean executed-block fraction
  deediff_min_fraction: float = 1.0
  deediff_refine_iters: int = 3        # closed-loop θ corrections (`refine_threshold`)
  deediff_calib_samples: int = 300     # teacher trajectories for the calibration (x2 with CFG);
  # as many as `num_eval`: with min_fraction 1 the slowest sample of the batch decides the depth,
  # so the calibration batch must be as large as the sampled one.
  # DuoDiff.
  duodiff_steps: int = 300
  duodiff_lr: float = 1e-3
  duodiff_layers: tuple = (("dit", 2), ("uvit", 3))
  duodiff_t_switch: float = 500.0
  # TABM block masks.
  masks_iters: int = 25
  masks_samples: int = 16
  masks_lambda1: float = 0.05
  masks_lambda2: float = 0.05
  masks_lr: float = 0.1
  # DiT masks are learned at the paper's MHA/MLP granularity (`masks`) and, for comparison, per
  # block (`masks_block`, the granularity of the demo before the paper-granularity change).
  masks_extra_units: tuple = (("dit", ("block",)), ("uvit", ()), ("unet", ()))
  # The U-Net (unconditional; its own backbone steps).
  unet_channels: int = 16
  unet_steps: int = 1500
  unet_lr: float = 2e-3
  # Plan search and baselines.
  search_samples: int = 16       # calibration samples of the searches and TeaCache's threshold
  teacache_bisections: int = 8
  # Which methods run on which backbone.
  methods: tuple = (("dit", METHOD_NAMES + BEYOND_NAMES), ("uvit", METHOD_NAMES + BEYOND_NAMES),
                    ("unet", UNET_METHODS))

  def arch_value(self, field: str, arch: str) -> Any:
    """The per-arch entry of a `((arch, value), ...)` field."""
    table = dict(getattr(self, field))
    if arch not in table:
      raise ValueError(f"demo scale {self.name!r} has no {field} entry for {arch!r}")
    return table[arch]

  def methods_for(self, arch: str) -> tuple:
    return tuple(dict(self.methods).get(arch, ()))

  def to_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


SCALES = {
    "default": DemoScale("default"),
    # The smoke-test scale: every stage runs, a few steps each (seconds, not minutes).
    "micro": DemoScale(
        "micro", width=32, dit_depth=4, uvit_depth=4, num_heads=2, batch_size=16,
        backbone_steps=6, warmup_steps=1, sample_steps=6, num_eval=20, timing_rounds=2,
        classifier_steps=20, ase_steps=3, deediff_steps=3, duodiff_steps=3, masks_iters=2,
        masks_samples=4, deediff_calib_samples=20, deediff_refine_iters=1, unet_channels=8,
        unet_steps=6, search_samples=2, teacache_bisections=2),
}


def model_overrides(arch: str, scale: DemoScale) -> dict:
  """`jaxee.models.create` overrides of the demo backbone of `arch`.

  Both are class-conditional with a null class (CFG-ready) and use DiT's linear β chain of 1000
  steps with integer time, the U-ViT in the DuoDiff/DeeDiff setting (`configs/common.py`).
  The DiT does not learn σ: the demo samples with DDIM, which uses only ε.
  """
  if arch == "dit":
    return dict(input_size=8, patch_size=scale.patch_size, in_channels=1, hidden_size=scale.width,
                depth=scale.dit_depth, num_heads=scale.num_heads, num_classes=10,
                learn_sigma=False)
  if arch == "uvit":
    return dict(img_size=8, patch_size=scale.patch_size, in_chans=1, embed_dim=scale.width,
                depth=scale.uvit_depth, num_heads=scale.num_heads, num_classes=11,
                cfg_null_class=10, conv=True, default_schedule="linear_discrete")
  if arch == "unet":
    # The DDPM U-Net layout (diffusers `UNet2DModel`, as `unet_ddpm_cifar10`) shrunk to 8x8
    # digits: two levels (8², 4² with attention), one ResNet per level, unconditional.
    c0 = scale.unet_channels
    groups = min(8, c0)
    return dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(c0, 2 * c0),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=groups,
                attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False,
                downsample_padding=0, norm_eps=1e-6, default_schedule="linear_discrete")
  raise ValueError(f"unknown demo arch {arch!r}; choose from {ARCHS}")


def create_model(arch: str, scale: DemoScale):
  from jaxee import models  # pylint: disable=g-import-not-at-top
  return models.create(arch, **model_overrides(arch, scale))


def stage_config(method: str, arch: str, scale: DemoScale, seed: int, *, num_steps: int,
                 lr: float, section: Optional[dict] = None,
                 batch_size: Optional[int] = None) -> config_dict.ConfigDict:
  """The training config of one demo stage (`jaxee/train/config_base.py` schema).

  Args:
    method: 'baseline', 'ase', 'deediff', 'duodiff' or 'masks'.
    arch: 'dit' or 'uvit'.
    scale: the demo scale.
    seed: the run seed (the stage seed folds in the method and arch).
    num_steps: optimizer steps.
    lr: peak learning rate (linear warm-up, cosine decay to 10 %).
    section: the method section (`config.<method>`), as a dict.
    batch_size: global batch (default `scale.batch_size`).

  Returns:
    The ConfigDict.
  """
  c = config_base.base_config()
  c.method = method
  c.model.arch = arch
  c.model.overrides = config_dict.ConfigDict(model_overrides(arch, scale))
  c.init = ""
  c.data.source = "digits"
  c.data.split = "train"
  c.data.image_size = 8
  c.data.options = config_dict.ConfigDict({"channels": 1})
  c.data.batch_size = int(batch_size or scale.batch_size)
  c.data.prefetch = 0
  c.optim.lr = float(lr)
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = min(int(scale.warmup_steps), max(num_steps - 1, 0))
  c.optim.min_lr_ratio = 0.1
  c.optim.grad_clip_norm = 1.0
  c.train.num_steps = int(num_steps)
  c.train.log_every = max(1, min(100, num_steps))
  c.train.ckpt_every = 0
  c.train.keep = 1
  c.train.ema_decay = float(scale.ema_decay)
  c.train.ema_warmup = "linear"
  c.train.parallel = "jit"
  c.train.seed = stage_seed(seed, method, arch)
  c.train.async_checkpoint = False
  c.train.progress = False
  c.train.tensorboard = False
  if section is not None:
    c[method] = (config_base.method_section(method, **section)
                 if method in config_base.SECTIONS else config_dict.ConfigDict(section))
  return c


def stage_seed(seed: int, method: str, arch: str) -> int:
  """A distinct, reproducible seed per (run seed, stage)."""
  salt = sum((i + 1) * ord(ch) for i, ch in enumerate(f"{method}/{arch}"))
  return int((seed * 1_000_003 + salt) % (2 ** 31 - 1))


def ase_section(arch: str, scale: DemoScale) -> dict:
  """`config.ase` of the demo (`configs/common.py ase_section` fields)."""
  return dict(schedule=scale.arch_value("ase_schedule", arch), scale_to_model=True,
              lambda_boost=2.0, lambda_mode="cycle",
              cycle_length=max(1, scale.ase_steps // 2), cycle_repeat=False,
              freeze_time_embedder=True)


def deediff_section() -> dict:
  """`config.deediff` of the demo: the paper recipe (`config_base.DEEDIFF_RECIPES['paper']`).

  Per-element uncertainty maps (Eq. 8–9), exits at layers 1..N, backbone, heads and UEMs
  trained jointly with λ = β = 1; θ here is a placeholder (the demo calibrates it). The exit
  heads start as copies of the backbone's own head (`heads_from_backbone`, a jaxee option; the
  paper does not say how heads are initialised), which at this training length gives much better
  early exits.
  """
  recipe = config_base.DEEDIFF_RECIPES["paper"]["section"]
  return dict(threshold=0.5, **recipe, heads_from_backbone=True, unweighted_head_loss=False)


def deediff_betas() -> tuple:
  """AdamW (β₁, β₂) of the paper recipe."""
  return tuple(config_base.DEEDIFF_RECIPES["paper"]["betas"])


def duodiff_section(arch: str, scale: DemoScale) -> dict:
  """`config.duodiff` of the demo: shallow copy initialised from the deep model."""
  return dict(shallow_layers=int(scale.arch_value("duodiff_layers", arch)),
              t_switch=float(scale.duodiff_t_switch), rule="threshold", init="deep")


def masks_section(arch: str, scale: DemoScale, seed: int, unit: Optional[str] = None) -> dict:
  """`config.masks` (TABM) for the demo sampler (DDIM-`sample_steps` with the demo's CFG).

  `unit`: default the paper's granularity — DiT: MHA/MLP sub-layers ('branch', TABM §3.2),
  U-ViT and U-Net: blocks. Branch units are twice as many scores as blocks, so they get half
  the per-unit sparsity weight (the penalty per block stays where it was).
  """
  guidance = scale.arch_value("guidance", arch)
  unit = unit or ("branch" if arch == "dit" else "block")
  per_unit = 0.5 if unit == "branch" else 1.0
  # Under per-sub-layer output replacement a unit's reconstruction gradient vanishes whenever a
  # later unit of the same step is sampled off (its output is overwritten), so Adam's normalised
  # steps follow the sparsity term alone for those draws; at lr 0.1 the DiT branch mask collapsed
  # to ~35 % kept (FD +83), at 0.02 it keeps ~80 % (measured on the seed-0 backbone). Branch
  # scores therefore take a fifth of the block step.
  lr_scale = 0.2 if unit == "branch" else 1.0
  return dict(sampler="ddim", steps=int(scale.sample_steps),
              labels="random" if arch != "unet" else "none", unit=unit,
              guidance=None if guidance is None else float(guidance),
              num_samples=int(scale.masks_samples), iters_per_step=int(scale.masks_iters),
              lambda1=per_unit * float(scale.masks_lambda1),
              lambda2=per_unit * float(scale.masks_lambda2),
              lr=lr_scale * float(scale.masks_lr), init_score=0.9, sampling="bernoulli", threshold=0.5,
              rectify=True, loss_target="x_end", loss_norm="l2", seed=int(seed))


def load_digits(split: str, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Digits of a TFDS split as (images float32 (N, size, size, 1) in [-1, 1], labels int32)."""
  from jaxee import data  # pylint: disable=g-import-not-at-top
  source = data.get_source("digits", split=split, image_size=size, channels=1)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([ex["image"] for ex in examples]).astype(np.float32)
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return images, labels
