"""`jaxee.sample` end to end with a real converted network (official DiT DDIM loop as reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import convert, models

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
            num_classes=10)


@pytest.fixture(scope="module")
def dit_tiny():
  import pathlib
  path = pathlib.Path(__file__).parent / "fixtures" / "dit_tiny.pt"
  return models.create("dit", **TINY), convert.from_torch(path, "dit", **TINY)


@pytest.mark.parametrize("key,guidance", [("ddim10_cfg1.5", 1.5), ("ddim10_nocfg", None)])
def test_dit_tiny_ddim_matches_official_loop(dit_tiny, fixtures_dir, key, guidance):
  model, params = dit_tiny
  gold = np.load(fixtures_dir / "dit_tiny_ddim_golden.npz")
  x_T = gold["x_T"].transpose(0, 2, 3, 1)
  out = jaxee.sample(model, params, jax.random.key(0), sampler="ddim", steps=10, x_T=x_T,
                     labels=gold["y"], guidance=guidance)
  ref = gold[key].transpose(0, 2, 3, 1)
  rel = np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref))
  assert rel <= 1e-4, rel


def test_same_seed_same_samples_and_stats(dit_tiny):
  model, params = dit_tiny
  kw = dict(num=2, sampler="ddpm", steps=5, labels=jnp.array([1, 2]), guidance=4.0)
  a, stats = jaxee.sample(model, params, jax.random.key(3), return_stats=True, **kw)
  b = jaxee.sample(model, params, jax.random.key(3), **kw)
  c = jaxee.sample(model, params, jax.random.key(4), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert stats["blocks"].shape == (5,) and float(stats["blocks"][0]) == 3.0
  np.testing.assert_array_equal(np.asarray(stats["nfe_times"]), [999, 749, 500, 250, 0])


def test_bad_arguments_are_clear(dit_tiny):
  model, params = dit_tiny
  with pytest.raises(ValueError, match="unknown sampler"):
    jaxee.sample(model, params, jax.random.key(0), num=1, sampler="heun")
  with pytest.raises(ValueError, match="num"):
    jaxee.sample(model, params, jax.random.key(0))
  with pytest.raises(ValueError, match="takes no option"):
    jaxee.sample(model, params, jax.random.key(0), num=1, sampler="ddpm", steps=2, eta=0.5)


def test_second_call_does_not_recompile(dit_tiny):
  model, params = dit_tiny
  from jaxee import sampling
  kw = dict(num=2, sampler="ddim", steps=4)
  jaxee.sample(model, params, jax.random.key(0), **kw)
  before = sampling._compiled.cache_info().misses
  jaxee.sample(model, params, jax.random.key(1), **kw)
  assert sampling._compiled.cache_info().misses == before
