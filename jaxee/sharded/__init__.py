"""Sharded sampling: many samples written as resumable, checksummed shards.

* `run`: the engine behind `jaxee-sample` (`jaxee/cli/sample.py`): `run_sampling(config)`,
  `ShardSampler`, `make_plan`, `load_backbone`, `load_vae`, `validate_config`;
* `shards`: the storage (atomic byte-stable `.npz`, provenance, manifest, out_dir lock).

Import the modules directly (`from jaxee.sharded import run`); nothing is imported here.
"""
