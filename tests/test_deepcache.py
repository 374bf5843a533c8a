"""DeepCache on the DDPM U-Net (`jaxee/exits/deepcache.py`): equality with a compute-everything
reference written here (Python loop over static units, both paths computed, `jnp.where`),
conditionals in the HLO, no recompiles over N or the branch, FLOP tables, refusals."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import exits, sampling, testing
from jaxee.exits import deepcache, plan as plan_lib, spec as spec_lib
from jaxee.models import backbone as bb_lib

KW = dict(num=2, sampler="ddim", steps=7, return_stats=True)


@pytest.fixture(scope="module")
def unet():
  return testing.tiny_unet()


@plan_lib.pytree_plan(data=("interval", "branch"))
class _Reference:
  """Both paths every NFE (full forward; shallow path on the cache), selected with `where`."""
  interval: int = 2
  branch: int = 0

  def check(self, model, nfe_times):
    del model, nfe_times

  def bind(self, model, params, nfe_times):
    bb = bb_lib.as_backbone(model)
    pairs = jnp.asarray(bb.cache_branches())
    a_r = pairs[self.branch]

    def net(x, t_net, y, nfe_index, cache):
      full = nfe_index % self.interval == 0
      state = bb.embed(params, x, t_net, y)
      fresh = None
      for i in range(bb.num_units):  # full network, recording the stream after r's enter
        ref = bb.ref(i)
        state = bb.enter(params, ref, state)
        fresh = jnp.where(i == a_r[1], state["h"], 0.0 if fresh is None else fresh)
        state = bb.apply(params, ref, state, bb.compute(params, ref, state))
      out_full = bb.head(params, state)
      shallow = bb.embed(params, x, t_net, y)
      outs = []
      for a, r in bb.cache_branches():  # every branch's shallow path (static), select later
        st = shallow
        for i in range(a):
          st = bb.run_unit(params, i, st)
        st = dict(st, h=cache)
        for i in range(r, bb.num_units):
          ref = bb.ref(i)
          st = st if i == r else bb.enter(params, ref, st)
          st = bb.apply(params, ref, st, bb.compute(params, ref, st))
        outs.append(bb.head(params, st))
      out_cached = jnp.stack(outs)[self.branch]
      stats = {"blocks": jnp.float32(0), "flops": jnp.float32(0)}
      return (jnp.where(full, out_full, out_cached), jnp.where(full, fresh, cache), stats)

    def init_cache(x_batch, y=None):
      st = jax.eval_shape(lambda xx: bb.embed(params, xx, jnp.zeros(xx.shape[:1]), y), x_batch)
      return jnp.zeros(st["h"].shape, st["h"].dtype)
    return plan_lib.BoundPlan(net, init_cache, None)


def test_branch_points_of_the_tiny_unet(unet):
  model, _ = unet
  bb = bb_lib.as_backbone(model)
  names = [u.name for u in bb.specs]
  # slots: conv_in → 0, down0.res0 → 1, down1's downsample (in down1.res0's enter) → 2,
  # down1.attn0 → 3; up ResNets pop 3, 2, 1, 0.
  assert bb.cache_branches() == ((0, 11), (1, 10), (1, 9), (2, 8), (2, 7), (3, 6))
  assert names[6] == "up0.res0" and names[3] == "mid.res0"   # deepest: skip the mid block
  assert deepcache.branches(model).shape == (6, 2)


@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 3), (4, 5), (1, 2)])
def test_sampler_equals_the_compute_everything_reference(unet, interval, branch):
  model, params = unet
  plan = exits.DeepCachePlan(interval, branch)
  x, stats = jaxee.sample(model, params, jax.random.PRNGKey(0), plan=plan, **KW)
  x_ref, _ = jaxee.sample(model, params, jax.random.PRNGKey(0),
                          plan=_Reference(interval, branch), **KW)
  testing.assert_outputs_close(x, x_ref, 1e-5)
  bb = bb_lib.as_backbone(model)
  a, r = bb.cache_branches()[branch]
  flops = np.asarray(stats["flops"])
  full = np.arange(len(flops)) % interval == 0
  np.testing.assert_allclose(flops[full], bb.full_flops, rtol=1e-6)
  saved = bb.unit_flops[a:r].sum() + bb.enter_flops[r]
  np.testing.assert_allclose(flops[~full], bb.full_flops - saved, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["blocks"])[~full], bb.num_units - (r - a))
  if interval == 1:
    testing.assert_outputs_close(
        x, jaxee.sample(model, params, jax.random.PRNGKey(0), num=2, sampler="ddim", steps=7),
        1e-5)


def test_info_and_flops_ratio(unet):
  model, params = unet
  bb = bb_lib.as_backbone(model)
  times = sampling.nfe_times(model, "ddim", 6)
  info = exits.DeepCachePlan(3, 0).bind(model, params, times).info
  # NFEs 0 and 3 full; the others run conv_in, the last up ResNet and the head only.
  cached = bb.embed_flops + bb.head_flops + bb.unit_flops[-1] - bb.enter_flops[-1]
  want = (2 * bb.full_flops + 4 * cached) / 6
  assert info["flops_per_nfe"].mean() == pytest.approx(want, rel=1e-9)
  assert info["ideal_saving"] == pytest.approx(1 - want / bb.full_flops, rel=1e-9)
  assert info["skipped_units"] == (0, 11) and info["num_branches"] == 6
  deeper = exits.DeepCachePlan(3, 5).bind(model, params, times).info
  assert 0 < deeper["ideal_saving"] < info["ideal_saving"]


def test_lowers_to_conditionals_and_sweeps_do_not_recompile(unet):
  model, params = unet
  times = sampling.nfe_times(model, "ddim", 7)
  x = jnp.zeros((2, 8, 8, 3))

  def f(p, pl, x, i):
    bound = pl.bind(model, p, times)
    return bound.net(x, jnp.zeros(2), None, i, bound.init_cache(x))[0]
  hlo = jax.jit(f).lower(params, exits.DeepCachePlan(2, 0), x, jnp.int32(1)).compile().as_text()
  assert len(re.findall(r"\bconditional\(", hlo)) >= 12   # one or more per unit
  jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.DeepCachePlan(2, 0), **KW)
  before = sampling.trace_count()
  for interval, branch in ((3, 0), (5, 4), (1, 2)):
    jaxee.sample(model, params, jax.random.PRNGKey(0),
                 plan=exits.DeepCachePlan(interval, branch), **KW)
  assert sampling.trace_count() == before


def test_spec_and_bad_plans(unet):
  model, params = unet
  plan = spec_lib.parse_plan("deepcache:4:branch=2", model)
  assert isinstance(plan, exits.DeepCachePlan)
  assert (int(plan.interval), int(plan.branch)) == (4, 2)
  assert int(spec_lib.parse_plan("deepcache:3", model).branch) == 0
  again = spec_lib.parse_plan(plan.spec, model)
  assert (int(again.interval), int(again.branch)) == (4, 2)
  for bad, match in (("deepcache", "interval N"), ("deepcache:2.5", "integers"),
                     ("deepcache:2:depth=3", "unknown DeepCache option"),
                     ("deepcache:0", ">= 1")):
    with pytest.raises(ValueError, match=match):
      spec_lib.parse_plan(bad, model)
  with pytest.raises(ValueError, match="out of range"):
    jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.DeepCachePlan(2, 6), **KW)


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_backbones_without_skip_branches_refuse_it(family):
  model, params = testing.tiny_dit() if family == "dit" else testing.tiny_uvit()
  with pytest.raises(NotImplementedError, match="DeepCache branch points"):
    spec_lib.parse_plan("deepcache:2", model)
  kw = dict(num=2, sampler="ddim", steps=3, schedule="linear_discrete")
  if family == "dit":
    kw["labels"] = jnp.array([0, 1])
  with pytest.raises(NotImplementedError, match="U-Net skip branch"):
    jaxee.sample(model, params, jax.random.PRNGKey(0), plan=exits.DeepCachePlan(2), **kw)
