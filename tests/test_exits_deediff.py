"""DeeDiff runners (`jaxee/exits/deediff.py`) against a block-by-block reference.

The reference runs every block in a Python loop with the modules' own methods (not the backbone
contract the runners use), applies every exit head and UEM to the input of each block, and
selects each sample's first exit with NumPy. Exits are made sample-dependent by scripted
timestep-aware UEMs (exit layer a function of t) with each sample at its own t, plus a small
random weight on the pooled tokens so that u also depends on the sample's features. The same
runner code serves the DiT and the U-ViT (`case` is parametrised over both).
"""
import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models
from jaxee.eval import flops as flops_lib
from jaxee.exits import deediff
from jaxee.exits import deediff_heads as heads_lib
from jaxee.models.backbone import as_backbone, take

import deediff_fixtures as fx

BATCH = 16


def _module_blocks(model, params, x, t, y):
  """(block inputs in execution order, exit context, final tokens), by the modules' methods."""
  states = []
  if model.family == "dit":
    h, ctx = model.apply({"params": params}, x, t, y, method="embed")
    blk = model.block_module()
    for l in range(model.depth):
      states.append(h)
      h = blk.apply({"params": take(params["blocks"], l)}, h, ctx)
    return states, ctx, model.apply({"params": params}, h, ctx, method="head")
  h, ctx = model.apply({"params": params}, x, t, y, method="embed"), None
  in_blk, out_blk = model.block_module(False), model.block_module(True)
  skips = []
  for l in range(model.num_in_blocks):
    states.append(h)
    h = in_blk.apply({"params": take(params["in_blocks"], l)}, h)
    skips.append(h)
  states.append(h)
  h = in_blk.apply({"params": params["mid_block"]}, h)
  for l in range(model.num_in_blocks):
    states.append(h)
    h = out_blk.apply({"params": take(params["out_blocks"], l)}, h, skips.pop())
  return states, ctx, model.apply({"params": params}, h, method="head")


@functools.partial(jax.jit, static_argnums=(0, 6))
def reference_all_exits(model, params, ee, x, t, y, uem):
  """(final, [head_k(state_k)], u (L, B), [state_k], ctx, full forward) with state_k the input
  of block k."""
  states, ctx, final = _module_blocks(model, params, x, t, y)
  head, probe = heads_lib.make_head(model), heads_lib.make_uem(model, uem)
  t_emb = heads_lib.time_features(model, t)
  outs = [head.apply({"params": take(ee["heads"], k)}, s, ctx) for k, s in enumerate(states)]
  u = jnp.stack([probe.apply({"params": take(ee["uems"], k)}, s, t_emb)
                 for k, s in enumerate(states)])
  return final, outs, u, states, ctx, model.apply({"params": params}, x, t, y)


def reference(model, params, ee, x, t, y, uem):
  final, outs, u, states, ctx, full = reference_all_exits(model, params, ee, x, t, y, uem)
  np.testing.assert_allclose(np.asarray(final), np.asarray(full), atol=1e-5, rtol=0)
  return (np.asarray(final), [np.asarray(o) for o in outs], np.asarray(u), states, ctx)


def numpy_first_exit(u, theta):
  hit = u <= theta
  return np.where(hit.any(0), hit.argmax(0), u.shape[0])


def pick(final, outs, k):
  cands = outs + [final]
  return np.stack([cands[kb][b] for b, kb in enumerate(k)])


@functools.lru_cache(maxsize=None)
def _case(family):
  model, params = fx.tiny_backbone(family)
  x, y = fx.numpy_inputs(model, BATCH)
  num = heads_lib.num_exits(model)
  ee = deediff.init_deediff_params(model, jax.random.PRNGKey(5), "timestep_aware",
                                   backbone_params=params)
  ee = deediff.scripted_uem_params(model, ee, 0.5, depth_at_noise=0.0, depth_at_clean=num + 0.4)
  # A small sample-dependent part on the pooled tokens (exits no longer a function of t only).
  d = heads_lib.width(model)
  kernel = ee["uems"]["linear"]["kernel"]
  noise = 0.3 * jax.random.normal(jax.random.PRNGKey(6), kernel[:, :d].shape)
  ee = dict(ee, uems={"linear": {"kernel": kernel.at[:, :d].set(noise),
                                 "bias": ee["uems"]["linear"]["bias"]}})
  t = jnp.linspace(0.0, 999.0, BATCH)
  ref = reference(model, params, ee, x, t, y, "timestep_aware")
  exits = numpy_first_exit(ref[2], 0.5)
  return dict(model=model, params=params, ee=ee, x=x, y=y, t=t, ref=ref, exits=exits, num=num)


@pytest.fixture(scope="module", params=["dit", "uvit"])
def case(request):
  return _case(request.param)


@pytest.fixture(scope="module")
def dit_case():
  return _case("dit")


@pytest.fixture(scope="module")
def uvit_case():
  return _case("uvit")


@pytest.fixture(scope="module")
def scripted(dit_case):
  """A benchmark plan on the tiny DiT: the whole batch exits at round(4 − 3τ)."""
  return deediff.benchmark_plan(dit_case["model"], dit_case["params"], jax.random.PRNGKey(8),
                                exit_layer_at_noise=1)


def _run(plan, c, x=None, t=None, y=None, nfe_times=(500.0,)):
  bound = plan.bind(c["model"], c["params"], np.asarray(nfe_times))
  x = c["x"] if x is None else x
  t = c["t"] if t is None else t
  y = c["y"] if y is None else y
  out, _, stats = jax.jit(bound.net)(x, t, y, 0, ())
  return np.asarray(out), {k: float(v) for k, v in stats.items()}


def test_case_has_varied_exits(case):
  exits = case["exits"]
  assert len(set(exits.tolist())) >= 4, exits
  assert exits.min() == 0 and exits.max() == case["num"], exits


def test_exact_equals_reference(case):
  plan = deediff.DeeDiffPlan(case["ee"], threshold=0.5, mode="exact", uem="timestep_aware")
  out, stats = _run(plan, case)
  final, outs = case["ref"][:2]
  want = pick(final, outs, case["exits"])
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=0)
  assert stats["exit"] == pytest.approx(case["exits"].mean(), abs=1e-6)
  assert stats["blocks"] == case["num"]


def test_exact_token_mean_uem_equals_reference(dit_case):
  c = dit_case
  model = c["model"]
  final, outs, _, states, _ = c["ref"]
  uems = deediff.init_deediff_params(model, jax.random.PRNGKey(7), "token_mean")["uems"]
  ee = dict(c["ee"], uems=uems)  # the same heads, the public per-token UEM
  probe = heads_lib.make_uem(model, "token_mean")
  u = np.stack([np.asarray(probe.apply({"params": take(uems, k)}, s, None))
                for k, s in enumerate(states)])
  theta = float(np.quantile(u, 0.3))
  k = numpy_first_exit(u, theta)
  assert len(set(k.tolist())) >= 2
  out, _ = _run(deediff.DeeDiffPlan(ee, threshold=theta, mode="exact"), c)
  np.testing.assert_allclose(out, pick(final, outs, k), atol=1e-6, rtol=0)


def test_batched_equals_exact(case):
  exact, _ = _run(deediff.DeeDiffPlan(case["ee"], 0.5, "exact", uem="timestep_aware"), case)
  out, stats = _run(deediff.DeeDiffPlan(case["ee"], 0.5, "batched", uem="timestep_aware"), case)
  np.testing.assert_allclose(out, exact, atol=1e-6, rtol=0)
  # min_fraction=1: the loop runs until the last sample exits.
  assert stats["blocks"] == case["exits"].max()
  assert stats["exit"] == pytest.approx(case["exits"].mean(), abs=1e-6)


def test_batched_min_fraction_forces_exit(dit_case):
  c = dit_case
  plan = deediff.DeeDiffPlan(c["ee"], 0.5, "batched", min_fraction=0.5, uem="timestep_aware")
  out, stats = _run(plan, c)
  exits = c["exits"]
  stop = next(k for k in range(c["num"] + 1) if np.sum(exits <= k) >= 0.5 * BATCH)
  assert stop < exits.max()  # some samples are forced out
  final, outs = c["ref"][:2]
  np.testing.assert_allclose(out, pick(final, outs, np.minimum(exits, stop)), atol=1e-6, rtol=0)
  assert stats["blocks"] == stop


def test_batched_lowers_to_while_and_stops_early(dit_case, scripted):
  c = dit_case
  model, params = c["model"], c["params"]
  plan, meta = scripted
  assert meta["exit_layer_at_clean"] == c["num"]
  times = np.asarray([999.0, 700.0, 0.0], np.float32)
  bound = plan.bind(model, params, times)
  assert bound.info["exits_predicted"]
  np.testing.assert_array_equal(bound.info["exits_per_nfe"], [1, 2, c["num"]])
  x, y = c["x"][:4], c["y"][:4]
  text = jax.jit(bound.net).lower(x, jnp.full((4,), 999.0), y, 0, ()).as_text()
  assert "stablehlo.while" in text and "stablehlo.case" in text
  net = jax.jit(bound.net)
  full = flops_lib.backbone_flops(model)
  savings = []
  for i, tv in enumerate(times):
    _, _, stats = net(x, jnp.full((4,), tv), y, i, ())
    assert float(stats["blocks"]) == bound.info["exits_per_nfe"][i]  # loop iterations run
    assert float(stats["flops"]) == pytest.approx(bound.info["flops_per_nfe"][i], rel=1e-6)
    savings.append(1 - float(stats["flops"]) / full)
  assert bound.info["ideal_saving"] == pytest.approx(np.mean(savings), rel=1e-5)


def test_uvit_exit_discards_pending_skips(uvit_case):
  c = uvit_case
  model, params = c["model"], c["params"]
  k = model.num_in_blocks + 2  # after the in-blocks, the mid block and one out-block
  ee = deediff.scripted_uem_params(model, c["ee"], 0.5, depth_at_noise=k, depth_at_clean=k)
  out, stats = _run(deediff.DeeDiffPlan(ee, 0.5, "batched", uem="timestep_aware"), c)
  _, outs, _, states, _ = c["ref"]
  np.testing.assert_allclose(out, outs[k], atol=1e-6, rtol=0)
  # The pending skips were not fused: the ASE rule (fuse every remaining skip) differs.
  out_blk = model.block_module(True)
  h = states[k]
  skips = list(reversed(states[1:model.num_in_blocks + 1]))  # in-block outputs, LIFO order
  for j in range(k - model.num_in_blocks - 1, model.num_in_blocks):
    h = out_blk.apply({"params": take(params["out_blocks"], j)}, h, skips[j],
                      method="merge_skip")
  fused = heads_lib.make_head(model).apply({"params": take(ee["heads"], k)}, h)
  assert np.abs(np.asarray(fused) - outs[k]).max() > 1e-3
  want = (flops_lib.embed_flops(model) + (model.num_in_blocks + 1) * flops_lib.block_flops(model)
          + flops_lib.block_flops(model, "out_block")
          + (k + 1) * deediff.uem_flops(model, "timestep_aware") + deediff.exit_head_flops(model))
  assert stats["flops"] == pytest.approx(want, rel=1e-6)
  assert stats["blocks"] == k


def test_shard_map_exits_per_device(dit_case):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest sets 8 fake CPU devices)")
  c = dit_case
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = deediff.DeeDiffPlan(c["ee"], 0.5, "batched", uem="timestep_aware", mesh=mesh)
  out, stats = _run(sharded, c)
  local = deediff.DeeDiffPlan(c["ee"], 0.5, "batched", uem="timestep_aware")
  net = jax.jit(local.bind(c["model"], c["params"], np.asarray([500.0])).net)
  per = BATCH // 8
  outs, blocks = [], []
  for d in range(8):
    sl = slice(d * per, (d + 1) * per)
    o, _, s = net(c["x"][sl], c["t"][sl], c["y"][sl], 0, ())
    outs.append(np.asarray(o))
    blocks.append(float(s["blocks"]))
  assert len(set(blocks)) > 2  # each device stopped at its own layer
  np.testing.assert_allclose(out, np.concatenate(outs), atol=1e-6, rtol=0)
  assert stats["blocks"] == pytest.approx(np.mean(blocks), abs=1e-6)
  assert np.mean(blocks) < c["exits"].max()  # less work than one global loop


def test_sample_with_plan_and_cfg(dit_case, scripted):
  model, params = dit_case["model"], dit_case["params"]
  plan, _ = scripted
  labels = jnp.asarray([1, 2])
  xs, stats = jaxee.sample(model, params, jax.random.PRNGKey(11), plan=plan, num=2,
                           sampler="ddim", steps=4, labels=labels, guidance=1.5,
                           return_stats=True)
  assert xs.shape == (2, 8, 8, 4) and np.all(np.isfinite(np.asarray(xs)))
  info = plan.bind(model, params, np.asarray(stats["nfe_times"])).info
  np.testing.assert_array_equal(np.asarray(stats["blocks"]), info["exits_per_nfe"])
  assert info["exits_per_nfe"].min() < model.depth  # it did exit early somewhere


@pytest.mark.parametrize("theta", [-0.1, 1.5, float("nan"), "x", None])
def test_threshold_validation(dit_case, theta):
  with pytest.raises(ValueError, match="threshold"):
    deediff.DeeDiffPlan(dit_case["ee"], threshold=theta)


def test_plan_argument_errors(dit_case):
  c = dit_case
  ee = c["ee"]
  for bad in (dict(mode="fast"), dict(min_fraction=0.0), dict(min_fraction=1.5),
              dict(uem="attention")):
    with pytest.raises(ValueError):
      deediff.DeeDiffPlan(ee, 0.5, **bad)
  # Params of the other UEM kind, or for another depth, fail at bind with a clear message.
  with pytest.raises(ValueError, match="ee_params"):
    deediff.DeeDiffPlan(ee, 0.5, uem="token_mean").bind(c["model"], c["params"], [500.0])
  other = models.create("dit", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                        depth=3, num_heads=4, num_classes=10)
  with pytest.raises(ValueError, match="exits"):
    deediff.DeeDiffPlan(ee, 0.5, uem="timestep_aware").bind(other, c["params"], [500.0])
  with pytest.raises(ValueError, match="exit_layer_at_noise"):
    deediff.benchmark_plan(c["model"], c["params"], jax.random.PRNGKey(0), exit_layer_at_noise=9)
  assert deediff.DeeDiffPlan(ee, 0.0).threshold == 0.0  # the closed ends are valid
  assert deediff.DeeDiffPlan(ee, 1.0).threshold == 1.0


def test_exit_flops_are_generic_kernel_counts(case):
  """Exit head / UEM FLOPs come from their kernels (no per-family formula), and the per-layer
  tables from the backbone contract."""
  model = case["model"]
  bb = as_backbone(model, "block")
  d, n = bb.width, bb.num_tokens
  assert deediff.uem_flops(model, "token_mean") == 2.0 * n * d
  assert deediff.uem_flops(model, "timestep_aware") == 4.0 * d
  if model.family == "dit":  # FinalLayer-shaped: adaLN on c, then Linear on every token
    want = 2.0 * d * 2 * d + 2.0 * n * d * model.patch_size ** 2 * model.out_channels
  else:  # Linear on every token (extras included), then the 3×3 conv on every pixel
    c = model.in_chans
    want = 2.0 * n * d * model.patch_size ** 2 * c + 2.0 * model.img_size ** 2 * 9 * c * c
  assert deediff.exit_head_flops(model) == want
  assert deediff.blocks_flops_upto(model, case["num"]) == pytest.approx(
      flops_lib.full_block_flops(model), rel=1e-12)
  assert deediff.exit_flops(model, case["num"], "token_mean") == pytest.approx(
      flops_lib.backbone_flops(model) + case["num"] * 2.0 * n * d, rel=1e-12)


def test_plan_is_a_pytree_with_traced_threshold(dit_case):
  """θ, min_fraction and the head/UEM params are leaves: a jitted function taking the plan
  traces once for any θ, binds with `info=None`, and matches the concrete plan."""
  c = dit_case
  model, params = c["model"], c["params"]
  plan = deediff.DeeDiffPlan(c["ee"], 0.5, "batched", uem="timestep_aware")
  leaves, tree = jax.tree.flatten(plan)
  assert len(leaves) == len(jax.tree.leaves(c["ee"])) + 2
  again = jax.tree.unflatten(tree, leaves)
  assert isinstance(again, deediff.DeeDiffPlan) and again.mode == "batched"
  traces, infos = [], []

  @jax.jit
  def run(p, x, t, y):
    traces.append(1)
    bound = p.bind(model, params, np.asarray([500.0]))
    infos.append(bound.info)
    out, _, stats = bound.net(x, t, y, 0, ())
    return out, stats["blocks"]

  for theta in (0.5, 0.3, 0.7):
    p = dataclasses.replace(plan, threshold=theta)
    out, blocks = run(p, c["x"], c["t"], c["y"])
    want, stats = _run(p, c)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, rtol=0)
    assert float(blocks) == stats["blocks"]
  assert len(traces) == 1 and infos == [None]
  plan.check(model, [500.0, 0.0])
  with pytest.raises(ValueError, match="ee_params"):
    dataclasses.replace(plan, uem="token_mean").check(model, [500.0])
  with pytest.raises(ValueError, match="nfe_times"):
    plan.check(model, [])


def test_threshold_sweep_through_sample_compiles_once(dit_case):
  """A 5-value θ sweep through `jaxee.sample` traces the sampler once (θ is a traced leaf) and
  each θ really takes effect (the per-NFE depths follow the host prediction)."""
  from jaxee import sampling  # pylint: disable=g-import-not-at-top
  model, params = dit_case["model"], dit_case["params"]
  # A soft scripted UEM (1 logit unit per layer), so that moving θ moves the exit layers.
  base, _ = deediff.benchmark_plan(model, params, jax.random.PRNGKey(8), exit_layer_at_noise=1,
                                   sharpness=1.0)
  before = sampling.trace_count()
  seen = []
  for theta in (0.1, 0.3, 0.5, 0.7, 0.9):
    plan = dataclasses.replace(base, threshold=theta)
    xs, stats = jaxee.sample(model, params, jax.random.PRNGKey(11), plan=plan, num=2,
                             sampler="ddim", steps=3, labels=jnp.asarray([1, 2]),
                             return_stats=True)
    assert np.all(np.isfinite(np.asarray(xs)))
    want = deediff.predict_exits(model, plan.ee_params, "timestep_aware", theta,
                                 np.asarray(stats["nfe_times"]))
    np.testing.assert_array_equal(np.asarray(stats["blocks"]), want)
    seen.append(tuple(want.tolist()))
  assert len(set(seen)) > 1  # the sweep changes the exits
  assert sampling.trace_count() - before == 1


def test_non_uniform_tokens_are_refused(dit_case):
  model = dit_case["model"]

  @dataclasses.dataclass(frozen=True)
  class Ragged(type(as_backbone(model, "block"))):
    @property
    def uniform_tokens(self):
      return False

  ragged = Ragged(model, "block")
  with pytest.raises(ValueError, match="uniform_tokens"):
    deediff.DeeDiffPlan(dit_case["ee"], 0.5, uem="timestep_aware").bind(ragged, dit_case["params"],
                                                                        [500.0])
  with pytest.raises(ValueError, match="uniform_tokens"):
    deediff.init_deediff_params(ragged, jax.random.PRNGKey(0))


def test_no_family_branch_in_deediff_code():
  """DeeDiff is written once against the backbone contract (project issue 11)."""
  root = pathlib.Path(deediff.__file__).resolve().parents[1]
  for rel in ("exits/deediff.py", "exits/deediff_heads.py", "train/objectives/deediff.py"):
    src = (root / rel).read_text()
    assert not re.search(r"\.family\b|['\"](dit|uvit)['\"]", src), rel
    assert not re.search(r"family_ops|\bops\.", src), rel
