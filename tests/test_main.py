"""The training loop and entry point: resume, metrics, non-finite stop, corrupt checkpoints, CLI.

The loop runs on the real input pipeline (8x8 digits), checkpointer, metric writer and parallel
steps, but with a linear objective (`LinearSetup`, injected through `trainer.build_setup`) so
that each run compiles in about a second. The full DiT baseline through the CLI is exercised by
`test_train_resume.py` (kill -9) and `test_multihost.py`.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.train import launch as main_lib
from jaxee.train import checkpoint
from jaxee.train import config_base
from jaxee.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _baseline_config(arg="runlocal"):
  spec = importlib.util.spec_from_file_location("train_baseline",
                                                REPO / "configs" / "train_baseline.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class LinearSetup:
  """A method setup with a linear regressor (label from pixels) and all optional hooks."""

  def __init__(self, nan_at_step=None, with_hooks=False):
    self.params = {"w": np.zeros((64,), np.float32), "b": np.zeros((), np.float32)}
    self.frozen_patterns = ()
    self.nan_at_step = nan_at_step
    self.exported = None
    if with_hooks:
      self.extras = {"scale": np.float32(1.0)}
      self.calls = 0

  def loss_fn(self, params, batch, rng, *, train_state_extras):
    x = batch["image"].reshape(batch["image"].shape[0], -1)
    y = batch["label"].astype(jnp.float32)
    pred = x @ params["w"] + params["b"] + 0.1 * jax.random.normal(rng, y.shape)
    loss = jnp.mean((pred - y) ** 2) * train_state_extras.get("scale", 1.0)
    if self.nan_at_step is not None:  # step is the count before this update (0-based)
      loss = jnp.where(train_state_extras["step"] + 1 == self.nan_at_step, jnp.nan, loss)
    return loss, {"pred_mean": jnp.mean(pred)}

  def export(self, workdir, params):
    self.exported = jax.tree.map(np.asarray, params)

  # Optional hooks (only with_hooks=True defines `extras`; the loop uses them when present).
  def on_log(self, step, metrics):
    if not hasattr(self, "extras"):
      return None
    self.calls += 1
    return {"scale": 0.5} if step >= 2 else None

  def host_state(self):
    return {"calls": getattr(self, "calls", 0)}

  def load_host_state(self, state):
    self.calls = state["calls"]


def _train(workdir, monkeypatch, setup, **train_overrides):
  config = _baseline_config()
  config.train.tensorboard = True
  for k, v in train_overrides.items():
    config.train[k] = v
  monkeypatch.setattr(trainer, "build_setup", lambda *a, **kw: setup)
  return trainer.train(config, workdir, model=trainer.build_model(config), params={})


def _losses(workdir):
  return [(m["step"], m["loss"]) for m in trainer.read_metrics(workdir)]


def test_resume_extends_run_and_matches_fresh_run(tmp_path, monkeypatch):
  fresh = _train(tmp_path / "fresh", monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2)
  assert fresh["start_step"] == 0 and fresh["step"] == 6
  assert fresh["checkpoint_steps"] == [4, 6]  # keep=2
  assert (tmp_path / "fresh" / "config.json").is_file()
  assert any((tmp_path / "fresh" / "tb").iterdir())

  part = tmp_path / "part"
  setup = LinearSetup()
  first = _train(part, monkeypatch, setup, num_steps=4, ckpt_every=2)
  assert first["step"] == 4 and setup.exported is not None
  # Lines an interrupted run would have logged after its last checkpoint are dropped.
  with open(part / trainer.METRICS_FILE, "a") as f:
    f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "lo')
  second = _train(part, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2)
  assert second["start_step"] == 4 and second["step"] == 6
  assert _losses(part) == _losses(tmp_path / "fresh")
  assert [s for s, _ in _losses(part)] == list(range(1, 7))


def test_nonfinite_loss_stops_before_saving(tmp_path, monkeypatch):
  with pytest.raises(trainer.NonFiniteLossError) as info:
    # Logged only every 5 steps: the sticky `healthy` flag is read at the step-4 checkpoint.
    _train(tmp_path, monkeypatch, LinearSetup(nan_at_step=3), num_steps=8, ckpt_every=2,
           log_every=5)
  message = str(info.value)
  assert "step 3" in message and "state kept at step 2" in message
  assert "latest checkpoint is step 2" in message
  mgr = checkpoint.TrainCheckpointer(tmp_path / "checkpoints")
  assert mgr.all_steps() == [2]
  mgr.close()
  assert not (tmp_path / trainer.METRICS_FILE).read_text().strip()  # nothing logged after


def test_corrupt_latest_checkpoint_error_then_explicit_fallback(tmp_path, monkeypatch, caplog):
  _train(tmp_path / "ref", monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3)
  work = tmp_path / "run"
  _train(work, monkeypatch, LinearSetup(), num_steps=4, ckpt_every=2, keep=3)
  for f in (work / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(os.urandom(f.stat().st_size))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 4"):
    _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3)
  with caplog.at_level("WARNING"):
    out = _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3,
                 ckpt_fallback=True)
  assert "falling back" in caplog.text
  assert out["start_step"] == 2 and out["step"] == 6
  assert _losses(work) == _losses(tmp_path / "ref")


def test_parallel_kinds_agree_with_hooks(tmp_path, monkeypatch):
  results = {}
  for kind in config_base.PARALLEL_KINDS:
    setup = LinearSetup(with_hooks=True)
    _train(tmp_path / kind, monkeypatch, setup, num_steps=4, ckpt_every=4, parallel=kind)
    results[kind] = [l for _, l in _losses(tmp_path / kind)]
    mgr = checkpoint.TrainCheckpointer(tmp_path / kind / "checkpoints")
    meta = mgr.read_meta(4)
    assert meta["host"] == {"calls": 4}  # on_log ran at every log step, host state saved
    assert meta["loader"] == {"epoch": 0, "index": 64}
    assert float(mgr.restore_flat(4, meta)["extras.scale"]) == 0.5  # on_log's update landed
    mgr.close()
  np.testing.assert_allclose(results["pmap"], results["shard_map"], rtol=1e-6)
  np.testing.assert_allclose(results["jit"], results["shard_map"], rtol=1e-6)


def test_validate_config_and_args():
  config = _baseline_config()
  trainer.validate_config(config)
  for field, value, match in [("method", "nope", "config.method"),
                              ("train.parallel", "pjit", "config.train.parallel"),
                              ("data.batch_size", 12, "batch_size"),
                              ("train.ema_decay", 1.5, "ema_decay"),
                              ("train.num_steps", 0, "num_steps")]:
    bad = _baseline_config()
    section, _, name = field.rpartition(".")
    (bad[section] if section else bad)[name] = value
    with pytest.raises(ValueError, match=match):
      trainer.validate_config(bad)
  with pytest.raises(ValueError, match="unknown config argument"):
    _baseline_config("runlocal,colour=red")
  assert _baseline_config("runlocal,parallel=pmap,steps=3").train.num_steps == 3
  assert main_lib.METHODS == config_base.METHODS


def test_cli_bad_config_exits_with_message(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "jaxee.main", "--config=configs/train_baseline.py:runlocal",
       f"--workdir={tmp_path}", "--config.train.parallel=pjit"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.train.parallel='pjit'" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


# Issue 16 item 3: no silent restart from step 0; item 8: optimizer checks, resume changes, workdir.


def _corrupt_all_steps(work):
  for step_dir in (work / "checkpoints").iterdir():
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(os.urandom(f.stat().st_size))


def test_failed_fallback_is_not_followed_by_a_restart_from_zero(tmp_path, monkeypatch):
  work = tmp_path / "run"
  _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3)
  logged = (work / trainer.METRICS_FILE).read_text()
  _corrupt_all_steps(work)
  with pytest.raises(checkpoint.CorruptCheckpointError):  # every step corrupt: moved aside
    _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3,
           ckpt_fallback=True)
  assert len(list((work / checkpoint.CORRUPT_DIR).iterdir())) == 3
  with pytest.raises(trainer.workdir_lib.NoUsableCheckpointError) as info:
    _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2, keep=3,
           ckpt_fallback=True)
  message = str(info.value)
  assert "checkpoints_corrupt/ holds 3" in message and "new --workdir" in message
  assert (work / trainer.METRICS_FILE).read_text() == logged  # nothing overwritten


def test_deleted_checkpoints_are_not_a_restart_from_zero(tmp_path, monkeypatch):
  import shutil
  work = tmp_path / "run"
  _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2)
  logged = (work / trainer.METRICS_FILE).read_text()
  shutil.rmtree(work / "checkpoints")
  with pytest.raises(ValueError, match="metrics.jsonl logs training up to step 6"):
    _train(work, monkeypatch, LinearSetup(), num_steps=6, ckpt_every=2)
  assert (work / trainer.METRICS_FILE).read_text() == logged
  # A run killed before any checkpoint could have been finalized still simply starts over.
  early = tmp_path / "early"
  early.mkdir()
  (early / trainer.METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n')
  assert _train(early, monkeypatch, LinearSetup(), num_steps=2, ckpt_every=2)["step"] == 2


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("lr", 0.0), ("lr", float("nan")),
                                         ("b2", 1.5), ("warmup_steps", -10),
                                         ("weight_decay", -0.1)])
def test_optimizer_overrides_are_validated(field, value):
  config = _baseline_config()
  config.optim[field] = value
  with pytest.raises(ValueError, match=f"config.optim.{field}"):
    trainer.validate_config(config)


def test_changed_config_on_resume_is_logged_and_recorded(tmp_path, monkeypatch, caplog):
  work = tmp_path / "run"
  _train(work, monkeypatch, LinearSetup(), num_steps=4, ckpt_every=2)
  config = _baseline_config()
  config.train.num_steps, config.train.ckpt_every, config.train.tensorboard = 6, 2, True
  config.optim.lr = 5e-4
  monkeypatch.setattr(trainer, "build_setup", lambda *a, **kw: LinearSetup())
  with caplog.at_level("WARNING"):
    out = trainer.train(config, work, model=trainer.build_model(config), params={})
  assert "optim.lr: 0.001 -> 0.0005" in caplog.text and "train.num_steps: 4 -> 6" in caplog.text
  assert out["config_changes"]["optim.lr"] == [1e-3, 5e-4]
  events = [r for r in trainer.read_metrics(work, events=True) if "event" in r]
  assert events == [{"step": 4, "event": "config_changed", "changes": out["config_changes"]}]
  assert [r["step"] for r in trainer.read_metrics(work)] == list(range(1, 7))


def test_workdir_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "workdir"
  path.write_text("a file")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    _train(path, monkeypatch, LinearSetup(), num_steps=2)
  with pytest.raises(ValueError, match="is a file, not a directory"):
    main_lib.train_and_evaluate(_baseline_config(), str(path))
  with pytest.raises(ValueError, match="cannot create workdir"):
    _train(pathlib.Path("/proc/jaxee_no_workdir"), monkeypatch, LinearSetup(), num_steps=2)
