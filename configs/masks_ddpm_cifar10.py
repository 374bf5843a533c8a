"""TABM block masks for the unconditional DDPM CIFAR-10 U-Net sampled with DDIM-100.

The paper's DDPM setting (TABM, arXiv 2603.19939, Table 1; `research/paper_results.md` §4.2:
"All the methods here adopt 100 DDIM steps"): the released DDPM CIFAR-10 U-Net
(`google/ddpm-cifar10-32`, preset `unet_ddpm_cifar10`, trained on the linear β
chain β₁ = 1e-4 … β_T = 0.02, T = 1000; `config.init` its converted checkpoint) frozen,
unconditional, the teacher's deterministic DDIM trajectory (η = 0, 100 steps on the uniform grid
0, 10, …, 990) from Gaussian noise, one score per ResBlock/AttnBlock (the backbone contract's
'block' units of `jaxee/models/unet_units.py`: 10 down, 3 mid, 15 up = 28 units), block-output
caching (a cached down unit also supplies its cached output as its skip), binarise at 0.5,
rectify (U-Net skip consumers respected, `Backbone.skip_consumers`), save a `MaskPlan`.
λ₁ = λ₂ = 0.1 and 200 iterations per step over 32 trajectories are jaxee's choices (TABM's
values are not public).

    jaxee-convert --arch unet_ddpm_cifar10 --src ddpm-cifar10-32/diffusion_pytorch_model.bin \
        --out ckpt/ddpm_cifar10
    jaxee-train --config=configs/masks_ddpm_cifar10.py --workdir=runs/tabm_cifar \
        --config.init=ckpt/ddpm_cifar10

Args: `steps=100`; `runlocal` (tiny random U-Net on 8×8 digits, DDIM-4); `samples=N`; `iters=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """TABM masks for the DDPM CIFAR-10 U-Net; see the module docstring."""
  args = common.parse(arg, steps=100, runlocal=False, samples=32, iters=200)
  c = common.base("masks")
  common.set_model(c, "unet_ddpm_cifar10")
  c.init = f"{common.SET_ME}: the converted google/ddpm-cifar10-32 U-Net (jaxee-convert)"
  c.masks = common.masks_section(
      sampler="ddim", steps=args.steps, sampler_options={"eta": 0.0},
      schedule="linear_discrete", guidance=None, labels="none", num_samples=args.samples,
      iters_per_step=args.iters, lr=1e-2, lambda1=0.1, lambda2=0.1,
      output=f"mask_plan_ddim{args.steps}.npz")
  if args.runlocal:
    common.runlocal(c, family="unet")
    c.masks.update(dict(steps=4, num_samples=2, iters_per_step=5, lr=0.05, lambda1=1e-2,
                        lambda2=1e-2, output="mask_plan_runlocal.npz"))
  return common.finish(c)
