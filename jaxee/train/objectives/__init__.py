"""Every training objective of jaxee, behind one contract.

An objective is any pure function

    loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)

* `params`: the trainable parameter pytree (frozen groups included; the optimizer zeroes their
  updates);
* `batch`: the per-device slice of the batch (a dict of arrays with a leading batch axis; `t`
  and `noise` may be given to fix the otherwise random draws);
* `rng`: the per-device key, already folded with the step and the device index;
* `train_state_extras`: `dict(state.extras, step=state.step)` (e.g. ASE's plateau flag);
* returns the scalar mean loss over the slice (per-sample weights are applied inside, before the
  batch mean) and a dict of scalar metrics. The step (`jaxee/train/step.py`) averages both over
  devices.

`jaxee.train.methods.build_method` wires each objective with its recipe (frozen groups, extras,
export). Modules (import them directly; nothing is imported here, so `config_base` can read
`masks.DEFAULTS` without initialising anything else):

* `diffusion`: the backbone's own loss (`make_diffusion_loss`: DiT's hybrid ε-MSE + VLB, U-ViT's
  `LSimple`; the 'baseline' method and the base of the others) and the plain ε-MSE of the
  trainer tests (`make_eps_mse_loss`, `synthetic_batch`);
* `ase`: ASE fine-tuning (per-sample truncation × λ(t), the λ table and the plateau test);
* `duodiff`: DuoDiff's shallow backbone (`make_duodiff_loss`, `shallow_depth`,
  `init_shallow_from_deep`);
* `deediff`: DeeDiff / AdaDiff exit heads and UEMs (L_simple + λ·L_u + β·L_UAL);
* `masks` (+ `masks_teacher`): TABM block-mask optimisation along the teacher's trajectory; not
  a gradient-training objective of the step but its own loop (`masks.run`), writing a `MaskPlan`
  file.

Inference (`jaxee.sampling`, `jaxee.exits`, `jaxee.models`, `jaxee.sharded`) never imports
this package (`tests/test_layout.py`).
"""
