"""Test setup: CPU only, 8 fake host devices, fp32 matmuls at full precision, fast XLA compiles.

The environment must be set before JAX is imported anywhere, hence module level.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Tests run tiny models, so XLA's backend optimisation time dominates; level 0 roughly halves
# compile time and keeps fp32 results within the parity tolerances (all parity tests run with it).
if "xla_backend_optimization_level" not in _flags and not os.environ.get("JAXEE_TEST_XLA_OPT"):
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHARED_FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture
def fixtures_dir():
  return FIXTURES


@pytest.fixture
def inception_weights():
  """The 48 MB Inception fixture is read in place from ../shared; skip when absent."""
  path = SHARED_FIXTURES / "inception_fid_random_fp16.pth"
  if not path.exists():
    pytest.skip(f"Inception fixture not found at {path} (read in place from ../shared/fixtures)")
  return path
