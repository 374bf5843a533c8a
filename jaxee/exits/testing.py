"""Moved to `jaxee.testing` (kept as an alias while call sites move)."""
from jaxee.testing import *  # noqa: F401,F403
from jaxee.testing import (ReferencePlan, _tiny, assert_outputs_close, block_mask_rows,  # noqa: F401
                           example_inputs, plan_from_spec, random_params, reference_masked,
                           reference_prefix, tiny_dit, tiny_uvit)
