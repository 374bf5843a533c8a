"""ASE fine-tuning objective: the truncated backbone's diffusion loss × λ(t), and λ's helpers.

ASE (Moon et al., ICML 2024, §3.3, Alg. 1; `research/ee_methods.md` §1.4, §1.7): the backbone
truncated per sample at its schedule depth for the sample's t (`exits.ase.ase_forward_masked`,
so gradients reach only the blocks the sample used), times a re-weighting coefficient λ(t).

**λ(t), jaxee's reading.** The paper gives λ(t) only in words (a higher coefficient where blocks
are dropped, i.e. towards t → 1, until the re-weighting cycle C ends or the loss plateaus, then
λ = 1); the released code has λ ≡ 1 (§1.1, §1.7). jaxee grades λ by how much of the network is
dropped at t: on interval i (τ ∈ [i/10, (i+1)/10)) with n_i of the model's droppable
`capacity` blocks running (`exits.ase.capacity`: 28 DiT-XL/2 blocks, 6 U-ViT-S out-blocks),

    λ_i = 1 + γ · (1 − n_i / capacity)        (γ = `config.ase.lambda_boost`)

during the boosted phase and λ_i = 1 after it. A two-level form (γ wherever *any* block is
dropped) would be a constant for D2/D3/D6-U-ViT, whose every interval drops decoder blocks, and a
constant loss scale is cancelled by Adam: the graded form is time-dependent for all eight paper
tables at their reference depths (e.g. D3-DiT, γ = 2: 1, 1, 1.29, 1.29, 1.57, 1.57, 1.86, 1.86,
2.14, 2.14; D6-U-ViT: 2.33 ×4, 2.67 ×6), and at any rescaled depth where the rescaled table is
not itself constant (a constant schedule has nothing to re-weight: U-ViT D3/D6 rescaled to
fewer than 3/5 out-blocks). The boosted phase ends after C steps (`lambda_mode='cycle'`,
optionally repeating with period 2C) or when a host-side plateau test on the training loss fires
(`lambda_mode='plateau'`, state kept in `TrainState.extras` so a resumed run continues exactly).

**Loss.** The paper fine-tunes both backbones with the hybrid loss (L_simple + L_vlb, IDDPM).
L_vlb trains only the learned variance (the mean is stop-gradient'd), so on a backbone with no σ
output — U-ViT predicts ε only — the hybrid loss *is* L_simple. `loss` states which one a run
uses ('hybrid': learned-σ model on the discrete chain, DiT; 'simple': ε-MSE, U-ViT's `LSimple`;
'auto': whichever the model supports) and a mismatch is an error, never a silent switch.

The objective follows the contract of `jaxee.train.objectives` (package docstring); the loss
itself is `diffusion.make_diffusion_loss` with the truncated forward and λ as its per-sample
weight. Keyword defaults come from `jaxee.train.config_base.ASE_DEFAULTS` (the config schema).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxee.train import config_base
from jaxee.train.objectives import diffusion as diffusion_obj

LAMBDA_MODES = ("cycle", "plateau", "constant")
LOSS_KINDS = ("hybrid", "simple", "auto")
_D = config_base.ASE_DEFAULTS


def lambda_values(schedule, capacity: int, boost: float) -> np.ndarray:
  """λ_i = 1 + boost·(1 − n_i/capacity) for the 10 entries n_i of a schedule (float32)."""
  n = np.asarray(schedule, np.float64)
  if capacity <= 0 or np.any(n < 0) or np.any(n > capacity):
    raise ValueError(f"schedule {tuple(schedule)} does not fit capacity {capacity}")
  return (1.0 + float(boost) * (1.0 - n / capacity)).astype(np.float32)


def ase_lambda_table(plan, model, boost: float) -> np.ndarray:
  """λ per interval during the boosted phase: 1 + boost·(dropped fraction of the capacity).

  The fraction is of the model's droppable blocks (`exits.ase.capacity`); see the module
  docstring for the reading of Alg. 1. Interval i is τ ∈ [i/10, (i+1)/10).
  """
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  return lambda_values(plan.schedule, ase_lib.capacity(model), boost)


def native_loss(model, schedule=None) -> str:
  """'hybrid' when the model's training chain learns σ (DiT), else 'simple' (ε-MSE)."""
  sched = (diffusion_obj.training_schedule(model, schedule)
           if schedule is None or isinstance(schedule, str) else schedule)
  return "hybrid" if getattr(sched, "learn_sigma", False) else "simple"


def resolve_loss(loss: str, model, schedule=None) -> str:
  """The loss a run uses: `loss` checked against the model ('auto': its native loss).

  Raises:
    ValueError: unknown kind, 'hybrid' on a model without a σ output, or 'simple' on a
      learned-σ model (its σ channels would go untrained; jaxee does not drop the VLB term).
  """
  if loss not in LOSS_KINDS:
    raise ValueError(f"unknown ASE loss {loss!r}; choose from {LOSS_KINDS}")
  native = native_loss(model, schedule)
  if loss != "auto" and loss != native:
    why = ("the model has no learned-σ output (U-ViT predicts ε only), so the hybrid loss "
           "reduces to L_simple: use loss='simple'" if loss == "hybrid" else
           "the model learns σ, whose only training signal is the VLB term: use "
           "loss='hybrid'")
    raise ValueError(f"ASE loss {loss!r} does not fit {type(model).__name__}: {why}")
  return native


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


def make_ase_loss(model, plan, *, boost: float = _D["lambda_boost"],
                  lambda_mode: str = _D["lambda_mode"], cycle_length: int = _D["cycle_length"],
                  cycle_repeat: bool = _D["cycle_repeat"], loss: str = _D["loss"],
                  schedule=None, label_dropout: Optional[float] = None) -> diffusion_obj.LossFn:
  """ASE fine-tuning loss (hybrid for learned-σ DiT, L_simple ε-MSE for U-ViT) × λ(t).

  Args:
    model: the backbone being fine-tuned.
    plan: an `exits.ase.ASEPlan` (its depth for each sample's t truncates the backbone).
    boost: γ of λ_i = 1 + γ·(1 − n_i/capacity) during the boosted phase (1 after it).
    lambda_mode: see `ase_boost_active`.
    cycle_length: C, in optimizer steps (`lambda_mode='cycle'`).
    cycle_repeat: boosted/plain phases alternate every C steps instead of switching once.
    loss: 'hybrid' | 'simple' | 'auto', checked against the model (`resolve_loss`).
    schedule: training schedule (default from the model).
    label_dropout: CFG label dropout.

  The keyword defaults are the config schema's (`config_base.ASE_DEFAULTS`); a training run
  (`jaxee.train.methods`) passes every argument from `config.ase`.

  Returns:
    The objective; metrics include `weight_mean` (mean λ of the batch) and `ase_boost`
    (1 while boosted).
  """
  from jaxee.exits import ase as ase_lib  # pylint: disable=g-import-not-at-top
  from jaxee.exits import plan as plan_lib  # pylint: disable=g-import-not-at-top
  plan.validate(model)
  resolve_loss(loss, model, schedule)
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


def plateau_update(state: Dict[str, Any], loss: float, *, window: int = 10,
                   patience: int = _D["plateau_patience"],
                   rel_tol: float = _D["plateau_rel_tol"], ema: float = 0.9) -> Dict[str, Any]:
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
