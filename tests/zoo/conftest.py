"""The zoo runs code jaxsparse did not write: models from other libraries
rely on NumPy's implicit rank promotion, which the rest of the suite turns
into an error to keep jaxsparse's own code explicit."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _outside_code_promotes_ranks():
  with jax.numpy_rank_promotion("allow"):
    yield
