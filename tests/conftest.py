"""Test configuration: 8 CPU devices, rank promotion errors, hypothesis profile.

Strict dtype promotion is not global because optax's own optimizers (adam's
``decay ** count``) mix Python floats with int32 under it; tests of
jaxsparse's own code enter ``jax.numpy_dtype_promotion("strict")``.
"""

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
  "deterministic",
  derandomize=True,
  database=None,
  deadline=None,
  max_examples=40,
  print_blob=True,
)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  return doctest_namespace
