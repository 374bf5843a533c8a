"""TABM block masks for DiT-XL/2 ImageNet 256 with DDIM-50 / DDIM-100.

Timestep-Aware Block Masking (arXiv 2603.19939; `research/ee_methods.md` §4.7, §5.5;
`jaxee/train/objectives/masks.py`): the released DiT-XL/2-256 (EMA) frozen; per DDIM step a block
score vector optimised along the teacher's own CFG-1.5 trajectory from Gaussian noise (no data)
with ‖x_end − x_end^orig‖₂ + λ₁·w(t)·Σs + λ₂·w(t)·Σs(1−s), block-output caching, binarised at
0.5, rectified and saved as a `MaskPlan` (`WORKDIR/mask_plan_ddim50.npz`) for
`jaxee.sample(..., sampler='ddim', steps=50, plan=load_mask_plan(path))`. TABM's λ values, step
counts and batch are not public: λ₁ = λ₂ = 1 (the per-sample L2 norm of DiT-XL/2's final
features is O(10³), so skipping a block must cost less than ~0.1 % of it), 200 Adam iterations
per step at lr 1e-2 over 16 trajectories (32 network rows with CFG) are jaxee's choices; the
w(t) table (0.1/0.5 → 2.0/1.5/1.0) and θ = 0.5 are the paper's.

    jaxee-train --config=configs/masks_dit_imagenet256.py:ddim100 \
        --workdir=runs/tabm_ddim100 --config.init=ckpt/dit_xl_2_256

Args: ddim50 (default) | ddim100; `runlocal` (tiny random DiT, DDIM-4, 2 trajectories);
`samples=N`; `iters=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SETTINGS = {"ddim50": 50, "ddim100": 100}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """TABM masks for DiT-XL/2 256 and one DDIM step count; see the module docstring."""
  args = common.parse(arg, {"setting": tuple(SETTINGS)}, setting="ddim50", runlocal=False,
                      samples=16, iters=200)
  c = common.base("masks")
  common.set_model(c, "dit_xl_2", input_size=32, num_classes=1000)
  c.init = f"{common.SET_ME}: converted DiT-XL/2-256 dir or DiT-XL-2-256x256.pt"
  c.masks = common.masks_section(
      sampler="ddim", steps=SETTINGS[args.setting], guidance=1.5, num_samples=args.samples,
      iters_per_step=args.iters, lr=1e-2, lambda1=1.0, lambda2=1.0,
      output=f"mask_plan_{args.setting}.npz")
  if args.runlocal:
    common.runlocal(c, family="dit", depth=4)
    c.masks.update(dict(steps=4, num_samples=2, iters_per_step=5, lr=0.05, lambda1=1e-2,
                        lambda2=1e-2, output="mask_plan_runlocal.npz"))
  return common.finish(c)
