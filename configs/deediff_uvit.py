"""DeeDiff (AdaDiff) exit heads + uncertainty modules on U-ViT: CIFAR-10, CelebA 64, ImageNet 256.

Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion Model
Generation" (2023), as re-implemented in `razvanmatisan/duodiff` (`research/ee_methods.md`
§2.1–2.6, §5.2): L = L_simple + λ·L_u + β·L_UAL with λ = β = 1, one head and one MLP-probe UEM
at the input of every block, the backbone loaded and frozen (`--load_backbone --freeze_backbone`),
AdamW lr 2e-4, betas (0.99, 0.999), weight decay 0.03, 1500 warm-up steps then cosine to 0, grad
clip 1.0, batch 128, no EMA, 100k steps (150k for ImageNet, `scripts/train_deediff.sh`). The
backbones are DuoDiff's U-ViTs (linear β chain, t ∈ {0..999}; CIFAR-10/CelebA: 13 layers of width
512, ImageNet 256 latents: 21 layers of width 1024, 1001 classes). θ is used at sampling time
(exported): 0.08 for CelebA (README), 0.075 for CIFAR-10 (the re-implementation's blog table),
0.07 for ImageNet (the middle of the notebook's sweep 0.05/0.07/0.09).

    jaxee-train --config=configs/deediff_uvit.py:celeba --workdir=runs/deediff_celeba \
        --config.init=ckpt/duodiff_celeba_uvit

Args: cifar10 (default) | celeba | imagenet256; `threshold=θ` (default per dataset);
`variant=public` (the public code's summed, undetached reductions); `joint` (train the backbone
too); `runlocal`; `parallel=...`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


DATASETS = ("cifar10", "celeba", "imagenet256")
THRESHOLDS = {"cifar10": 0.075, "celeba": 0.08, "imagenet256": 0.07}
STEPS = {"cifar10": 100_000, "celeba": 100_000, "imagenet256": 150_000}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """DeeDiff U-ViT for one dataset; see the module docstring for `arg`."""
  args = common.parse(arg, {"dataset": DATASETS}, dataset="cifar10", variant="paper",
                      threshold=-1.0, joint=False, runlocal=False, parallel="shard_map",
                      steps=0)
  c = common.base("deediff")
  backbone = common.DUODIFF_BACKBONES[args.dataset]
  common.set_model(c, backbone["arch"], **backbone["overrides"])
  c.init = f"{common.SET_ME}: the trained DuoDiff U-ViT backbone ({args.dataset})"
  data = common.DUODIFF_DATA[args.dataset]
  common.set_data(c, data["source"], 128, data["image_size"], **data["options"])
  common.duodiff_recipe(c, STEPS[args.dataset])
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  theta = THRESHOLDS[args.dataset] if args.threshold == -1.0 else args.threshold
  c.deediff = common.deediff_section(theta, variant=args.variant,
                                     freeze_backbone=not args.joint)
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=4, num_classes=-1,
                    default_schedule="linear_discrete")
    c.optim.warmup_steps = 1
    c.train.ema_decay = 0.0
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
