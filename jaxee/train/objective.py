"""The objective plug-in contract and a plain epsilon-MSE objective for tests and smoke runs.

An objective is any pure function

    loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)

* `params`: the trainable parameter pytree (frozen groups included; the optimizer zeroes their
  updates);
* `batch`: the per-device slice of the batch (a dict of arrays with a leading batch axis);
* `rng`: the per-device key, already folded with the step and the device index;
* `train_state_extras`: `dict(state.extras, step=state.step)`;
* returns the scalar mean loss over the slice (per-sample weights are applied inside) and a
  dict of scalar metrics. The step averages both over devices.

The research objectives (ASE, DeeDiff, DuoDiff, block masks) live in `jaxee.losses`; this
module only provides `make_eps_mse_loss`, DiT's simple loss (L_simple with a linear beta chain),
used by the trainer tests, the kill/resume check and the multi-host check.
"""
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


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
