"""DeeDiff on U-ViT: CIFAR-10, CelebA 64, ImageNet 256; the paper's recipe or the public one.

Two named recipes (`jaxee.train.config_base.DEEDIFF_RECIPES`):

* `paper` (default) — Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for
  Accelerating Diffusion Model Generation" (2023) as the paper trains it (`research/
  paper_results.md` §2.3): the UEM of Eq. 8 with timestep-specific w_t, b_t (generated from the
  time embedding) giving a per-element uncertainty map with the pseudo-target tanh|g_i − ε| of
  Eq. 9 (`uem='paper_map'`), exits at layers 1..N (`layout='outputs'`, the last being the
  backbone's own head), backbone + heads + UEMs trained jointly with L_simple + λL_u + βL_UAL,
  λ = β = 1, AdamW lr 2e-4, weight decay 0.03, (β₁, β₂) = (0.99, 0.99).
* `adadiff_public` — the public re-implementation `razvanmatisan/duodiff` (`research/
  ee_methods.md` §2.1–2.6, §5.2): one head and one MLP-probe UEM (token mean) at the input of
  every block (`layout='inputs'`, exit 0 runs no block), the backbone loaded and frozen
  (`--load_backbone --freeze_backbone`), its exact loss (`variant='public'`), betas (0.99, 0.999).
  `adadiff_public,variant=paper` is this file's former default (the public heads with the
  mean-reduced, detached loss).

Not stated in the paper, so both recipes take the public code's values: 1500 warm-up steps then
cosine to 0, grad clip 1.0, batch 128, no EMA, 100k steps (150k for ImageNet,
`scripts/train_deediff.sh`). The backbones are DuoDiff's U-ViTs (linear β chain,
t ∈ {0..999}; CIFAR-10/CelebA: 13 layers of width 512, ImageNet 256 latents: 21 layers of width
1024, 1001 classes), the paper's U-ViT-Small / U-ViT-Large sizes. θ is used at sampling time
(exported): 0.08 for CelebA (README), 0.075 for CIFAR-10 (the re-implementation's blog table),
0.07 for ImageNet (the middle of the notebook's sweep 0.05/0.07/0.09); the paper picks θ in
[0.01, 0.2] without a per-dataset value.

    jaxee-train --config=configs/deediff_uvit.py:celeba --workdir=runs/deediff_celeba \
        --config.init=ckpt/duodiff_celeba_uvit
    jaxee-train --config=configs/deediff_uvit.py:celeba,adadiff_public ...

Args: cifar10 (default) | celeba | imagenet256; paper (default) | adadiff_public; `threshold=θ`
(default per dataset); `variant=paper|public` (the loss reductions; default the recipe's);
`joint` (adadiff_public: train the backbone too); `runlocal`; `parallel=...`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


DATASETS = ("cifar10", "celeba", "imagenet256")
RECIPES = tuple(common.DEEDIFF_RECIPES)
THRESHOLDS = {"cifar10": 0.075, "celeba": 0.08, "imagenet256": 0.07}
STEPS = {"cifar10": 100_000, "celeba": 100_000, "imagenet256": 150_000}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """DeeDiff U-ViT for one dataset and recipe; see the module docstring for `arg`."""
  args = common.parse(arg, {"dataset": DATASETS, "recipe": RECIPES}, dataset="cifar10",
                      recipe="paper", variant="", threshold=-1.0, joint=False, runlocal=False,
                      parallel="shard_map", steps=0)
  recipe = common.DEEDIFF_RECIPES[args.recipe]
  c = common.base("deediff")
  backbone = common.DUODIFF_BACKBONES[args.dataset]
  common.set_model(c, backbone["arch"], **backbone["overrides"])
  c.init = f"{common.SET_ME}: the trained DuoDiff U-ViT backbone ({args.dataset})"
  data = common.DUODIFF_DATA[args.dataset]
  common.set_data(c, data["source"], 128, data["image_size"], **data["options"])
  common.duodiff_recipe(c, STEPS[args.dataset])
  c.optim.b1, c.optim.b2 = recipe["betas"]
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  theta = THRESHOLDS[args.dataset] if args.threshold == -1.0 else args.threshold
  section = dict(recipe["section"])
  if args.variant:
    section["variant"] = args.variant
  if args.joint:
    section["freeze_backbone"] = False
  c.deediff = common.deediff_section(theta, **section)
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=4, num_classes=-1,
                    default_schedule="linear_discrete")
    c.optim.warmup_steps = 1
    c.train.ema_decay = 0.0
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
