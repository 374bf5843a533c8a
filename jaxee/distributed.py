"""Multi-process JAX for training and sampling: `initialize` (`jax.distributed.initialize`).

Shared by `jaxee-train --multihost` and `jaxee-sample --multihost` (inference must not import
`jaxee.train`, so it lives here). On CPU the cross-process collectives are gloo's (what the
localhost multi-process checks use); elsewhere the setting is a no-op.
"""
from __future__ import annotations

from typing import Optional

from absl import logging


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """`jax.distributed.initialize` (CPU: gloo collectives); must run before any JAX work.

  Args left None are found by JAX from the environment (SLURM, TPU pods, ...).
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = int(num_processes)
  if process_id is not None:
    kwargs["process_id"] = int(process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
