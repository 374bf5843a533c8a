"""The sampling entry point (`jaxee-sample` = `python -m jaxee.cli.sample`, engine `jaxee.sharded`).

Shards, resume after a real interruption, corruption, config checks, VAE decoding, Orbax
checkpoints, exit plans, the command line in a subprocess, and `jaxee.sample` staying the function.
Every run uses the `runlocal` DiT config (the tiny official fixture, DDIM-10, guidance 1.5, 12
samples in three shards of 4) so the sampler compiles once per process (plans add one compile
each); `multi_device=False` keeps the eight fake test devices out of it except in the one test
that checks batch sharding.
"""
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxee import models
from jaxee.sharded import run as run_lib
from jaxee.convert import orbax_io, vae_rules
from jaxee.eval import images as images_lib
from jaxee.exits import ase, duodiff, masks
from jaxee.models import vae as vae_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARDS = [f"shards/shard_{k:05d}.npz" for k in range(3)]


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def runlocal(out_dir, **changes):
  """The runlocal DiT config writing to `out_dir`, with field changes."""
  config = _config_module("sample_dit").get_config("runlocal")
  config.ckpt = str(FIXTURES / "dit_tiny.pt")
  config.out_dir = str(out_dir)
  config.progress = False
  config.multi_device = False
  for key, value in changes.items():
    setattr(config, key, value)
  return config


def _bytes(out, names=SHARDS):
  return {n: (pathlib.Path(out) / n).read_bytes() for n in names}


class _Counter:
  """Wraps `jaxee.sampling.sample` and counts the batches it samples."""

  def __init__(self, monkeypatch):
    self.calls = 0
    self._sample = run_lib.sampling_lib.sample
    monkeypatch.setattr(run_lib.sampling_lib, "sample", self)

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._sample(*args, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted runlocal run: (out_dir, result)."""
  out = tmp_path_factory.mktemp("reference")
  return out, run_lib.run_sampling(runlocal(out))


def test_end_to_end_writes_shards_grid_and_throughput(reference):
  out, result = reference
  for name in SHARDS + ["grid.png", "config.json", "throughput.json", "manifest.json"]:
    assert (out / name).is_file(), name
  with np.load(out / SHARDS[0]) as z:
    assert sorted(z.files) == ["index", "labels", "latents"]
    assert z["latents"].shape == (4, 8, 8, 4) and z["latents"].dtype == np.float32
    assert np.all(np.isfinite(z["latents"]))
    assert z["labels"].dtype == np.int32 and np.all((z["labels"] >= 0) & (z["labels"] < 10))
    np.testing.assert_array_equal(z["index"], np.arange(4))
  stats = json.loads((out / "throughput.json").read_text())
  assert stats["shards_computed"] == 3 and stats["shards_skipped"] == 0
  assert stats["images_per_s"] > 0 and stats["compile_s"] >= 0
  assert result["images_per_s"] == stats["images_per_s"]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["num_samples"] == 12 and [s["count"] for s in manifest["shards"]] == [4, 4, 4]
  assert json.loads((out / "config.json").read_text())["steps"] == 10


def test_same_seed_identical_other_seed_different(reference, tmp_path):
  ref, _ = reference
  run_lib.run_sampling(runlocal(tmp_path / "same", num_samples=8))
  assert _bytes(tmp_path / "same", SHARDS[:2]) == _bytes(ref, SHARDS[:2])
  run_lib.run_sampling(runlocal(tmp_path / "other", seed=1, num_samples=4))
  with np.load(ref / SHARDS[0]) as a, np.load(tmp_path / "other" / SHARDS[0]) as b:
    assert not np.allclose(a["latents"], b["latents"])


def test_interrupted_run_resumes_to_identical_output(reference, tmp_path, monkeypatch):
  ref, _ = reference
  out = tmp_path / "run"

  def crash(k, arrays):
    del arrays
    if k == 1:
      raise KeyboardInterrupt("killed after shard 1")

  with pytest.raises(KeyboardInterrupt):
    run_lib.run_sampling(runlocal(out, merge=True), on_shard=crash)
  assert (out / SHARDS[1]).is_file() and not (out / SHARDS[2]).exists()
  assert not (out / "manifest.json").exists()
  partial = out / "shards" / ".shard_00002.npz.tmp-killed"
  partial.write_bytes(b"PK\x03\x04 half a shard")  # a kill mid-write leaves only a temp file
  counter = _Counter(monkeypatch)
  result = run_lib.run_sampling(runlocal(out, merge=True))
  assert counter.calls == 1  # only shard 2's single batch; shards 0 and 1 were not recomputed
  assert result["shards_computed"] == 1 and result["shards_skipped"] == 2
  assert not partial.exists()
  assert _bytes(out) == _bytes(ref)
  ref_manifest = json.loads((ref / "manifest.json").read_text())
  assert json.loads((out / "manifest.json").read_text())["shards"] == ref_manifest["shards"]
  with np.load(out / "samples.npz") as merged:
    parts = [np.load(ref / s)["latents"] for s in SHARDS]
    np.testing.assert_array_equal(merged["latents"], np.concatenate(parts))
    np.testing.assert_array_equal(merged["index"], np.arange(12))


def test_corrupt_shard_is_rewritten(reference, tmp_path, monkeypatch, caplog):
  ref, _ = reference
  out = tmp_path / "run"
  shutil.copytree(ref, out)
  shard = out / SHARDS[1]
  shard.write_bytes(shard.read_bytes()[:100])
  counter = _Counter(monkeypatch)
  with caplog.at_level(logging.WARNING):
    result = run_lib.run_sampling(runlocal(out))
  assert counter.calls == 1 and result["shards_skipped"] == 2
  assert "unreadable" in caplog.text and "shard_00001" in caplog.text
  assert _bytes(out) == _bytes(ref)


def test_config_mismatch_is_refused_unless_forced(reference, tmp_path, monkeypatch):
  ref, _ = reference
  out = tmp_path / "run"
  shutil.copytree(ref, out)
  with pytest.raises(run_lib.ConfigMismatchError, match=r"steps: saved 10 != now 5"):
    run_lib.run_sampling(runlocal(out, steps=5, guidance=2.0))
  with pytest.raises(run_lib.ConfigMismatchError, match="guidance"):
    run_lib.run_sampling(runlocal(out, steps=5, guidance=2.0))
  counter = _Counter(monkeypatch)
  # Keys that do not change samples never block a resume; force=True overrides the check.
  assert run_lib.run_sampling(runlocal(out, merge=True))["shards_skipped"] == 3
  result = run_lib.run_sampling(runlocal(out, steps=5, force=True))
  assert result["shards_skipped"] == 3 and counter.calls == 0
  stray = tmp_path / "stray"
  (stray / "shards").mkdir(parents=True)
  (stray / "shards" / "shard_00000.npz").write_bytes(b"x")
  with pytest.raises(run_lib.ConfigMismatchError, match="config.json is missing"):
    run_lib.run_sampling(runlocal(stray))


@pytest.mark.parametrize("change,message", [
    (dict(sampler="heun"), "unknown sampler"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(guidance=-1.0), "guidance must be >= 0"),
    (dict(shard_size=0), "shard_size must be >= 1"),
    (dict(batch_size=8), "must be <= shard_size"),
    (dict(labels="cats"), "comma-separated ints"),
    (dict(sampler_options={"eta": 0.5}, sampler="ddpm"), "takes no option"),
])
def test_invalid_config_is_a_clear_error(tmp_path, change, message):
  config = runlocal(tmp_path)
  config.update(change)
  with pytest.raises(ValueError, match=message):
    run_lib.validate_config(config)
  with pytest.raises(ValueError, match=message):
    run_lib.run_sampling(config)
  assert not (tmp_path / "config.json").exists()


def test_placeholders_unknown_args_and_plans(tmp_path):
  with pytest.raises(ValueError, match="unknown configs/sample_dit.py arg"):
    _config_module("sample_dit").get_config("bogus")
  with pytest.raises(ValueError, match="config.ckpt is not set"):
    run_lib.run_sampling(runlocal(tmp_path, ckpt="SET_ME: path"))
  config = runlocal(tmp_path)
  assert run_lib.make_plan(config, None) is None
  config.plan = "magic:fast"
  with pytest.raises(ValueError, match="unknown plan spec 'magic:fast'"):
    run_lib.make_plan(config, None)
  assert run_lib.parse_labels("1, 2,3") == [1, 2, 3]
  assert run_lib.parse_labels("none") is None


def test_uvit_configs_load():
  module = _config_module("sample_uvit")
  h2 = module.get_config("")
  assert (h2.arch, h2.sampler, h2.steps, h2.guidance) == ("uvit_h2_imagenet256", "dpm_solver_pp",
                                                         50, 0.4)
  celeba = module.get_config("celeba")
  assert (celeba.sampler, celeba.steps, celeba.labels) == ("euler_maruyama", 1000, "none")
  local = module.get_config("runlocal")
  assert local.model_overrides.cfg_null_class == 10 and local.sampler == "dpm_solver"


def test_vae_decodes_to_uint8_images(reference, tmp_path):
  ref, _ = reference
  vae_config, vae_params = vae_rules.load_vae(FIXTURES / "vae_diffusers_tiny.safetensors")
  vae = vae_lib.AutoencoderKL(vae_config)
  vae_dir = orbax_io.save_converted(tmp_path / "vae", vae, vae_params)
  out = tmp_path / "run"
  run_lib.run_sampling(runlocal(out, vae_ckpt=str(vae_dir), num_samples=4))
  with np.load(out / SHARDS[0]) as z, np.load(ref / SHARDS[0]) as r:
    assert sorted(z.files) == ["images", "index", "labels"]
    assert z["images"].shape == (4, 16, 16, 3) and z["images"].dtype == np.uint8
    np.testing.assert_array_equal(z["labels"], r["labels"])
    decoded = vae.apply({"params": vae_params}, r["latents"], method="decode")
    expected = images_lib.to_uint8(np.asarray(decoded), dit_fid=True).astype(int)
    assert np.max(np.abs(z["images"].astype(int) - expected)) <= 1
  assert (out / "grid.png").is_file()


def test_batch_sharded_over_devices_matches_one_device(tmp_path):
  if jax.local_device_count() < 2:
    pytest.skip("needs more than one device")
  n = jax.local_device_count()
  kw = dict(num_samples=n, batch_size=n, shard_size=n, steps=2)
  run_lib.run_sampling(runlocal(tmp_path / "one", **kw))
  run_lib.run_sampling(runlocal(tmp_path / "many", multi_device=True, **kw))
  with np.load(tmp_path / "one" / SHARDS[0]) as a, np.load(tmp_path / "many" / SHARDS[0]) as b:
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["latents"], b["latents"], atol=1e-4, rtol=1e-4)


def _first_batch_by_hand(model, params, plan):
  """Shard 0 of the runlocal config, recomputed from the documented key derivation.

  Shard k's key is `fold_in(key(seed), k)`, batch b's `fold_in(shard_key, b)`, split into start
  noise, labels and sampler noise; the runlocal config samples DDIM-10 with guidance 1.5.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0)
  k_noise, k_label, k_sample = jax.random.split(key, 3)
  x_T = jax.random.normal(k_noise, (4, 8, 8, 4))
  labels = jax.random.randint(k_label, (4,), 0, 10, np.int32)
  x = run_lib.sampling_lib.sample(model, params, k_sample, sampler="ddim", steps=10,
                                      labels=labels, guidance=1.5, plan=plan, x_T=x_T)
  return np.asarray(x), np.asarray(labels)


def test_ase_plan_from_the_config_really_skips_blocks(reference, tmp_path):
  ref, _ = reference
  out = tmp_path / "ase"
  config = runlocal(out, plan="ase:D3-DiT", num_samples=4)
  config.plan_options.depth = 3
  result = run_lib.run_sampling(config)
  assert result["plan"] == "ase:D3-DiT" and 0.0 < result["plan_ideal_saving"] < 1.0
  model, params = run_lib.load_backbone(config)
  with_plan, labels = _first_batch_by_hand(model, params, ase.ase_plan("D3-DiT", depth=3))
  full, _ = _first_batch_by_hand(model, params, None)
  with np.load(out / SHARDS[0]) as z, np.load(ref / SHARDS[0]) as r:
    np.testing.assert_array_equal(z["labels"], labels)
    np.testing.assert_array_equal(r["labels"], labels)
    np.testing.assert_allclose(r["latents"], full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z["latents"], with_plan, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(z["latents"] - r["latents"])) > 1e-3  # the plan changed the network
  assert json.loads((out / "config.json").read_text())["plan_options"]["depth"] == 3
  # The 28-block table does not fit the 3-block model: refused before anything is written.
  with pytest.raises(ValueError, match="runs up to 28 blocks but the model has 3"):
    run_lib.run_sampling(runlocal(tmp_path / "bad", plan="D3-DiT"))
  assert not (tmp_path / "bad").exists()


def test_mask_and_duodiff_specs_build_plans(tmp_path):
  model = models.create("dit", **_config_module("sample_dit").DIT_TINY)
  mask = np.ones((10, 3), bool)
  mask[5:, 1] = False
  masks.MaskPlan(mask).save(str(tmp_path / "plan.npz"))
  for spec in (f"mask:{tmp_path / 'plan.npz'}", str(tmp_path / "plan.npz")):
    plan = run_lib.make_plan(runlocal(tmp_path / "out", plan=spec), model)
    assert isinstance(plan, masks.MaskPlan)
    np.testing.assert_array_equal(plan.mask, mask)
  # A mask made for 10 NFEs does not fit DDIM-5: a clear error, and nothing is written.
  with pytest.raises(ValueError, match="mask has shape"):
    run_lib.run_sampling(runlocal(tmp_path / "out", plan=f"mask:{tmp_path / 'plan.npz'}",
                                      steps=5))
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    run_lib.make_plan(runlocal(tmp_path, plan="mask:missing.npz"), model)
  config = runlocal(tmp_path / "out", plan="duodiff:200")
  config.plan_options.shallow_ckpt = str(FIXTURES / "dit_tiny.pt")
  plan = run_lib.make_plan(config, model)
  assert isinstance(plan, duodiff.DuoDiffPlan) and plan.t_switch == 200.0
  assert plan.shallow_model == model and plan.rule == "threshold"
  with pytest.raises(ValueError, match="unknown ASE schedule 'D9-DiT'"):
    run_lib.make_plan(runlocal(tmp_path, plan="ase:D9-DiT"), model)


def test_deediff_spec_loads_trained_heads(tmp_path):
  import json
  import jax
  from jaxee.exits import deediff, deediff_heads
  model = models.create("dit", **_config_module("sample_dit").DIT_TINY)
  ee = deediff_heads.init_deediff_params(model, jax.random.PRNGKey(0), uem="token_mean")
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(ee)[0]}
  meta = json.dumps({"threshold": 0.3, "uem": "token_mean"})
  np.savez(tmp_path / "deediff_heads.npz", __meta__=np.array(meta), **flat)
  plan = run_lib.make_plan(runlocal(tmp_path / "out", plan=f"deediff:{tmp_path}"), model)
  assert isinstance(plan, deediff.DeeDiffPlan)
  assert plan.threshold == 0.3 and plan.mode == "batched" and plan.uem == "token_mean"
  config = runlocal(tmp_path / "out", plan=f"deediff:{tmp_path / 'deediff_heads.npz'}")
  config.plan_options.threshold = 0.1
  config.plan_options.mode = "exact"
  plan = run_lib.make_plan(config, model)
  assert plan.threshold == 0.1 and plan.mode == "exact"
  jax.tree.map(np.testing.assert_array_equal, plan.ee_params, jax.tree.map(np.asarray, ee))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no DeeDiff heads file"):
    run_lib.make_plan(runlocal(tmp_path, plan=f"deediff:{tmp_path / 'empty'}"), model)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run_lib.make_plan(runlocal(tmp_path, plan=f"deediff:{tmp_path / 'missing'}"), model)


def test_converted_orbax_checkpoint_gives_the_same_samples(reference, tmp_path):
  ref, _ = reference
  config = runlocal(tmp_path / "run", num_samples=4)
  model, params = run_lib.load_backbone(config)
  config.ckpt = str(orbax_io.save_converted(tmp_path / "ckpt", model, params))
  run_lib.run_sampling(config)
  assert _bytes(tmp_path / "run", SHARDS[:1]) == _bytes(ref, SHARDS[:1])


def test_sampler_schedule_mismatch_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="runs on the 'vp_continuous' schedule"):
    run_lib.run_sampling(runlocal(tmp_path, sampler="euler_ode"))
  with pytest.raises(ValueError, match="runs on the 'linear_discrete' schedule, not"):
    run_lib.validate_config(runlocal(tmp_path, schedule="sd_discrete"))
  assert not (tmp_path / "config.json").exists()


def test_importing_the_cli_module_keeps_jaxee_sample_callable(reference):
  import jaxee  # pylint: disable=g-import-not-at-top
  import jaxee.cli.sample  # pylint: disable=g-import-not-at-top,unused-import
  import jaxee.sharded.run  # pylint: disable=g-import-not-at-top,unused-import
  import jaxee.sampling  # pylint: disable=g-import-not-at-top
  from jaxee import sample as by_name  # pylint: disable=g-import-not-at-top
  assert jaxee.sample is jaxee.sampling.sample and by_name is jaxee.sampling.sample
  assert inspect.isfunction(jaxee.sample)
  assert importlib.util.find_spec("jaxee.sample") is None  # no module shadows the function
  model, params = run_lib.load_backbone(runlocal(reference[0]))
  x_T = jax.random.normal(jax.random.key(5), (4, 8, 8, 4))
  labels = np.array([1, 2, 3, 4], np.int32)
  kw = dict(sampler="ddim", steps=10, labels=labels, guidance=1.5, x_T=x_T)
  a = jaxee.sample(model, params, jax.random.key(1), **kw)
  assert a.shape == (4, 8, 8, 4) and bool(np.isfinite(np.asarray(a)).all())


def test_cli_main_reports_bad_input_and_resumes(reference, tmp_path, capsys):
  from jaxee.sharded import run as engine  # pylint: disable=g-import-not-at-top,reimported
  from jaxee.cli import sample as cli  # pylint: disable=g-import-not-at-top
  assert engine is run_lib
  out = tmp_path / "run"
  shutil.copytree(reference[0], out)
  assert cli.main(["prog"], runlocal(out, steps=5)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "steps: saved 10 != now 5" in err
  assert "Traceback" not in err
  assert cli.main(["prog"], runlocal(out)) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["shards_skipped"] == 3
  assert "0 shard(s) sampled, 3 already present" in captured.err


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
  return subprocess.run([sys.executable, "-m", "jaxee.cli.sample", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def test_command_line_runlocal_end_to_end_matches_library_run(reference, tmp_path):
  ref, _ = reference
  shown = _run_cli("--help")
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert "`jaxee-sample`: sampling from the command line" in shown.stdout + shown.stderr
  out = tmp_path / "cli"
  proc = _run_cli("--config=configs/sample_dit.py:runlocal", f"--config.out_dir={out}",
                  "--config.multi_device=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert result["shards_computed"] == 3 and result["images_per_s"] > 0
  assert "sampling: 100%" in proc.stderr and "images/s" in proc.stderr  # progress bar, summary
  # Same seed → the same bytes, across processes and entry points.
  assert _bytes(out, SHARDS + ["grid.png"]) == _bytes(ref, SHARDS + ["grid.png"])
