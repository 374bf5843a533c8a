"""ASE fine-tuning of U-ViT on CelebA 64 for the schedules D1/D2/D3/D6-U-ViT.

Moon et al. (ICML 2024), Table 5 U-ViT schedules (`research/ee_methods.md` §1.5, §5.1; the U-ViT
part was not released): the official U-ViT CelebA 64 model (U-ViT-S/4: 6 in-blocks, mid, 6
out-blocks; continuous VP-SDE, network time 999·t) fine-tuned with, per sample, only the first n
out-blocks' attention+MLP kept (every `skip_linear` still runs, paper Fig. 8), the ε-MSE loss
(U-ViT `LSimple`), AdamW lr 2e-5 with a cosine schedule, EMA 0.9999, batch 128 (paper) and λ(t)
as in the DiT config. Data: U-ViT's CelebA 64 recipe (`jaxee.data` 'celeba64'). The number of
steps is not given by the sources (jaxee uses 50k).

    jaxee-train --config=configs/ase_uvit_celeba.py:D6 --workdir=runs/ase_uvit_d6 \
        --config.init=ckpt/celeba_uvit_small

Args: D1 | D2 | D3 (default) | D6; `runlocal` (tiny U-ViT with 2 out-blocks, schedule
rescaled); `lambda_mode=...`; `parallel=...`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SCHEDULES = ("D1", "D2", "D3", "D6")


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """ASE U-ViT CelebA 64 for one schedule; see the module docstring for `arg`."""
  args = common.parse(arg, {"schedule": SCHEDULES}, schedule="D3", runlocal=False,
                      lambda_mode="plateau", parallel="shard_map", steps=0)
  c = common.base("ase")
  common.set_model(c, "uvit_s4_celeba64")
  c.init = f"{common.SET_ME}: converted U-ViT CelebA 64 dir or celeba_uvit_small.pth"
  common.set_data(c, "celeba64", 128, 64)
  c.optim.lr = 2e-5
  c.optim.schedule = "cosine"
  c.train.num_steps = 50_000
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.ema_decay = 0.9999
  c.ase = common.ase_section(f"{args.schedule}-U-ViT", lambda_mode=args.lambda_mode)
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=4, num_classes=-1)
    c.ase.scale_to_model = True
    c.ase.cycle_length = 2
    c.ase.plateau_window = 1
    c.ase.plateau_patience = 1
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
