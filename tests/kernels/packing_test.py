"""Packed N:M and block-sparse formats and their reference matmuls.

Every check compares against an independent NumPy rule: the dense weight the
packing came from, ``x @ W`` in float64, the byte formula from ``log2 m``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsparse as js
from jaxsparse import kernels

DTYPES = {
  "float32": (np.float32, np.uint32),
  "bfloat16": (ml_dtypes.bfloat16, np.uint16),
  "float16": (np.float16, np.uint16),
}


def bits_of(a, dtype_name):
  return np.asarray(a).view(DTYPES[dtype_name][1])


def random_nm_weight(seed, n, m, groups, cols, dtype_name, drop):
  """``W: [groups*m, cols]`` with exactly ``n`` chosen per group; a fraction
  ``drop`` of the chosen entries set to zero (fewer nonzeros than ``n``)."""
  rng = np.random.default_rng(seed)
  k = groups * m
  chosen = np.zeros((groups, m, cols), bool)
  for g in range(groups):
    for c in range(cols):
      chosen[g, rng.choice(m, n, replace=False), c] = True
  chosen = chosen.reshape(k, cols)
  values = rng.standard_normal((k, cols)).astype(DTYPES[dtype_name][0])
  zeroed = chosen & (rng.random((k, cols)) < drop)
  w = np.where(chosen & ~zeroed, values, np.zeros((), values.dtype))
  return w, chosen


def random_block_weight(seed, br, bc, nrows, ncols, dtype_name, density):
  rng = np.random.default_rng(seed)
  keep = rng.random((nrows, ncols)) < density
  dense = rng.standard_normal((nrows * br, ncols * bc))
  dense = dense.astype(DTYPES[dtype_name][0])
  full = np.repeat(np.repeat(keep, br, 0), bc, 1)
  return np.where(full, dense, np.zeros((), dense.dtype)), keep


def matmul_tolerance(x, w, dtype_name):
  """``|y - x@W| <= eps * (|x| @ |W|)``: rounding of the output (and of
  products/sums in float32) for the dtype."""
  eps = {"float32": 2e-6, "bfloat16": 2**-7, "float16": 2**-10}[dtype_name]
  scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
  return eps * scale + 1e-6


nm_cases = st.builds(
  dict,
  m=st.integers(1, 16),
  frac=st.floats(0, 1),
  groups=st.integers(1, 4),
  cols=st.sampled_from([1, 5]),
  dtype=st.sampled_from(sorted(DTYPES)),
  drop=st.sampled_from([0.0, 0.3, 1.0]),
  seed=st.integers(0, 2**31),
)


def nm_of(case):
  m = case["m"]
  n = 1 + min(m - 1, int(case["frac"] * m))
  return js.NM(n, m)


@jax.jit(static_argnums=3)
def nm_everything(w, mask, x, pattern):
  """One compile per example: pack (both ways), unpack, reference matmul."""
  packed = kernels.pack_nm(w, pattern)
  from_mask = kernels.pack_nm(w, pattern, mask=mask)
  return dict(
    packed=packed,
    back=kernels.unpack_nm(packed),
    from_mask=from_mask,
    back_from_mask=kernels.unpack_nm(from_mask),
    positions=kernels.packing.nm_positions(from_mask),
    y=kernels.nm_matmul_reference(x, packed),
  )


class PackNMTest(parameterized.TestCase):
  @settings(max_examples=20)
  @given(case=nm_cases)
  def test_round_trip_layout_bytes_and_matmul(self, case):
    pattern = nm_of(case)
    n, m = pattern.n, pattern.m
    w, chosen = random_nm_weight(
      case["seed"],
      n,
      m,
      case["groups"],
      case["cols"],
      case["dtype"],
      case["drop"],
    )
    k, cols = w.shape
    rng = np.random.default_rng(case["seed"] + 1)
    x = rng.standard_normal((2, 3, k)).astype(w.dtype)
    with jax.numpy_dtype_promotion("strict"):
      out = nm_everything(w, chosen, x, pattern)
    # Exact (bitwise) round trips, from the nonzeros and from the mask.
    for back in (out["back"], out["back_from_mask"]):
      np.testing.assert_array_equal(
        bits_of(back, case["dtype"]), bits_of(w, case["dtype"])
      )
    packed = out["packed"]
    self.assertEqual(packed.values.shape, (n, k // m, cols))
    self.assertEqual(packed.values.dtype, w.dtype)
    # With a mask, the stored positions are exactly the mask's, in order.
    expected = (
      np.stack(
        [
          np.flatnonzero(chosen[g * m : (g + 1) * m, c])
          for g in range(k // m)
          for c in range(cols)
        ]
      )
      .reshape(k // m, cols, n)
      .transpose(2, 0, 1)
    )
    np.testing.assert_array_equal(np.asarray(out["positions"]), expected)
    # Bytes: kept values + ceil(log2 m)-bit fields packed in words along
    # the groups of each slot plane.
    bits = max(1, math.ceil(math.log2(m)))
    word_bits = 8 if 8 % bits == 0 else 32
    groups = k // m
    expected_bytes = (
      n
      * cols
      * (
        groups * w.itemsize
        + math.ceil(groups / (word_bits // bits)) * word_bits // 8
      )
    )
    self.assertEqual(kernels.packed_nbytes(packed), expected_bytes)
    fraction = kernels.packing.nm_dense_fraction(pattern, w.itemsize, k)
    self.assertAlmostEqual(fraction, expected_bytes / w.nbytes)
    # At most one partial word per slot plane and column is wasted, plus
    # the unused 2 bits of each 32-bit word when bits == 3.
    self.assertLessEqual(
      packed.indices.nbytes * 8,
      n * cols * (groups * bits * 32 / 30 + word_bits),
    )
    # x @ W against float64 with a dtype-aware tolerance.
    y = out["y"]
    self.assertEqual(y.dtype, w.dtype)
    self.assertEqual(y.shape, (2, 3, cols))
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = np.asarray(y).astype(np.float64)
    tol = matmul_tolerance(x, w, case["dtype"])
    self.assertTrue(np.all(np.abs(got - want) <= tol), (got, want))

  @parameterized.parameters(
    (2, 4, "bfloat16", 0.3),
    (3, 8, "float32", 0.0),
    (1, 16, "float16", 0.5),
    (5, 5, "float32", 0.2),
    (2, 6, "bfloat16", 1.0),
  )
  def test_jit_equals_eager(self, n, m, dtype, drop):
    pattern = js.NM(n, m)
    w, chosen = random_nm_weight(n + m, n, m, 3, 4, dtype, drop)
    x = np.random.default_rng(0).standard_normal((2, 3 * m)).astype(w.dtype)
    eager = kernels.pack_nm(w, pattern)
    jitted = nm_everything(w, chosen, x, pattern)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted["packed"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
      bits_of(kernels.unpack_nm(eager), dtype), bits_of(w, dtype)
    )
    y = kernels.nm_matmul_reference(x, eager)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jitted["y"]))

  @parameterized.parameters(16, 64, 256, 1024)
  def test_two_four_bfloat16_takes_at_most_0_5625(self, k):
    w, _ = random_nm_weight(k, 2, 4, k // 4, 32, "bfloat16", 0.0)
    packed = kernels.pack_nm(w, js.NM(2, 4))
    ratio = kernels.packed_nbytes(packed) / w.nbytes
    self.assertLessEqual(ratio, 0.5625)
    self.assertEqual(packed.indices.dtype, np.uint8)

  def test_pack_with_mask_drops_entries_outside_it(self):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    pattern = js.NM(2, 4)
    mask = np.asarray(js.patterns.select(pattern, jnp.abs(w), 0.5))
    back = kernels.unpack_nm(kernels.pack_nm(w, pattern, mask=mask))
    np.testing.assert_array_equal(np.asarray(back), np.where(mask, w, 0))

  def test_pytree_leaves_static_fields_and_tree_map(self):
    w, _ = random_nm_weight(1, 2, 4, 4, 6, "float32", 0.2)
    packed = kernels.pack_nm(w, js.NM(2, 4))
    leaves, treedef = jax.tree.flatten(packed)
    self.assertLen(leaves, 2)  # values, indices; n, m, shape are static
    rebuilt = jax.tree.unflatten(treedef, leaves)
    self.assertEqual((rebuilt.n, rebuilt.m, rebuilt.shape), (2, 4, (16, 6)))
    doubled = jax.tree.map(
      lambda a: a * 2 if jnp.issubdtype(a.dtype, jnp.floating) else a, packed
    )
    np.testing.assert_array_equal(np.asarray(kernels.unpack_nm(doubled)), 2 * w)
    # Packed weights pass through jit and eval_shape as arguments.
    np.testing.assert_array_equal(
      np.asarray(jax.jit(kernels.unpack_nm)(packed)), w
    )
    shapes = jax.eval_shape(lambda w: kernels.pack_nm(w, js.NM(2, 4)), w)
    self.assertEqual(shapes.values.shape, packed.values.shape)
    self.assertEqual(shapes.indices.shape, packed.indices.shape)

  @parameterized.named_parameters(
    ("m_above_16", np.zeros((34, 2)), js.NM(2, 17), "at most 16"),
    ("k_not_divisible", np.zeros((6, 2)), js.NM(2, 4), "multiple of m=4"),
    ("n_above_m", np.zeros((8, 2)), js.NM(5, 4), "0 < n <= m"),
    ("wrong_axis", np.zeros((8, 8)), js.NM(2, 4, axis=-1), "axis=-2"),
    ("not_2d", np.zeros((8,)), js.NM(2, 4), "2-D kernel"),
    ("too_many_nonzeros", np.ones((8, 2)), js.NM(2, 4), "prune w"),
  )
  def test_errors_name_the_fix(self, w, pattern, message):
    with self.assertRaisesRegex(ValueError, message):
      kernels.pack_nm(w, pattern)

  def test_mask_off_pattern_is_an_error(self):
    w = np.ones((8, 2), np.float32)
    mask = np.zeros((8, 2), bool)
    mask[:3, 0] = True
    with self.assertRaisesRegex(ValueError, r"keeps 3 entries.*exactly 2"):
      kernels.pack_nm(w, js.NM(2, 4), mask=mask)
    with self.assertRaisesRegex(ValueError, "mask has shape"):
      kernels.pack_nm(w, js.NM(2, 4), mask=mask[:4])


block_cases = st.builds(
  dict,
  br=st.sampled_from([1, 2, 3, 4, 8]),
  bc=st.sampled_from([1, 2, 3, 4, 8]),
  nrows=st.integers(1, 4),
  ncols=st.integers(1, 4),
  density=st.sampled_from([0.0, 0.4, 1.0]),
  dtype=st.sampled_from(sorted(DTYPES)),
  extra=st.integers(0, 2),
  seed=st.integers(0, 2**31),
)


@jax.jit(static_argnums=(2, 3))
def block_everything(w, x, pattern, slots):
  packed = kernels.pack_block(w, pattern, max_blocks=slots)
  return dict(
    packed=packed,
    back=kernels.unpack_block(packed),
    y=kernels.block_sparse_matmul_reference(x, packed),
  )


class PackBlockTest(parameterized.TestCase):
  @settings(max_examples=20)
  @given(case=block_cases)
  def test_round_trip_layout_and_matmul(self, case):
    nrows, ncols = case["nrows"], case["ncols"]
    br, bc = case["br"], case["bc"]
    w, _ = random_block_weight(
      case["seed"], br, bc, nrows, ncols, case["dtype"], case["density"]
    )
    nonzero = (
      np.abs(w.astype(np.float32).reshape(nrows, br, ncols, bc)).sum((1, 3)) > 0
    )
    slots = min(nrows, max(1, nonzero.sum(0).max()) + case["extra"])
    rng = np.random.default_rng(case["seed"] + 1)
    x = rng.standard_normal((3, nrows * br)).astype(w.dtype)
    with jax.numpy_dtype_promotion("strict"):
      out = block_everything(w, x, js.Block(br, bc), int(slots))
    np.testing.assert_array_equal(
      bits_of(out["back"], case["dtype"]), bits_of(w, case["dtype"])
    )
    packed = out["packed"]
    self.assertEqual(packed.blocks.shape, (ncols, slots, br, bc))
    counts = np.asarray(packed.counts)
    np.testing.assert_array_equal(counts, nonzero.sum(0))
    indices = np.asarray(packed.indices)
    blocks = np.asarray(packed.blocks).astype(np.float32)
    tiles = w.astype(np.float32).reshape(nrows, br, ncols, bc)
    for c in range(ncols):
      stored = np.flatnonzero(nonzero[:, c])
      np.testing.assert_array_equal(indices[c, : counts[c]], stored)
      for j, r in enumerate(stored):
        np.testing.assert_array_equal(blocks[c, j], tiles[r, :, c])
      # Padding repeats the last stored block row (0 when none).
      last = stored[-1] if len(stored) else 0
      np.testing.assert_array_equal(indices[c, counts[c] :], last)
      self.assertFalse(blocks[c, counts[c] :].any())
    y = out["y"]
    self.assertEqual(y.dtype, w.dtype)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = np.asarray(y).astype(np.float64)
    tol = matmul_tolerance(x, w, case["dtype"])
    self.assertTrue(np.all(np.abs(got - want) <= tol), (got, want))

  @parameterized.parameters(
    (2, 4, 3, 2, "float32", 0.5),
    (4, 1, 2, 4, "bfloat16", 0.3),
    (3, 3, 2, 2, "float16", 0.0),
    (1, 8, 4, 3, "float32", 1.0),
  )
  def test_jit_equals_eager(self, br, bc, nrows, ncols, dtype, density):
    pattern = js.Block(br, bc)
    w, _ = random_block_weight(br + bc, br, bc, nrows, ncols, dtype, density)
    x = np.random.default_rng(0).standard_normal((2, nrows * br))
    x = x.astype(w.dtype)
    eager = kernels.pack_block(w, pattern)
    self.assertEqual(
      eager.max_blocks, max(1, int(np.asarray(eager.counts).max()))
    )
    jitted = block_everything(w, x, pattern, eager.max_blocks)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted["packed"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
      bits_of(kernels.unpack_block(eager), dtype), bits_of(w, dtype)
    )
    y = kernels.block_sparse_matmul_reference(x, eager)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jitted["y"]))

  def test_padding_slots_are_ignored_even_if_written(self):
    w, _ = random_block_weight(3, 2, 2, 3, 4, "float32", 0.4)
    packed = kernels.pack_block(w, js.Block(2, 2), max_blocks=3)
    self.assertLess(int(packed.counts.min()), 3)
    junk = dataclasses.replace(packed, blocks=packed.blocks + 1.0)
    valid = np.asarray(kernels.packing.block_valid(packed))
    expected = kernels.unpack_block(
      dataclasses.replace(
        packed, blocks=jnp.where(valid[:, :, None, None], junk.blocks, 0.0)
      )
    )
    np.testing.assert_array_equal(
      np.asarray(kernels.unpack_block(junk)), np.asarray(expected)
    )
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(
      np.asarray(kernels.block_sparse_matmul_reference(x, junk)),
      x @ np.asarray(expected),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_pytree_leaves(self):
    w, _ = random_block_weight(4, 2, 4, 2, 2, "float32", 0.5)
    packed = kernels.pack_block(w, js.Block(2, 4))
    self.assertLen(jax.tree.leaves(packed), 3)
    negated = jax.tree.map(
      lambda a: -a if jnp.issubdtype(a.dtype, jnp.floating) else a, packed
    )
    np.testing.assert_array_equal(np.asarray(kernels.unpack_block(negated)), -w)

  def test_errors_name_the_fix(self):
    w = np.ones((8, 8), np.float32)
    with self.assertRaisesRegex(ValueError, "not tiled"):
      kernels.pack_block(w, js.Block(3, 4))
    with self.assertRaisesRegex(ValueError, "max_blocks>=2"):
      kernels.pack_block(w, js.Block(4, 4), max_blocks=1)
    with self.assertRaisesRegex(ValueError, "1..2"):
      kernels.pack_block(w, js.Block(4, 4), max_blocks=3)
    with self.assertRaisesRegex(ValueError, "block column 0 has 2"):
      kernels.pack_block(w, js.Block(4, 4), max_blocks=1)
    with self.assertRaisesRegex(ValueError, "static max_blocks"):
      jax.jit(kernels.pack_block, static_argnums=1)(w, js.Block(4, 4))


class ReferenceTest(parameterized.TestCase):
  def test_nm_grads_match_masked_dense(self):
    pattern = js.NM(2, 4)
    w, _ = random_nm_weight(5, 2, 4, 8, 6, "float32", 0.3)
    packed = kernels.pack_nm(w, pattern)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    g = rng.standard_normal((3, 6)).astype(np.float32)

    def loss(x, values):
      p = dataclasses.replace(packed, values=values)
      return jnp.sum(kernels.nm_matmul_reference(x, p) * g)

    gx, gv = jax.grad(loss, argnums=(0, 1))(x, packed.values)
    np.testing.assert_allclose(np.asarray(gx), g @ w.T, rtol=1e-5, atol=1e-5)
    # dL/dW = x^T g, read at the stored positions (padded zeros included).
    ones = dataclasses.replace(packed, values=jnp.ones_like(packed.values))
    stored = np.asarray(kernels.unpack_nm(ones)) != 0
    want = kernels.pack_nm(x.T @ g, pattern, mask=stored).values
    np.testing.assert_allclose(
      np.asarray(gv), np.asarray(want), rtol=1e-5, atol=1e-5
    )

  def test_block_grads_match_masked_dense(self):
    w, _ = random_block_weight(7, 2, 3, 4, 3, "float32", 0.5)
    packed = kernels.pack_block(w, js.Block(2, 3), max_blocks=4)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    g = rng.standard_normal((5, 9)).astype(np.float32)

    def loss(x, blocks):
      p = dataclasses.replace(packed, blocks=blocks)
      return jnp.sum(kernels.block_sparse_matmul_reference(x, p) * g)

    gx, gb = jax.grad(loss, argnums=(0, 1))(x, packed.blocks)
    np.testing.assert_allclose(np.asarray(gx), g @ w.T, rtol=1e-5, atol=1e-5)
    dense = (x.T @ g).reshape(4, 2, 3, 3).transpose(0, 2, 1, 3)
    counts, rows = np.asarray(packed.counts), np.asarray(packed.indices)
    want = np.zeros(packed.blocks.shape, np.float32)
    for c in range(3):
      for j in range(counts[c]):
        want[c, j] = dense[rows[c, j], c]
    np.testing.assert_allclose(np.asarray(gb), want, rtol=1e-5, atol=1e-5)

  def test_x_shape_mismatch_is_an_error(self):
    packed = kernels.pack_nm(np.zeros((8, 2), np.float32), js.NM(2, 4))
    with self.assertRaisesRegex(ValueError, "K=8"):
      kernels.nm_matmul_reference(np.zeros((3, 4), np.float32), packed)
    blocked = kernels.pack_block(np.zeros((8, 2), np.float32), js.Block(2, 2))
    with self.assertRaisesRegex(ValueError, "K=8"):
      kernels.block_sparse_matmul_reference(
        np.zeros((3, 4), np.float32), blocked
      )


if __name__ == "__main__":
  absltest.main()
