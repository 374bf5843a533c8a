"""Unit tests of the ASE and DuoDiff objectives (`jaxee.train.objectives`) on tiny backbones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee import models
from jaxee.diffusion import gaussian
from jaxee.exits import ase
from jaxee import testing
from jaxee.train.objectives import ase as ase_obj
from jaxee.train.objectives import diffusion as diffusion_obj
from jaxee.train.objectives import duodiff as duodiff_obj

RNG = jax.random.PRNGKey(0)
# The truncated reference network (model and depth static).
_prefix = jax.jit(testing.reference_prefix, static_argnums=(0, 5))


def _per_sample_values_and_grads(loss_fn, params, batch, extras):
  """Each sample's own (loss, metrics) and gradient (vmapped single-sample batches), one jit."""
  def one(p, sample):
    b = jax.tree.map(lambda a: a[None], sample)
    return loss_fn(p, b, RNG, train_state_extras=extras)
  return jax.jit(jax.vmap(jax.value_and_grad(one, has_aux=True), in_axes=(None, 0)))(params,
                                                                                     batch)


def _prefix_outputs(model, params, x_t, t_net, y, depths):
  """The truncated reference network of each sample at its own depth, in one jit."""
  def run(p, x, t, yy):
    return jnp.concatenate([testing.reference_prefix(
        model, p, x[i:i + 1], t[i:i + 1], None if yy is None else yy[i:i + 1], n)
                            for i, n in enumerate(depths)])
  return jax.jit(run)(params, x_t, t_net, y)


def _max_abs(tree):
  return max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(tree))


# Random backbones are costly to build (an init compile each): one per shape, shared.
@pytest.fixture(scope="module")
def dit4():
  """A tiny class-conditional DiT of depth 4 with learned σ (hybrid loss)."""
  return testing.tiny_dit(depth=4)


@pytest.fixture(scope="module")
def uvit6():
  """A tiny unconditional U-ViT: 3 in-blocks, mid, 3 out-blocks."""
  return testing.tiny_uvit(depth=6)


@pytest.fixture(scope="module")
def dit2():
  """A tiny DiT of depth 2 without learned σ (ε-MSE), shared by the λ tests."""
  return testing.tiny_dit(depth=2, learn_sigma=False)


def test_ase_dit_gradients_reach_only_used_blocks_and_loss_is_truncated_hybrid(dit4):
  model, params = dit4                                 # learn_sigma: hybrid loss
  plan = ase.ase_plan("D3-DiT", depth=4)               # (4, 4, 3, 3, 3, 3, 2, 2, 2, 2)
  loss_fn = ase_obj.make_ase_loss(model, plan, boost=3.0, lambda_mode="cycle", cycle_length=5,
                                 loss="hybrid", label_dropout=0.0)
  x0, y = testing.example_inputs(model, 3)
  t = jnp.array([950, 50, 450], jnp.int32)             # depths 2, 4, 3
  noise = jax.random.normal(jax.random.PRNGKey(7), x0.shape)
  batch = {"image": x0, "label": y, "t": t, "noise": noise}
  extras = {"step": jnp.int32(0)}

  (per_loss, per_metrics), grads = _per_sample_values_and_grads(loss_fn, params, batch, extras)
  depths = [2, 4, 3]
  for i, n in enumerate(depths):
    blocks = jax.tree.map(lambda g: g[i], grads["blocks"])
    for l in range(4):
      size = _max_abs(jax.tree.map(lambda g: g[l], blocks))
      if l < n:
        assert size > 0, (i, l)
      else:
        assert size == 0.0, f"sample {i} (depth {n}) leaked gradient into block {l}"
    assert _max_abs(jax.tree.map(lambda g: g[i], grads["final_layer"])) > 0

  # Each sample's loss is the hybrid loss (mse + vb) of its truncated network, times λ.
  sched = diffusion_obj.training_schedule(model)
  x_t = gaussian.q_sample(sched, x0, t, noise)
  outs = _prefix_outputs(model, params, x_t, sched.at(t)["t_net"], y, depths)
  ref = gaussian.training_losses(sched, outs, x0, t, noise)
  assert float(jnp.min(ref["vb"])) > 0
  # λ = 1 + γ·(1 − n/4), γ = 3 (intervals 9, 0, 4 run 2, 4, 3 of 4 blocks): graded, not a
  # constant boost on every dropped interval (was 3, 1, 3 before issue 12).
  lam = np.array([2.5, 1.0, 1.75])
  np.testing.assert_allclose(per_loss, lam * ref["loss"], rtol=2e-5)
  np.testing.assert_allclose(per_metrics["vb"], ref["vb"], rtol=2e-5)
  np.testing.assert_allclose(per_metrics["mse"], ref["mse"], rtol=2e-5)
  np.testing.assert_allclose(per_metrics["weight_mean"], lam)


def test_ase_uvit_dropped_out_blocks_keep_only_skip_linear_gradients(uvit6):
  model, params = uvit6
  plan = ase.ase_plan("D1-U-ViT", depth=3)             # (3, 3, 2, 2, 1, 1, 1, 1, 1, 1)
  loss_fn = ase_obj.make_ase_loss(model, plan, cycle_length=5)
  x0, _ = testing.example_inputs(model, 2)
  batch = {"image": x0, "t": jnp.array([0.95, 0.25]),
           "noise": jax.random.normal(jax.random.PRNGKey(3), x0.shape)}
  _, grads = _per_sample_values_and_grads(loss_fn, params, batch, {"step": jnp.int32(0)})
  for i, n in enumerate([1, 2]):
    assert _max_abs(jax.tree.map(lambda g: g[i], grads["in_blocks"])) > 0
    assert _max_abs(jax.tree.map(lambda g: g[i], grads["mid_block"])) > 0
    for l in range(3):
      blk = jax.tree.map(lambda g: g[i, l], grads["out_blocks"])
      assert _max_abs(blk["skip_linear"]) > 0, "every skip_linear runs (paper Fig. 8)"
      body = {k: v for k, v in blk.items() if k != "skip_linear"}
      if l < n:
        assert _max_abs(body) > 0, (i, l)
      else:
        assert _max_abs(body) == 0.0, f"sample {i} leaked gradient into out-block {l}"


def test_ase_plain_eps_mse_without_learned_sigma(dit2):
  model, params = dit2
  plan = ase.ASEPlan((2,) * 5 + (1,) * 5)
  loss_fn = ase_obj.make_ase_loss(model, plan, lambda_mode="constant", boost=0.0,  # λ ≡ 1
                                 loss="simple", label_dropout=0.0)
  x0, y = testing.example_inputs(model, 2)
  t = jnp.array([10, 990])
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  batch = {"image": x0, "label": y, "t": t, "noise": noise}
  (per_loss, metrics), _ = _per_sample_values_and_grads(loss_fn, params, batch, {})
  sched = diffusion_obj.training_schedule(model)
  x_t = gaussian.q_sample(sched, x0, t, noise)
  out = _prefix_outputs(model, params, x_t, sched.at(t)["t_net"], y, [2, 1])
  np.testing.assert_allclose(per_loss, jnp.mean((out - noise) ** 2, axis=(1, 2, 3)), rtol=2e-5)
  np.testing.assert_array_equal(metrics["vb"], 0.0)


def test_ase_lambda_cycle_switches_once_or_repeats():
  once = [bool(ase_obj.ase_boost_active({"step": s}, "cycle", 3)) for s in range(8)]
  assert once == [True] * 3 + [False] * 5
  rep = [bool(ase_obj.ase_boost_active({"step": s}, "cycle", 3, True)) for s in range(8)]
  assert rep == [True, True, True, False, False, False, True, True]
  with pytest.raises(ValueError, match="lambda mode"):
    ase_obj.ase_boost_active({}, "sometimes")


def test_ase_lambda_applies_boost_only_in_boosted_phase(dit2):
  model, params = dit2
  plan = ase.ASEPlan((2,) * 5 + (1,) * 5)
  loss_fn = jax.jit(lambda p, b, e: ase_obj.make_ase_loss(
      model, plan, boost=4.0, lambda_mode="cycle", cycle_length=2, label_dropout=0.0)(
          p, b, RNG, train_state_extras=e))
  x0, y = testing.example_inputs(model, 2)
  noisy = {"image": x0, "label": y, "t": jnp.array([700, 999])}      # both run 1 of 2 blocks
  clean = dict(noisy, t=jnp.array([0, 400]))                         # both full-depth intervals
  for step, lam in [(0, 3.0), (1, 3.0), (2, 1.0), (50, 1.0)]:        # 1 + 4·(1 − 1/2), then 1
    _, m = loss_fn(params, noisy, {"step": jnp.int32(step)})
    np.testing.assert_allclose(float(m["weight_mean"]), lam)
    np.testing.assert_allclose(float(m["ase_boost"]), float(lam > 1))
    _, m = loss_fn(params, clean, {"step": jnp.int32(step)})
    np.testing.assert_allclose(float(m["weight_mean"]), 1.0)


def test_plateau_test_ends_boost_on_flat_loss_only(dit2):
  state = ase_obj.plateau_init()
  for i in range(1000):
    state = ase_obj.plateau_update(state, 10.0 * np.exp(-i / 200), window=50, patience=2)
  assert float(state["boost"]) == 1.0
  for _ in range(50 * 3):
    state = ase_obj.plateau_update(state, 0.5, window=50, patience=2)
  assert float(state["boost"]) == 0.0
  for i in range(500):       # never switches back on
    state = ase_obj.plateau_update(state, 0.1 * np.exp(-i), window=50, patience=2)
  assert float(state["boost"]) == 0.0

  model, params = dit2
  loss_fn = ase_obj.make_ase_loss(model, ase.ASEPlan((2,) * 5 + (1,) * 5), boost=2.0,
                                 lambda_mode="plateau", label_dropout=0.0)
  x0, y = testing.example_inputs(model, 2)
  batch = {"image": x0, "label": y, "t": jnp.array([990, 990])}
  run = jax.jit(lambda e: loss_fn(params, batch, RNG, train_state_extras=e)[1]["weight_mean"])
  on = run({"ase_boost": np.float32(ase_obj.plateau_init()["boost"])})
  off = run({"ase_boost": np.float32(state["boost"])})
  assert float(on) == 2.0 and float(off) == 1.0


# ------------------------------------------------------------------------------------------------
# λ(t) (issue 12): graded by the dropped fraction, time-dependent for every paper table.


@pytest.mark.parametrize("name", sorted(ase.ASE_TABLES))
def test_lambda_is_graded_over_the_ten_intervals_for_every_paper_table(name):
  table = ase.ASE_TABLES[name]
  ref = ase.REFERENCE_DEPTH[ase.TABLE_FAMILY[name]]
  arch = {"dit": "dit_xl_2", "uvit": "uvit_s4_celeba64"}[ase.TABLE_FAMILY[name]]
  model = models.create(arch)
  assert ase.capacity(model) == ref                  # 28 DiT-XL/2 blocks, 6 U-ViT-S out-blocks
  for gamma in (2.0, 0.5):
    lam = ase_obj.ase_lambda_table(ase.ase_plan(name), model, gamma)
    assert lam.shape == (10,) and len(set(lam.tolist())) >= 2, (name, lam)
    np.testing.assert_allclose(lam, 1 + gamma * (1 - np.asarray(table) / ref), rtol=1e-6)
    assert np.all(np.diff(lam) >= 0) and lam.min() >= 1.0   # larger towards t → 1 (noise)
  for depth in range(2, ref + 1):                    # rescaled: graded whenever the table is
    scaled = ase.scale_schedule(table, ref, depth)
    lam = ase_obj.lambda_values(scaled, depth, 2.0)
    assert (len(set(lam.tolist())) >= 2) == (len(set(scaled)) >= 2), (name, depth, scaled)


def test_lambda_values_documented_in_the_module():
  d3 = ase_obj.lambda_values(ase.ASE_TABLES["D3-DiT"], 28, 2.0)
  np.testing.assert_allclose(d3, [1, 1, 1.2857, 1.2857, 1.5714, 1.5714, 1.8571, 1.8571, 2.1429,
                                  2.1429], atol=1e-4)
  d6 = ase_obj.lambda_values(ase.ASE_TABLES["D6-U-ViT"], 6, 2.0)
  np.testing.assert_allclose(d6, [7 / 3] * 4 + [8 / 3] * 6, rtol=1e-6)
  np.testing.assert_array_equal(ase_obj.lambda_values((4,) * 10, 4, 2.0), np.ones(10))
  with pytest.raises(ValueError, match="does not fit capacity"):
    ase_obj.lambda_values((5,) * 10, 4, 2.0)


def test_make_ase_loss_defaults_are_the_config_schema():
  import inspect
  from jaxee.train import config_base
  sig = inspect.signature(ase_obj.make_ase_loss).parameters
  for arg, field in [("boost", "lambda_boost"), ("lambda_mode", "lambda_mode"),
                     ("cycle_length", "cycle_length"), ("cycle_repeat", "cycle_repeat"),
                     ("loss", "loss")]:
    assert sig[arg].default == config_base.ASE_DEFAULTS[field], arg
  assert config_base.ASE_DEFAULTS["lambda_mode"] == "plateau"
  plateau = inspect.signature(ase_obj.plateau_update).parameters
  assert plateau["patience"].default == config_base.ASE_DEFAULTS["plateau_patience"]
  assert plateau["rel_tol"].default == config_base.ASE_DEFAULTS["plateau_rel_tol"]


def test_ase_loss_kind_is_explicit(dit4, uvit6):
  dit, _ = dit4
  uvit, _ = uvit6
  assert ase_obj.resolve_loss("auto", dit) == "hybrid"     # learned σ on the discrete chain
  assert ase_obj.resolve_loss("auto", uvit) == "simple"    # U-ViT predicts ε only
  assert ase_obj.resolve_loss("simple", uvit) == "simple"
  with pytest.raises(ValueError, match="no learned-σ output.*reduces to L_simple"):
    ase_obj.resolve_loss("hybrid", uvit)
  with pytest.raises(ValueError, match="learns σ"):
    ase_obj.resolve_loss("simple", dit)
  with pytest.raises(ValueError, match="no learned-σ output"):
    ase_obj.make_ase_loss(uvit, ase.ase_plan("D1-U-ViT", depth=3), loss="hybrid")
  with pytest.raises(ValueError, match="unknown ASE loss"):
    ase_obj.resolve_loss("vlb", dit)


def test_duodiff_shallow_dit_from_deep_is_the_deep_prefix(dit4):
  deep, params = dit4
  shallow = models.create("dit", **{**_dit_kwargs(deep),
                                    "depth": duodiff_obj.shallow_depth(deep, 2)})
  sp = duodiff_obj.init_shallow_from_deep(params, deep, shallow)
  shapes = jax.eval_shape(shallow.init, RNG, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                          jnp.zeros((1,), jnp.int32))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(sp)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, sp)
  x, y = testing.example_inputs(deep, 2)
  t = jnp.array([3.0, 700.0])
  np.testing.assert_allclose(jax.jit(shallow.apply)({"params": sp}, x, t, y),
                             _prefix(deep, params, x, t, y, 2), atol=1e-5)


def test_duodiff_shallow_uvit_init_and_eps_mse(uvit6):
  # DuoDiff's U-ViTs train on the linear β chain (t in 0..999); the params do not depend on it.
  deep = uvit6[0].clone(default_schedule="linear_discrete")
  params = uvit6[1]
  depth = duodiff_obj.shallow_depth(deep, 3)
  assert depth == 2
  with pytest.raises(ValueError, match="odd number of layers"):
    duodiff_obj.shallow_depth(deep, 4)
  shallow = models.create("uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32,
                          depth=depth, num_heads=4, default_schedule="linear_discrete")
  sp = duodiff_obj.init_shallow_from_deep(params, deep, shallow)
  shapes = jax.eval_shape(shallow.init, RNG, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"]
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, sp)
  for a, b in zip(jax.tree.leaves(sp["in_blocks"]), jax.tree.leaves(params["in_blocks"])):
    np.testing.assert_array_equal(a[0], b[0])
  for a, b in zip(jax.tree.leaves(sp["out_blocks"]), jax.tree.leaves(params["out_blocks"])):
    np.testing.assert_array_equal(a[0], b[-1])     # consumes in-block 0's skip (LIFO)

  loss_fn = duodiff_obj.make_duodiff_loss(shallow)
  x0, _ = testing.example_inputs(shallow, 2)
  t = jnp.array([5, 999])
  noise = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(p, {"image": x0, "t": t, "noise": noise}, RNG), has_aux=True))(sp)
  sched = diffusion_obj.training_schedule(shallow)
  x_t = gaussian.q_sample(sched, x0, t, noise)
  eps = jax.jit(shallow.apply)({"params": sp}, x_t, t.astype(jnp.float32), None)   # DuoDiff: t in 0..999
  np.testing.assert_allclose(float(loss), float(jnp.mean((eps - noise) ** 2)), rtol=1e-5)
  assert "vb" not in metrics or float(metrics["vb"]) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _dit_kwargs(model):
  return dict(input_size=model.input_size, patch_size=model.patch_size,
              in_channels=model.in_channels, hidden_size=model.hidden_size,
              num_heads=model.num_heads, num_classes=model.num_classes)
