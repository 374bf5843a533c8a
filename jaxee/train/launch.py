"""Launching a training run from Python: `train_and_evaluate(config, workdir)`.

The command line is `jaxee-train` (`jaxee/cli/train.py`; `python -m jaxee.cli.train` and the old
`python -m jaxee.main` are the same). `initialize_distributed` starts multi-host JAX. Re-running
on the same workdir resumes from its latest checkpoint.

Config schema (defaults in `jaxee/train/config_base.py` `base_config()`; every experiment file
`configs/*.py` has `get_config(arg)` and a tiny `runlocal` variant):

* `method`: `'baseline'` (the backbone's own loss, `objectives.diffusion.make_diffusion_loss`),
  `'ase'`, `'deediff'`, `'duodiff'` (all three through `jaxee.train.methods.build_method(config,
  model, params, rng) -> MethodSetup`) or `'masks'` (`jaxee.train.objectives.masks.run(config,
  workdir, model, params)`: trajectory-based mask optimisation, no data loop).
* `model.arch`, `model.overrides` (dict): `jaxee.models.create(arch, **overrides)`, the
  backbone being fine-tuned (or the deep model a method derives its network from);
  `model.compute_dtype` ('bfloat16': bf16 compute, float32 params and optimizer state) and
  `model.remat` (True: per-block activation rematerialisation), both None = the model's own
  (`jaxee.models.with_runtime`, docs/SCALING.md).
* `init`: `''` (random init from `train.seed`), a converted checkpoint directory, a jaxee
  training workdir (its latest EMA weights) or a PyTorch/safetensors file.
* `data`: `source` (`jaxee.data.get_source` name: 'digits', 'cifar10', 'celeba64',
  'imagenet256', 'folder:<path>', 'latents:<path>'), `split`, `batch_size` (GLOBAL: over all
  processes and devices), `image_size`, `data_dir`, `shuffle`, `prefetch`, `num_threads`,
  `options` (dict of source-specific keywords, e.g. digits `channels`).
* `loss`: `schedule` (training schedule name; default the backbone's), `label_dropout` (CFG;
  default the backbone's) — used by 'baseline' and by methods that reuse the diffusion loss.
* `optim`: the fields of `jaxee/train/optim.py make_optimizer`: `lr`, `b1`, `b2`, `eps`,
  `weight_decay`, `schedule` ('constant' | 'cosine'), `warmup_steps`, `min_lr_ratio`,
  `grad_clip_norm`, `frozen_patterns` (regexes over `/`-joined param paths; merged with the
  method's own frozen groups); `num_steps` defaults to `train.num_steps`.
* `train`: `num_steps`, `log_every`, `ckpt_every` (0: only at the end), `keep` (checkpoints
  kept), `ema_decay`, `ema_warmup` ('none' | 'linear'), `parallel` ('shard_map' default |
  'pmap' | 'jit'), `seed`, `ckpt_fallback` (fall back to the previous checkpoint, logged, when
  the latest is corrupt; default: error), `async_checkpoint`, `progress` (tqdm), `tensorboard`,
  `export` / `export_ema` (write the (EMA) weights at the end), `multihost` (same as
  `--multihost`), `debug_step_sleep_s` (testing only: sleep after each step).
* method sections `ase`, `deediff`, `duodiff`, `masks`: owned by the method modules
  (`jaxee/train/methods.py`, `jaxee/train/objectives/`) and their configs.

Outputs in `workdir`: `config.json`, `metrics.jsonl` (one JSON line per log step: loss and the
objective's metrics, grad/param norms, lr, steps/s), `tb/` (TensorBoard), `checkpoints/<step>/`
(Orbax), `export/` (baseline: a converted checkpoint for `jaxee-sample`). Only process 0
writes, except the checkpoint arrays: every process writes its share of them (its own OCDBT
store, `jaxee/train/checkpoint.py`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from jaxee.train.config_base import METHODS  # noqa: F401  (re-exported for configs/tests)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """`jax.distributed.initialize` (CPU: gloo collectives); must run before any JAX work
  (`jaxee.distributed.initialize`, shared with the sampling CLI)."""
  from jaxee import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(coordinator_address, num_processes, process_id)


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Runs the experiment `config` in `workdir` (resuming if it has checkpoints).

  Returns:
    A summary dict (for 'masks': `{'plan': path}` from `objectives.masks.run`).
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  from jaxee.train import trainer  # pylint: disable=g-import-not-at-top
  from jaxee.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  trainer.validate_config(config)
  workdir_lib.check_workdir(pathlib.Path(workdir), create=False)
  if config.method == "masks":
    try:
      from jaxee.train.objectives import masks as masks_opt  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"config.method='masks' needs jaxee.train.objectives.masks: {e}") from e
    import jax  # pylint: disable=g-import-not-at-top
    model = trainer.build_model(config)
    params = trainer.init_params(config, model, jax.random.PRNGKey(int(config.train.seed)))
    return {"plan": masks_opt.run(config, workdir, model, params), "workdir": str(workdir)}
  return trainer.train(config, workdir)
