"""ASE fine-tuning of DiT-XL/2 on ImageNet 256 (latents) for the schedules D2/D3/D4/D7-DiT.

Moon et al., "A Simple Early Exiting Framework for Accelerated Sampling in Diffusion Models"
(ICML 2024): Table 5 schedules, the §3.3 / §4.1 / App. A.3 recipe and `ee-diffusion/DiT/
train_ase.py` (`research/ee_methods.md` §1.7, §5.1; `research/paper_results.md` §1.3):

* init: the released DiT-XL-2-256x256 (EMA) weights; every sample truncated at its schedule depth;
* loss: 'hybrid' (ε-MSE + VLB with learned σ, the paper's hybrid loss) × λ(t), where
  λ_i = 1 + γ·(1 − n_i/28) on interval i (γ = `lambda_boost`) until the loss plateaus, then 1
  (jaxee's reading of Alg. 1, `jaxee/train/objectives/ase.py`);
* AdamW lr 2e-5 (paper §4.1; the released script hard-codes 1e-5), weight decay 0 and betas
  (0.9, 0.999) (released script), constant LR (the paper states cosine for U-ViT only);
* EMA 0.9999 (the paper says "a high EMA rate"; the value is the released script's);
* time embedder frozen, CFG label dropout 0.1 (`train_dit.sh`);
* budget per schedule from Table 6, batch 32 (§4.1 says 64: Table 6 is followed, because it is
  per schedule and its percentages are iterations × batch relative to the 400K × 256
  pre-training):

  | schedule | iterations × batch |
  |---|---|
  | D2-DiT | 400K × 32 |
  | D3-DiT | 450K × 32 |
  | D4-DiT | 500K × 32 |
  | D7-DiT | 500K × 32 |

  ASSUMPTION: the extracted DiT half of Table 6 lost its row labels and keeps three fine-tuning
  rows (400K, 450K, 500K × 32) for four schedules. jaxee reads them in order of increasing drop,
  as in the table's U-ViT half (where the budget grows with the drop): D2 → 400K, D3 → 450K, and
  D4 and D7 both → 500K.

Data: pre-extracted sd-vae-ft-mse moments (`jaxee.data.latents`, z = mean + σ·ε re-drawn per
epoch; §6.1 item 6).

    jaxee-train --config=configs/ase_dit_imagenet256.py:D4 --workdir=runs/ase_d4 \
        --config.init=ckpt/dit_xl_2_256 --config.data.source=latents:/data/in256_moments

Args (`:arg`, comma-separated): a schedule name D2 | D3 (default) | D4 | D7 (also `schedule=D4`);
`runlocal` (tiny DiT of depth 4 with the schedule rescaled to it, 3 steps on 8x8 digits);
`lambda_mode=cycle` (plateau (default) | cycle | constant); `parallel=pmap`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


SCHEDULES = ("D2", "D3", "D4", "D7")
# Paper Table 6 (ImageNet, DiT), rows mapped to schedules as the docstring states.
BUDGETS = {"D2": (400_000, 32), "D3": (450_000, 32), "D4": (500_000, 32), "D7": (500_000, 32)}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """ASE DiT-XL/2 ImageNet-256 for one schedule; see the module docstring for `arg`."""
  args = common.parse(arg, {"schedule": SCHEDULES}, schedule="D3", runlocal=False,
                      lambda_mode=common.ASE_DEFAULTS["lambda_mode"], parallel="shard_map",
                      steps=0)
  num_steps, batch_size = BUDGETS[args.schedule]
  c = common.base("ase")
  common.set_model(c, "dit_xl_2", input_size=32, num_classes=1000)
  c.init = f"{common.SET_ME}: converted DiT-XL/2-256 dir or DiT-XL-2-256x256.pt"
  common.set_data(c, f"latents:{common.SET_ME}/imagenet256_sd_vae_ft_mse_moments", batch_size,
                  32, include_flips=True)
  c.optim.lr = 2e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  c.train.num_steps = num_steps
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.ema_decay = 0.9999
  c.ase = common.ase_section(f"{args.schedule}-DiT", loss="hybrid", lambda_mode=args.lambda_mode)
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
