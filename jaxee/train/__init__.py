"""Training: parallel steps, optimizer, checkpoints, the loop and the method objectives.

Modules (import them directly; nothing heavy is imported here):

* `state`: the `TrainState` pytree and the EMA update;
* `optim`: AdamW, schedules, clipping and frozen parameter groups (`make_optimizer`);
* `step`: one pure `step_core` wrapped by `jax.pmap`, `jax.jit(jax.shard_map)` (default) and
  `jax.jit` with `NamedSharding` (`make_train_step`);
* `checkpoint`: the Orbax `CheckpointManager` of a run (state, input position, host state);
* `trainer`: the loop (`train(config, workdir)`), metrics, non-finite stop, export;
* `config_base`: the shared config schema and `:arg` parser (documented in `jaxee/train/launch.py`);
* `objectives/`: every objective behind one contract (`loss_fn(params, batch, rng, *,
  train_state_extras) -> (loss, metrics)`): `diffusion` (the backbone's own loss, plain ε-MSE),
  `ase`, `duodiff`, `deediff`, `masks` (+ `masks_teacher`, the TABM mask optimisation);
* `methods`: the ASE / DeeDiff / DuoDiff set-ups (objective, frozen groups, extras, export).
"""
