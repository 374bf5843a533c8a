"""The diffusion objectives every method builds on: the backbone's own loss and a plain ε-MSE.

Every objective of `jaxee.train.objectives` follows the contract stated in the package docstring
(`loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)`: pure, per-device, the
rng already folded with the step and the device index, per-sample weights applied before the
batch mean).

- `make_diffusion_loss`: the backbone's own training loss — DiT's hybrid loss (ε-MSE + VLB with
  the stop-gradient on the mean, learned σ; DiT `diffusion/gaussian_diffusion.py
  training_losses`), ε-MSE when σ is not learned (DuoDiff's `_loss_fn` on the linear chain),
  U-ViT's continuous `LSimple` (t ~ U[0,1), network time 999·t) or discrete `LSimple`
  (n ∈ {1..1000}) — with CFG label dropout and an optional per-sample time weight. The
  'baseline' method, and the base of the ASE, DuoDiff and DeeDiff objectives.
- `make_eps_mse_loss`: DiT's simple loss (L_simple with a linear beta chain, `t ~ U{0..T-1}`),
  used by the trainer tests, the kill/resume check and the multi-host check, with
  `synthetic_batch` / `process_rows` (deterministic global batches and a host's rows of them).

Batches may carry `t` (per-sample respaced index / continuous time / SD step, as the schedule
draws them) and `noise` to fix the otherwise random draws (evaluation and tests).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.diffusion import gaussian
from jaxee.diffusion import schedules as schedules_lib

Forward = Callable[[Any, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]


def training_schedule(model, name: Optional[str] = None):
  """The schedule a backbone trains on: DiT's full 1000-step linear chain, or U-ViT's."""
  name = name or model.default_schedule
  if name == "linear_discrete":
    return schedules_lib.create_dit_diffusion("", learn_sigma=model.learn_sigma)
  return schedules_lib.get_schedule(name)


def drop_labels(rng, labels, null_class: Optional[int], prob: float):
  """CFG training: each label becomes the null class with probability `prob` (DiT
  `LabelEmbedder.token_drop`, U-ViT `CFGDataset`)."""
  if labels is None or null_class is None or prob <= 0:
    return labels
  drop = jax.random.uniform(rng, labels.shape) < prob
  return jnp.where(drop, null_class, labels)


def _per_sample_losses(schedule, forward_at, x0, rng, t=None, noise=None):
  """Draws t and noise (unless given), returns (per-sample dict, network time per sample)."""
  t_key, n_key = jax.random.split(rng)
  if noise is None:
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
  noise = jnp.asarray(noise, x0.dtype)
  b = x0.shape[0]
  if isinstance(schedule, schedules_lib.DiscreteDiffusion):
    t = jax.random.randint(t_key, (b,), 0, schedule.num_timesteps) if t is None else t
    t = jnp.asarray(t, jnp.int32)
    t_net = schedule.at(t)["t_net"]
    return gaussian.training_losses(schedule, forward_at, x0, t, noise), t_net
  if isinstance(schedule, schedules_lib.SDDiscreteSchedule):
    n = jax.random.randint(t_key, (b,), 1, 1001) if t is None else jnp.asarray(t, jnp.int32)
    return gaussian.sd_eps_loss(schedule, forward_at, x0, n, noise), n.astype(jnp.float32)
  t = jax.random.uniform(t_key, (b,)) if t is None else jnp.asarray(t, jnp.float32)
  return gaussian.vp_eps_loss(schedule, forward_at, x0, t, noise), schedule.net_time(t)


def make_diffusion_loss(model, *, schedule=None, forward: Optional[Forward] = None,
                        weight_fn: Optional[Callable] = None, label_dropout: Optional[float] = None,
                        image_key: str = "image", label_key: str = "label") -> LossFn:
  """The backbone's training loss with optional per-sample weights.

  Args:
    model: the backbone (its family decides the schedule and the label conventions).
    schedule: a schedule object or name; default `training_schedule(model)`.
    forward: `forward(params, x_t, t_net, y) -> out`; default the full `model.apply`.
    weight_fn: `weight_fn(t_net, extras) -> (B,)` per-sample weights (e.g. ASE's λ(t)).
    label_dropout: CFG label-drop probability; default DiT's `class_dropout_prob`, else 0.1 when
      the model has a null class, else 0.
    image_key, label_key: batch keys.

  Returns:
    `loss_fn(params, batch, rng, *, train_state_extras=None) -> (loss, metrics)`; the loss is
    `mean_b w_b · (mse_b + vb_b)` (vb only for learned-σ discrete schedules).
  """
  if schedule is None or isinstance(schedule, str):
    schedule = training_schedule(model, schedule)
  if forward is None:
    forward = lambda p, x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
  if label_dropout is None:
    label_dropout = getattr(model, "class_dropout_prob",
                            0.1 if model.null_class is not None else 0.0)

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    extras = train_state_extras or {}
    x0 = jnp.asarray(batch[image_key], jnp.float32)
    y = batch.get(label_key) if model.num_classes > 0 else None
    drop_key, loss_key = jax.random.split(rng)
    if y is not None:
      y = drop_labels(drop_key, jnp.asarray(y, jnp.int32), model.null_class, label_dropout)
    out, t_net = _per_sample_losses(schedule, lambda x_t, tn: forward(params, x_t, tn, y), x0,
                                    loss_key, t=batch.get("t"), noise=batch.get("noise"))
    w = jnp.ones_like(out["loss"]) if weight_fn is None else weight_fn(t_net, extras)
    loss = jnp.mean(w * out["loss"])
    metrics = {"loss_unweighted": jnp.mean(out["loss"]), "mse": jnp.mean(out["mse"]),
               "weight_mean": jnp.mean(w)}
    if "vb" in out:
      metrics["vb"] = jnp.mean(out["vb"])
    return loss, metrics

  return loss_fn


# ------------------------------------------------------------------------------------------------
# Plain ε-MSE (tests and smoke runs)


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> np.ndarray:
  """`alpha_bar_t` of DiT's linear beta chain, computed in float64 then stored as float32."""
  betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  return np.cumprod(1.0 - betas).astype(np.float32)


def make_eps_mse_loss(model, *, num_steps: int = 1000, image_key: str = "image",
                      label_key: str = "label") -> Callable[..., Tuple[jax.Array, Dict]]:
  """Epsilon-prediction MSE: `x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`, `t ~ U{0..T-1}`.

  Args:
    model: a Flax backbone called as `model.apply({'params': p}, x, t, y)` (NHWC); only the
      first C output channels (epsilon) are used when the model also predicts sigma.
    num_steps: length of the diffusion chain.
    image_key: batch key of the clean images/latents (B, H, W, C).
    label_key: batch key of the class labels (B,) int.

  Returns:
    `loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)`.
  """
  abar = jnp.asarray(linear_alphas_cumprod(num_steps))

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    del train_state_extras
    x0 = jnp.asarray(batch[image_key], jnp.float32)
    y = jnp.asarray(batch[label_key], jnp.int32)
    t_key, n_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, num_steps)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    a = abar[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    out = model.apply({"params": params}, x_t, t.astype(jnp.float32), y)
    eps = out[..., :x0.shape[-1]]
    per_sample = jnp.mean((eps - noise) ** 2, axis=tuple(range(1, x0.ndim)))
    loss = jnp.mean(per_sample)
    return loss, {"mse": loss, "t_mean": jnp.mean(t.astype(jnp.float32))}

  return loss_fn


def synthetic_batch(step: int, batch_size: int, *, size: int = 8, channels: int = 4,
                    num_classes: int = 10, seed: int = 0) -> Dict[str, np.ndarray]:
  """A deterministic global batch for step `step` (NumPy; identical on every process)."""
  rs = np.random.RandomState((seed * 1_000_003 + step) % (2**31 - 1))
  return {"image": rs.standard_normal((batch_size, size, size, channels)).astype(np.float32),
          "label": rs.randint(0, num_classes, (batch_size,)).astype(np.int32)}


def process_rows(batch: Dict[str, np.ndarray], process_index: int,
                 process_count: int) -> Dict[str, np.ndarray]:
  """This process's contiguous rows of a global batch (matches a `P('data')` sharding over a
  mesh of `jax.devices()` with the same number of devices on every process)."""
  def rows(x):
    if x.shape[0] % process_count:
      raise ValueError(f"batch of {x.shape[0]} rows does not split over {process_count} hosts")
    per = x.shape[0] // process_count
    return x[process_index * per:(process_index + 1) * per]
  return {k: rows(v) for k, v in batch.items()}
