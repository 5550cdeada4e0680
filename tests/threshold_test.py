"""Exact top-k by bisection, against a sort-based reference."""

import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse import threshold

WORD = 2**32
# Counts on both sides of the int32 and uint32 limits and far beyond them.
BOUNDARY = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, WORD - 1, WORD, WORD + 1]
BOUNDARY += [3 * WORD - 5, 2**53 + 1, 2**63 - 1, 2**64 - 1]
counts = st.one_of(
  st.sampled_from(BOUNDARY), st.integers(0, 2**64 - 1), st.integers(0, 2**33)
)


def value(count: threshold.Count) -> int:
  return int(count.hi) * WORD + int(count.lo)


def numpy_num_kept(size: int, sparsity: float) -> int:
  """size - round(s * size) with the product rounded in float32."""
  pruned = np.round(np.float32(sparsity) * np.float32(size))
  return min(max(size - int(pruned), 0), size)


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

  @parameterized.parameters(1, 2, 3, 4, 7, 8, 9, 16, 17, 64)
  def test_first_n_at_power_of_two_sizes(self, size):
    rng = np.random.default_rng(size)
    flat = rng.random(size) < 0.6
    first_n = jax.jit(threshold.first_n)
    for n in range(-1, size + 2):
      got = np.asarray(first_n(jnp.asarray(flat), jnp.int32(n)))
      np.testing.assert_array_equal(got, flat & (np.cumsum(flat) <= n))


class CountTest(parameterized.TestCase):
  """Exact counts past 2**31 elements, with jax_enable_x64 off."""

  @given(a=counts, b=counts)
  def test_arithmetic_matches_python_ints(self, a, b):
    x, y = threshold.as_count(a), threshold.as_count(b)
    self.assertEqual(value(x), a)
    self.assertEqual(value(threshold.add(x, y)), (a + b) % 2**64)
    self.assertEqual(bool(threshold.greater_equal(x, y)), a >= b)
    self.assertEqual(value(threshold.minimum(x, y)), min(a, b))
    big, small = threshold.as_count(max(a, b)), threshold.as_count(min(a, b))
    self.assertEqual(value(threshold.subtract(big, small)), abs(a - b))

  def test_leaf_counts_near_the_uint32_limit_add_exactly(self):
    # Per-leaf uint32 counts as the bisection produces them, injected near
    # 2**32 (leaves this large cannot be allocated in a test).
    leaf_counts = jnp.array([WORD - 1, WORD - 1, 2**31, 3], jnp.uint32)

    @jax.jit
    def total(c):
      out = threshold.as_count(0)
      for i in range(c.shape[0]):
        out = threshold.add(out, threshold.Count(jnp.uint32(0), c[i]))
      return out

    self.assertEqual(value(total(leaf_counts)), 2 * (WORD - 1) + 2**31 + 3)
    k = threshold.as_count(2 * (WORD - 1) + 2**31 + 3)
    self.assertTrue(bool(threshold.greater_equal(total(leaf_counts), k)))
    k = threshold.as_count(2 * (WORD - 1) + 2**31 + 4)
    self.assertFalse(bool(threshold.greater_equal(total(leaf_counts), k)))

  def test_signed_counts_clip_at_zero(self):
    self.assertEqual(value(threshold.as_count(jnp.int32(-5))), 0)
    self.assertEqual(value(threshold.as_count(jnp.int32(2**31 - 1))), 2**31 - 1)
    self.assertEqual(
      value(threshold.as_count(np.uint64(3 * WORD + 1))), 3 * WORD + 1
    )
    with self.assertRaisesRegex(ValueError, "outside"):
      threshold.as_count(2**64)

  @parameterized.product(
    size=[
      7,
      1000,
      2**24 + 1,
      2**31 - 1,
      2**31 + 3,
      2**32,
      3 * 2**33 + 7,
      2**53 + 1,
      2**62,
    ],
    sparsity=[0.0, 0.1, 0.5, 0.9, 0.99, 1.0],
  )
  def test_num_kept_is_exact_for_large_sizes(self, size, sparsity):
    got = jax.jit(threshold.num_kept, static_argnums=0)(size, sparsity)
    self.assertEqual(value(got), numpy_num_kept(size, sparsity))

  @given(
    size=st.one_of(st.integers(0, 2**31 - 1), st.sampled_from(BOUNDARY[:3])),
    sparsity=st.floats(0, 1, width=32),
  )
  def test_num_kept_matches_the_int32_rule_below_int32(self, size, sparsity):
    # The same k as the int32 float32-rounding rule (the one
    # patterns.num_kept had before it delegated here) wherever that one
    # does not overflow (topk_masks clips a negative k to 0).
    s = jnp.float32(sparsity)
    int32_rule = jnp.int32(size) - jnp.round(s * jnp.float32(size)).astype(
      jnp.int32
    )
    self.assertEqual(
      value(threshold.num_kept(size, sparsity)), max(int(int32_rule), 0)
    )

  def test_lowers_for_totals_past_two_to_the_32(self):
    # 2**33 float32 scores (32 GiB) as abstract shapes: lowering and
    # eval_shape must not overflow, and no int32 count may reach the loop.
    leaves = [jax.ShapeDtypeStruct((2**16, 2**15), jnp.float32)] * 4
    total = 4 * 2**31

    def select(scores, sparsity):
      return threshold.topk_masks(scores, threshold.num_kept(total, sparsity))

    shapes = jax.eval_shape(select, leaves, 0.9)
    self.assertEqual([s.shape for s in shapes], [(2**16, 2**15)] * 4)
    text = jax.jit(select).lower(leaves, 0.9).as_text()
    # Every full count (a sum down to a scalar) is a uint32 one; the uint32
    # words are combined exactly by Count, so no int32 total can overflow.
    scalar_sums = re.findall(
      r"applies stablehlo.add across dimensions = \[[\d, ]*\] : "
      r"\(.*\) -> tensor<(\w+)>",
      text,
    )
    self.assertNotEmpty(scalar_sums)
    self.assertEqual({d for d in scalar_sums if "x" not in d}, {"ui32"})
    self.assertNotIn("i64", text)

  def test_a_leaf_of_two_to_the_32_entries_is_refused(self):
    leaf = jax.ShapeDtypeStruct((2**16, 2**16), jnp.float32)
    with self.assertRaisesRegex(ValueError, "leaf 0 .* fewer than 2\\*\\*32"):
      jax.eval_shape(lambda s: threshold.topk_masks([s], 5), leaf)


if __name__ == "__main__":
  absltest.main()
