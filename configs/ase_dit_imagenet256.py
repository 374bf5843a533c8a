"""ASE fine-tuning of DiT-XL/2 on ImageNet 256 (latents) for the schedules D2/D3/D4/D7-DiT.

Moon et al., "A Simple Early Exiting Framework for Accelerated Sampling in Diffusion Models"
(ICML 2024), Table 5 schedules and `ee-diffusion/DiT/train_ase.py` (`research/ee_methods.md`
§1.7, §5.1): the released DiT-XL-2-256x256 (EMA) weights fine-tuned with every sample truncated
at its schedule depth, DiT's hybrid loss (ε-MSE + VLB, learned σ), the time embedder frozen,
AdamW lr 2e-5 (the issue's value; the released script hard-codes 1e-5), weight decay 0, EMA
0.9999, global batch 64, CFG label dropout 0.1, one epoch of ImageNet (1,281,167 / 64 steps).
λ(t) = `lambda_boost` on the intervals whose blocks are dropped until the loss plateaus, then 1
(jaxee's reading of Alg. 1; `jaxee/train/objectives/ase.py`). Data: pre-extracted sd-vae-ft-mse
moments (`jaxee.data.latents`, z = mean + σ·ε re-drawn per epoch; §6.1 item 6).

    jaxee-train --config=configs/ase_dit_imagenet256.py:D4 --workdir=runs/ase_d4 \
        --config.init=ckpt/dit_xl_2_256 --config.data.source=latents:/data/in256_moments

Args (`:arg`, comma-separated): a schedule name D2 | D3 (default) | D4 | D7; `runlocal` (tiny
DiT of depth 4 with the schedule rescaled to it, 3 steps on 8x8 digits); `lambda_mode=cycle`
(plateau | cycle | constant); `parallel=pmap`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SCHEDULES = ("D2", "D3", "D4", "D7")


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """ASE DiT-XL/2 ImageNet-256 for one schedule; see the module docstring for `arg`."""
  args = common.parse(arg, {"schedule": SCHEDULES}, schedule="D3", runlocal=False,
                      lambda_mode="plateau", parallel="shard_map", steps=0)
  c = common.base("ase")
  common.set_model(c, "dit_xl_2", input_size=32, num_classes=1000)
  c.init = f"{common.SET_ME}: converted DiT-XL/2-256 dir or DiT-XL-2-256x256.pt"
  common.set_data(c, f"latents:{common.SET_ME}/imagenet256_sd_vae_ft_mse_moments", 64, 32,
                  include_flips=True)
  c.optim.lr = 2e-5
  c.optim.weight_decay = 0.0
  c.train.num_steps = 1_281_167 // 64
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.ema_decay = 0.9999
  c.ase = common.ase_section(f"{args.schedule}-DiT", lambda_mode=args.lambda_mode)
  if args.runlocal:
    common.runlocal(c, family="dit", depth=4)
    c.ase.scale_to_model = True
    c.ase.cycle_length = 2
    c.ase.plateau_window = 1
    c.ase.plateau_patience = 1
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
