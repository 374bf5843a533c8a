"""DeeDiff / AdaDiff training objective: L = L_simple + λ·L_u + β·L_UAL.

DeeDiff (Tang et al., 2023, "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating
Diffusion Model Generation", Eqs. for the UEM loss and the uncertainty-aware layer-wise loss), as
re-implemented in `razvanmatisan/duodiff` `trainer.py:Trainer._loss_fn` (`research/ee_methods.md`
§2.4–2.5). Every sample runs every block, every exit head g_i and every UEM u_i
(`exits.deediff.forward_all_exits`: one `lax.scan` per segment of the backbone contract,
`jaxee/models/backbone.py`, so the same code trains heads on any backbone; no per-sample exit in
training). With ε the target noise and
e_i = g_i(L_i) − ε on the ε channels (a learned-σ DiT head's σ channels are ignored):

* pseudo-uncertainty û_i = mean_{HWC} tanh|e_i| (per sample);
* `variant='paper'` (default): û_i is a regression target (stop-gradient);
  L_u = Σ_i mean_b (u_i − û_i)², L_UAL = Σ_i mean_b (1 − u_i)·mse_i with
  mse_i = mean_{HWC} e_i² (‖·‖² taken as the per-sample mean, the scale of L_simple);
* `variant='public'`: exactly the public code — û is NOT detached;
  L_u = Σ_{i,b} (u_i − û_i)² (`mse_loss(reduction="sum")`, so it grows with the per-device batch);
  L_UAL = Σ_i mean_b (1 − û_i)·mse_i (weighted by the pseudo-target û, gradients through û);
  optional `unweighted_head_loss` adds L_L = Σ_i mean_b mse_i (`--use_unweighted_loss`).

With a map UEM (`uem='paper_map'`, the paper's Eq. 8–9: one uncertainty u_i per output element)
the pseudo-target is per element, û_i = tanh|e_i| (B, H, W, C) (stop-gradient for 'paper'), and
both terms are taken per element, then averaged over the H·W·C elements of a sample (the scale of
L_simple) before the variant's reduction over (i, b):
'paper': L_u = Σ_i mean_b mean_{HWC} (u_i − û_i)², L_UAL = Σ_i mean_b mean_{HWC} (1 − u_i)·e_i²
(each element's squared error weighted by its own predicted certainty; the weight is not
detached, as for the scalar UEMs, so L_UAL also pulls u towards 1 where the error is large while
L_u ties u to û); 'public': the same with û not detached, L_u summed over (i, b) and the weight
(1 − û_i).

Exit layouts (`exits.deediff_heads.LAYOUTS`): 'inputs' (public: exits at the inputs of blocks
0..L−1) or 'outputs' (paper: exits at the outputs of blocks 1..L−1; the final exit L is the
backbone head, trained by L_simple). The paper trains backbone, heads and UEMs jointly
(`train_backbone=True`, the default here).

L_simple is the backbone's own loss on its final output (`diffusion.make_diffusion_loss`: DiT's
hybrid ε-MSE + VLB with learned σ, U-ViT's ε-MSE), with the same label dropout and the same draws
of t and noise from the same key, so with the heads removed it equals `make_diffusion_loss`
exactly.

Params are `{'backbone': backbone params, 'deediff': {'heads': ..., 'uems': ...}}`
(`init_deediff_train_params`). `train_backbone=False` (the public recipe `--freeze_backbone`) puts
a `stop_gradient` on the backbone params inside the loss, so their gradients are exactly zero and
L_simple is a constant; pair it with optax freezing (`frozen_patterns='backbone/.*'` in
`train/optim.py`) so that weight decay and the EMA do not move them either.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxee.diffusion import gaussian
from jaxee.diffusion import schedules as schedules_lib
from jaxee.exits import deediff as deediff_lib
from jaxee.exits import deediff_heads as heads_lib
from jaxee.train.objectives import diffusion as diffusion_obj

VARIANTS = ("paper", "public")


def init_deediff_train_params(model: Any, backbone_params: Any, rng, *, uem: str = "token_mean",
                              heads_from_backbone: bool = False, layout: str = "inputs") -> dict:
  """`{'backbone': backbone_params, 'deediff': init_deediff_params(model, rng, uem, ...)}`."""
  ee = heads_lib.init_deediff_params(
      model, rng, uem, backbone_params=backbone_params if heads_from_backbone else None,
      layout=layout)
  return {"backbone": backbone_params, "deediff": ee}


def draw_noisy_inputs(schedule: Any, x0, rng) -> dict:
  """t, noise and x_t as `diffusion.make_diffusion_loss` draws them from the same key.

  Returns:
    dict with `t` (the schedule's own index or time, what its loss function takes), `t_net`
    (what the network receives), `noise` and `x_t`.
  """
  t_key, n_key = jax.random.split(rng)
  noise = jax.random.normal(n_key, x0.shape, x0.dtype)
  b = x0.shape[0]
  if isinstance(schedule, schedules_lib.DiscreteDiffusion):
    t = jax.random.randint(t_key, (b,), 0, schedule.num_timesteps)
    return {"t": t, "t_net": schedule.at(t)["t_net"], "noise": noise,
            "x_t": gaussian.q_sample(schedule, x0, t, noise)}
  if isinstance(schedule, schedules_lib.SDDiscreteSchedule):
    n = jax.random.randint(t_key, (b,), 1, 1001)
    return {"t": n, "t_net": n.astype(jnp.float32), "noise": noise,
            "x_t": gaussian.sd_q_sample(schedule, x0, n, noise)}
  t = jax.random.uniform(t_key, (b,))
  return {"t": t, "t_net": schedule.net_time(t), "noise": noise,
          "x_t": gaussian.vp_q_sample(schedule, x0, t, noise)}


def backbone_loss(schedule: Any, out, x0, draw: dict) -> dict:
  """Per-sample backbone loss of an output computed at `draw['x_t']` (L_simple)."""
  if isinstance(schedule, schedules_lib.DiscreteDiffusion):
    return gaussian.training_losses(schedule, out, x0, draw["t"], draw["noise"])
  if isinstance(schedule, schedules_lib.SDDiscreteSchedule):
    return gaussian.sd_eps_loss(schedule, out, x0, draw["t"], draw["noise"])
  return gaussian.vp_eps_loss(schedule, out, x0, draw["t"], draw["noise"])


def exit_terms(outs, u, target, *, variant: str = "paper", detach_target: Optional[bool] = None,
               unweighted_head_loss: bool = False) -> dict:
  """L_u, L_UAL (and L_L) from the exit outputs.

  Args:
    outs: exit head outputs (L, B, H, W, C_out); the first C channels are compared with target.
    u: UEM outputs (L, B), or per-element uncertainty maps (L, B, H, W, C) (module docstring).
    target: ε (B, H, W, C).
    variant: 'paper' or 'public' (module docstring).
    detach_target: stop-gradient on û (default: True for 'paper', False for 'public').
    unweighted_head_loss: add L_L = Σ_i mean_b mse_i.

  Returns:
    dict with scalars `l_u`, `l_ual`, `l_l` and the (L, B) arrays `u_hat` (per-sample mean of
    the pseudo-target), `head_mse`.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeeDiff loss variant {variant!r}; choose from {VARIANTS}")
  if detach_target is None:
    detach_target = variant == "paper"
  err = outs[..., :target.shape[-1]] - target[None]
  axes = tuple(range(2, err.ndim))
  if u.ndim > 2:
    return _map_terms(err, u, axes, variant, detach_target, unweighted_head_loss)
  u_hat = jnp.mean(jnp.tanh(jnp.abs(err)), axis=axes)
  if detach_target:
    u_hat = jax.lax.stop_gradient(u_hat)
  head_mse = jnp.mean(err ** 2, axis=axes)
  if variant == "paper":
    l_u = jnp.sum(jnp.mean((u - u_hat) ** 2, axis=1))
    l_ual = jnp.sum(jnp.mean((1.0 - u) * head_mse, axis=1))
  else:
    l_u = jnp.sum((u - u_hat) ** 2)
    l_ual = jnp.sum(jnp.mean((1.0 - u_hat) * head_mse, axis=1))
  l_l = jnp.sum(jnp.mean(head_mse, axis=1)) if unweighted_head_loss else jnp.float32(0)
  return {"l_u": l_u, "l_ual": l_ual, "l_l": l_l, "u_hat": u_hat, "head_mse": head_mse}


def _map_terms(err, u, axes, variant, detach_target, unweighted_head_loss) -> dict:
  """`exit_terms` for per-element uncertainty maps u (L, B, H, W, C) (module docstring)."""
  if u.shape != err.shape:
    raise ValueError(f"uncertainty maps {u.shape} do not match the exit errors {err.shape}")
  u_hat = jnp.tanh(jnp.abs(err))
  if detach_target:
    u_hat = jax.lax.stop_gradient(u_hat)
  sq = err ** 2
  head_mse = jnp.mean(sq, axis=axes)
  per_u = jnp.mean((u - u_hat) ** 2, axis=axes)                   # (L, B)
  weight = (1.0 - u) if variant == "paper" else (1.0 - u_hat)
  per_ual = jnp.mean(weight * sq, axis=axes)                      # (L, B)
  l_u = jnp.sum(jnp.mean(per_u, axis=1)) if variant == "paper" else jnp.sum(per_u)
  l_ual = jnp.sum(jnp.mean(per_ual, axis=1))
  l_l = jnp.sum(jnp.mean(head_mse, axis=1)) if unweighted_head_loss else jnp.float32(0)
  return {"l_u": l_u, "l_ual": l_ual, "l_l": l_l, "u_hat": jnp.mean(u_hat, axis=axes),
          "head_mse": head_mse}


def make_deediff_loss(model: Any, schedule: Any = None, *, lam: float = 1.0, beta: float = 1.0,
                      variant: str = "paper", train_backbone: bool = True,
                      uem: str = "token_mean", detach_target: Optional[bool] = None,
                      unweighted_head_loss: bool = False, label_dropout: Optional[float] = None,
                      image_key: str = "image", label_key: str = "label",
                      layout: str = "inputs"):
  """The DeeDiff objective (module docstring) for `jaxee/train/step.py`.

  Args:
    model: the backbone (any implementation of the contract: DiT, U-ViT, ...).
    schedule: training schedule object or name (default `diffusion.training_schedule(model)`).
    lam: λ, weight of L_u.
    beta: β, weight of L_UAL.
    variant: 'paper' or 'public'.
    train_backbone: False freezes the backbone by `stop_gradient` (its gradients are zero).
    uem: UEM kind of `params['deediff']`.
    detach_target: stop-gradient on û (default per variant).
    unweighted_head_loss: add the public code's optional L_L (weight 1).
    label_dropout: CFG label-drop probability (default as `make_diffusion_loss`).
    image_key, label_key: batch keys.
    layout: exit layout of `params['deediff']` ('inputs' public, 'outputs' paper).

  Returns:
    `loss_fn(params, batch, rng, *, train_state_extras=None) -> (loss, metrics)` with
    `params = {'backbone': ..., 'deediff': {'heads': ..., 'uems': ...}}`.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeeDiff loss variant {variant!r}; choose from {VARIANTS}")
  if uem not in heads_lib.UEM_KINDS:
    raise ValueError(f"unknown UEM {uem!r}; choose from {heads_lib.UEM_KINDS}")
  heads_lib.check_layout(layout)
  if schedule is None or isinstance(schedule, str):
    schedule = diffusion_obj.training_schedule(model, schedule)
  if label_dropout is None:
    label_dropout = getattr(model, "class_dropout_prob",
                            0.1 if model.null_class is not None else 0)

  def loss_fn(params, batch, rng, *, train_state_extras=None):
    del train_state_extras
    if not isinstance(params, dict) or set(params) != {"backbone", "deediff"}:
      raise ValueError("DeeDiff params must be {'backbone': ..., 'deediff': ...}")
    backbone = params["backbone"]
    if not train_backbone:
      backbone = jax.lax.stop_gradient(backbone)
    x0 = jnp.asarray(batch[image_key], jnp.float32)
    y = batch.get(label_key) if model.num_classes > 0 else None
    drop_key, loss_key = jax.random.split(rng)
    if y is not None:
      y = diffusion_obj.drop_labels(drop_key, jnp.asarray(y, jnp.int32), model.null_class,
                                    label_dropout)
    draw = draw_noisy_inputs(schedule, x0, loss_key)
    final, outs, u = deediff_lib.forward_all_exits(model, backbone, params["deediff"],
                                                   draw["x_t"], draw["t_net"], y, uem, layout,
                                                   uem_maps=True)
    simple = backbone_loss(schedule, final, x0, draw)
    l_simple = jnp.mean(simple["loss"])
    terms = exit_terms(outs, u, draw["noise"], variant=variant, detach_target=detach_target,
                       unweighted_head_loss=unweighted_head_loss)
    loss = l_simple + lam * terms["l_u"] + beta * terms["l_ual"] + terms["l_l"]
    metrics = {"l_simple": l_simple, "l_u": terms["l_u"], "l_ual": terms["l_ual"],
               "mse": jnp.mean(simple["mse"]), "u_mean": jnp.mean(u),
               "u_hat_mean": jnp.mean(terms["u_hat"]),
               "head_mse_first": jnp.mean(terms["head_mse"][0]),
               "head_mse_last": jnp.mean(terms["head_mse"][-1])}
    if unweighted_head_loss:
      metrics["l_l"] = terms["l_l"]
    return loss, metrics

  return loss_fn
