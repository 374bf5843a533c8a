"""TABM mask optimisation (`jaxee/train/objectives/masks.py`), tiny DiT / U-ViT, few steps."""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee.exits import mask_tools
from jaxee.exits import masks as masks_lib
from jaxee import models
from jaxee import testing
from jaxee.models import backbone as bb_lib
from jaxee.train.objectives import masks as masks_opt
from jaxee.train.objectives import masks_teacher

STEPS = 4
OPTS = dict(sampler="ddim", steps=STEPS, num_samples=2, iters_per_step=12, lr=0.05,
            lambda1=1e-2, lambda2=1e-2, labels="random")


@pytest.fixture(scope="module")
def dit():
  return testing.tiny_dit(depth=3)


@pytest.fixture(scope="module")
def run_dir(dit, tmp_path_factory):
  """One full `masks_opt.run` (teacher + optimisation + plan file), shared by the tests."""
  model, params = dit
  before = copy.deepcopy(jax.tree.map(np.asarray, params))
  workdir = tmp_path_factory.mktemp("tabm")
  path = masks_opt.run({"masks": dict(OPTS), "train": {"seed": 3}}, str(workdir), model, params)
  return workdir, path, before


def test_time_weights_follow_relative_feature_change():
  delta = np.array([0.0, 1.0, 0.4, 0.05, 0.6, 0.099])
  np.testing.assert_array_equal(masks_opt.time_weights(delta), [1.0, 1.0, 1.5, 2.0, 1.0, 2.0])
  np.testing.assert_array_equal(masks_opt.time_weights(np.array([0.0])), [1.0])


def test_options_reject_bad_values():
  with pytest.raises(ValueError, match="threshold θ must be in"):
    masks_opt.options_from_config({"threshold": 1.5})
  with pytest.raises(ValueError, match="unknown config.masks field"):
    masks_opt.options_from_config({"lambda3": 1.0})
  with pytest.raises(ValueError, match="w_values needs"):
    masks_opt.options_from_config({"w_values": (1.0, 2.0)})


def test_run_changes_only_masks_and_writes_a_sampler_plan(dit, run_dir):
  model, params = dit
  workdir, path, before = run_dir
  # The frozen backbone is untouched.
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  plan = masks_lib.load_mask_plan(path)
  meta = plan.metadata
  assert plan.mask.shape == (STEPS, model.depth)
  assert plan.unit == "block" and plan.cache_mode == "block_output"
  assert plan.mask[0].all()
  np.testing.assert_array_equal(plan.mask, mask_tools.rectify(plan.mask))
  scores = np.asarray(meta["scores"])
  assert scores.shape == (STEPS, model.depth)
  assert np.all((scores >= 0) & (scores <= 1))
  assert np.any(np.abs(scores[1:] - 0.9) > 1e-3), "the scores (masks) were optimised"
  assert meta["sampler"] == "ddim" and meta["sampler_steps"] == STEPS and meta["rectified"]
  assert len(meta["w"]) == STEPS and set(meta["w"]) <= {1.0, 1.5, 2.0}
  assert (workdir / masks_opt.METRICS_FILE).exists()

  out, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim",
                            steps=STEPS, labels=jnp.array([1, 2]), plan=plan, return_stats=True)
  assert out.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(stats["blocks"]), plan.mask.sum(1), atol=1e-6)


def test_restart_resumes_from_progress_and_refuses_foreign_progress(dit, run_dir):
  model, params = dit
  workdir, path, _ = run_dir
  first = masks_lib.load_mask_plan(path).metadata["scores"]
  again = masks_opt.run({"masks": dict(OPTS), "train": {"seed": 3}}, str(workdir), model, params)
  assert masks_lib.load_mask_plan(again).metadata["scores"] == first
  with pytest.raises(ValueError, match="different options"):
    masks_opt.run({"masks": dict(OPTS, lambda1=0.5), "train": {"seed": 3}}, str(workdir), model,
                  params)


def test_sparsity_weight_controls_the_masks(dit):
  model, params = dit
  opts = masks_opt.options_from_config(OPTS)     # same statics: the compiled step is reused
  traj = masks_opt.record_teacher(model, params, opts, jax.random.PRNGKey(5))
  # δ against the next executed NFE (default 'next'): defined at every NFE, the last one falling
  # back to its previous pair.
  assert traj.x.shape == (STEPS, 2, 8, 8, 4) and np.all(traj.delta > 0)
  dense = masks_opt.optimise_masks(model, params, traj, dataclasses.replace(
      opts, lambda1=0.0, lambda2=0.0), jax.random.PRNGKey(0))
  sparse = masks_opt.optimise_masks(model, params, traj, dataclasses.replace(opts, lambda1=1e4),
                                    jax.random.PRNGKey(0))
  assert dense["mask"].all(), "without a sparsity cost every block keeps computing"
  assert not sparse["mask"][1:].any(), "a huge sparsity cost skips every block after NFE 0"


def _flat(values):
  return jnp.concatenate(values, axis=0)


def _split(bb, flat):
  return tuple(flat[seg.start:seg.stop] for seg in bb.segments)


def test_relaxed_forward_matches_the_uvit_mask_runner():
  model, params = testing.tiny_uvit(depth=4)        # 2 in-blocks, mid, 2 out-blocks: 5 units
  bb = bb_lib.as_backbone(model, "block")
  x, y = testing.example_inputs(model, 2)
  t = jnp.full((2,), 300.0)
  row = np.array([0, 1, 0, 1, 1], bool)
  bound = masks_lib.MaskPlan(np.stack([np.ones(5, bool), row])).bind(
      model, params, np.array([600.0, 300.0]))

  @jax.jit
  def both(p, cache_noise):
    state = bb.embed(p, x, t, y)
    full, outs = masks_opt.run_blocks(model, p, state)
    cache = _split(bb, _flat(outs) + cache_noise)
    h, mixed = masks_opt.run_blocks(model, p, state, jnp.asarray(row, jnp.float32), cache)
    ref, _, _ = bound.net(x, t, y, jnp.int32(1), cache)   # the runner's cache is the same tuple
    return (bb.head(p, full), model.apply({"params": p}, x, t, y), _flat(cache), _flat(mixed),
            bb.head(p, h), ref)

  noise = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (5, 2, 17, 32))
  full, apply_out, cache, mixed, masked, ref = both(params, noise)
  np.testing.assert_allclose(full, apply_out, atol=1e-5)      # gates None: the full network
  np.testing.assert_array_equal(mixed[~row], cache[~row])     # skipped blocks output the cache
  np.testing.assert_allclose(masked, ref, atol=1e-5)          # = the sampler's mask runner
  assert float(jnp.max(jnp.abs(masked - full))) > 1e-3


def test_random_label_range_without_family():
  # Today's rule was "minus one for a U-ViT with a null class"; the contract-level rule (minus one
  # when the null row is inside the label table) agrees on both families.
  dit, _ = testing.tiny_dit(depth=3)
  assert dit.null_class == dit.num_classes                      # null row outside the table
  assert masks_teacher.num_real_classes(dit) == dit.num_classes
  uvit = models.create("uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2,
                       num_heads=4, num_classes=11, cfg_null_class=10)
  assert masks_teacher.num_real_classes(uvit) == 10
  uncond = models.create("uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2,
                         num_heads=4, num_classes=11)
  assert masks_teacher.num_real_classes(uncond) == 11
  for m in (dit, uvit, uncond):
    legacy = m.num_classes - (1 if m.family == "uvit" and m.null_class is not None else 0)
    assert masks_teacher.num_real_classes(m) == legacy


def test_recorder_plan_is_an_empty_pytree():
  recorder = masks_teacher._RECORDER  # pylint: disable=protected-access
  leaves, tree = jax.tree.flatten(type(recorder)())
  assert leaves == [] and tree == jax.tree.structure(recorder)
