"""DeeDiff objective (`jaxee/train/objectives/deediff.py`) on tiny backbones.

The terms are recomputed by hand with NumPy from the same draws of t, noise and label dropout
(re-derived from the key as documented), and the gradients are checked to reach every exit head
and UEM, to be exactly zero for a frozen backbone, and to follow each variant's stop-gradients.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxee.exits import deediff
from jaxee.train.objectives import deediff as deediff_loss
from jaxee.train.objectives import diffusion as diffusion_obj

import deediff_fixtures as fx

BATCH = 4


@functools.lru_cache(maxsize=None)
def _setup(family):
  model, params = fx.tiny_backbone(family)
  x, y = fx.numpy_inputs(model, BATCH, seed=3)
  batch = {"image": x} if y is None else {"image": x, "label": y}
  train_params = deediff_loss.init_deediff_train_params(model, params, jax.random.PRNGKey(4))
  return model, train_params, batch


def _linear_abar():
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  return np.cumprod(1.0 - betas)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keyed_draws(rng, shape, continuous):
  """The draws the objective makes from its key, re-derived as documented."""
  drop_key, loss_key = jax.random.split(rng)
  t_key, n_key = jax.random.split(loss_key)
  t = (jax.random.uniform(t_key, shape[:1]) if continuous
       else jax.random.randint(t_key, shape[:1], 0, 1000))
  return t, jax.random.normal(n_key, shape), jax.random.uniform(drop_key, shape[:1])


def _reference_draw(model, batch, rng):
  """t, noise, labels and x_t exactly as the objective draws them (DiT linear chain)."""
  x0 = np.asarray(batch["image"], np.float64)
  t, noise, uniform = (np.asarray(a) for a in _keyed_draws(rng, x0.shape, False))
  noise = noise.astype(np.float64)
  y = np.where(uniform < model.class_dropout_prob, model.null_class, np.asarray(batch["label"]))
  a = _linear_abar()[t][:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  return t, noise, y, x_t


_forward_all = jax.jit(deediff.forward_all_exits, static_argnums=(0, 6))


def _reference_terms(outs, u, noise, variant):
  err = outs[..., :noise.shape[-1]] - noise[None]
  u_hat = np.tanh(np.abs(err)).mean(axis=(2, 3, 4))
  mse = (err ** 2).mean(axis=(2, 3, 4))
  if variant == "paper":
    return ((u - u_hat) ** 2).mean(1).sum(), ((1 - u) * mse).mean(1).sum()
  return ((u - u_hat) ** 2).sum(), ((1 - u_hat) * mse).mean(1).sum()


def test_dit_terms_match_hand_computation():
  model, params, batch = _setup("dit")
  rng = jax.random.PRNGKey(11)
  fns = {v: deediff_loss.make_deediff_loss(model, lam=0.7, beta=1.3, variant=v)
         for v in ("paper", "public")}
  simple_fn = diffusion_obj.make_diffusion_loss(model)

  @jax.jit
  def run(p):
    out = {v: f(p, batch, rng, train_state_extras={"step": 0}) for v, f in fns.items()}
    return out, simple_fn(p["backbone"], batch, rng)[0]

  results, simple = run(params)
  t, noise, y, x_t = _reference_draw(model, batch, rng)
  _, outs, u = _forward_all(model, params["backbone"], params["deediff"],
                            jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32),
                            jnp.asarray(y, jnp.int32), "token_mean")
  for variant, (loss, metrics) in results.items():
    assert np.isfinite(float(loss))
    l_u, l_ual = _reference_terms(np.asarray(outs, np.float64), np.asarray(u, np.float64),
                                  noise, variant)
    np.testing.assert_allclose(float(metrics["l_u"]), l_u, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["l_ual"]), l_ual, rtol=2e-5)
    # L_simple is the backbone's own (hybrid, learned-σ) loss on the same draws.
    np.testing.assert_allclose(float(metrics["l_simple"]), float(simple), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(simple) + 0.7 * l_u + 1.3 * l_ual, rtol=2e-5)
  assert float(results["public"][1]["l_u"]) > float(results["paper"][1]["l_u"])  # Σ_b vs mean_b


def test_uvit_continuous_loss_matches_hand_computation():
  model, params, batch = _setup("uvit")
  rng = jax.random.PRNGKey(12)
  loss, metrics = jax.jit(deediff_loss.make_deediff_loss(model))(params, batch, rng)
  x0 = np.asarray(batch["image"], np.float64)
  t, noise, _ = (np.asarray(a, np.float64) for a in _keyed_draws(rng, x0.shape, True))
  a = np.exp(-(0.1 * t + (20.0 - 0.1) * t ** 2 / 2))[:, None, None, None]  # U-ViT VPSDE ᾱ(t)
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  final, outs, u = _forward_all(
      model, params["backbone"], params["deediff"], jnp.asarray(x_t, jnp.float32),
      jnp.asarray(999.0 * t, jnp.float32), None, "token_mean")
  l_simple = ((np.asarray(final, np.float64) - noise) ** 2).mean()
  l_u, l_ual = _reference_terms(np.asarray(outs, np.float64), np.asarray(u, np.float64), noise,
                                "paper")
  np.testing.assert_allclose(float(metrics["l_simple"]), l_simple, rtol=2e-5)
  np.testing.assert_allclose(float(loss), l_simple + l_u + l_ual, rtol=2e-5)


def _per_exit_norms(tree):
  """‖grad‖ of each exit's slice of a stacked head/UEM param tree, (L,)."""
  return np.sqrt(sum(np.asarray(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))
                     for g in jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=None)
def _gradients():
  """Gradients of the total loss and of L_u alone, for three settings, in one program."""
  model, params, batch = _setup("dit")
  rng = jax.random.PRNGKey(13)
  settings = {
      "paper_frozen": deediff_loss.make_deediff_loss(model, train_backbone=False),
      "public_frozen": deediff_loss.make_deediff_loss(model, variant="public",
                                                      train_backbone=False),
      "paper_joint": deediff_loss.make_deediff_loss(model, train_backbone=True),
  }

  @jax.jit
  def run(p):
    out = {}
    for name, fn in settings.items():
      total = jax.grad(lambda q, fn=fn: fn(q, batch, rng)[0])(p)
      l_u = jax.grad(lambda q, fn=fn: fn(q, batch, rng)[1]["l_u"])(p)
      out[name] = {"total": total, "l_u": l_u}
    return out

  return run(params)


def test_gradients_reach_every_head_and_uem_and_frozen_backbone_gets_none():
  grads = _gradients()
  frozen, joint = grads["paper_frozen"]["total"], grads["paper_joint"]["total"]
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(frozen["backbone"]))
  assert np.all(_per_exit_norms(frozen["deediff"]["heads"]) > 0)
  assert np.all(_per_exit_norms(frozen["deediff"]["uems"]) > 0)
  block_grads = jax.tree.leaves(joint["backbone"]["blocks"])
  assert sum(float(jnp.sum(g ** 2)) for g in block_grads) > 0
  np.testing.assert_allclose(  # freezing changes nothing for the heads and UEMs
      np.concatenate([np.ravel(g) for g in jax.tree.leaves(joint["deediff"])]),
      np.concatenate([np.ravel(g) for g in jax.tree.leaves(frozen["deediff"])]), atol=1e-6)


def test_pseudo_target_gradient_follows_variant():
  """L_u alone: the paper's û is a detached target (the heads get no gradient from L_u); the
  public code's û is not detached, so L_u also trains the heads."""
  grads = _gradients()
  paper, public = grads["paper_frozen"]["l_u"], grads["public_frozen"]["l_u"]
  assert np.all(_per_exit_norms(paper["deediff"]["heads"]) == 0)
  assert np.all(_per_exit_norms(paper["deediff"]["uems"]) > 0)
  assert np.all(_per_exit_norms(public["deediff"]["heads"]) > 0)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(public["backbone"]))


def test_bad_arguments():
  model, params, batch = _setup("dit")
  with pytest.raises(ValueError, match="variant"):
    deediff_loss.make_deediff_loss(model, variant="blog")
  with pytest.raises(ValueError, match="UEM"):
    deediff_loss.make_deediff_loss(model, uem="attention")
  with pytest.raises(ValueError, match="backbone"):
    deediff_loss.make_deediff_loss(model)(params["backbone"], batch, jax.random.PRNGKey(0))
