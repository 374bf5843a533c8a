"""The training state pytree and its exponential moving average (EMA) update.

`TrainState` is a `flax.struct.dataclass`: a plain pytree holding everything a training run
needs to resume bit-exactly:

* `step`: int32 scalar, the number of optimizer updates applied so far;
* `params`: the trainable (and frozen) parameters;
* `opt_state`: the optax state;
* `ema_params`: the EMA of `params` (DiT's `update_ema`), used for sampling;
* `rng`: the run's base PRNG key (raw `uint32[2]` key data, so that Orbax stores it as a plain
  array). It never changes: every step derives its randomness as
  `fold_in(fold_in(rng, step), device_index)` (see `jaxee.train.step`), so resuming from a
  checkpoint at step k draws exactly what an uninterrupted run draws at step k;
* `extras`: a dict of non-trained arrays an objective may need (a frozen teacher, running
  statistics, ...). It is passed to the loss as `train_state_extras` together with `step`.
  Empty by default;
* `healthy`: bool scalar, False once a step produced a non-finite loss or gradient. The step
  then leaves the state untouched and every later step is a no-op (see `jaxee.train.step`), so
  the host may look at the flag only now and then (at log and checkpoint time, without a
  per-step device sync) and still hold exactly the last good state when it stops the run.
"""
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that is checkpointed during training.

  Attributes:
    step: int32 scalar, optimizer updates applied so far.
    params: model parameters.
    opt_state: optax optimizer state.
    ema_params: exponential moving average of `params`.
    rng: base PRNG key as raw `uint32[2]` key data.
    extras: dict of extra arrays handed to the objective (may be empty).
    healthy: bool scalar; False after the first non-finite step (the state is then frozen).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  rng: jax.Array
  extras: Dict[str, PyTree] = flax.struct.field(default_factory=dict)
  healthy: jax.Array = flax.struct.field(default_factory=lambda: jnp.ones((), jnp.bool_))


def as_raw_key(rng) -> jax.Array:
  """Returns `rng` as raw `uint32` key data (typed `jax.random.key` keys are unwrapped)."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  if rng.dtype != jnp.uint32:
    raise TypeError(f"expected a PRNG key, got an array of dtype {rng.dtype}")
  return rng


def create_train_state(params: PyTree, tx: optax.GradientTransformation, rng,
                       extras: Optional[Dict[str, PyTree]] = None) -> TrainState:
  """Builds the initial `TrainState` at step 0.

  Args:
    params: initial parameters (the EMA starts as an exact copy, as in DiT).
    tx: the optax transformation (e.g. from `jaxee.train.optim.make_optimizer`).
    rng: the run's base key (`jax.random.PRNGKey(seed)` or `jax.random.key(seed)`).
    extras: optional dict of extra arrays for the objective.

  Returns:
    A `TrainState`.
  """
  params = jax.tree.map(jnp.asarray, params)
  # A real copy: the EMA must not alias the params buffers, or donation would delete both.
  ema_params = jax.tree.map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=ema_params, rng=as_raw_key(rng), extras=dict(extras or {}))


def ema_decay_at(step, decay: float, warmup: Optional[str] = None) -> jax.Array:
  """The EMA decay used for the update that produces step `step + 1`.

  Args:
    step: the state's step before the update (int32 scalar, traced or not).
    decay: the target decay (DiT: 0.9999).
    warmup: `None` (constant decay, DiT's default) or `'linear'`:
      `min(decay, (1 + step) / (10 + step))`, the warm-up used by many diffusion codebases so
      the EMA is not dominated by the random initialization in short runs.

  Returns:
    float32 scalar decay.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if warmup is None or warmup == "none":
    return decay
  if warmup == "linear":
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + s) / (10.0 + s))
  raise ValueError(f"unknown ema warmup {warmup!r}; expected None or 'linear'")


def update_ema(ema_params: PyTree, params: PyTree, decay) -> PyTree:
  """DiT's `update_ema`: `ema = decay * ema + (1 - decay) * params`, leaf by leaf.

  Evaluated as `ema + (1 - decay) * (params - ema)` (the same value up to one rounding): a leaf
  whose parameters equal its EMA (a frozen group, or the first step) then stays bit-identical
  whatever way XLA fuses the arithmetic.

  Args:
    ema_params: the current EMA.
    params: the freshly updated parameters.
    decay: scalar decay in [0, 1].

  Returns:
    The new EMA, with the dtypes of `ema_params`.
  """
  def one(e, p):
    d = jnp.asarray(decay, e.dtype)
    return e + (1 - d) * (p.astype(e.dtype) - e)
  return jax.tree.map(one, ema_params, params)
