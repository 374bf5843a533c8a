"""Parity and conversion tests for the KL-f8 VAE (`jaxee.models.vae`, `jaxee.convert.vae_rules`).

References: `vae_compvis_tiny` (U-ViT `libs/autoencoder.py` FrozenAutoencoderKL, CompVis layout)
and `vae_diffusers_tiny` (diffusers AutoencoderKL) fixtures, see tests/fixtures/FIXTURES.json.
The npz arrays are NCHW.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxee.convert import vae_rules
from jaxee.convert.errors import CheckpointError
from jaxee.convert.torch_reader import load_state_dict
from jaxee.models import vae

TOL = 1e-5
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def compvis():
  fixtures = FIXTURES
  sd = load_state_dict(fixtures / "vae_compvis_tiny.pth")
  io = dict(np.load(fixtures / "vae_compvis_tiny_io.npz"))
  return sd, io


@pytest.fixture(scope="module")
def diffusers_io():
  return dict(np.load(FIXTURES / "vae_diffusers_tiny_io.npz"))


def test_compvis_parity(compvis):
  sd, io = compvis
  cfg = vae.compvis_tiny()
  assert vae_rules.detect_layout(list(sd)) == "compvis"
  params = vae_rules.vae_params_from_state_dict(sd, layout="auto", config=cfg)
  model = vae.AutoencoderKL(cfg)
  moments = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_moments))(
      params, _nhwc(io["x"]))
  assert moments.shape == (2, 8, 8, 8)
  assert _max_err(moments, _nhwc(io["moments"])) <= TOL
  # U-ViT FrozenAutoencoderKL.decode divides by the scale factor first.
  decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
      params, _nhwc(io["z"]))
  assert decoded.shape == (2, 16, 16, 3)
  assert _max_err(decoded, _nhwc(io["decoded"])) <= TOL


@pytest.mark.parametrize("filename", ["vae_diffusers_tiny.bin", "vae_diffusers_tiny.safetensors"])
def test_diffusers_parity(diffusers_io, filename):
  io = diffusers_io
  path = FIXTURES / filename
  cfg, params = vae_rules.load_vae(path)  # layout and config inferred from the weights
  assert cfg.ch == 32 and cfg.ch_mult == (1, 2) and cfg.num_res_blocks == 1
  assert cfg.attn_resolutions == () and cfg.embed_dim == 4
  model = vae.AutoencoderKL(cfg)
  moments = model.apply({"params": params}, _nhwc(io["x"]), method=model.encode_moments)
  mean, logvar = np.split(np.asarray(moments), 2, axis=-1)
  assert _max_err(mean, _nhwc(io["mean"])) <= TOL
  assert _max_err(logvar, _nhwc(io["logvar"])) <= TOL
  # diffusers decode(z).sample applies no scale factor.
  decoded = model.apply({"params": params}, _nhwc(io["z"]), method=model.decode_unscaled)
  assert _max_err(decoded, _nhwc(io["decoded"])) <= TOL
  scaled = model.apply({"params": params}, _nhwc(io["z"]) * cfg.scale_factor,
                       method=model.decode)
  assert _max_err(scaled, decoded) <= TOL


def test_diffusers_legacy_attention_names_and_conv_shapes():
  """Old diffusers files: query/key/value/proj_attn, and 1×1-conv-shaped projections."""
  sd = load_state_dict(FIXTURES / "vae_diffusers_tiny.bin")
  rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for k, v in sd.items():
    for new, old in rename.items():
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        if k.endswith(".weight"):
          v = v[:, :, None, None]
    legacy[k] = v
  ref = vae_rules.vae_params_from_state_dict(sd, config=vae.diffusers_tiny())
  params = vae_rules.vae_params_from_state_dict(legacy, config=vae.diffusers_tiny())
  flat_ref = traverse_util.flatten_dict(ref)
  flat = traverse_util.flatten_dict(params)
  assert flat.keys() == flat_ref.keys()
  for key, value in flat_ref.items():
    np.testing.assert_array_equal(flat[key], value)


def test_strict_errors_list_every_offender(compvis):
  sd, _ = compvis
  bad = dict(sd)
  del bad["decoder.mid.attn_1.q.bias"]
  bad["encoder.down.0.block.0.conv1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  bad["encoder.extra.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(CheckpointError) as info:
    vae_rules.vae_params_from_state_dict(bad, config=vae.compvis_tiny())
  msg = str(info.value)
  assert "decoder.mid.attn_1.q.bias" in msg
  assert "encoder.down.0.block.0.conv1.weight" in msg and "(32, 32, 1, 1)" in msg
  assert "encoder.extra.weight" in msg
  # A config that does not fit the weights is refused too.
  with pytest.raises(CheckpointError, match="shape mismatches"):
    vae_rules.vae_params_from_state_dict(sd, config=vae.sd_kl_f8())
  with pytest.raises(CheckpointError, match="layout"):
    vae_rules.vae_params_from_state_dict({"foo.weight": np.zeros(3)})


def test_prefix_and_ignore(compvis):
  sd, _ = compvis
  full = {f"first_stage_model.{k}": v for k, v in sd.items()}
  full["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  full["model.diffusion_model.x.weight"] = np.zeros((2,), np.float32)
  params = vae_rules.vae_params_from_state_dict(
      full, prefix="first_stage_model.", ignore_prefixes=("loss.",))
  ref = vae_rules.vae_params_from_state_dict(sd)
  assert jax.tree.structure(params) == jax.tree.structure(ref)


@pytest.mark.parametrize("layout", ["compvis", "diffusers"])
@pytest.mark.parametrize("cfg", [vae.sd_kl_f8(),
                                 vae.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                                               resolution=32, attn_resolutions=(16,))])
def test_rules_cover_every_param(cfg, layout):
  """Each Flax param is produced by exactly one torch key (real SD config, attention levels)."""
  shapes = traverse_util.flatten_dict(vae.param_shapes(cfg))
  covered = []
  for _, path, kind in vae_rules.module_rules(cfg, layout):
    covered += [path + ("scale" if kind == "norm" else "kernel",), path + ("bias",)]
  assert len(covered) == len(set(covered))
  assert set(covered) == set(shapes)


def test_sd_kl_f8_param_count():
  shapes = vae.param_shapes(vae.sd_kl_f8())
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 83_653_863


def test_sample_latent():
  cfg = vae.compvis_tiny()
  model = vae.AutoencoderKL(cfg)
  mean = jnp.linspace(-1.0, 1.0, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
  logvar = jnp.full_like(mean, 40.0).at[0].set(-1.0)  # 40 is clamped to 20
  rng = jax.random.PRNGKey(3)
  z = model.apply({}, jnp.concatenate([mean, logvar], -1), rng, method=model.sample_latent)
  noise = jax.random.normal(rng, mean.shape)
  std = np.where(np.arange(2)[:, None, None, None] == 0, np.exp(-0.5), np.exp(10.0))
  np.testing.assert_allclose(z, (mean + std * noise) * cfg.scale_factor, rtol=1e-6)
