"""The three data-parallel wrappers of `step_core` agree; rngs, donation and frozen groups.

Runs on the 8 fake CPU devices set up by `conftest.py`, with a depth-2, width-32 DiT on 8x8x4
inputs and the epsilon-MSE objective of `jaxee.train.objectives.diffusion`. The three 3-step
runs are compiled once (module fixture) and shared by the agreement, donation and frozen-group
tests: AdamW with weight decay, a cosine schedule, clipping and two frozen groups.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxee import models
from jaxee.train import optim
from jaxee.train import state as state_lib
from jaxee.train import step as step_lib
from jaxee.train.objectives import diffusion

BATCH = 16
OPT = dict(lr=1e-3, weight_decay=0.05, grad_clip_norm=1.0)
# The shared runs: frozen embedders, a strong weight decay and a schedule, so that a frozen leaf
# that moved (decay or schedule leaking through) cannot go unnoticed.
RUN = dict(OPT, frozen_patterns=["t_embedder/.*", "y_embedder/.*"], weight_decay=0.5,
           schedule="cosine", warmup_steps=0, num_steps=10)


@pytest.fixture(scope="module")
def setup():
  model = models.create("dit", input_size=8, hidden_size=32, depth=2, num_heads=2,
                        num_classes=10)
  x = jnp.zeros((2, 8, 8, 4))
  # One jitted init (eager init dispatches and compiles hundreds of tiny ops).
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros(2),
                               jnp.zeros(2, jnp.int32))["params"]
  params = jax.device_get(params)
  return model, params, diffusion.make_eps_mse_loss(model)


def _batches(n):
  return [diffusion.synthetic_batch(i, BATCH) for i in range(n)]


def _run(kind, model, params, loss_fn, config=None, steps=3):
  """`steps` steps of `kind`; returns (host state, losses, first input state deleted?)."""
  config = dict(OPT, **(config or {}))
  tx = optim.make_optimizer(config, params)
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(42))
  ps = step_lib.make_train_step(kind, loss_fn=loss_fn, tx=tx, ema_decay=0.9)
  s = placed = ps.place_state(state)
  rng = ps.place_rng(state.rng)
  losses = []
  for batch in _batches(steps):
    s, metrics = ps(s, ps.place_batch(batch), rng)
    losses.append(ps.host_metrics(metrics)["loss"])
  donated = placed.params["blocks"]["attn"]["qkv"]["kernel"].is_deleted()
  # The host-side original survives donation: place_state copies.
  assert np.isfinite(np.asarray(state.params["blocks"]["attn"]["qkv"]["kernel"])).all()
  return jax.device_get(ps.canonical_state(s)), losses, donated


@pytest.fixture(scope="module")
def runs(setup):
  model, params, loss_fn = setup
  return {kind: _run(kind, model, params, loss_fn, config=RUN) for kind in step_lib.KINDS}


@pytest.mark.parametrize("kind", ["pmap", "jit"])
def test_wrappers_agree_with_shard_map(runs, kind):
  ref_state, ref_losses, _ = runs["shard_map"]
  state, losses, _ = runs[kind]
  assert int(state.step) == 3
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
  for tree in ("params", "ema_params"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 getattr(state, tree), getattr(ref_state, tree))
  # And the run really trained: params moved.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params, state.ema_params)
  assert max(jax.tree.leaves(moved)) > 0


def test_per_device_noise_differs_and_matches_across_wrappers(setup):
  model, params, _ = setup
  draws = {}

  def probe_loss(p, batch, rng, *, train_state_extras):
    t = jax.random.randint(jax.random.split(rng)[0], batch["row"].shape, 0, 1000)

    def record(rows, ts, kind=None):
      for r, v in zip(np.asarray(rows).reshape(-1), np.asarray(ts).reshape(-1)):
        draws.setdefault(record.kind, {})[int(r)] = int(v)
    record.kind = probe_loss.kind
    jax.debug.callback(record, batch["row"], t)
    leaf = p["final_layer"]["linear"]["bias"]
    return jnp.mean(leaf) * 0 + jnp.mean(t.astype(jnp.float32)), {}

  batch = {"row": np.arange(BATCH, dtype=np.int32)}
  tx = optax.sgd(0.0)
  for kind in step_lib.KINDS:
    probe_loss.kind = kind
    ps = step_lib.make_train_step(kind, loss_fn=probe_loss, tx=tx, ema_decay=0.9)
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
    _, metrics = ps(ps.place_state(state), ps.place_batch(batch), ps.place_rng(state.rng))
    jax.block_until_ready(metrics)
  per_dev = BATCH // jax.device_count()
  ref = draws["shard_map"]
  assert sorted(ref) == list(range(BATCH))
  dev0 = [ref[r] for r in range(per_dev)]
  dev1 = [ref[r] for r in range(per_dev, 2 * per_dev)]
  assert dev0 != dev1, "devices 0 and 1 drew the same timesteps"
  assert draws["pmap"] == ref
  assert draws["jit"] == ref


@pytest.mark.parametrize("kind", step_lib.KINDS)
def test_donation_deletes_input_state(runs, kind):
  assert runs[kind][2], f"{kind}: the state passed to the step was not donated"


def test_trainable_mask_patterns(setup):
  _, params, _ = setup
  assert optim.frozen_paths(params, ["t_embedder/.*"]) == [
      "t_embedder/mlp_0/bias", "t_embedder/mlp_0/kernel",
      "t_embedder/mlp_2/bias", "t_embedder/mlp_2/kernel"]
  mask = optim.trainable_mask(params, "^(?!final_layer).*")
  flat = {optim.param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["final_layer/linear/kernel"] and not flat["blocks/attn/qkv/kernel"]
  with pytest.raises(ValueError, match="freeze every parameter"):
    optim.make_optimizer({"frozen_patterns": [".*"]}, params)


@pytest.mark.parametrize("kind", step_lib.KINDS)
def test_frozen_groups_unchanged_with_weight_decay(setup, runs, kind):
  _, params, _ = setup
  state = runs[kind][0]
  mask = optim.trainable_mask(params, RUN["frozen_patterns"])
  counts = {"frozen": 0, "trainable": 0}

  def check(path, trainable, new, old):
    name = optim.param_path(path)
    if trainable:
      # AdamW's decoupled decay (0.5) moves every non-zero trainable leaf, whatever its
      # gradient (DiT's adaLN-Zero init leaves some block gradients exactly zero for a while).
      if np.abs(old).max() > 0:
        assert np.abs(new - old).max() > 0, name
        counts["trainable"] += 1
    else:
      np.testing.assert_array_equal(new, old, err_msg=name)
      counts["frozen"] += 1
  jax.tree_util.tree_map_with_path(check, mask, state.params, params)
  jax.tree_util.tree_map_with_path(
      lambda path, t, e, o: None if t else np.testing.assert_array_equal(e, o),
      mask, state.ema_params, params)
  assert counts["frozen"] >= 5 and counts["trainable"] >= 5, counts


def test_ema_update_and_warmup():
  ema = {"w": jnp.ones(3)}
  new = state_lib.update_ema(ema, {"w": jnp.zeros(3)}, 0.75)
  np.testing.assert_allclose(new["w"], 0.75)
  assert float(state_lib.ema_decay_at(0, 0.9999)) == pytest.approx(0.9999)
  assert float(state_lib.ema_decay_at(0, 0.9999, "linear")) == pytest.approx(0.1)


def test_nonfinite_step_keeps_state_and_halts(setup):
  """A non-finite step keeps the state; `healthy` is sticky, so later finite steps are no-ops."""
  _, params, _ = setup

  def poisoned(p, batch, rng, *, train_state_extras):
    # Cheap to compile: a quadratic in one leaf, NaN for batches flagged 'poison'.
    loss = jnp.mean((p["final_layer"]["linear"]["bias"] - jnp.mean(batch["image"])) ** 2) + 1.0
    return jnp.where(jnp.max(batch["poison"]) > 0, jnp.nan, loss), {}

  def batch(i, poison):
    return dict(_batches(i + 1)[i], poison=np.full((BATCH,), poison, np.float32))

  tx = optim.make_optimizer(OPT, params)
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  ps = step_lib.make_train_step("shard_map", loss_fn=poisoned, tx=tx, ema_decay=0.9)
  s, rng = ps.place_state(state), ps.place_rng(state.rng)
  s, bad = ps(s, ps.place_batch(batch(0, 1.0)), rng)
  s, later = ps(s, ps.place_batch(batch(1, 0.0)), rng)
  bad, later = ps.host_metrics(bad), ps.host_metrics(later)
  assert bad["finite"] == 0.0 and bad["healthy"] == 0.0
  assert later["finite"] == 1.0 and later["healthy"] == 0.0
  new = jax.device_get(s)
  assert int(new.step) == 0 and not bool(new.healthy)
  jax.tree.map(np.testing.assert_array_equal, new.params, params)
  jax.tree.map(np.testing.assert_array_equal, new.ema_params, params)

  # Control: the same step on a clean batch from the initial state does update it.
  s, m = ps(ps.place_state(state), ps.place_batch(batch(1, 0.0)), rng)
  assert ps.host_metrics(m)["healthy"] == 1.0 and int(jax.device_get(s).step) == 1
