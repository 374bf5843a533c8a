"""Fine-tuning objectives of the four methods, as `loss_fn(params, batch, rng, *, train_state_extras)`.

All objectives follow the contract of `jaxee/train/objective.py`: pure, per-device, the rng is
already folded with the step and device index, `train_state_extras` carries `step` (and any
arrays the trainer keeps in `TrainState.extras`). Per-sample weights are applied before the batch
mean.

- `make_diffusion_loss`: the backbone's own training loss — DiT's hybrid loss (ε-MSE + VLB with
  the stop-gradient on the mean, learned σ; `diffusion/gaussian_diffusion.py training_losses`),
  U-ViT's continuous `LSimple` (t ~ U[0,1), network time 999·t) or discrete `LSimple`
  (n ∈ {1..1000}) — with CFG label dropout and an optional per-sample time weight.
- `make_ase_loss`: ASE fine-tuning (Moon et al., ICML 2024, Alg. 1): the backbone truncated per
  sample at its schedule depth for the sample's t (`exits.ase.ase_forward_masked`, so gradients
  reach only the blocks the sample used), times the re-weighting coefficient λ(t): larger on the
  noise-side intervals where blocks were removed during the boosted phase of the cycle, 1 after.
- `make_duodiff_loss`: DuoDiff's shallow backbone, plain diffusion loss over all t.
- DeeDiff and block-mask objectives: `jaxee/train/deediff_objective.py`, `jaxee/train/masks_opt.py`.
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


def _per_sample_losses(schedule, forward_at, x0, rng):
  """Draws t and noise, returns (per-sample dict, network time per sample)."""
  t_key, n_key = jax.random.split(rng)
  noise = jax.random.normal(n_key, x0.shape, x0.dtype)
  b = x0.shape[0]
  if isinstance(schedule, schedules_lib.DiscreteDiffusion):
    t = jax.random.randint(t_key, (b,), 0, schedule.num_timesteps)
    t_net = schedule.at(t)["t_net"]
    return gaussian.training_losses(schedule, forward_at, x0, t, noise), t_net
  if isinstance(schedule, schedules_lib.SDDiscreteSchedule):
    n = jax.random.randint(t_key, (b,), 1, 1001)
    return gaussian.sd_eps_loss(schedule, forward_at, x0, n, noise), n.astype(jnp.float32)
  t = jax.random.uniform(t_key, (b,))
  return gaussian.vp_eps_loss(schedule, forward_at, x0, t, noise), schedule.net_time(t)


def make_diffusion_loss(model, *, schedule=None, forward: Optional[Forward] = None,
                        weight_fn: Optional[Callable] = None, label_dropout: Optional[float] = None,
                        image_key: str = "image", label_key: str = "label",
                        forward_with_time: Optional[Callable] = None) -> LossFn:
  """The backbone's training loss with optional per-sample weights.

  Args:
    model: the backbone (its family decides the schedule and the label conventions).
    schedule: a schedule object or name; default `training_schedule(model)`.
    forward: `forward(params, x_t, t_net, y) -> out`; default the full `model.apply`.
    weight_fn: `weight_fn(t_net, extras) -> (B,)` per-sample weights (e.g. ASE's λ(t)).
    label_dropout: CFG label-drop probability; default DiT's `class_dropout_prob`, else 0.1 when
      the model has a null class, else 0.
    image_key, label_key: batch keys.
    forward_with_time: internal; `forward_with_time(params, x_t, t_net, y)` used as is.

  Returns:
    `loss_fn(params, batch, rng, *, train_state_extras=None) -> (loss, metrics)`.
  """
  schedule = training_schedule(model, schedule) if schedule is None or isinstance(
      schedule, str) else schedule
  if forward is None:
    forward = lambda p, x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
  if label_dropout is None:
    label_dropout = getattr(model, "class_dropout_prob", 0.1 if model.null_class is not None else 0)

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    extras = train_state_extras or {}
    x0 = jnp.asarray(batch[image_key], jnp.float32)
    y = batch.get(label_key) if model.num_classes > 0 else None
    drop_key, loss_key = jax.random.split(rng)
    if y is not None:
      y = drop_labels(drop_key, jnp.asarray(y, jnp.int32), model.null_class, label_dropout)
    out, t_net = _per_sample_losses(schedule, lambda x_t, tn: forward(params, x_t, tn, y), x0,
                                    loss_key)
    w = jnp.ones_like(out["loss"]) if weight_fn is None else weight_fn(t_net, extras)
    loss = jnp.mean(w * out["loss"])
    metrics = {"loss_unweighted": jnp.mean(out["loss"]), "mse": jnp.mean(out["mse"]),
               "weight_mean": jnp.mean(w)}
    if "vb" in out:
      metrics["vb"] = jnp.mean(out["vb"])
    return loss, metrics

  return loss_fn


# ------------------------------------------------------------------------------------------------
# ASE


def ase_lambda_table(plan, model, boost: float) -> np.ndarray:
  """λ per interval during the boosted phase: `boost` where the schedule removes blocks, else 1.

  ASE Alg. 1 re-weights the time regions whose blocks were dropped (the noise side); the
  function form is not in the released code (`research/ee_methods.md` §1.7), so jaxee uses this
  two-level table and documents it.
  """
  from jaxee.exits import ase as ase_lib  # local: exits import losses-free modules only
  full = ase_lib.capacity(model)
  return np.where(np.asarray(plan.schedule) < full, boost, 1.0).astype(np.float32)


def make_ase_loss(model, plan, *, boost: float = 2.0, cycle_length: int = 0,
                  schedule=None, label_dropout: Optional[float] = None) -> LossFn:
  """ASE fine-tuning loss (hybrid for learned-σ DiT, ε-MSE otherwise) × λ(t).

  Args:
    model: the backbone being fine-tuned.
    plan: an `exits.ase.ASEPlan` (its depth for each sample's t truncates the backbone).
    boost: λ on intervals with dropped blocks during the boosted phase.
    cycle_length: boosted phase length in steps (C); 0 = until the trainer's plateau test clears
      `train_state_extras['ase_boost']` (a float 1/0 the trainer keeps in the state extras).
    schedule: training schedule (default from the model).
    label_dropout: CFG label dropout.

  Returns:
    The objective; metrics include `ase_depth_mean` and `ase_boost`.
  """
  from jaxee.exits import ase as ase_lib
  plan.validate(model)
  table = jnp.asarray(ase_lambda_table(plan, model, boost))
  time_schedule = plan.time_schedule or model.default_schedule

  def forward(params, x_t, t_net, y):
    depths = plan.depth_for_time(model, t_net)
    return ase_lib.ase_forward_masked(model, params, x_t, t_net, y, depths)

  def weight_fn(t_net, extras):
    from jaxee.exits import plan as plan_lib
    tau = plan_lib.model_time_to_unit(t_net, time_schedule)
    idx = jnp.clip(jnp.floor(10 * tau + 1e-6), 0, 9).astype(jnp.int32)
    if cycle_length > 0:
      active = (jnp.asarray(extras.get("step", 0)) % (2 * cycle_length)) < cycle_length
    else:
      active = jnp.asarray(extras.get("ase_boost", 1.0)) > 0.5
    return jnp.where(active, table[idx], 1.0)

  inner = make_diffusion_loss(model, schedule=schedule, forward=forward, weight_fn=weight_fn,
                              label_dropout=label_dropout)

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    loss, metrics = inner(params, batch, rng, train_state_extras=train_state_extras)
    extras = train_state_extras or {}
    metrics["ase_boost"] = jnp.asarray(extras.get("ase_boost", 1.0), jnp.float32)
    return loss, metrics

  return loss_fn


class PlateauSwitch:
  """Host-side plateau test that ends ASE's boosted phase (Alg. 1 "until the loss plateaus").

  Tracks an exponential moving average of the loss; when it improves by less than `rel_tol`
  over `patience` consecutive windows of `window` steps, `boost` drops to 0 (λ back to 1).
  """

  def __init__(self, window: int = 100, patience: int = 3, rel_tol: float = 1e-3,
               ema: float = 0.98):
    self.window, self.patience, self.rel_tol, self.ema = window, patience, rel_tol, ema
    self.avg: Optional[float] = None
    self.best = float("inf")
    self.stale = 0
    self.count = 0
    self.boost = 1.0

  def update(self, loss: float) -> float:
    self.avg = loss if self.avg is None else self.ema * self.avg + (1 - self.ema) * loss
    self.count += 1
    if self.boost and self.count % self.window == 0:
      if self.avg < self.best * (1 - self.rel_tol):
        self.best, self.stale = self.avg, 0
      else:
        self.stale += 1
        if self.stale >= self.patience:
          self.boost = 0.0
    return self.boost

  def state_dict(self) -> dict:
    return dict(avg=self.avg, best=self.best, stale=self.stale, count=self.count, boost=self.boost)

  def load_state_dict(self, state: dict) -> None:
    for k, v in state.items():
      setattr(self, k, v)


# ------------------------------------------------------------------------------------------------
# DuoDiff


def make_duodiff_loss(shallow_model, *, schedule=None,
                      label_dropout: Optional[float] = None) -> LossFn:
  """DuoDiff: the shallow backbone trained with the plain diffusion loss over all t (§3.2)."""
  return make_diffusion_loss(shallow_model, schedule=schedule, label_dropout=label_dropout)


def init_shallow_from_deep(deep_params: Any, deep_model, shallow_model) -> Any:
  """Initialises a shallow backbone from the deep one's embeddings, head and first blocks.

  DiT: `blocks[:depth]`; U-ViT: the first in-blocks, the mid block, and the LAST out-blocks
  (those that consume the kept in-blocks' skips), everything else copied as is.
  """
  if deep_model.family != shallow_model.family:
    raise ValueError("shallow and deep backbones must be the same family")
  out = dict(deep_params)
  if deep_model.family == "dit":
    out["blocks"] = jax.tree.map(lambda a: a[:shallow_model.depth], deep_params["blocks"])
    return out
  n = shallow_model.num_in_blocks
  out["in_blocks"] = jax.tree.map(lambda a: a[:n], deep_params["in_blocks"])
  out["out_blocks"] = jax.tree.map(lambda a: a[a.shape[0] - n:], deep_params["out_blocks"])
  return out
