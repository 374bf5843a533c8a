"""TABM masks for DiT-XL/2 ImageNet 256 with DDIM-100 (the paper's setting) or DDIM-50.

Timestep-Aware Block Masking (arXiv 2603.19939; `research/ee_methods.md` §4.7, §5.5;
`research/paper_results.md` §4.3; `jaxee/train/objectives/masks.py`): the released DiT-XL/2-256
(EMA) frozen; per DDIM step a score vector over the MHA and MLP sub-layers (the paper's DiT
granularity, §3.2: `unit='branch'`, 56 units, per-unit output replacement) optimised along the
teacher's own CFG-1.5 trajectory from Gaussian noise (no data) with ‖x_end − x_end^orig‖₂ +
λ₁·w(t)·Σs + λ₂·w(t)·Σs(1−s), w(t) from δ measured against the next executed step (the paper's
t−1), binarised at 0.5, rectified and saved as a `MaskPlan` (`WORKDIR/mask_plan_ddim100.npz`) for
`jaxee.sample(..., sampler='ddim', steps=100, plan=load_mask_plan(path))`. Paper's values: DDIM
NFE 100 at 256 (Table 2), MHA/MLP units, the w(t) table (0.1/0.5 → 2.0/1.5/1.0), θ = 0.5. Not
public, jaxee's choices: λ₁ = λ₂ = 1 (the per-sample L2 norm of DiT-XL/2's final features is
O(10³), so skipping a unit must cost less than ~0.1 % of it), 200 Adam iterations per step at lr
1e-2 over 16 trajectories (32 network rows with CFG), guidance 1.5 (the paper states none).

    jaxee-train --config=configs/masks_dit_imagenet256.py --workdir=runs/tabm_ddim100 \
        --config.init=ckpt/dit_xl_2_256

Args: ddim100 (default) | ddim50; `unit=branch` (default) | `unit=block` (one score per block);
`runlocal` (tiny random DiT, DDIM-4, 2 trajectories); `samples=N`; `iters=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SETTINGS = {"ddim100": 100, "ddim50": 50}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """TABM masks for DiT-XL/2 256 and one DDIM step count; see the module docstring."""
  args = common.parse(arg, {"setting": tuple(SETTINGS)}, setting="ddim100", runlocal=False,
                      samples=16, iters=200, unit="branch")
  c = common.base("masks")
  common.set_model(c, "dit_xl_2", input_size=32, num_classes=1000)
  c.init = f"{common.SET_ME}: converted DiT-XL/2-256 dir or DiT-XL-2-256x256.pt"
  c.masks = common.masks_section(
      sampler="ddim", steps=SETTINGS[args.setting], guidance=1.5, num_samples=args.samples,
      iters_per_step=args.iters, lr=1e-2, lambda1=1.0, lambda2=1.0, unit=args.unit,
      delta_direction="next", output=f"mask_plan_{args.setting}.npz")
  if args.runlocal:
    common.runlocal(c, family="dit", depth=4)
    c.masks.update(dict(steps=4, num_samples=2, iters_per_step=5, lr=0.05, lambda1=1e-2,
                        lambda2=1e-2, output="mask_plan_runlocal.npz"))
  return common.finish(c)
