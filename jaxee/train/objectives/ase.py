"""ASE fine-tuning objective: the truncated backbone's diffusion loss × λ(t), and λ's helpers.

ASE (Moon et al., ICML 2024, Alg. 1; `research/ee_methods.md` §1.4, §1.7): the backbone
truncated per sample at its schedule depth for the sample's t (`exits.ase.ase_forward_masked`,
so gradients reach only the blocks the sample used), times the re-weighting coefficient λ(t):
`boost` on the intervals where the schedule removes blocks (the noise side) during the boosted
phase, 1 after it. The boosted phase ends after C steps (`lambda_mode='cycle'`, optionally
repeating with period 2C) or when a host-side plateau test on the training loss fires
(`lambda_mode='plateau'`, state kept in `TrainState.extras` so a resumed run continues exactly).
The functional form of λ is not in the released code (`ee_methods.md` §1.1, §1.7); the two-level
table is jaxee's reading of the paper's text.

The objective follows the contract of `jaxee.train.objectives` (package docstring); the loss
itself is `diffusion.make_diffusion_loss` (hybrid for learned-σ DiT, ε-MSE otherwise) with the
truncated forward and λ as its per-sample weight.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.train.objectives import diffusion as diffusion_obj

LAMBDA_MODES = ("cycle", "plateau", "constant")


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
                  schedule=None, label_dropout: Optional[float] = None) -> diffusion_obj.LossFn:
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

  inner = diffusion_obj.make_diffusion_loss(model, schedule=schedule, forward=forward,
                                            weight_fn=weight_fn, label_dropout=label_dropout)

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
