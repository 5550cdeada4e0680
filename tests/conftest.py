"""Test configuration: 8 CPU devices, rank promotion errors, hypothesis profile.

Strict dtype promotion is not global because optax's own optimizers (adam's
``decay ** count``) mix Python floats with int32 under it; tests of
jaxsparse's own code enter ``jax.numpy_dtype_promotion("strict")``.
"""

import os

# With 8 virtual devices on a 2-core machine, a starved device thread can miss
# XLA:CPU's 40 s collective rendezvous and abort the whole process; allow more.
os.environ["XLA_FLAGS"] = " ".join(
  [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
  ]
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
  "deterministic",
  derandomize=True,
  database=None,
  deadline=None,
  max_examples=25,
  print_blob=True,
)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  return doctest_namespace
