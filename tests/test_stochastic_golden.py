"""Stochastic samplers replayed exactly: `stochastic_samplers_golden.npz` through `jaxee.sample`.

The fixture is the official code with every Gaussian draw recorded (NCHW, in call order):

* DiT (`dit_tiny` fixture): DDPM-10 with CFG 1.5 and without, DDIM-10 with eta = 0.5.
  `p_sample` / `ddim_sample` draw at every step, the last one masked out: 10 draws.
  With CFG the official loop runs on the doubled batch [x_T; x_T] and records draws for all 4
  rows, but `forward_with_cfg` rebuilds its input from the first half at every step, so only the
  draws of the first `num` rows reach the kept half. jaxee's guided denoiser makes one combined
  prediction per sampled row, so `noise=` takes one draw per sampled row: the first half.
* U-ViT Euler--Maruyama SDE-10/25 with the fake network eps = 0.3 x + 0.001 t_in
  (t_in = 999 t), as `uvit_samplers_golden`: a draw at every step but the last (steps − 1).
  The fake network goes through the public API as a test-only backbone (`FakeUViT`).
"""
import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import convert, models, sampling
from jaxee.models import backbone as bb_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
            num_classes=10)
TOL = 1e-4


@pytest.fixture(scope="module")
def gold():
  return dict(np.load(FIXTURES / "stochastic_samplers_golden.npz"))


@pytest.fixture(scope="module")
def dit_tiny():
  return models.create("dit", **TINY), convert.from_torch(FIXTURES / "dit_tiny.pt", "dit", **TINY)


def nhwc(a):
  """(..., C, H, W) -> (..., H, W, C)."""
  return np.moveaxis(np.asarray(a), -3, -1)


def rel_err(ours, ref_nchw):
  """max |ours − ref| / max(1, max |ref|), ours NHWC."""
  ref = nhwc(ref_nchw).astype(np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(1.0, np.max(np.abs(ref))))


class FakeUViT(nn.Module):
  """The fake noise-prediction network of the U-ViT golden files, eps = 0.3 x + 0.001 t_in.

  A parameter-free module with the attributes `jaxee.sample` reads (`vp_continuous` schedule,
  unconditional) and a one-unit backbone, so the full plan runs it unchanged.
  """
  size: int = 4
  channels: int = 3

  family = "uvit"
  default_schedule = "vp_continuous"
  null_class = None
  num_classes = -1
  learn_sigma = False

  def backbone(self, granularity="block"):
    return FakeBackbone(self, granularity)

  def __call__(self, x, t, y=None):
    del y
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return 0.3 * x + 0.001 * t[:, None, None, None]


@dataclasses.dataclass(frozen=True)
class FakeBackbone(bb_lib.Backbone):
  """`FakeUViT` as embed (the whole network) → one identity unit → head."""

  @property
  def segments(self):
    return (bb_lib.Segment("blocks", 0, 1, ("block",) if self.granularity == "block"
                           else ("attn", "mlp")),)

  @property
  def input_shape(self):
    return (self.module.size, self.module.size, self.module.channels)

  @property
  def unit_flops(self):
    return np.ones(self.num_units)

  embed_flops = 0.0
  head_flops = 0.0
  width = 3
  num_tokens = 16

  def embed(self, params, x, t, y):
    return {"h": self.module.apply({"params": params}, x, t, y)}

  def compute(self, params, ref, state):
    return state["h"]

  def apply(self, params, ref, state, value):
    return dict(state, h=value)

  def drop(self, params, ref, state):
    return state

  def head(self, params, state):
    return state["h"]


DIT_CASES = [
    ("ddpm10_cfg1.5", "ddpm", 1.5, {}),
    ("ddpm10_nocfg", "ddpm", None, {}),
    ("ddim10_eta0.5_nocfg", "ddim", None, {"eta": 0.5}),
]


@pytest.mark.parametrize("key,sampler,guidance,options", DIT_CASES)
def test_dit_stochastic_replayed(dit_tiny, gold, key, sampler, guidance, options):
  model, params = dit_tiny
  x_T = nhwc(gold["x_T"])
  noise = nhwc(gold[f"{key}_noise"])
  num = x_T.shape[0]
  assert noise.shape[:2] == (10, 2 * num if guidance is not None else num)
  noise = noise[:, :num]  # CFG: the draws of the rows that reach the kept half
  out = jaxee.sample(model, params, jax.random.key(0), sampler=sampler, steps=10, x_T=x_T,
                     labels=gold["y"], guidance=guidance, noise=noise, **options)
  err = rel_err(out, gold[key])
  print(f"{key}: max rel err {err:.3e}")
  assert err <= TOL, (key, err)
  if guidance is not None:  # the second half's draws never reach the kept half officially
    other = jaxee.sample(model, params, jax.random.key(0), sampler=sampler, steps=10, x_T=x_T,
                         labels=gold["y"], guidance=guidance,
                         noise=nhwc(gold[f"{key}_noise"])[:, num:], **options)
    assert rel_err(other, gold[key]) > 1e-2


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_maruyama_replayed(gold, steps):
  model = FakeUViT()
  key = f"em_sde_{steps}"
  noise = nhwc(gold[f"{key}_noise"])
  assert noise.shape[0] == steps - 1
  out = jaxee.sample(model, {}, jax.random.key(0), sampler="euler_maruyama", steps=steps,
                     x_T=nhwc(gold["uvit_x_T"]), noise=noise)
  err = rel_err(out, gold[key])
  print(f"{key}: max rel err {err:.3e}")
  assert err <= TOL, (key, err)


def test_noise_shape_is_checked(dit_tiny, gold):
  model, params = dit_tiny
  x_T = nhwc(gold["x_T"])
  kw = dict(sampler="ddpm", steps=10, x_T=x_T, labels=gold["y"])
  noise = nhwc(gold["ddpm10_nocfg_noise"])
  with pytest.raises(ValueError, match=r"\(draws, num, H, W, C\) = \(10, 2, 8, 8, 4\)"):
    jaxee.sample(model, params, jax.random.key(0), noise=noise[:9], **kw)
  with pytest.raises(ValueError, match="must have shape"):  # NCHW instead of NHWC
    jaxee.sample(model, params, jax.random.key(0), noise=gold["ddpm10_nocfg_noise"], **kw)
  with pytest.raises(ValueError, match="must have shape"):  # the doubled CFG batch
    jaxee.sample(model, params, jax.random.key(0), guidance=1.5,
                 noise=nhwc(gold["ddpm10_cfg1.5_noise"]), **kw)
  with pytest.raises(ValueError, match=r"= \(9, 2, 4, 4, 3\)"):  # SDE: steps − 1 draws
    jaxee.sample(FakeUViT(), {}, jax.random.key(0), sampler="euler_maruyama", steps=10,
                 x_T=nhwc(gold["uvit_x_T"]), noise=np.zeros((10, 2, 4, 4, 3), np.float32))


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("ddim", {"eta": 0.0}),
                                             ("euler_ode", {}), ("dpm_solver", {})])
def test_noise_refused_by_deterministic_samplers(gold, dit_tiny, sampler, options):
  if sampler == "ddim":
    model, params = dit_tiny
    x_T = nhwc(gold["x_T"])
  else:
    model, params = FakeUViT(), {}
    x_T = nhwc(gold["uvit_x_T"])
  noise = np.zeros((10,) + x_T.shape, np.float32)
  with pytest.raises(ValueError, match="deterministic and takes no noise"):
    jaxee.sample(model, params, jax.random.key(0), sampler=sampler, steps=10, x_T=x_T,
                 noise=noise, **options)


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_noise_none_is_unchanged(dit_tiny, gold, sampler, options):
  """Without `noise` the per-step draws still come from `rng` (fold_in(loop key, step))."""
  model, params = dit_tiny
  x_T = nhwc(gold["x_T"])
  kw = dict(sampler=sampler, steps=10, x_T=x_T, labels=gold["y"], **options)
  rng = jax.random.key(7)
  a = jaxee.sample(model, params, rng, **kw)
  b = jaxee.sample(model, params, rng, noise=None, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same draws the PRNG path takes, given explicitly, give the same samples.
  _, loop_key = jax.random.split(rng)
  draws = jnp.stack([jax.random.normal(jax.random.fold_in(loop_key, k), x_T.shape)
                     for k in range(10)])
  c = jaxee.sample(model, params, rng, noise=draws, **kw)
  np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=0, atol=1e-5 * max(
      1.0, float(np.max(np.abs(np.asarray(a))))))
  traces = sampling.trace_count()  # noise is a traced argument: new draws never recompile
  d = jaxee.sample(model, params, rng, noise=-draws, **kw)
  assert sampling.trace_count() == traces
  assert not np.allclose(np.asarray(d), np.asarray(c))
