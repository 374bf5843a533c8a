"""TABM masks for DiT-XL/2 ImageNet 512 with DDIM-50 (the paper's setting, Table 2).

As `configs/masks_dit_imagenet256.py` (read its docstring for the method and the readings) for
the released DiT-XL/2-512 (EMA; 64×64×4 latents, 1024 tokens): MHA/MLP units (`unit='branch'`,
56 units, per-unit output replacement), DDIM NFE 50, CFG 1.5 (the paper states no scale), δ
against the next executed step, θ = 0.5, the w(t) table of the paper. Not public, jaxee's
choices: λ₁ = λ₂ = 1, 200 Adam iterations per step at lr 1e-2, 8 trajectories (16 network rows
with CFG: one forward+backward of DiT-XL/2 at 1024 tokens per iteration; the paper trained this
setting on one RTX 4090 in under 3 h). Writes `WORKDIR/mask_plan_ddim50.npz` for
`jaxee.sample(..., sampler='ddim', steps=50, plan=load_mask_plan(path))`.

    jaxee-train --config=configs/masks_dit_imagenet512.py --workdir=runs/tabm512 \
        --config.init=ckpt/dit_xl_2_512

Args: `unit=branch` (default) | `unit=block`; `runlocal` (tiny random DiT, DDIM-4);
`samples=N`; `iters=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common

STEPS = 50


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """TABM masks for DiT-XL/2 512 with DDIM-50; see the module docstring."""
  args = common.parse(arg, runlocal=False, samples=8, iters=200, unit="branch")
  c = common.base("masks")
  common.set_model(c, "dit_xl_2", input_size=64, num_classes=1000)
  c.init = f"{common.SET_ME}: converted DiT-XL/2-512 dir or DiT-XL-2-512x512.pt"
  c.masks = common.masks_section(
      sampler="ddim", steps=STEPS, guidance=1.5, num_samples=args.samples,
      iters_per_step=args.iters, lr=1e-2, lambda1=1.0, lambda2=1.0, unit=args.unit,
      delta_direction="next", output=f"mask_plan_ddim{STEPS}.npz")
  if args.runlocal:
    common.runlocal(c, family="dit", depth=4)
    c.masks.update(dict(steps=4, num_samples=2, iters_per_step=5, lr=0.05, lambda1=1e-2,
                        lambda2=1e-2, output="mask_plan_runlocal.npz"))
  return common.finish(c)
