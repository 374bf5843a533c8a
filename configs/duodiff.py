"""DuoDiff: train the shallow (3-layer) U-ViT of the dual backbone; CIFAR-10, CelebA, ImageNet.

DuoDiff (Gallo Fernández, Matişan, Monroy Muñoz, Vasilcoiu, Partyka, Hadži Veljković and
Jazbec) as released in `razvanmatisan/duodiff` (`research/ee_methods.md` §3, §5.3): the shallow
U-ViT (1 in-block, the mid block, 1 out-block: one long skip) trained, like
the deep one, from scratch with plain ε-MSE over all t of the linear β chain (t ∈ {0..999}),
AdamW lr 2e-4, betas (0.99, 0.999), weight decay 0.03, 1500 warm-up steps then cosine, clip 1.0,
batch 128, no EMA, 500k steps, and no label dropout for the class-conditional ImageNet models
(`objectives.duodiff.make_duodiff_loss`; `config.loss.label_dropout` sets one). CIFAR-10 and
CelebA U-ViTs take t/1000 (`normalize_timesteps=True`, as DuoDiff's configs), ImageNet the
integer t. The deep backbone (`config.model`: 13 layers for CIFAR-10 and
CelebA, 17 for ImageNet 64, 21 for ImageNet 256 latents) is the one the sampler switches to
after t_s steps from the noise end (`t_switch`, README 300; the paper's sweep 300/400/500);
`init=deep` instead starts the shallow model from the deep checkpoint's first blocks.
The export (`WORKDIR/export` + `duodiff.json`) gives `exits.duodiff.DuoDiffPlan` through
`jaxee.train.methods.load_duodiff_plan`.

    jaxee-train --config=configs/duodiff.py:celeba,t_switch=400 --workdir=runs/duo_celeba

DuoDiff samples with DDPM-1000 and the posterior variance β̃ (`jaxee.sample(..., sampler='ddpm',
steps=1000, var_type='fixed_small')`), or DDIM on its grid `linspace(0, 999, N).astype(int)`
(`sampler='ddim', grid='duodiff'`).

Args: cifar10 (default) | celeba | imagenet64 | imagenet256; `t_switch=300`; `layers=3`;
`init=scratch|deep`; `runlocal`; `parallel=...`; `steps=N`.
"""
from ml_collections import config_dict

from jaxee import configs_common as common


DATASETS = ("cifar10", "celeba", "imagenet64", "imagenet256")
# DuoDiff's configs with `normalize_timesteps: true` (the network receives t/1000, §0.2, §3.1).
NORMALIZED_TIME = ("cifar10", "celeba")


def get_config(arg: str = "") -> config_dict.ConfigDict:
  """DuoDiff shallow-backbone training for one dataset; see the module docstring for `arg`."""
  args = common.parse(arg, {"dataset": DATASETS}, dataset="cifar10", t_switch=300.0, layers=3,
                      init="scratch", runlocal=False, parallel="shard_map", steps=0)
  c = common.base("duodiff")
  backbone = common.DUODIFF_BACKBONES[args.dataset]
  time_kw = dict(normalize_timesteps=True) if args.dataset in NORMALIZED_TIME else {}
  common.set_model(c, backbone["arch"], **backbone["overrides"], **time_kw)
  c.init = ""          # set to the deep checkpoint with init=deep
  data = common.DUODIFF_DATA[args.dataset]
  common.set_data(c, data["source"], 128, data["image_size"], **data["options"])
  common.duodiff_recipe(c, 500_000)
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.duodiff = common.duodiff_section(args.t_switch, shallow_layers=args.layers, init=args.init)
  if args.runlocal:
    common.runlocal(c, family="uvit", depth=4, num_classes=-1,
                    default_schedule="linear_discrete", **time_kw)
    c.optim.warmup_steps = 1
    c.train.ema_decay = 0.0
  c.train.parallel = args.parallel
  if args.steps:
    c.train.num_steps = args.steps
  return common.finish(c)
