r"""Sampling config for DiT (`jaxee-sample --config=configs/sample_dit.py[:arg]`).

Default: the DiT-XL/2 256×256 FID-50K setting of the paper (`sample_ddp.py`): DDPM with 250
steps, classifier-free guidance 1.5, 50,000 samples with uniformly random ImageNet labels, decoded
by sd-vae-ft-ema and stored as uint8 in DiT's FID convention. The checkpoint and VAE paths are
placeholders that must be given:

    jaxee-sample --config=configs/sample_dit.py \
        --config.ckpt=ckpt/dit_xl_2_256 --config.vae_ckpt=ckpt/sd_vae_ft_ema \
        --config.out_dir=runs/dit_xl_2_fid50k

Args (`:arg`):
  runlocal: the tiny official fixture `tests/fixtures/dit_tiny.pt` (8×8×4 latents, 10 classes),
    no VAE, DDIM-10, 12 samples in 3 shards of 4 — runs on a laptop CPU in seconds.

Exit plans (`--config.plan=...`, built by `jaxee.sharded.run.make_plan`): `ase:D3-DiT` (an ASE
table; `--config.plan_options.depth=N` rescales it to N blocks), `mask:PATH` (a saved
`MaskPlan`; `plan_options.rectify`), `duodiff[:T_SWITCH]` (shallow model from
`plan_options.shallow_ckpt`, converted dir or a `.pt` of `shallow_arch` (default: `arch`) with
`model_overrides` and depth `shallow_depth`), `deediff:WORKDIR` (heads/UEMs of a DeeDiff run;
`plan_options.threshold`, `.mode`, `.min_fraction`),
`fora:K[:block]` and `teacache:THRESHOLD[:max|mean|pooled]` (training-free baselines,
`docs/methods/baselines.md`).
"""
from ml_collections import config_dict

from jaxee import configs_common as common
from jaxee.sharded import run as sharded_run

DIT_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                num_classes=10)


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """The DiT sampling config; `arg` is '' (DiT-XL/2-256 FID-50K) or 'runlocal'."""
  c = common.sample_base_config()
  if arg == "runlocal":
    c.ckpt = "tests/fixtures/dit_tiny.pt"
    c.arch = "dit"
    c.model_overrides = config_dict.ConfigDict(DIT_TINY)
    c.vae_ckpt = None
    c.sampler = "ddim"
    c.steps = 10
    c.num_samples = 12
    c.batch_size = 4
    c.shard_size = 4
    c.out_dir = "runs/sample_dit_runlocal"
  elif arg:
    raise ValueError(f"unknown configs/sample_dit.py arg {arg!r}; use '' or 'runlocal'")
  sharded_run.validate_config(c)
  return c
