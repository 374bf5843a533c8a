r"""Sampling configs for U-ViT (`jaxee-sample --config=configs/sample_uvit.py[:arg]`).

Default: U-ViT-H/2 ImageNet 256×256 as evaluated in the paper (`configs/imagenet256_uvit_huge.py`):
DPM-Solver++ with 50 steps, classifier-free guidance 0.4 (U-ViT convention
cond + s·(cond − uncond)), 50,000 samples with random labels from the 1000 real classes (1000 is
the null class), decoded by the U-ViT autoencoder (`autoencoder_kl_ema.pth`, CompVis layout) and
stored as uint8 the way `save_image` writes them. Paths are placeholders that must be given:

    jaxee-sample --config=configs/sample_uvit.py \
        --config.ckpt=ckpt/uvit_h2_imagenet256 --config.vae_ckpt=autoencoder_kl_ema.pth

Args (`:arg`):
  celeba: U-ViT-S/4 CelebA 64×64 (pixel space, unconditional): Euler–Maruyama SDE, 1000 steps.
  runlocal: the tiny official fixture `tests/fixtures/uvit_tiny_cond.pt` (8×8×4, 11 label rows
    with row 10 the null class), no VAE, DPM-Solver with 10 steps, 12 samples in 3 shards of 4.
"""
from ml_collections import config_dict

from jaxee import configs_common as common
from jaxee.sharded import run as sharded_run

UVIT_TINY_COND = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=4, num_heads=4,
                      num_classes=11, cfg_null_class=10)


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """The U-ViT sampling config; `arg` is '' (H/2 ImageNet256), 'celeba' or 'runlocal'."""
  c = common.sample_base_config()
  c.arch = "uvit_h2_imagenet256"
  c.model_overrides = config_dict.ConfigDict()
  c.ckpt = "SET_ME: converted dir or imagenet256_uvit_huge.pth"
  c.vae_ckpt = "SET_ME: converted dir or autoencoder_kl_ema.pth"
  c.sampler = "dpm_solver_pp"
  c.steps = 50
  c.guidance = 0.4
  c.batch_size = 25
  c.shard_size = 1000
  c.uint8 = "save_image"
  c.out_dir = "runs/sample_uvit_h2_imagenet256"
  if arg == "celeba":
    c.arch = "uvit_s4_celeba64"
    c.ckpt = "SET_ME: converted dir or celeba64_uvit_small.pth"
    c.vae_ckpt = None
    c.sampler = "euler_maruyama"
    c.steps = 1000
    c.guidance = None
    c.labels = "none"
    c.batch_size = 100
    c.out_dir = "runs/sample_uvit_s4_celeba64"
  elif arg == "runlocal":
    c.arch = "uvit"
    c.model_overrides = config_dict.ConfigDict(UVIT_TINY_COND)
    c.ckpt = "tests/fixtures/uvit_tiny_cond.pt"
    c.vae_ckpt = None
    c.sampler = "dpm_solver"
    c.steps = 10
    c.num_samples = 12
    c.batch_size = 4
    c.shard_size = 4
    c.out_dir = "runs/sample_uvit_runlocal"
  elif arg:
    raise ValueError(f"unknown configs/sample_uvit.py arg {arg!r}; use '', 'celeba' or "
                     "'runlocal'")
  sharded_run.validate_config(c)
  return c
