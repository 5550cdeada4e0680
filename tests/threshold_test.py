"""Exact top-k by bisection, against a sort-based reference."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse import threshold


def reference_topk(scores: list[np.ndarray], k: int) -> list[np.ndarray]:
  """Stable sort of the concatenation: larger first, earlier index on ties."""
  flat = np.concatenate([s.astype(np.float32).ravel() for s in scores])
  order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  out, start = [], 0
  for s in scores:
    out.append(keep[start : start + s.size].reshape(s.shape))
    start += s.size
  return out


class ThresholdTest(parameterized.TestCase):
  def test_ordered_keys_preserve_order(self):
    values = np.array(
      [-np.inf, -3.5, -1e-30, 0.0, 1e-30, 2.0, 7.5, np.inf], np.float32
    )
    keys = np.asarray(threshold.ordered_keys(values))
    self.assertTrue(np.all(np.diff(keys.astype(np.int64)) > 0))
    zeros = np.asarray(
      threshold.ordered_keys(np.array([-0.0, 0.0], np.float32))
    )
    self.assertEqual(zeros[0], zeros[1])

  @given(
    arrays=st.lists(
      hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
        elements=st.sampled_from([-2.0, -0.5, 0.0, 0.0, 0.5, 1.0, 3.0]),
      ),
      min_size=1,
      max_size=3,
    ),
    fraction=st.floats(0, 1),
  )
  def test_matches_sort_with_ties(self, arrays, fraction):
    total = sum(a.size for a in arrays)
    k = int(round(fraction * total))
    with jax.numpy_dtype_promotion("strict"):
      got = threshold.topk_masks([jnp.asarray(a) for a in arrays], k)
    for g, want in zip(got, reference_topk(arrays, k)):
      np.testing.assert_array_equal(np.asarray(g), want)

  @given(
    array=hnp.arrays(
      np.float32,
      hnp.array_shapes(min_dims=1, max_dims=2, max_side=40),
      elements=st.floats(-1e6, 1e6, width=32),
    ),
    fraction=st.floats(0, 1),
  )
  def test_matches_sort_random_values(self, array, fraction):
    k = int(round(fraction * array.size))
    (got,) = jax.jit(threshold.topk_masks)([jnp.asarray(array)], k)
    np.testing.assert_array_equal(
      np.asarray(got), reference_topk([array], k)[0]
    )

  def test_k_is_traced_without_retrace(self):
    x = jax.random.normal(jax.random.key(0), (64, 32))
    calls = []

    @jax.jit
    def count(k):
      calls.append(None)
      return jnp.sum(threshold.topk_masks([x], k)[0])

    for k in (0, 1, 100, 2048):
      self.assertEqual(int(count(jnp.int32(k))), k)
    self.assertLen(calls, 1)

  def test_first_n(self):
    candidates = np.array([[True, False, True], [True, True, False]])
    flat = candidates.ravel()
    for n in range(5):
      got = np.asarray(threshold.first_n(jnp.asarray(candidates), n)).ravel()
      want = flat & (np.cumsum(flat) <= n)
      np.testing.assert_array_equal(got, want)


if __name__ == "__main__":
  absltest.main()
