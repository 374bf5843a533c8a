"""The DDPM U-Net (diffusers `UNet2DModel` layout): parity with the `unet_ddpm_tiny` fixture from
both checkpoint formats, strict conversion, presets, and the backbone contract (units compose to
the exact forward; a block-output `MaskPlan` equals its compute-everything reference).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import convert, exits, models, sampling, testing
from jaxee.cli import convert as cli
from jaxee.convert import backbone_rules, torch_reader
from jaxee.eval import flops as flops_lib
from jaxee.models import backbone as bb_lib


@pytest.fixture(scope="module")
def tiny(request):
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parent / "fixtures"
  cfg = root / "unet_ddpm_tiny_config.json"
  model = models.create("unet", **models.unet_config_json(cfg))
  params = convert.from_torch(root / "unet_ddpm_tiny.safetensors", "unet", config_json=cfg)
  io = np.load(root / "unet_ddpm_tiny_io.npz")
  return root, model, params, io


def _nhwc(a):
  return jnp.asarray(a).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fixture_is_reproduced_from_both_formats(tiny, fmt):
  root, _, _, io = tiny
  kwargs = json.loads((root / "FIXTURES.json").read_text())["unet_ddpm_tiny"]["constructor_kwargs"]
  params = convert.from_torch(root / f"unet_ddpm_tiny.{fmt}", "unet", **kwargs)
  model = models.create("unet", **kwargs)
  out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, _nhwc(io["x"]),
                                                                   jnp.asarray(io["t"]))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), io["out"], atol=1e-5, rtol=0)


def test_presets_and_parameter_counts():
  count = lambda m: sum(int(np.prod(s)) for s in backbone_rules.param_shapes(m).values())
  cifar = models.create("unet_ddpm_cifar10")
  assert count(cifar) == 35_746_307  # google/ddpm-cifar10-32: 35.7 M
  assert (cifar.family, cifar.default_schedule, cifar.learn_sigma) == ("unet", "linear_discrete",
                                                                       False)
  assert cifar.null_class is None and cifar.num_classes == -1 and cifar.out_channels == 3
  for arch in ("unet_ddpm_church256", "unet_ddpm_bedroom256"):
    m = models.create(arch)
    assert count(m) == pytest.approx(114e6, rel=0.01)  # DDPM paper: 114 M for LSUN 256²
    units = bb_lib.as_backbone(m).specs
    assert {u.size for u in units if u.kind == "attn"} == {16, 8}  # 16² levels + the mid block
  # DDPM CIFAR-10 is reported at 6.1 G MACs (convs and linears); attention matmuls add ~2 %.
  assert flops_lib.backbone_flops(cifar) == pytest.approx(2 * 6.1e9, rel=0.03)


def test_config_round_trip_and_bad_configs(tiny):
  _, model, _, _ = tiny
  cfg = json.loads(json.dumps(models.model_config(model)))
  assert models.from_config(cfg) == model
  with pytest.raises(ValueError, match="unknown option"):
    models.create("unet", num_heads=4)
  with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
    models.create("unet", down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(32, 64))
  with pytest.raises(ValueError, match="time_embedding_type"):
    models.create("unet_ddpm_cifar10", time_embedding_type="fourier")
  with pytest.raises(ValueError, match="does not take"):
    models.unet_config_json({"block_out_channels": [32], "cross_attention_dim": 8})
  with pytest.raises(ValueError, match="U-Net archs"):
    convert.from_torch({}, "dit", config_json={"sample_size": 8})


def test_bad_checkpoints_are_refused_listing_every_problem(tiny):
  root, model, _, _ = tiny
  cfg = models.unet_config_json(root / "unet_ddpm_tiny_config.json")
  state = torch_reader.load_state_dict(root / "unet_ddpm_tiny.safetensors")
  bad = dict(state)
  del bad["mid_block.attentions.0.to_q.weight"]
  bad["conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
  bad["extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(convert.CheckpointError) as e:
    convert.from_torch(bad, "unet", **cfg)
  msg = str(e.value)
  assert "missing: mid_block.attentions.0.to_q.weight" in msg
  assert "shape mismatch: conv_in.weight (16, 3, 5, 5)" in msg
  assert "unexpected: extra.weight" in msg
  # The wrong config: other widths, attention at another level.
  with pytest.raises(convert.CheckpointError) as e:
    convert.from_torch(state, "unet", **dict(cfg, block_out_channels=(16, 32, 64)))
  assert "shape mismatch: up_blocks.0.resnets.0.conv1.weight" in str(e.value)
  with pytest.raises(convert.CheckpointError) as e:
    convert.from_torch(state, "unet", **dict(
        cfg, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3))
  assert "unexpected: down_blocks.1.attentions.0.to_q.weight" in str(e.value)
  with pytest.raises(convert.CheckpointError, match="looks like: UNet2DModel"):
    convert.from_torch(state, "dit", input_size=8, hidden_size=64, depth=1, num_heads=4)


def test_pre_014_attention_names_are_accepted(tiny):
  """Released DDPM files name the projections query/key/value/proj_attn (diffusers < 0.14)."""
  root, model, params, io = tiny
  state = torch_reader.load_state_dict(root / "unet_ddpm_tiny.bin")
  old = {}
  for k, v in state.items():
    for new, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                      ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{name}.")
    old[k] = v
  assert any(".proj_attn." in k for k in old)
  converted = convert.from_torch(old, "unet", **models.unet_config_json(
      root / "unet_ddpm_tiny_config.json"))
  jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_cli_converts_a_unet(tmp_path, tiny, capsys):
  root, model, params, _ = tiny
  cfg = json.loads((root / "unet_ddpm_tiny_config.json").read_text())
  sets = [f"{k}={json.dumps(v)}" for k, v in models.unet_config_json(cfg).items()]
  argv = ["--arch", "unet", "--src", str(root / "unet_ddpm_tiny.bin"), "--out",
          str(tmp_path / "ck")]
  for s in sets:
    argv += ["--set", s]
  assert cli.main(argv) == 0, capsys.readouterr().err
  loaded_model, loaded = convert.load_converted(tmp_path / "ck")
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


def test_cli_reads_a_model_folders_config_json(tmp_path, tiny, capsys):
  root, model, params, _ = tiny
  argv = ["--arch", "unet", "--src", str(root / "unet_ddpm_tiny.safetensors"), "--out",
          str(tmp_path / "ck"), "--config-json", str(root / "unet_ddpm_tiny_config.json")]
  assert cli.main(argv) == 0, capsys.readouterr().err
  loaded_model, loaded = convert.load_converted(tmp_path / "ck")
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
  # Without the config the generic `unet` defaults do not fit the weights: a clear refusal.
  assert cli.main(argv[:-2] + ["--out", str(tmp_path / "ck2")]) == 2
  assert "does not match" in capsys.readouterr().err


def test_units_compose_to_the_exact_forward(tiny):
  _, model, params, io = tiny
  bb = bb_lib.as_backbone(model, "block")
  x, t = _nhwc(io["x"]), jnp.asarray(io["t"], jnp.float32)
  want = model.apply({"params": params}, x, t)
  got = jax.jit(lambda p: bb_lib.forward_units(bb, p, x, t, None))(params)
  testing.assert_outputs_close(got, want, 1e-5)
  state = bb.embed(params, x, t, None)
  for ref in bb.refs():
    state = bb.run_unit(params, ref, state)
  testing.assert_outputs_close(bb.head(params, state), want, 1e-5)
  kinds = [u.kind for u in bb.specs]
  assert len(kinds) == bb.num_units == bb.num_blocks == 15 and kinds.count("attn") == 4
  assert all(seg.groups == 1 for seg in bb.segments)
  assert bb.full_flops == pytest.approx(
      bb.embed_flops + bb.head_flops + bb.unit_flops.sum(), rel=1e-12)
  assert np.all(bb.enter_flops <= bb.unit_flops) and np.count_nonzero(bb.enter_flops) == 4
  with pytest.raises(NotImplementedError, match="branch"):
    bb_lib.as_backbone(model, "branch")
  with pytest.raises(NotImplementedError, match="depth schedules"):
    bb.drop(params, bb.ref(3), state)
  # fixture: down0.res0 → (its skip, read by up2.res1; through down1's downsample, by up2.res0)
  consumers = bb.skip_consumers()
  assert all(isinstance(c, tuple) and c for c in consumers.values())
  assert max(len(c) for c in consumers.values()) == 2


def test_block_output_cache_matches_the_reference(tiny):
  _, model, params, _ = tiny
  times = sampling.nfe_times(model, "ddim", 6)
  bb = bb_lib.as_backbone(model)
  mask = exits.random_mask(len(times), bb.num_units, 0.6, seed=1)
  plan = exits.MaskPlan(mask)
  kw = dict(num=2, sampler="ddim", steps=6, return_stats=True)
  x, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, **kw)
  x_ref, stats_ref = jaxee.sample(model, params, jax.random.PRNGKey(0),
                                  plan=testing.ReferencePlan(plan), **kw)
  testing.assert_outputs_close(x, x_ref, 1e-5)
  np.testing.assert_allclose(stats["flops"], stats_ref["flops"])
  assert float(stats["flops"][0]) == pytest.approx(bb.full_flops)
  assert np.all(np.asarray(stats["flops"][1:]) < bb.full_flops)
  full = jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim", steps=6)
  ones = jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim", steps=6,
                      plan=exits.MaskPlan(np.ones_like(mask)))
  testing.assert_outputs_close(ones, full, 1e-5)
