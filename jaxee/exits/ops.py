"""Moved to `jaxee.testing.family_ops` (alias while call sites move)."""
from jaxee.testing.family_ops import *  # noqa: F401,F403
from jaxee.testing.family_ops import (Blocks, embed, head, hidden_states, stack_len,  # noqa: F401
                                      stack_one, static_slice, take)
