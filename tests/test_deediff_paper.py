"""DeeDiff as the paper trains it (issue 12, item 2): the per-element UEM map of Eq. 8–9 with
timestep-specific parameters, exits at layers 1..N ('outputs' layout), the runners against the
compute-everything reference of `test_exits_deediff.py`, joint training reaching the backbone,
and the heads file / plan spec carrying the layout. Tiny DiT and U-ViT (`deediff_fixtures`).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.exits import deediff
from jaxee.exits import deediff_heads as heads_lib
from jaxee.exits import io as io_lib
from jaxee.exits import spec as spec_lib
from jaxee.models.backbone import as_backbone
from jaxee.train.objectives import deediff as deediff_loss

import deediff_fixtures as fx
import test_exits_deediff as ref_lib

BATCH = 8


@functools.lru_cache(maxsize=None)
def _case(family):
  model, params = fx.tiny_backbone(family)
  x, y = fx.numpy_inputs(model, BATCH, seed=4)
  ee = heads_lib.init_deediff_params(model, jax.random.PRNGKey(21), "paper_map",
                                     backbone_params=params, layout="outputs")
  t = jnp.linspace(0.0, 999.0, BATCH)
  final, outs, u, states, _ = ref_lib.reference(model, params, ee_for_reference(model, ee), x,
                                                t, y, "paper_map")
  # Exit j of the paper layout reads the input of block j + 1: drop the reference's exit 0.
  return dict(model=model, params=params, ee=ee, x=x, y=y, t=t, final=final, outs=outs[1:],
              u=u[1:], states=states, num=as_backbone(model).num_units)


def ee_for_reference(model, ee):
  """The paper params padded with a dummy exit 0 so the L-exit reference can run them."""
  return jax.tree.map(lambda a: jnp.concatenate([a[:1], a]), ee)


@pytest.fixture(scope="module", params=["dit", "uvit"])
def case(request):
  return _case(request.param)


def _run(plan, c, nfe_times=(500.0,)):
  bound = plan.bind(c["model"], c["params"], np.asarray(nfe_times))
  out, _, stats = jax.jit(bound.net)(c["x"], c["t"], c["y"], 0, ())
  return np.asarray(out), {k: float(v) for k, v in stats.items()}, bound


def test_uem_map_is_per_element_in_unit_interval_and_timestep_specific(case):
  model = case["model"]
  bb = as_backbone(model)
  probe = heads_lib.make_uem(model, "paper_map")
  p0 = jax.tree.map(lambda a: a[0], case["ee"]["uems"])
  h = case["states"][1]
  emb = lambda tv: heads_lib.time_features(model, jnp.full((BATCH,), tv))  # noqa: E731
  u_map = np.asarray(probe.apply({"params": p0}, h, emb(100.0), method="uncertainty_map"))
  assert u_map.shape == (BATCH,) + tuple(bb.input_shape)  # one u per element of ε
  assert np.all((u_map > 0) & (u_map < 1)) and u_map.std() > 1e-3
  score = np.asarray(probe.apply({"params": p0}, h, emb(100.0)))
  np.testing.assert_allclose(score, u_map.reshape(BATCH, -1).mean(1), rtol=1e-6)
  # w_t, b_t depend on t: the same features give another map at another time ...
  other = np.asarray(probe.apply({"params": p0}, h, emb(900.0), method="uncertainty_map"))
  assert np.abs(other - u_map).max() > 1e-3
  # ... through both the generated scale (w_t) and the generated bias (b_t).
  for part in ("time_scale", "time_bias"):
    frozen = dict(p0, **{part: jax.tree.map(jnp.zeros_like, p0[part])})
    a = probe.apply({"params": frozen}, h, emb(100.0), method="uncertainty_map")
    b = probe.apply({"params": frozen}, h, emb(900.0), method="uncertainty_map")
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4, part
  none = {k: jax.tree.map(jnp.zeros_like, v) if k != "linear" else v for k, v in p0.items()}
  a = probe.apply({"params": none}, h, emb(100.0), method="uncertainty_map")
  b = probe.apply({"params": none}, h, emb(900.0), method="uncertainty_map")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_uem_map_uses_the_heads_token_layout(case):
  """A change in image token n moves only its p×p patch of the map (unpatchify as the head);
  non-image tokens (U-ViT's time token) do not enter the map."""
  model = case["model"]
  bb = as_backbone(model)
  probe = heads_lib.make_uem(model, "paper_map")
  p0 = jax.tree.map(lambda a: a[0], case["ee"]["uems"])
  h = case["states"][2]
  emb = heads_lib.time_features(model, case["t"])
  base = np.asarray(probe.apply({"params": p0}, h, emb, method="uncertainty_map"))
  extras = bb.num_tokens - (bb.input_shape[0] ** 2) // bb.pixels_per_token
  patch = int(round(np.sqrt(bb.pixels_per_token)))
  grid = bb.input_shape[0] // patch
  n = grid + 1  # image token (1, 1)
  moved = np.asarray(probe.apply({"params": p0}, h.at[:, extras + n].add(1.0), emb,
                                 method="uncertainty_map"))
  diff = np.abs(moved - base).max(axis=(0, 3)) > 0
  want = np.zeros_like(diff)
  want[patch:2 * patch, patch:2 * patch] = True
  np.testing.assert_array_equal(diff, want)
  if extras:
    same = probe.apply({"params": p0}, h.at[:, 0].add(1.0), emb, method="uncertainty_map")
    np.testing.assert_array_equal(np.asarray(same), base)


def _theta(c):
  """A θ that spreads the batch over several exits (u is sample-dependent)."""
  return float(np.quantile(c["u"], 0.35))


def _first(u, theta):
  return ref_lib.numpy_first_exit(u, theta)  # stacked index j; the exit layer is j + 1


def test_exact_and_batched_equal_the_reference(case):
  c = case
  theta = _theta(c)
  j = _first(c["u"], theta)
  assert len(set(j.tolist())) >= 2, j
  want = ref_lib.pick(c["final"], c["outs"], j)
  for mode in ("exact", "batched"):
    plan = deediff.DeeDiffPlan(c["ee"], theta, mode, uem="paper_map", layout="outputs")
    out, stats, _ = _run(plan, c)
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=0, err_msg=mode)
    assert stats["exit"] == pytest.approx(np.mean(j + 1), abs=1e-6)
  assert stats["blocks"] == (j + 1).max()  # batched: the loop ran to the last exit only


def test_exits_are_layers_1_to_n(case):
  c = case
  first = deediff.DeeDiffPlan(c["ee"], 1.0, "batched", uem="paper_map", layout="outputs")
  out, stats, bound = _run(first, c)
  assert stats["blocks"] == 1 and stats["exit"] == 1  # the earliest exit runs one block
  np.testing.assert_allclose(out, c["outs"][0], atol=1e-6, rtol=0)
  assert stats["heads"] == 1 and bound.info["blocks_per_nfe"][0] == c["num"]
  never = deediff.DeeDiffPlan(c["ee"], 0.0, "batched", uem="paper_map", layout="outputs")
  out, stats, _ = _run(never, c)
  assert stats["blocks"] == c["num"] and stats["exit"] == c["num"]
  np.testing.assert_allclose(out, c["final"], atol=1e-5, rtol=0)
  # c['num'] − 1 stacked exits; the public layout's L-exit params are refused with the layout.
  assert heads_lib.num_exits(c["model"], "outputs") == c["num"] - 1
  assert jax.tree.leaves(c["ee"])[0].shape[0] == c["num"] - 1
  with pytest.raises(ValueError, match="layout='inputs'"):
    deediff.DeeDiffPlan(c["ee"], 0.5, uem="paper_map").check(c["model"], np.asarray([1.0]))
  with pytest.raises(ValueError, match="layout"):
    deediff.DeeDiffPlan(c["ee"], 0.5, uem="paper_map", layout="middle")


def test_batched_lowers_to_conditionals_and_flops_tables(case):
  c = case
  model = c["model"]
  plan = deediff.DeeDiffPlan(c["ee"], _theta(c), "batched", uem="paper_map", layout="outputs")
  bound = plan.bind(model, c["params"], np.asarray([500.0]))
  text = jax.jit(bound.net).lower(c["x"], c["t"], c["y"], 0, ()).as_text()
  assert "stablehlo.while" in text and "stablehlo.case" in text
  _, stats, _ = _run(plan, c)
  k = int(stats["blocks"])   # all samples exited by k: k UEM tests, heads where exits happened
  bb = as_backbone(model)
  f_uem, f_head = deediff.uem_flops(model, "paper_map"), deediff.exit_head_flops(model)
  want = bb.embed_flops + np.sum(bb.unit_flops[:k]) + min(k, c["num"] - 1) * f_uem
  want += stats["heads"] * f_head + (bb.head_flops if k == c["num"] else 0.0)
  assert stats["flops"] == pytest.approx(want, rel=1e-6)
  exact = deediff.DeeDiffPlan(c["ee"], 0.5, "exact", uem="paper_map", layout="outputs")
  info = exact.bind(model, c["params"], np.asarray([500.0])).info
  assert info["flops_per_nfe"][0] == pytest.approx(bb.full_flops + (c["num"] - 1) * (f_uem
                                                                                   + f_head))


def test_scripted_paper_layout_predicts_exits_from_layer_1():
  model, params = fx.tiny_backbone("dit")
  plan, _ = deediff.benchmark_plan(model, params, jax.random.PRNGKey(3), exit_layer_at_noise=0,
                                   layout="outputs")
  times = np.asarray([999.0, 0.0], np.float32)
  bound = plan.bind(model, params, times)
  exits = bound.info["exits_per_nfe"]
  np.testing.assert_array_equal(exits, [1, 4])  # K(τ=1) = 0 is clamped to the first exit, 1
  x, y = fx.numpy_inputs(model, 2)
  net = jax.jit(bound.net)
  for i, tv in enumerate(times):
    _, _, stats = net(x, jnp.full((2,), tv), y, i, ())
    assert float(stats["blocks"]) == exits[i]
    assert float(stats["flops"]) == pytest.approx(bound.info["flops_per_nfe"][i], rel=1e-6)


def test_heads_file_and_plan_spec_keep_the_layout(tmp_path):
  c = _case("uvit")
  path = io_lib.save_deediff_heads(tmp_path / io_lib.DEEDIFF_FILE, c["ee"], threshold=0.1,
                                   uem="paper_map", layout="outputs")
  ee, meta = io_lib.load_deediff_heads(tmp_path)
  assert meta == {"threshold": 0.1, "uem": "paper_map", "layout": "outputs"}
  for plan in (io_lib.load_plan(path), spec_lib.parse_plan(f"deediff:{tmp_path}", c["model"])):
    assert (plan.layout, plan.uem, plan.threshold) == ("outputs", "paper_map", 0.1)
    plan.check(c["model"], np.asarray([1.0]))
    assert plan.name.endswith(":exits=1..L")
  # A file written before layouts existed (no 'layout' in its metadata) is the public layout.
  old = heads_lib.init_deediff_params(c["model"], jax.random.PRNGKey(0))
  flat = {io_lib.param_path(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(old)[0]}
  np.savez(tmp_path / "old.npz", __meta__=np.array(json.dumps({"threshold": 0.2,
                                                               "uem": "token_mean"})), **flat)
  plan = io_lib.load_plan(tmp_path / "old.npz")
  assert plan.layout == "inputs"
  plan.check(c["model"], np.asarray([1.0]))


# ---- training ------------------------------------------------------------------------------

def test_map_terms_match_hand_computation():
  rs = np.random.RandomState(0)
  outs = rs.standard_normal((3, 2, 4, 4, 8))      # a learned-σ head: 8 channels, ε has 4
  noise = rs.standard_normal((2, 4, 4, 4))
  u = 1 / (1 + np.exp(-rs.standard_normal((3, 2, 4, 4, 4))))
  err = outs[..., :4] - noise[None]
  u_hat, sq = np.tanh(np.abs(err)), err ** 2
  for variant in ("paper", "public"):
    terms = deediff_loss.exit_terms(jnp.asarray(outs, jnp.float32), jnp.asarray(u, jnp.float32),
                                    jnp.asarray(noise, jnp.float32), variant=variant)
    per_u = ((u - u_hat) ** 2).mean(axis=(2, 3, 4))
    if variant == "paper":
      l_u, w = per_u.mean(1).sum(), 1 - u
    else:
      l_u, w = per_u.sum(), 1 - u_hat
    np.testing.assert_allclose(float(terms["l_u"]), l_u, rtol=1e-5)
    np.testing.assert_allclose(float(terms["l_ual"]), (w * sq).mean(axis=(2, 3, 4)).mean(1).sum(),
                               rtol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    deediff_loss.exit_terms(jnp.asarray(outs), jnp.asarray(u[..., :2]), jnp.asarray(noise))


@functools.lru_cache(maxsize=None)
def _joint_gradients():
  model, params = fx.tiny_backbone("uvit")
  x, _ = fx.numpy_inputs(model, 4, seed=5)
  batch = {"image": x}
  train = deediff_loss.init_deediff_train_params(model, params, jax.random.PRNGKey(2),
                                                 uem="paper_map", layout="outputs")
  loss_fn = deediff_loss.make_deediff_loss(model, uem="paper_map", layout="outputs")
  rng = jax.random.PRNGKey(9)

  @jax.jit
  def run(p):
    total = jax.grad(lambda q: loss_fn(q, batch, rng)[0])(p)
    exits = jax.grad(lambda q: sum(loss_fn(q, batch, rng)[1][k] for k in ("l_u", "l_ual")))(p)
    return total, exits, loss_fn(p, batch, rng)[1]

  return model, train, run(train)


def test_joint_training_gradient_reaches_the_backbone():
  model, train, (total, exits, metrics) = _joint_gradients()
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert 0 < float(metrics["u_mean"]) < 1 and float(metrics["l_u"]) > 0
  # The paper's backbone is not frozen: every block gets a gradient, and so it does from the
  # exit terms alone (L_u + L_UAL, through the heads' and UEMs' inputs).
  for name in ("in_blocks", "mid_block", "out_blocks"):
    g = jax.tree.leaves(exits["backbone"][name])
    assert sum(float(jnp.sum(a ** 2)) for a in g) > 0, name
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(total))
  norms = _per_exit_norms(total["deediff"])
  assert norms.shape == (as_backbone(model).num_units - 1,) and np.all(norms > 0)
  # The uncertainty maps' gradient (L_u on the map) reaches every generated-parameter layer.
  for part in ("linear", "time_scale", "time_bias"):
    assert float(jnp.sum(exits["deediff"]["uems"][part]["kernel"] ** 2)) > 0, part
  with pytest.raises(ValueError, match="layout"):
    deediff_loss.make_deediff_loss(model, uem="paper_map", layout="blocks")


def _per_exit_norms(tree):
  """‖grad‖ per stacked exit over heads and UEMs, (E,)."""
  return np.sqrt(sum(np.asarray(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))
                     for g in jax.tree.leaves(tree)))


def test_paper_recipe_runs_on_a_backbone_that_is_neither_dit_nor_uvit():
  """The toy backbone of `test_backbone_contract.py` (per-pixel tokens, FIFO skips): the map UEM
  is built only from the contract, and the batched runner equals the exact one."""
  import toy_backbone
  model, params = toy_backbone.toy()
  ee = heads_lib.init_deediff_params(model, jax.random.PRNGKey(1), "paper_map", layout="outputs")
  x = jnp.asarray(np.random.RandomState(0).standard_normal((4,) + tuple(
      as_backbone(model).input_shape)), jnp.float32)
  t, y = jnp.linspace(0.0, 999.0, 4), jnp.arange(4, dtype=jnp.int32)
  _, _, u = deediff.forward_all_exits(model, params, ee, x, t, y, "paper_map", "outputs")
  _, _, maps = deediff.forward_all_exits(model, params, ee, x, t, y, "paper_map", "outputs",
                                         uem_maps=True)
  assert maps.shape == (u.shape[0], 4) + tuple(as_backbone(model).input_shape)
  np.testing.assert_allclose(np.asarray(u), np.asarray(maps).mean(axis=(2, 3, 4)), rtol=1e-5)
  theta = float(np.quantile(np.asarray(u), 0.4))
  outs = {}
  for mode in ("exact", "batched"):
    plan = deediff.DeeDiffPlan(ee, theta, mode, uem="paper_map", layout="outputs")
    bound = plan.bind(model, params, np.asarray([500.0]))
    outs[mode] = np.asarray(jax.jit(bound.net)(x, t, y, 0, ())[0])
  np.testing.assert_allclose(outs["batched"], outs["exact"], atol=1e-6, rtol=0)
