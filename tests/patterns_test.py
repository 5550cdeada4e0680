"""Patterns: exact counts, structure, and errors that name the leaf."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse as js
from jaxsparse import patterns


def expected_kept(size: int, sparsity: float) -> int:
  """The documented rule: ``size - round(s * size)`` in float32, half-even."""
  return size - int(np.round(np.float32(sparsity) * np.float32(size)))


class NumKeptTest(absltest.TestCase):
  def test_int32_count_refuses_sizes_past_int32(self):
    self.assertEqual(int(patterns.num_kept(10, 0.25)), 8)  # half to even
    with self.assertRaisesRegex(ValueError, "threshold.num_kept"):
      patterns.num_kept(2**31, 0.5)


class SelectTest(parameterized.TestCase):
  @given(
    scores=hnp.arrays(
      np.float32,
      hnp.array_shapes(min_dims=1, max_dims=4, max_side=12),
      elements=st.floats(-10, 10, width=32),
    ),
    sparsity=st.integers(0, 999).map(lambda i: i / 1000),
  )
  def test_unstructured_exact_count(self, scores, sparsity):
    with jax.numpy_dtype_promotion("strict"):
      mask = patterns.select(js.Unstructured(), jnp.asarray(scores), sparsity)
    self.assertEqual(int(mask.sum()), expected_kept(scores.size, sparsity))
    # Every kept score is >= every pruned score.
    kept, pruned = scores[np.asarray(mask)], scores[~np.asarray(mask)]
    if kept.size and pruned.size:
      self.assertGreaterEqual(kept.min(), pruned.max())

  @given(
    data=st.data(),
    nm=st.sampled_from(
      [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 16)]
    ),
  )
  def test_nm_every_group_exact(self, data, nm):
    n, m = nm
    rows = m * data.draw(st.integers(1, 4))
    cols = data.draw(st.integers(1, 5))
    scores = data.draw(
      hnp.arrays(
        np.float32, (rows, cols), elements=st.sampled_from([0.0, 1.0, 2.0])
      )
    )
    pattern = js.NM(n, m)
    mask = np.asarray(patterns.select(pattern, jnp.asarray(scores), 1 - n / m))
    groups = mask.reshape(rows // m, m, cols)
    np.testing.assert_array_equal(groups.sum(1), n)
    self.assertTrue(patterns.follows(pattern, mask))
    # Within each group the kept scores dominate the pruned ones.
    s = scores.reshape(rows // m, m, cols)
    kept_min = np.where(groups, s, np.inf).min(1)
    pruned_max = np.where(groups, -np.inf, s).max(1)
    self.assertTrue(np.all(kept_min >= pruned_max))

  def test_nm_other_axis_and_conv(self):
    scores = jax.random.normal(jax.random.key(0), (3, 3, 16, 8))
    mask = np.asarray(
      patterns.select(js.NM(2, 4, axis=-1), jnp.abs(scores), 0.5)
    )
    np.testing.assert_array_equal(mask.reshape(3, 3, 16, 2, 4).sum(-1), 2)

  def test_nm_ramp_keeps_more_before_level(self):
    scores = jnp.arange(32.0).reshape(8, 4)
    for sparsity, kept in [(0.0, 4), (0.25, 3), (0.5, 2), (0.9, 2)]:
      mask = np.asarray(patterns.select(js.NM(2, 4), scores, sparsity))
      np.testing.assert_array_equal(mask.reshape(2, 4, 4).sum(1), kept)

  @given(
    blocks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    tiles=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 100),
  )
  def test_block_whole_tiles_exact(self, blocks, tiles, sparsity, seed):
    pattern = js.Block(*blocks)
    shape = (blocks[0] * tiles[0], blocks[1] * tiles[1])
    scores = jax.random.uniform(jax.random.key(seed), shape)
    mask = np.asarray(patterns.select(pattern, scores, sparsity))
    self.assertTrue(patterns.follows(pattern, mask))
    n_blocks = tiles[0] * tiles[1]
    self.assertEqual(
      mask.sum(), expected_kept(n_blocks, sparsity) * blocks[0] * blocks[1]
    )
    # The kept tiles are those with the largest sums (reference: numpy).
    sums = np.asarray(scores).reshape(tiles[0], blocks[0], tiles[1], blocks[1])
    sums = sums.sum((1, 3)).ravel()
    kept = mask[:: blocks[0], :: blocks[1]].ravel()
    if kept.any() and (~kept).any():
      self.assertGreaterEqual(sums[kept].min(), sums[~kept].max())

  def test_channel_whole_output_channels(self):
    scores = jax.random.uniform(jax.random.key(1), (3, 3, 4, 10))
    mask = np.asarray(patterns.select(js.Channel(), scores, 0.3))
    per_channel = mask.reshape(-1, 10)
    self.assertTrue(np.all(per_channel.all(0) | ~per_channel.any(0)))
    self.assertEqual(per_channel.all(0).sum(), expected_kept(10, 0.3))
    norms = np.asarray(scores).reshape(-1, 10).sum(0)
    keep = per_channel.all(0)
    self.assertGreaterEqual(norms[keep].min(), norms[~keep].max())

  def test_select_is_idempotent(self):
    scores = jax.random.normal(jax.random.key(2), (32, 16))
    for pattern, s in [
      (js.Unstructured(), 0.7),
      (js.NM(2, 4), 0.5),
      (js.Block(4, 4), 0.5),
      (js.Channel(), 0.5),
    ]:
      mask = patterns.select(pattern, jnp.abs(scores), s)
      again = patterns.select(pattern, jnp.abs(jnp.where(mask, scores, 0)), s)
      np.testing.assert_array_equal(np.asarray(mask), np.asarray(again))


class PatternValueTest(absltest.TestCase):
  def test_equality_and_hash_include_type(self):
    self.assertNotEqual(js.NM(2, 4), js.Block(2, 4))
    self.assertNotEqual(js.Unstructured(), js.uniform())
    self.assertNotEqual(js.uniform(), js.global_threshold())
    self.assertEqual(js.NM(2, 4), js.NM(2, 4, axis=-2))
    self.assertLen({js.Unstructured(), js.Uniform(), js.GlobalThreshold()}, 3)
    self.assertEqual(hash(js.erk()), hash(js.erk(1.0)))


class PatternErrorTest(parameterized.TestCase):
  def test_n_greater_than_m(self):
    with self.assertRaisesRegex(ValueError, r"0 < n <= m.*NM\(2, 4\)"):
      patterns.check_pattern(js.NM(4, 2))

  def test_m_not_dividing_axis(self):
    with self.assertRaisesRegex(
      ValueError, r"layer/kernel: axis -2 has size 6"
    ):
      patterns.check_leaf(js.NM(2, 4), (6, 8), "layer/kernel")

  def test_block_not_dividing(self):
    with self.assertRaisesRegex(ValueError, r"dense/kernel: shape \(8, 6\)"):
      patterns.check_leaf(js.Block(4, 4), (8, 6), "dense/kernel")

  def test_not_a_pattern(self):
    with self.assertRaisesRegex(ValueError, "is not a pattern"):
      patterns.check_pattern("nm_2,4")


if __name__ == "__main__":
  absltest.main()
