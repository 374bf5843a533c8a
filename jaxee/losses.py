"""Fine-tuning objectives of ASE and DuoDiff, as `loss_fn(params, batch, rng, *, train_state_extras)`.

All objectives follow the contract of `jaxee/train/objective.py`: pure, per-device, the rng is
already folded with the step and device index, `train_state_extras` carries `step` (and any
arrays the trainer keeps in `TrainState.extras`). Per-sample weights are applied before the batch
mean.

- `make_diffusion_loss`: the backbone's own training loss — DiT's hybrid loss (ε-MSE + VLB with
  the stop-gradient on the mean, learned σ; DiT `diffusion/gaussian_diffusion.py
  training_losses`), ε-MSE when σ is not learned (DuoDiff's `_loss_fn` on the linear chain),
  U-ViT's continuous `LSimple` (t ~ U[0,1), network time 999·t) or discrete `LSimple`
  (n ∈ {1..1000}) — with CFG label dropout and an optional per-sample time weight.
- `make_ase_loss`: ASE fine-tuning (Moon et al., ICML 2024, Alg. 1; `research/ee_methods.md`
  §1.4, §1.7): the backbone truncated per sample at its schedule depth for the sample's t
  (`exits.ase.ase_forward_masked`, so gradients reach only the blocks the sample used), times
  the re-weighting coefficient λ(t): `boost` on the intervals where the schedule removes blocks
  (the noise side) during the boosted phase, 1 after it. The boosted phase ends after C steps
  (`lambda_mode='cycle'`, optionally repeating with period 2C) or when a host-side plateau test
  on the training loss fires (`lambda_mode='plateau'`, state kept in `TrainState.extras` so a
  resumed run continues exactly). The functional form of λ is not in the released code
  (`ee_methods.md` §1.1, §1.7); the two-level table is jaxee's reading of the paper's text.
- `make_duodiff_loss`, `init_shallow_from_deep`: DuoDiff's shallow backbone (3 layers by
  default), plain ε-MSE over all t, from scratch or initialised from the deep model (§3.2).
- DeeDiff and block-mask (TABM) objectives: `jaxee/train/deediff_loss.py`,
  `jaxee/train/masks_opt.py`.

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
from jaxee.models.backbone import as_backbone

Forward = Callable[[Any, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]
LossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]

LAMBDA_MODES = ("cycle", "plateau", "constant")


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
# ASE


def ase_lambda_table(plan, model, boost: float) -> np.ndarray:
  """λ per interval during the boosted phase: `boost` where the schedule removes blocks, else 1.

  ASE Alg. 1 re-weights the time regions whose blocks were dropped (the noise side); the
  function form is not in the released code (`research/ee_methods.md` §1.7), so jaxee uses this
  two-level table and documents it.
  """
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  full = ase_lib.capacity(model)
  return np.where(np.asarray(plan.schedule) < full, boost, 1.0).astype(np.float32)


def ase_boost_active(extras: Dict[str, Any], mode: str, cycle_length: int = 0,
                     cycle_repeat: bool = False) -> jax.Array:
  """Whether the boosted phase of λ(t) is on, as a traced bool scalar.

  Args:
    extras: `train_state_extras` (`step`, and `ase_boost` for the plateau mode).
    mode: 'cycle' (boosted for steps [0, C), or the first half of every 2C period with
      `cycle_repeat`), 'plateau' (while `extras['ase_boost']` > 0.5; the host-side
      `plateau_update` clears it, see `jaxee.train.methods`) or 'constant' (always boosted).
    cycle_length: C.
    cycle_repeat: repeat the cycle.

  Returns:
    bool scalar.
  """
  if mode == "constant":
    return jnp.asarray(True)
  if mode == "cycle":
    step = jnp.asarray(extras.get("step", 0), jnp.int32)
    if cycle_repeat:
      return (step % (2 * cycle_length)) < cycle_length
    return step < cycle_length
  if mode == "plateau":
    return jnp.asarray(extras.get("ase_boost", 1.0)) > 0.5
  raise ValueError(f"unknown ASE lambda mode {mode!r}; choose from {LAMBDA_MODES}")


def make_ase_loss(model, plan, *, boost: float = 2.0, lambda_mode: str = "cycle",
                  cycle_length: int = 10_000, cycle_repeat: bool = False,
                  schedule=None, label_dropout: Optional[float] = None) -> LossFn:
  """ASE fine-tuning loss (hybrid for learned-σ DiT, ε-MSE otherwise) × λ(t).

  Args:
    model: the backbone being fine-tuned.
    plan: an `exits.ase.ASEPlan` (its depth for each sample's t truncates the backbone).
    boost: λ on intervals with dropped blocks during the boosted phase (1 elsewhere / after).
    lambda_mode: see `ase_boost_active`.
    cycle_length: C, in optimizer steps (`lambda_mode='cycle'`).
    cycle_repeat: boosted/plain phases alternate every C steps instead of switching once.
    schedule: training schedule (default from the model).
    label_dropout: CFG label dropout.

  The keyword defaults serve direct calls only: a training run (`jaxee.train.methods`) passes
  every argument from `config.ase`, whose fields and defaults are defined once in
  `jaxee.train.config_base.ase_section` (there `lambda_mode='plateau'`).

  Returns:
    The objective; metrics include `weight_mean` (mean λ of the batch) and `ase_boost`
    (1 while boosted).
  """
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import plan as plan_lib  # pylint: disable=g-import-not-at-top
  plan.validate(model)
  if lambda_mode not in LAMBDA_MODES:
    raise ValueError(f"unknown ASE lambda mode {lambda_mode!r}; choose from {LAMBDA_MODES}")
  if lambda_mode == "cycle" and cycle_length <= 0:
    raise ValueError(f"lambda_mode='cycle' needs cycle_length > 0, got {cycle_length}")
  table = jnp.asarray(ase_lambda_table(plan, model, boost))
  time_schedule = plan_lib.time_schedule(model, plan.time_schedule)

  def forward(params, x_t, t_net, y):
    depths = plan.depth_for_time(model, t_net)
    return ase_lib.ase_forward_masked(model, params, x_t, t_net, y, depths)

  def interval(t_net):
    tau = plan_lib.model_time_to_unit(jnp.asarray(t_net, jnp.float32), time_schedule)
    return jnp.clip(jnp.floor(10 * tau + 1e-6), 0, 9).astype(jnp.int32)

  def weight_fn(t_net, extras):
    active = ase_boost_active(extras, lambda_mode, cycle_length, cycle_repeat)
    return jnp.where(active, table[interval(t_net)], 1.0)

  inner = make_diffusion_loss(model, schedule=schedule, forward=forward, weight_fn=weight_fn,
                              label_dropout=label_dropout)

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    extras = train_state_extras or {}
    loss, metrics = inner(params, batch, rng, train_state_extras=extras)
    metrics["ase_boost"] = ase_boost_active(extras, lambda_mode, cycle_length,
                                            cycle_repeat).astype(jnp.float32)
    return loss, metrics

  return loss_fn


def plateau_init() -> Dict[str, float]:
  """Initial host state of ASE's plateau test (JSON-serialisable, checkpointed by the trainer)."""
  return {"avg": None, "best": None, "stale": 0, "count": 0, "boost": 1.0}


def plateau_update(state: Dict[str, Any], loss: float, *, window: int = 10, patience: int = 3,
                   rel_tol: float = 1e-3, ema: float = 0.9) -> Dict[str, Any]:
  """One host-side update of the plateau test that ends ASE's boosted phase ("until the loss
  plateaus", Alg. 1).

  Keeps an exponential moving average of the observed training loss; every `window` updates it
  compares the average with the best seen so far, and after `patience` consecutive windows
  without a relative improvement of `rel_tol` it sets `boost` to 0 for good (λ back to 1).
  The trainer calls it once per log step (`jaxee.train.methods`), so `window` counts log steps.

  Args:
    state: the current state (`plateau_init()` or a previous result).
    loss: the latest training loss.
    window, patience, rel_tol, ema: the test's parameters.

  Returns:
    The new state (a new dict of Python scalars).
  """
  avg, best = state["avg"], state["best"]
  stale, count, boost = int(state["stale"]), int(state["count"]) + 1, float(state["boost"])
  loss = float(loss)
  avg = loss if avg is None else ema * float(avg) + (1 - ema) * loss
  if boost > 0.5 and count % window == 0:
    if best is None or avg < float(best) * (1 - rel_tol):
      best, stale = avg, 0
    else:
      stale += 1
      if stale >= patience:
        boost = 0.0
  return {"avg": avg, "best": best, "stale": stale, "count": count, "boost": boost}


# ------------------------------------------------------------------------------------------------
# DuoDiff


def make_duodiff_loss(shallow_model, *, schedule=None,
                      label_dropout: Optional[float] = None) -> LossFn:
  """DuoDiff: the shallow backbone trained with the plain diffusion loss over all t (§3.2).

  With a U-ViT whose `default_schedule` is 'linear_discrete' (DuoDiff's linear β chain, t in
  {0..999}) this is exactly DuoDiff's ε-MSE `_loss_fn`; a learned-σ DiT also gets the VLB term.
  """
  return make_diffusion_loss(shallow_model, schedule=schedule, label_dropout=label_dropout)


def shallow_depth(deep_model, num_layers: int) -> int:
  """The `depth` constructor value of a shallow copy with `num_layers` transformer blocks.

  The backbone decides (`Backbone.shallow_depth`): DuoDiff counts U-ViT layers as in-blocks +
  mid + out-blocks ("3 layers" = 1 + 1 + 1, §3.1), i.e. `depth = num_layers − 1`; a DiT has
  `depth = num_layers`.
  """
  return as_backbone(deep_model).shallow_depth(num_layers)


def init_shallow_from_deep(deep_params: Any, deep_model, shallow_model) -> Any:
  """Initialises a shallow backbone from the deep one's embeddings, head and first blocks.

  The backbone decides which blocks (`Backbone.shallow_params`): DiT `blocks[:depth]`; U-ViT the
  first in-blocks, the mid block and the LAST out-blocks (those that consume the kept
  in-blocks' skips, LIFO); everything else is copied as is.
  """
  if type(deep_model) is not type(shallow_model):
    raise ValueError("shallow and deep backbones must be the same family")
  return as_backbone(deep_model).shallow_params(deep_params, shallow_model)
