"""TABM block masks for an unconditional CIFAR-10 U-ViT sampled with DDPM.

The TABM objective of `jaxee/train/objectives/masks.py` (`research/ee_methods.md` §4.7, §5.5) on the
DDPM setting: the CIFAR-10 U-ViT of DuoDiff/DeeDiff (13 layers of width 512, trained on the linear
β chain; `config.init` its checkpoint) frozen, the teacher's ancestral DDPM trajectory (100
respaced steps by default, `steps=1000` for the full chain) from Gaussian noise, one score per
block (6 in-blocks, mid, 6 out-blocks; a skipped in-block's cached output is also its long skip),
block-output caching, binarise at 0.5, rectify (U-ViT skip consumers respected), save a
`MaskPlan`. λ₁ = λ₂ = 0.1 and 200 iterations per step over 32 trajectories are jaxee's choices
(TABM's values are not public).

    jaxee-train --config=configs/masks_ddpm_cifar10.py --workdir=runs/tabm_cifar \
        --config.init=ckpt/duodiff_cifar10_uvit

Args: `steps=100`; `runlocal` (tiny random U-ViT, DDPM-4); `samples=N`; `iters=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """TABM masks for the DDPM CIFAR-10 U-ViT; see the module docstring."""
  args = common.parse(arg, steps=100, runlocal=False, samples=32, iters=200)
  c = common.base("masks")
  backbone = common.DUODIFF_BACKBONES["cifar10"]
  common.set_model(c, backbone["arch"], **backbone["overrides"])
  c.init = f"{common.SET_ME}: the CIFAR-10 U-ViT (DuoDiff linear-chain) checkpoint"
  c.masks = common.masks_section(
      sampler="ddpm", steps=args.steps, guidance=None, labels="none", num_samples=args.samples,
      iters_per_step=args.iters, lr=1e-2, lambda1=0.1, lambda2=0.1,
      output=f"mask_plan_ddpm{args.steps}.npz")
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=4, num_classes=-1,
                    default_schedule="linear_discrete")
    c.masks.update(dict(steps=4, num_samples=2, iters_per_step=5, lr=0.05, lambda1=1e-2,
                        lambda2=1e-2, output="mask_plan_runlocal.npz"))
  return common.finish(c)
