"""ASE fine-tuning of U-ViT on CelebA 64 for the schedules D1/D2/D3/D6-U-ViT.

Moon et al. (ICML 2024): Table 5 U-ViT schedules, the §3.3 / §4.1 / App. A.3 recipe
(`research/ee_methods.md` §1.5, §5.1; `research/paper_results.md` §1.3; the U-ViT part of the
code was not released):

* init: the official U-ViT CelebA 64 model (U-ViT-S/4: 6 in-blocks, mid, 6 out-blocks;
  continuous VP-SDE, network time 999·t); per sample only the first n out-blocks' attention+MLP
  run (every `skip_linear` still runs, paper Fig. 8);
* loss: 'simple' — L_simple, the ε-MSE of U-ViT's `LSimple`. The paper fine-tunes both
  backbones with the hybrid loss, but U-ViT predicts ε only (no σ output); the VLB term of the
  hybrid loss trains only the learned variance (the mean is stop-gradient'd), so on U-ViT the
  hybrid loss *is* L_simple. jaxee adds no σ head (the pretrained model and its EM / DPM-Solver
  samplers have none); `loss='hybrid'` on U-ViT is a config error, not a silent switch;
* λ(t) = 1 + γ·(1 − n_i/6) on interval i (γ = `lambda_boost`; n_i decoder blocks of 6 run)
  until the loss plateaus, then 1 (`jaxee/train/objectives/ase.py`);
* AdamW lr 2e-5 with cosine annealing over the run (§4.1), weight decay 0, betas (0.9, 0.999);
* EMA 0.9999 ("a high EMA rate"; value as in the DiT config);
* budget per schedule from Table 6 (§4.1 says batch 128 for U-ViT-S/4; Table 6 gives 128 for
  D1/D2 and 64 for D3/D6 and is followed, being per schedule):

  | schedule | iterations × batch |
  |---|---|
  | D1-U-ViT | 40K × 128 |
  | D2-U-ViT | 50K × 128 |
  | D3-U-ViT | 150K × 64 |
  | D6-U-ViT | 200K × 64 |

Data: U-ViT's CelebA 64 recipe (`jaxee.data` 'celeba64').

    jaxee-train --config=configs/ase_uvit_celeba.py:D6 --workdir=runs/ase_uvit_d6 \
        --config.init=ckpt/celeba_uvit_small

Args: D1 | D2 | D3 (default) | D6 (also `schedule=D6`); `runlocal` (tiny U-ViT with 5
out-blocks, the schedule rescaled to them — 5 is the fewest at which every U-ViT table stays
graded over t, so λ(t) is too); `lambda_mode=...`; `parallel=...`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SCHEDULES = ("D1", "D2", "D3", "D6")
# Paper Table 6 (CelebA, U-ViT): iterations × batch size per schedule.
BUDGETS = {"D1": (40_000, 128), "D2": (50_000, 128), "D3": (150_000, 64), "D6": (200_000, 64)}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """ASE U-ViT CelebA 64 for one schedule; see the module docstring for `arg`."""
  args = common.parse(arg, {"schedule": SCHEDULES}, schedule="D3", runlocal=False,
                      lambda_mode=common.ASE_DEFAULTS["lambda_mode"], parallel="shard_map",
                      steps=0)
  num_steps, batch_size = BUDGETS[args.schedule]
  c = common.base("ase")
  common.set_model(c, "uvit_s4_celeba64")
  c.init = f"{common.SET_ME}: converted U-ViT CelebA 64 dir or celeba_uvit_small.pth"
  common.set_data(c, "celeba64", batch_size, 64)
  c.optim.lr = 2e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.train.num_steps = num_steps
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.ema_decay = 0.9999
  c.ase = common.ase_section(f"{args.schedule}-U-ViT", loss="simple",
                             lambda_mode=args.lambda_mode)
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=10, num_classes=-1)
    c.ase.scale_to_model = True
    c.ase.cycle_length = 2
    c.ase.plateau_window = 1
    c.ase.plateau_patience = 1
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
