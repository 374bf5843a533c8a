"""Runtime options that scale training and sampling: per-block remat and bf16 compute.

* `remat=True` (DiT, U-ViT): the training loss and its gradients are the same as without it
  (≤ 1e-6), through the full forward and through the unit contract, and the traced gradient
  really rematerialises (a `checkpoint`/`remat` in its jaxpr).
* `compute_dtype='bfloat16'` with float32 params: sampling gives finite float32 samples within
  a stated bound of the float32 samples (max |bf16 − fp32| ≤ 2e-2 · max |fp32|; measured on
  these tiny random models: about 1.7e-3 (DiT, DDIM 5 steps, CFG 1.5) and 2.5e-3 (U-ViT,
  DPM-Solver 5 steps) relative), and different from them (so bf16 did run); training
  gradients stay float32, finite, within 5e-2 relative of the float32 ones (measured 3.7e-3).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxee
from jaxee import models
from jaxee import testing
from jaxee.models.backbone import as_backbone, run_all
from jaxee.train import config_base
from jaxee.train import trainer
from jaxee.train.objectives import diffusion

SAMPLE_REL_BOUND = 2e-2
GRAD_REL_BOUND = 5e-2


def _tiny(family):
  return testing.tiny_dit() if family == "dit" else testing.tiny_uvit()


def _batch(model):
  x, y = testing.example_inputs(model, batch=4)
  return {"image": x} if y is None else {"image": x, "label": y}


def _loss_and_grads(model, params, forward=None):
  loss_fn = diffusion.make_diffusion_loss(model, forward=forward)
  fn = lambda p: loss_fn(p, _batch(model), jax.random.PRNGKey(3))[0]  # noqa: E731
  return jax.value_and_grad(fn)(params), fn


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_remat_gives_the_same_loss_and_gradients(family):
  model, params = _tiny(family)
  remat = models.with_runtime(model, remat=True)
  assert remat.remat and not model.remat
  (loss, grads), _ = _loss_and_grads(model, params)
  (loss_r, grads_r), fn_r = _loss_and_grads(remat, params)
  assert abs(float(loss) - float(loss_r)) <= 1e-6
  assert _max_diff(grads, grads_r) <= 1e-6
  jaxpr = str(jax.make_jaxpr(jax.grad(fn_r))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  # Through the unit contract (what the exit methods train with).
  def units_forward(m):
    bb = as_backbone(m)
    return lambda p, x, t, y: bb.head(p, run_all(bb, p, bb.embed(p, x, t, y)))
  (loss_u, grads_u), _ = _loss_and_grads(remat, params, forward=units_forward(remat))
  assert abs(float(loss) - float(loss_u)) <= 1e-6
  assert _max_diff(grads, grads_u) <= 1e-6


def test_remat_and_compute_dtype_from_the_training_config():
  c = config_base.base_config()
  c.model.arch = "dit"
  c.model.overrides = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                           num_heads=4, num_classes=10)
  assert trainer.build_model(c).dtype is None and not trainer.build_model(c).remat
  c.model.compute_dtype, c.model.remat = "bfloat16", True
  model = trainer.build_model(c)
  assert model.dtype == jnp.bfloat16 and model.remat
  with pytest.raises(ValueError, match="compute_dtype"):
    models.with_runtime(model, compute_dtype="int8")
  unet_like = models.create("unet_ddpm_cifar10")
  with pytest.raises(ValueError, match="remat"):
    models.with_runtime(unet_like, remat=True)


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_bf16_sampling_is_finite_and_close_to_fp32(family):
  model, params = _tiny(family)
  kw = dict(num=4, steps=5, sampler="ddim" if family == "dit" else "dpm_solver")
  if family == "dit":
    kw.update(labels=np.arange(4), guidance=1.5)
  ref = jaxee.sample(model, params, jax.random.PRNGKey(0), **kw)
  low = jaxee.sample(model, params, jax.random.PRNGKey(0), compute_dtype="bfloat16", **kw)
  assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
  rel = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
  print(f"{family}: bf16 vs fp32 max relative deviation {rel:.2e}")
  assert 0 < rel <= SAMPLE_REL_BOUND
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # params untouched


def test_bf16_training_gradients_are_float32_and_close():
  model, params = _tiny("dit")
  (loss, grads), _ = _loss_and_grads(model, params)
  (loss_b, grads_b), _ = _loss_and_grads(models.with_runtime(model, compute_dtype="bfloat16"),
                                         params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_b))
  assert bool(jnp.isfinite(loss_b)) and all(bool(jnp.all(jnp.isfinite(g)))
                                            for g in jax.tree.leaves(grads_b))
  assert abs(float(loss_b) - float(loss)) <= GRAD_REL_BOUND * abs(float(loss))
  gn = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
  dn = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(grads),
                                                                 jax.tree.leaves(grads_b)))))
  print(f"bf16 training: loss {float(loss):.5f} vs {float(loss_b):.5f}; gradient relative "
        f"L2 deviation {dn / gn:.2e}")
  assert dn <= GRAD_REL_BOUND * gn


def test_attention_auto_is_the_exact_path_off_gpu_and_refuses_unknown_impls():
  """'auto' (the default) takes the explicit einsum path on CPU / in fp32 — bit-identical to
  'xla' — and the fused (cuDNN on GPU) path only for bf16/fp16 on a GPU backend."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from jaxee.models import layers
  assert layers.resolve_attn_impl("auto", jnp.float32) == "xla"
  want = "fused" if jax.default_backend() == "gpu" else "xla"
  assert layers.resolve_attn_impl("auto", jnp.bfloat16) == want
  assert layers.resolve_attn_impl("fused", jnp.float32) == "fused"
  with pytest.raises(ValueError, match="attn_impl must be one of"):
    layers.resolve_attn_impl("flash", jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  outs = {}
  for impl in ("auto", "xla", "fused"):
    mod = layers.Attention(16, 4, True, impl=impl)
    p = mod.init(jax.random.PRNGKey(1), x)
    outs[impl] = np.asarray(mod.apply(p, x))
  np.testing.assert_array_equal(outs["auto"], outs["xla"])
  np.testing.assert_allclose(outs["fused"], outs["xla"], atol=1e-5)
