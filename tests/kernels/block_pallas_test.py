"""Pallas block-sparse matmul: interpret mode against the reference and a
float64 NumPy rule, VJPs against ``jax.grad`` of the reference, and
cross-lowering of the compiled kernels for TPU (Mosaic) and CUDA (Triton)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import jaxsparse as js
from jaxsparse.kernels import block_pallas, pack_block
from jaxsparse.kernels.reference import block_sparse_matmul_reference
from tests.kernels.lowering import KERNEL_CALL, verified_triton_modules

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Relative to |x| @ |W|: float32 sums in another order; bfloat16 outputs
# rounded (half an ulp each side) after float32 sums.
EPS = {"float32": 1e-5, "bfloat16": 2**-7 + 1e-5}


def random_block_weight(seed, br, bc, nrows, ncols, dtype, density):
  """``W: [nrows*br, ncols*bc]`` whose blocks are kept with ``density``;
  with 0 < density < 1 the first block column and last block row are empty
  (so both kernels meet empty columns and empty rows)."""
  rng = np.random.default_rng(seed)
  keep = rng.random((nrows, ncols)) < density
  if 0 < density < 1:
    keep[:, 0] = False
    keep[-1, :] = False
  dense = rng.standard_normal((nrows * br, ncols * bc))
  full = np.repeat(np.repeat(keep, br, 0), bc, 1)
  return np.where(full, dense, 0.0).astype(DTYPES[dtype])


def random_x(seed, shape, dtype):
  rng = np.random.default_rng(seed + 1)
  return rng.standard_normal(shape).astype(DTYPES[dtype])


def f64(a):
  return np.asarray(a, np.float64)


def assert_close(actual, expected, scale, eps):
  """``|actual - expected| <= eps * scale + 1e-6`` elementwise."""
  err = np.abs(f64(actual) - f64(expected))
  bound = eps * f64(scale) + 1e-6
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (
    f"max excess at {worst}: |{f64(actual)[worst]} - "
    f"{f64(expected)[worst]}| > {bound[worst]}"
  )


def pallas(x, packed, platform, **kwargs):
  kwargs.setdefault("interpret", True)
  return block_pallas.block_sparse_matmul_pallas(
    x, packed, platform=platform, **kwargs
  )


def check_forward(x, w, packed, platform, dtype, **kwargs):
  y = pallas(x, packed, platform, **kwargs)
  assert y.shape == (*x.shape[:-1], w.shape[1]), y.shape
  assert y.dtype == jnp.dtype(DTYPES[dtype]), y.dtype
  scale = np.abs(f64(x)) @ np.abs(f64(w))
  assert_close(y, block_sparse_matmul_reference(x, packed), scale, EPS[dtype])
  assert_close(y, f64(x) @ f64(w), scale, EPS[dtype])


def block_scale(dense_scale, packed):
  """Per-slot ``[N/bc, slots, br, bc]`` view of a ``[K, N]`` bound."""
  br, bc = packed.rows, packed.cols_per_block
  idx = np.asarray(packed.indices)
  out = np.zeros(packed.blocks.shape)
  for c in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      r = idx[c, j]
      out[c, j] = dense_scale[r * br : (r + 1) * br, c * bc : (c + 1) * bc]
  return out


def check_vjp(x, w, packed, platform, dtype, **kwargs):
  """Grads of ``sum(y * ct)`` w.r.t. ``x`` and ``blocks`` against
  ``jax.grad`` of the reference; padding slots get exactly zero."""
  ct = random_x(7, (*x.shape[:-1], w.shape[1]), dtype)

  def loss(op):
    def f(x, blocks):
      y = op(x, dataclasses.replace(packed, blocks=blocks))
      return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(f, argnums=(0, 1))(x, packed.blocks)

  dx, dblocks = loss(lambda x, p: pallas(x, p, platform, **kwargs))
  rdx, rdblocks = loss(block_sparse_matmul_reference)
  assert dx.dtype == x.dtype and dblocks.dtype == packed.blocks.dtype
  ct2 = np.abs(f64(ct)).reshape(-1, ct.shape[-1])
  x2 = np.abs(f64(x)).reshape(-1, x.shape[-1])
  dx_scale = (ct2 @ np.abs(f64(w)).T).reshape(x.shape)
  assert_close(dx, rdx, dx_scale, EPS[dtype])
  assert_close(dblocks, rdblocks, block_scale(x2.T @ ct2, packed), EPS[dtype])
  padding = ~np.asarray(js.kernels.packing.block_valid(packed))
  assert np.all(np.asarray(dblocks, np.float32)[padding] == 0)


FORWARD_CASES = [
  dict(platform=p, dtype=d, density=s, br=br, bc=bc)
  for p in ("tpu", "gpu")
  for d in ("float32", "bfloat16")
  for s in (0.0, 0.25, 1.0)
  for br, bc in ((16, 16), (32, 16))
  if s > 0 or br == bc  # an all-empty W: one block shape is enough
]


class ForwardTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.enter_context(jax.numpy_dtype_promotion("strict"))

  @parameterized.parameters(*FORWARD_CASES)
  def test_matches_reference(self, platform, dtype, density, br, bc):
    w = random_block_weight(0, br, bc, 4, 3, dtype, density)
    packed = pack_block(w, js.Block(br, bc))
    x = random_x(0, (24, w.shape[0]), dtype)
    check_forward(x, w, packed, platform, dtype)

  @parameterized.product(platform=["tpu", "gpu"], lead=[(1,), (3, 5, 2)])
  def test_leading_dims_and_batch_padding(self, platform, lead):
    w = random_block_weight(1, 16, 32, 3, 2, "float32", 0.5)
    packed = pack_block(w, js.Block(16, 32))
    x = random_x(1, (*lead, w.shape[0]), "float32")
    check_forward(x, w, packed, platform, "float32", block_b=16)

  @parameterized.parameters("float32", "bfloat16")
  def test_tpu_tiled_blocks(self, dtype):
    # (128, 128) blocks and (8, 128)-aligned batch tiles: shapes the
    # compiled TPU kernel accepts, several batch tiles.
    w = random_block_weight(2, 128, 128, 2, 2, dtype, 0.5)
    packed = pack_block(w, js.Block(128, 128))
    self.assertIsNone(
      block_pallas.block_pallas_unsupported(packed, (40, 256), "tpu")
    )
    x = random_x(2, (40, 256), dtype)
    check_forward(x, w, packed, "tpu", dtype, block_b=16)

  def test_padding_slot_contents_are_ignored(self):
    # Garbage written into padding slots must not reach the output.
    w = random_block_weight(3, 16, 16, 4, 3, "float32", 0.5)
    packed = pack_block(w, js.Block(16, 16))
    valid = np.asarray(js.kernels.packing.block_valid(packed))
    self.assertFalse(valid.all())
    junk = np.where(valid[:, :, None, None], packed.blocks, 1e3)
    dirty = dataclasses.replace(packed, blocks=jnp.asarray(junk, jnp.float32))
    x = random_x(3, (16, w.shape[0]), "float32")
    for platform in ("tpu", "gpu"):
      check_forward(x, w, dirty, platform, "float32")

  def test_mixed_dtypes_promote(self):
    w = random_block_weight(4, 16, 16, 2, 2, "bfloat16", 1.0)
    packed = pack_block(w, js.Block(16, 16))
    x = random_x(4, (16, w.shape[0]), "float32")
    with jax.numpy_dtype_promotion("standard"):
      y = pallas(x, packed, "gpu")
      self.assertEqual(y.dtype, jnp.float32)
      assert_close(
        y, f64(x) @ f64(w), np.abs(f64(x)) @ np.abs(f64(w)), EPS["float32"]
      )

  def test_jit_equals_eager(self):
    w = random_block_weight(5, 16, 16, 3, 2, "float32", 0.5)
    packed = pack_block(w, js.Block(16, 16))
    x = random_x(5, (8, w.shape[0]), "float32")
    for platform in ("tpu", "gpu"):
      f = lambda x, p, platform=platform: pallas(x, p, platform)
      np.testing.assert_array_equal(jax.jit(f)(x, packed), f(x, packed))


class VJPTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.enter_context(jax.numpy_dtype_promotion("strict"))

  @parameterized.product(platform=["tpu", "gpu"], dtype=["float32", "bfloat16"])
  def test_grads_match_reference(self, platform, dtype):
    w = random_block_weight(6, 16, 32, 4, 3, dtype, 0.4)
    packed = pack_block(w, js.Block(16, 32), max_blocks=3)
    x = random_x(6, (2, 9, w.shape[0]), dtype)
    check_vjp(x, w, packed, platform, dtype)

  @parameterized.parameters("tpu", "gpu")
  def test_grads_of_empty_and_full_weights(self, platform):
    for density in (0.0, 1.0):
      w = random_block_weight(7, 16, 16, 3, 2, "float32", density)
      packed = pack_block(w, js.Block(16, 16))
      x = random_x(7, (5, w.shape[0]), "float32")
      check_vjp(x, w, packed, platform, "float32")

  def test_integer_leaves_get_float0(self):
    w = random_block_weight(8, 16, 16, 2, 2, "float32", 0.5)
    packed = pack_block(w, js.Block(16, 16))
    x = random_x(8, (4, w.shape[0]), "float32")
    f = lambda p: jnp.sum(pallas(x, p, "gpu"))
    grads = jax.grad(f, allow_int=True)(packed)
    self.assertEqual(grads.indices.dtype, jax.dtypes.float0)
    self.assertEqual(grads.counts.dtype, jax.dtypes.float0)
    ref = lambda b: jnp.sum(
      block_sparse_matmul_reference(x, dataclasses.replace(packed, blocks=b))
    )
    scale = np.abs(f64(x)).T @ np.ones((x.shape[0], w.shape[1]))
    assert_close(
      grads.blocks,
      jax.grad(ref)(packed.blocks),
      block_scale(scale, packed),
      EPS["float32"],
    )


class TPUInterpreterTest(parameterized.TestCase):
  def test_forward_and_vjp(self):
    # pltpu.InterpretParams simulates TPU memory spaces, scalar prefetch and
    # DMAs: a stricter run of the TPU kernels than the generic interpreter.
    w = random_block_weight(9, 128, 128, 3, 2, "float32", 0.7)
    packed = pack_block(w, js.Block(128, 128))
    self.assertFalse(np.asarray(js.kernels.packing.block_valid(packed)).all())
    x = random_x(9, (16, w.shape[0]), "float32")
    tpu = dict(interpret=pltpu.InterpretParams(), block_b=8)
    with jax.numpy_dtype_promotion("strict"):
      check_forward(x, w, packed, "tpu", "float32", **tpu)
      check_vjp(x, w, packed, "tpu", "float32", **tpu)


block_cases = st.builds(
  dict,
  br=st.sampled_from([8, 16, 32]),
  bc=st.sampled_from([8, 16, 32]),
  nrows=st.integers(1, 3),
  ncols=st.integers(1, 3),
  density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
  batch=st.integers(1, 20),
  platform=st.sampled_from(["tpu", "gpu"]),
  seed=st.integers(0, 2**31),
)


class PropertyTest(parameterized.TestCase):
  @settings(max_examples=3)
  @given(case=block_cases)
  def test_forward_and_vjp_any_block_shape(self, case):
    with jax.numpy_dtype_promotion("strict"):
      br, bc = case["br"], case["bc"]
      w = random_block_weight(
        case["seed"],
        br,
        bc,
        case["nrows"],
        case["ncols"],
        "float32",
        case["density"],
      )
      packed = pack_block(w, js.Block(br, bc))
      x = random_x(case["seed"], (case["batch"], w.shape[0]), "float32")
      check_forward(x, w, packed, case["platform"], "float32")
      check_vjp(x, w, packed, case["platform"], "float32")


def lowered_text(platform, shape, block, batch, dtype):
  """StableHLO of the forward and of ``value_and_grad``, compiled kernels
  (``interpret=False``) lowered for ``platform`` from this CPU host."""
  w = random_block_weight(
    0, *block, shape[0] // block[0], shape[1] // block[1], dtype, 0.25
  )
  packed = pack_block(w, js.Block(*block))
  x = jnp.zeros((batch, shape[0]), DTYPES[dtype])
  kernel_platform = "tpu" if platform == "tpu" else "gpu"
  reason = block_pallas.block_pallas_unsupported(
    packed, x.shape, kernel_platform
  )
  assert reason is None, reason

  def forward(x, blocks):
    p = dataclasses.replace(packed, blocks=blocks)
    return block_pallas.block_sparse_matmul_pallas(
      x, p, platform=kernel_platform
    )

  def loss(x, blocks):
    return jnp.sum(forward(x, blocks).astype(jnp.float32))

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  return [
    jax.jit(f)
    .trace(x, packed.blocks)
    .lower(lowering_platforms=(platform,))
    .as_text()
    for f in (forward, grad)
  ]


class CrossLoweringTest(parameterized.TestCase):
  @parameterized.parameters(
    ("tpu", (1024, 1024), (128, 128), 8, "bfloat16"),
    ("tpu", (1024, 1024), (128, 128), 256, "bfloat16"),
    ("tpu", (384, 640), (384, 128), 100, "float32"),  # full-K blocks
    ("cuda", (1024, 1024), (64, 64), 8, "bfloat16"),
    ("cuda", (1024, 1024), (64, 64), 256, "bfloat16"),
    ("cuda", (768, 384), (16, 128), 100, "float32"),  # K, N not 2^k
  )
  def test_forward_and_grad_lower(self, platform, shape, block, batch, dtype):
    forward, grad = lowered_text(platform, shape, block, batch, dtype)
    # One kernel forward; forward + dx + dblocks for value_and_grad.
    self.assertLen(re.findall(KERNEL_CALL[platform], forward), 1)
    self.assertLen(re.findall(KERNEL_CALL[platform], grad), 3)

  @parameterized.parameters(
    ((1024, 1024), (64, 64), 8, "bfloat16"),
    ((768, 384), (16, 128), 100, "float32"),
  )
  def test_triton_modules_verify(self, shape, block, batch, dtype):
    with verified_triton_modules() as verified:
      texts = lowered_text("cuda", shape, block, batch, dtype)
    calls = sum(len(re.findall(KERNEL_CALL["cuda"], t)) for t in texts)
    self.assertLen(verified, calls)
    self.assertEqual(
      {name.rsplit("_", 1)[-1] for name in verified}, {"fwd", "dx", "dblocks"}
    )


class UnsupportedTest(parameterized.TestCase):
  @parameterized.parameters(
    ("tpu", (256, 256), (128, 128), "float32", None),
    ("tpu", (64, 128), (64, 128), "bfloat16", None),  # full dims
    ("tpu", (256, 256), (64, 128), "float32", "multiple of 128 or K"),
    ("tpu", (256, 256), (128, 32), "float32", "multiple of 128 or N"),
    ("tpu", (256, 256), (128, 128), "float16", "float32/bfloat16"),
    ("gpu", (64, 64), (16, 32), "float16", None),
    ("gpu", (64, 64), (8, 16), "float32", "power-of-two"),
    ("gpu", (96, 64), (48, 16), "float32", "power-of-two"),
    ("cpu", (64, 64), (16, 16), "float32", "not 'tpu' or 'gpu'"),
  )
  def test_reasons(self, platform, shape, block, dtype, reason):
    w = np.ones(shape, DTYPES.get(dtype, dtype))
    packed = pack_block(w, js.Block(*block))
    got = block_pallas.block_pallas_unsupported(packed, (3, shape[0]), platform)
    if reason is None:
      self.assertIsNone(got)
    else:
      self.assertIn(reason, got)

  def test_x_dtype_sets_the_compute_dtype(self):
    # float16 W is not a TPU dtype, but float32 x promotes the product.
    packed = pack_block(np.ones((128, 128), np.float16), js.Block(128, 128))
    unsupported = block_pallas.block_pallas_unsupported
    self.assertIn("float16", unsupported(packed, (2, 128), "tpu"))
    self.assertIsNone(unsupported(packed, (2, 128), "tpu", x_dtype=np.float32))

  def test_x_shape_mismatch(self):
    packed = pack_block(np.ones((32, 32), np.float32), js.Block(16, 16))
    got = block_pallas.block_pallas_unsupported(packed, (4, 16), "gpu")
    self.assertIn("x has shape", got)
    with self.assertRaisesRegex(ValueError, "last axis of x must be K=32"):
      pallas(np.ones((4, 16), np.float32), packed, "gpu")

  def test_compiled_call_on_unsupported_shape_raises_with_fix(self):
    packed = pack_block(np.ones((32, 32), np.float32), js.Block(16, 16))
    with self.assertRaisesRegex(ValueError, "interpret=True"):
      block_pallas.block_sparse_matmul_pallas(
        np.ones((4, 32), np.float32), packed, platform="tpu"
      )

  @parameterized.parameters(("tpu", 12), ("gpu", 24), ("gpu", 8))
  def test_bad_block_b(self, platform, block_b):
    packed = pack_block(np.ones((32, 32), np.float32), js.Block(16, 16))
    with self.assertRaisesRegex(ValueError, "block_b"):
      pallas(np.ones((4, 32), np.float32), packed, platform, block_b=block_b)


if __name__ == "__main__":
  absltest.main()
