"""jaxee against the official PyTorch models on the same CPU, timed alternately in one process.

    pip install -e '.[bench]'            # torch + timm + einops (optional; never imported by jaxee)
    python tools/bench_vs_torch.py --dit-src ~/src/DiT --uvit-src ~/src/U-ViT --json

`--dit-src` is a checkout of facebookresearch/DiT (its `models.py` and `diffusion/` are imported
from there), `--uvit-src` one of baofff/U-ViT (`libs/uvit.py`). Nothing of those repositories is
part of jaxee; this tool loads them from the paths the user gives.

For each model: the official module is built with PyTorch's random init (DiT's zero-initialised
adaLN and final layers are filled with N(0, 0.02) so no block is an identity), its state dict is
converted with `jaxee.convert.from_torch` (the same strict path as a real checkpoint) and both
are run on the same inputs: the max |difference| of one forward is reported (a parity check).
Then, alternating in rounds (the order flips every round; every call ends with
`block_until_ready` / returns a realised tensor), it times

* `forward`: one network evaluation (batch `--batch`, fp32), `torch.inference_mode()` against
  a jitted `model.apply`;
* `loop`: a whole DDIM-`--steps` sampling run — DiT: the official `create_diffusion(f"ddim{steps}")`
  `ddim_sample_loop` with `forward_with_cfg` at `--guidance` (the batch doubled for CFG) against
  `jaxee.sample(sampler='ddim', guidance=...)`, whose samples are compared too; U-ViT (CelebA is
  unconditional): a DDIM loop written here around the official network (the official repository
  samples with DPM-Solver; the update arithmetic is negligible next to the network) against
  `jaxee.sample(sampler='ddim')`.

Reported per (model, part): the median of per-round time ratios torch / jaxee (> 1: jaxee is
faster) with a bootstrap 95 % interval, the medians and the fastest times of both. The machine's
other load shifts both sides of a round together, which is why the per-round ratio is the
estimate. `--threads` sets torch's intra-op threads (default: all cores, as XLA's CPU backend
uses).

If `timm` cannot import `torchvision` (e.g. a CUDA-only torchvision wheel next to a CPU torch;
DiT's `models.py` uses only timm's `PatchEmbed`, `Attention` and `Mlp`), `--torchvision-standin`
installs an inert stand-in module before importing timm so that import succeeds; nothing of it is
called by the models timed here.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import platform
import statistics
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_exits  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dit-src", default=None, help="checkout of facebookresearch/DiT")
  p.add_argument("--uvit-src", default=None, help="checkout of baofff/U-ViT")
  p.add_argument("--dit", default="DiT-S/2", help="official DiT_models key")
  p.add_argument("--dit-input-size", type=int, default=32, help="latent side (32: 256 tokens)")
  p.add_argument("--uvit", default="uvit_s4_celeba64", help="jaxee U-ViT preset")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--guidance", type=float, default=1.5, help="DiT CFG scale of the loop")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--parts", default="forward,loop")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  p.add_argument("--torchvision-standin", action="store_true")
  p.add_argument("--json", action="store_true", help="print only the JSON lines")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# An inert `torchvision` for timm's imports (see the module docstring).


class _StandinMeta(type):
  made: dict = {}

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _standin(f"{cls.__name__}.{name}")


def _standin(qualname: str):
  if qualname not in _StandinMeta.made:
    _StandinMeta.made[qualname] = _StandinMeta(qualname, (object,), {})
  return _StandinMeta.made[qualname]


class _StandinModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _standin(f"{self.__name__}.{name}")


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StandinModule(spec.name)
    module.__path__ = []
    module.__version__ = "0+standin"
    return module

  def exec_module(self, module):
    pass


# ------------------------------------------------------------------------------------------------


def alternate(torch_call, jax_call, rounds: int) -> dict:
  """Per-round times of both calls (order flipping per round) and the ratio statistics."""
  t_times, j_times = [], []
  for r in range(rounds):
    order = [("torch", torch_call), ("jaxee", jax_call)]
    if r % 2:
      order.reverse()
    for name, call in order:
      t0 = time.perf_counter()
      call()
      (t_times if name == "torch" else j_times).append(time.perf_counter() - t0)
  ratios = np.asarray(t_times) / np.asarray(j_times)
  lo, hi = bench_exits.bootstrap_median_ci(ratios, 2000)
  return {"jaxee_speed_vs_torch": round(float(np.median(ratios)), 3),
          "ci95": [round(lo, 3), round(hi, 3)],
          "torch_median_s": round(statistics.median(t_times), 4),
          "jaxee_median_s": round(statistics.median(j_times), 4),
          "torch_min_s": round(min(t_times), 4), "jaxee_min_s": round(min(j_times), 4),
          "ratio_of_fastest": round(min(t_times) / min(j_times), 3),
          "rounds": rounds, "round_ratios": [round(float(x), 3) for x in ratios]}


def compared(torch_call, jax_call, rounds: int) -> dict:
  """Max |difference| of the two calls' outputs (NCHW vs NHWC) and their `alternate` timing."""
  ref = np.asarray(torch_call().numpy())
  got = np.asarray(jax_call()).transpose(0, 3, 1, 2)
  return dict(max_abs_diff=float(np.abs(ref - got).max()),
              **alternate(torch_call, jax_call, rounds))


def _randomise_zeros(torch, module) -> None:
  """Fills all-zero parameters (DiT's adaLN-Zero / final layer init) with N(0, 0.02)."""
  with torch.no_grad():
    for p in module.parameters():
      if not p.detach().abs().sum():
        p.normal_(0.0, 0.02)


def _state_dict(module) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def bench_dit(args, torch, parts) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee import convert, models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.dit_src))
  import models as dit_models  # pylint: disable=g-import-not-at-top
  from diffusion import create_diffusion  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  official = dit_models.DiT_models[args.dit](input_size=args.dit_input_size).eval()
  _randomise_zeros(torch, official)
  arch = args.dit.lower().replace("-", "_").replace("/", "_")
  model = models.create(arch, input_size=args.dit_input_size)
  params = jax.device_put(convert.from_torch(_state_dict(official), arch,
                                             input_size=args.dit_input_size))
  rng = np.random.default_rng(0)
  b, s, c = args.batch, args.dit_input_size, model.in_channels
  x = rng.standard_normal((b, c, s, s)).astype(np.float32)
  t = rng.integers(0, 1000, b).astype(np.float32)
  y = rng.integers(0, 1000, b).astype(np.int64)
  xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
  xj, tj, yj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y, jnp.int32)
  fwd = jax.jit(lambda p, x_, t_, y_: model.apply({"params": p}, x_, t_, y_))
  common = {"model": f"official {args.dit} vs jaxee {arch}", "tokens": model.num_tokens,
            "batch": b}
  out = []
  if "forward" in parts:
    with torch.inference_mode():
      ref = official(xt, tt, yt).numpy()
    got = np.asarray(fwd(params, xj, tj, yj)).transpose(0, 3, 1, 2)
    rec = alternate(lambda: _torch_forward(torch, official, xt, tt, yt),
                    lambda: jax.block_until_ready(fwd(params, xj, tj, yj)), args.rounds)
    out.append(dict(common, part="forward", max_abs_diff=float(np.abs(ref - got).max()), **rec))
  if "loop" in parts:
    # "ddimN": DiT's stride spacing (range(0, 1000, 1000 // N)), the grid jaxee's DDIM uses;
    # plain "N" would be the evenly spaced sections of the ancestral sampler's respacing.
    diffusion = create_diffusion(f"ddim{args.steps}")
    z = torch.from_numpy(x)
    y_null = torch.full_like(yt, 1000)

    def torch_loop():
      with torch.inference_mode():
        zz = torch.cat([z, z], 0)
        kwargs = dict(y=torch.cat([yt, y_null], 0), cfg_scale=args.guidance)
        s_ = diffusion.ddim_sample_loop(official.forward_with_cfg, zz.shape, zz,
                                        clip_denoised=False, model_kwargs=kwargs,
                                        progress=False, device="cpu")
        return s_.chunk(2, dim=0)[0]

    def jax_loop():
      return jax.block_until_ready(jaxee.sample(
          model, params, jax.random.PRNGKey(0), x_T=xj, labels=yj, sampler="ddim",
          steps=args.steps, guidance=args.guidance))

    out.append(dict(common, part=f"loop ddim{args.steps} cfg{args.guidance}",
                    **compared(torch_loop, jax_loop, args.rounds)))
  sys.path.remove(os.path.abspath(args.dit_src))
  return out


def _torch_forward(torch, module, *inputs):
  with torch.inference_mode():
    return module(*inputs)


def bench_uvit(args, torch, parts) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jaxee  # pylint: disable=g-import-not-at-top
  from jaxee import convert, models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.uvit_src))
  from libs import uvit as uvit_lib  # pylint: disable=g-import-not-at-top
  model = models.create(args.uvit)
  kw = {k: getattr(model, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim",
                                       "depth", "num_heads", "mlp_ratio", "qkv_bias",
                                       "mlp_time_embed", "num_classes", "conv")}
  torch.manual_seed(0)
  official = uvit_lib.UViT(**kw).eval()
  params = jax.device_put(convert.from_torch(_state_dict(official), args.uvit))
  rng = np.random.default_rng(0)
  b, s, c = args.batch, model.img_size, model.in_chans
  x = rng.standard_normal((b, c, s, s)).astype(np.float32)
  t = rng.uniform(0, 999, b).astype(np.float32)
  xt, tt = torch.from_numpy(x), torch.from_numpy(t)
  xj, tj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t)
  fwd = jax.jit(lambda p, x_, t_: model.apply({"params": p}, x_, t_, None))
  common = {"model": f"official UViT({args.uvit}) vs jaxee {args.uvit}",
            "tokens": (model.img_size // model.patch_size) ** 2, "batch": b}
  out = []
  if "forward" in parts:
    with torch.inference_mode():
      ref = official(xt, tt).numpy()
    got = np.asarray(fwd(params, xj, tj)).transpose(0, 3, 1, 2)
    rec = alternate(lambda: _torch_forward(torch, official, xt, tt),
                    lambda: jax.block_until_ready(fwd(params, xj, tj)), args.rounds)
    out.append(dict(common, part="forward", max_abs_diff=float(np.abs(ref - got).max()), **rec))
  if "loop" in parts:
    # DDIM on DDPM's linear β chain (β from 1e-4 to 0.02 over 1000 steps), the discrete chain
    # jaxee's DDIM runs U-ViTs on (`schedule='linear_discrete'`); ᾱ at each NFE's network time.
    times = jaxee.sampling.nfe_times(model, "ddim", args.steps, schedule="linear_discrete")
    chain = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    abar = chain[np.clip(np.round(times).astype(int), 0, 999)]
    abar_next = np.append(abar[1:], 1.0)
    z = torch.from_numpy(x)

    def torch_loop():
      with torch.inference_mode():
        xx = z
        for tn, a, an in zip(times, abar, abar_next):
          eps = official(xx, torch.full((b,), float(tn)))
          x0 = (xx - (1 - a) ** 0.5 * eps) / a ** 0.5
          xx = an ** 0.5 * x0 + (1 - an) ** 0.5 * eps
        return xx

    def jax_loop():
      return jax.block_until_ready(jaxee.sample(model, params, jax.random.PRNGKey(0), x_T=xj,
                                                sampler="ddim", steps=args.steps,
                                                schedule="linear_discrete"))
    out.append(dict(common, part=f"loop ddim{args.steps}",
                    **compared(torch_loop, jax_loop, args.rounds)))
  sys.path.remove(os.path.abspath(args.uvit_src))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  if args.torchvision_standin:
    sys.meta_path.insert(0, _StandinFinder())
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("bench_vs_torch: PyTorch is not installed; `pip install -e '.[bench]'`", file=sys.stderr)
    return 2
  if not (args.dit_src or args.uvit_src):
    print("bench_vs_torch: give --dit-src and/or --uvit-src (local checkouts)", file=sys.stderr)
    return 2
  torch.set_num_threads(args.threads or os.cpu_count())
  import jax  # pylint: disable=g-import-not-at-top
  parts = set(args.parts.split(","))
  machine = {"host": platform.node(), "processor": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads":
             torch.get_num_threads(), "jax": jax.__version__,
             "device": str(jax.devices()[0]), "loadavg": [round(v, 2) for v in os.getloadavg()]}
  records = []
  if args.dit_src:
    records += bench_dit(args, torch, parts)
  if args.uvit_src:
    records += bench_uvit(args, torch, parts)
  for rec in records:
    rec.update(machine)
    if not args.json:
      print(f"# {rec['model']} {rec['part']}: jaxee ×{rec['jaxee_speed_vs_torch']} "
            f"{rec['ci95']} (torch {rec['torch_median_s']} s, jaxee {rec['jaxee_median_s']} s)",
            file=sys.stderr)
    print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
