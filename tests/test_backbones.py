"""Backbones reproduce the official PyTorch DiT / U-ViT outputs (fixtures from the official code)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee import convert, models
from jaxee.convert import backbone_rules
from jaxee.models import layers

MODELS = ["dit_tiny", "uvit_tiny_cond", "uvit_tiny_uncond_noconv", "uvit_tiny_qkvbias_timemlp"]


def fixture_model(fixtures_dir, name):
  kw = dict(json.loads((fixtures_dir / "FIXTURES.json").read_text())[name]["constructor_kwargs"])
  kw.pop("official_class")
  return ("dit" if name.startswith("dit") else "uvit"), kw


@pytest.mark.parametrize("name", MODELS)
def test_matches_official_forward(fixtures_dir, name):
  arch, kw = fixture_model(fixtures_dir, name)
  model = models.create(arch, **kw)
  params = convert.from_torch(fixtures_dir / f"{name}.pt", arch, **kw)
  io = np.load(fixtures_dir / f"{name}_io.npz")
  x = io["x"].transpose(0, 2, 3, 1)
  y = io["y"] if io["y"].size else None
  out = jax.jit(model.apply)({"params": params}, x, io["t"], y)
  err = np.max(np.abs(np.asarray(out) - io["out"].transpose(0, 2, 3, 1)))
  assert err <= 1e-5, f"{name}: max abs error {err}"


def test_dit_null_label_is_default(fixtures_dir):
  arch, kw = fixture_model(fixtures_dir, "dit_tiny")
  model = models.create(arch, **kw)
  params = convert.from_torch(fixtures_dir / "dit_tiny.pt", arch, **kw)
  x = jnp.ones((2, 8, 8, 4))
  a = model.apply({"params": params}, x, jnp.array([3, 500]), None)
  b = model.apply({"params": params}, x, jnp.array([3, 500]), jnp.array([10, 10]))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_input_shape_is_clear(fixtures_dir):
  arch, kw = fixture_model(fixtures_dir, "uvit_tiny_cond")
  model = models.create(arch, **kw)
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,)), jnp.zeros((1,), int))


def test_timestep_frequency_table_is_torch_exact():
  # Values exported from torch (fp32, CPU) for the DiT width; spot-check known entries.
  f = layers.timestep_frequencies(128)
  assert f.dtype == np.float32 and f.shape == (128,)
  assert f[0] == 1.0
  # torch's fp32 argument arithmetic, then a correctly rounded exp: torch's vectorised exp differs
  # by 1 ulp in at most a few entries (2 of 128 with the exported table).
  args = (np.arange(128, dtype=np.float32) * np.float32(-math.log(10000))) / np.float32(128)
  rounded = np.exp(args.astype(np.float64)).astype(np.float32)
  ulps = np.abs(f.view(np.int32) - rounded.view(np.int32))
  assert ulps.max() <= 1 and 0 < (ulps > 0).sum() <= 4
  # An uncommon width falls back to torch's fp32 argument arithmetic.
  g = layers.timestep_frequencies(100)
  assert g.shape == (100,) and np.max(np.abs(g - np.exp(-math.log(1e4) * np.arange(100) / 100))) < 1e-6


def test_sincos_pos_embed_column_half_first():
  table = layers.sincos_pos_embed_2d(8, 3)  # Q = 2
  # token n = i*G + j: row i = 0, column j = 1 → channels [sin(j), sin(j·ω1), cos(j), ...]
  np.testing.assert_allclose(table[1, 0], np.sin(1.0), rtol=1e-7)
  np.testing.assert_allclose(table[1, 4], 0.0, atol=0)       # sin(i=0)
  np.testing.assert_allclose(table[3, 4], np.sin(1.0), rtol=1e-7)  # token (1, 0)


# Official counts from shared/research/dit_uvit.md (A1: trainable / all at input 32, B1).
DIT_COUNTS = {
    "dit_xl_2": (674_834_720, 675_129_632), "dit_xl_4": (675_000_704, 675_074_432),
    "dit_xl_8": (675_664_640, 675_683_072), "dit_l_2": (457_840_672, 458_102_816),
    "dit_l_4": (457_988_224, 458_053_760), "dit_l_8": (458_578_432, 458_594_816),
    "dit_b_2": (130_315_808, 130_512_416), "dit_b_4": (130_426_496, 130_475_648),
    "dit_b_8": (130_869_248, 130_881_536), "dit_s_2": (32_865_056, 32_963_360),
    "dit_s_4": (32_920_448, 32_945_024), "dit_s_8": (33_142_016, 33_148_160),
}
UVIT_COUNTS = {
    "uvit_s4_celeba64": 44_292_228, "uvit_s2_cifar10": 44_255_328,
    "uvit_m4_imagenet64": 130_940_292, "uvit_l4_imagenet64": 286_827_652,
    "uvit_l2_imagenet256": 286_763_172, "uvit_h2_imagenet256": 500_832_016,
    "uvit_l4_imagenet512": 286_861_524, "uvit_h4_imagenet512": 500_942_656,
}


@pytest.mark.parametrize("arch", sorted(DIT_COUNTS))
def test_dit_param_counts(arch):
  model = models.create(arch)
  trainable = sum(math.prod(s) for s in backbone_rules.param_shapes(model).values())
  pos_embed = model.num_tokens * model.hidden_size  # a constant here, a frozen Parameter there
  assert (trainable, trainable + pos_embed) == DIT_COUNTS[arch]


def test_dit_xl_2_512_count():
  model = models.create("dit_xl_2", input_size=64)
  trainable = sum(math.prod(s) for s in backbone_rules.param_shapes(model).values())
  assert trainable + model.num_tokens * model.hidden_size == 676_014_368


@pytest.mark.parametrize("arch", sorted(UVIT_COUNTS))
def test_uvit_param_counts(arch):
  model = models.create(arch)
  assert sum(math.prod(s) for s in backbone_rules.param_shapes(model).values()) == UVIT_COUNTS[arch]


def test_unknown_arch_and_option():
  with pytest.raises(ValueError, match="unknown arch"):
    models.create("dit_xxl_2")
  with pytest.raises(ValueError, match="unknown option"):
    models.create("dit_s_2", img_size=32)


def test_model_config_round_trip():
  model = models.create("uvit_h2_imagenet256")
  again = models.from_config(json.loads(json.dumps(models.model_config(model))))
  assert again == model and again.null_class == 1000 and again.default_schedule == "sd_discrete"
