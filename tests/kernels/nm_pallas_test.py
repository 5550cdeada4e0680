"""Pallas N:M kernels against the plain-jnp specification.

Forward and VJP run in the Pallas interpreter on CPU (both the TPU body, with
its grid reduction and VMEM accumulator, and the Triton body, with its
in-kernel loop) and are compared with ``nm_matmul_reference`` and its
``jax.grad``; a NumPy float64 ``x @ W`` sets dtype-aware tolerances. Without
hardware, the compiled paths are checked by cross-lowering to TPU (Mosaic)
and CUDA (Triton).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.pallas.mosaic.interpret import (
  interpret_pallas_call as tpu_interpret,
)
from jax.experimental.pallas import tpu as pltpu

import jaxsparse as js
from jaxsparse.kernels import (
  index_layout,
  nm_matmul_reference,
  nm_pallas,
  pack_nm,
)
from jaxsparse.kernels.packing import unpack_nm
from tests.kernels.lowering import KERNEL_CALL, verified_triton_modules

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
EPS = {"float32": 2e-6, "bfloat16": 2**-7}


def random_packed(seed, n, m, k, cols, dtype_name):
  """A random N:M ``W: [k, cols]`` (exactly ``n`` kept per group), packed."""
  rng = np.random.default_rng(seed)
  scores = rng.random((k // m, m, cols))
  rank = np.argsort(np.argsort(scores, axis=1), axis=1)
  mask = (rank < n).reshape(k, cols)
  w = rng.standard_normal((k, cols)).astype(DTYPES[dtype_name])
  return pack_nm(jnp.asarray(w), js.NM(n, m), mask=jnp.asarray(mask))


def random_x(seed, shape, dtype_name):
  rng = np.random.default_rng(seed + 1)
  return jnp.asarray(rng.standard_normal(shape).astype(DTYPES[dtype_name]))


def f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def tolerance(a, b, dtype_name):
  """``eps * (|a| @ |b|)``: output rounding plus float32 sums."""
  return EPS[dtype_name] * (np.abs(f64(a)) @ np.abs(f64(b))) + 1e-6


def pallas(platform, **tiles):
  def op(x, packed):
    return nm_pallas.nm_matmul_pallas(
      x, packed, platform=platform, interpret=True, **tiles
    )

  return op


def forward_and_grads(op, x, packed, ct):
  """``y = op(x, W)`` and the VJP of ``ct`` w.r.t. ``x`` and ``values``."""

  def f(x, values):
    return op(x, dataclasses.replace(packed, values=values))

  y, vjp = jax.vjp(f, x, packed.values)
  return (y, *vjp(ct.astype(y.dtype)))


# (platform, n, m, K, N, x shape without K, dtype). K is a multiple of
# m * fields-per-word; the Triton path needs G_w = K / (m * per) >= 16.
FORWARD_CASES = [
  ("tpu_2_4_f32_lead", "tpu", 2, 4, 64, 32, (2, 3), "float32"),
  ("tpu_1_4_bf16_b1", "tpu", 1, 4, 128, 32, (1,), "bfloat16"),
  ("tpu_1_2_bf16", "tpu", 1, 2, 64, 128, (9,), "bfloat16"),
  ("gpu_2_4_bf16_b1", "gpu", 2, 4, 256, 32, (1,), "bfloat16"),
  ("gpu_1_2_f32_lead", "gpu", 1, 2, 256, 16, (3, 1), "float32"),
]


class NMPallasForwardTest(parameterized.TestCase):
  @parameterized.named_parameters(*FORWARD_CASES)
  def test_matches_reference(self, platform, n, m, k, cols, lead, dt):
    packed = random_packed(0, n, m, k, cols, dt)
    x = random_x(0, (*lead, k), dt)
    with jax.numpy_dtype_promotion("strict"):
      y = pallas(platform)(x, packed)
      want = nm_matmul_reference(x, packed)
    self.assertEqual(y.shape, (*lead, cols))
    self.assertEqual(y.dtype, want.dtype)
    exact = f64(x) @ f64(unpack_nm(packed))
    tol = tolerance(x, unpack_nm(packed), dt)
    np.testing.assert_array_less(np.abs(f64(y) - exact), tol)
    np.testing.assert_array_less(np.abs(f64(y) - f64(want)), 2 * tol)

  @parameterized.named_parameters(
    # TPU: 1:2, K=4096 -> G_w=256 word rows in 2 grid steps of 128; N=256 in
    # 2 column tiles; 20 rows in 3 tiles of 8 (padded to 24).
    ("tpu", "tpu", 1, 2, 4096, 256, dict(block_b=8, block_n=128, block_u=128)),
    # Triton: 2:4, K=1024 -> G_w=64 in 2 loop steps of 32; N=64 in 2 tiles;
    # 20 rows in 2 tiles of 16.
    ("gpu", "gpu", 2, 4, 1024, 64, dict(block_b=16, block_n=32, block_u=32)),
  )
  def test_accumulates_over_tiles_under_jit(
    self, platform, n, m, k, cols, tiles
  ):
    packed = random_packed(1, n, m, k, cols, "float32")
    x = random_x(1, (20, k), "float32")
    op = pallas(platform, **tiles)
    ct = random_x(2, (20, cols), "float32")
    y, dx, dv = jax.jit(functools.partial(forward_and_grads, op))(x, packed, ct)
    _, dx_ref, dv_ref = forward_and_grads(nm_matmul_reference, x, packed, ct)
    w = unpack_nm(packed)
    exact = f64(x) @ f64(w)
    np.testing.assert_array_less(
      np.abs(f64(y) - exact), tolerance(x, w, "float32")
    )
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dv, dv_ref, rtol=1e-5, atol=1e-4)

  def test_empty_batch(self):
    packed = random_packed(1, 2, 4, 64, 32, "bfloat16")
    y = pallas("tpu")(jnp.zeros((0, 2, 64), jnp.bfloat16), packed)
    self.assertEqual((y.shape, y.dtype), ((0, 2, 32), jnp.bfloat16))

  def test_tpu_lane_rule_for_block_u(self):
    packed = random_packed(1, 2, 4, 1024, 64, "float32")
    x = random_x(1, (4, 1024), "float32")
    with self.assertRaisesRegex(ValueError, "block_u=32"):
      pallas("tpu", block_u=32)(x, packed)  # not G_w=64 nor 128k


class NMPallasGradTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("tpu_2_4_bf16", "tpu", 2, 4, 64, 32, (3,), "bfloat16"),
    ("tpu_3bit_2_8_f32", "tpu", 2, 8, 160, 16, (2, 2), "float32"),
    ("gpu_2_4_bf16", "gpu", 2, 4, 256, 16, (17,), "bfloat16"),
  )
  def test_vjp_matches_reference_grad(self, platform, n, m, k, cols, lead, dt):
    packed = random_packed(2, n, m, k, cols, dt)
    x = random_x(2, (*lead, k), dt)
    rng = np.random.default_rng(3)
    ct = jnp.asarray(rng.standard_normal((*lead, cols)), jnp.float32)
    with jax.numpy_dtype_promotion("strict"):
      y, dx, dv = forward_and_grads(pallas(platform), x, packed, ct)
      _, dx_ref, dv_ref = forward_and_grads(nm_matmul_reference, x, packed, ct)
    self.assertEqual((dx.dtype, dv.dtype), (x.dtype, packed.values.dtype))
    self.assertEqual(dv.shape, packed.values.shape)
    w = unpack_nm(packed)
    exact = f64(x) @ f64(w)
    np.testing.assert_array_less(np.abs(f64(y) - exact), tolerance(x, w, dt))
    ct2 = f64(ct).reshape(-1, cols)
    x2 = f64(x).reshape(-1, k)
    dx_tol = tolerance(ct2, f64(w).T, dt).reshape(x.shape)
    np.testing.assert_array_less(np.abs(f64(dx) - f64(dx_ref)), 2 * dx_tol)
    # dW = xᵀ dy at every position; the kept ones are dv_ref (the reference
    # is the gather of the dense gradient), so a scalar bound suffices.
    dv_tol = 2 * EPS[dt] * (np.abs(x2).T @ np.abs(ct2)).max() + 1e-6
    np.testing.assert_array_less(np.abs(f64(dv) - f64(dv_ref)), dv_tol)
    self.assertGreater(np.abs(f64(dv)).max(), 10 * dv_tol)

  def test_indices_get_no_float_cotangent(self):
    packed = random_packed(4, 2, 4, 64, 32, "float32")
    x = random_x(4, (2, 64), "float32")

    def loss(packed):
      return jnp.sum(pallas("tpu")(x, packed))

    grads = jax.grad(loss, allow_int=True)(packed)
    self.assertEqual(grads.indices.dtype, jax.dtypes.float0)
    ref = jax.grad(lambda p: jnp.sum(nm_matmul_reference(x, p)), allow_int=True)
    np.testing.assert_allclose(grads.values, ref(packed).values, atol=1e-5)


class NMPallasTPUInterpreterTest(absltest.TestCase):
  def test_forward_and_vjp_on_two_simulated_cores(self):
    # The TPU-faithful interpreter simulates VMEM, DMAs and (here) two
    # cores sharing the "parallel" grid axes; scratch starts as NaN, so a
    # missed accumulator init or a race between cores shows in the result.
    packed = random_packed(8, 2, 4, 1024, 256, "float32")
    x = random_x(8, (20, 1024), "float32")
    ct = random_x(9, (20, 256), "float32")
    params = pltpu.InterpretParams(
      detect_races=True,
      num_cores_or_threads=2,
      uninitialized_memory="nan",
      out_of_bounds_reads="raise",
    )

    def op(x, packed):
      return nm_pallas.nm_matmul_pallas(
        x, packed, platform="tpu", interpret=params, block_b=8, block_n=128
      )

    got = forward_and_grads(op, x, packed, ct)
    want = forward_and_grads(nm_matmul_reference, x, packed, ct)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    self.assertFalse(tpu_interpret.races.races_found)


@st.composite
def nm_shapes(draw):
  m = draw(st.sampled_from([2, 4]))  # m=8 (3-bit words): named cases
  n = draw(st.integers(1, m - 1))
  per = index_layout(m)[1]
  k = m * per * draw(st.integers(1, 2))
  cols = draw(st.sampled_from([8, 16]))
  rows = draw(st.integers(1, 5))
  dt = draw(st.sampled_from(sorted(DTYPES)))
  return n, m, k, cols, rows, dt, draw(st.integers(0, 2**16))


class NMPallasPropertyTest(parameterized.TestCase):
  @settings(max_examples=3)
  @given(case=nm_shapes())
  def test_any_pattern_matches_dense_product(self, case):
    n, m, k, cols, rows, dt, seed = case
    packed = random_packed(seed, n, m, k, cols, dt)
    x = random_x(seed, (rows, k), dt)
    y = pallas("tpu")(x, packed)
    exact = f64(x) @ f64(unpack_nm(packed))
    tol = tolerance(x, unpack_nm(packed), dt)
    np.testing.assert_array_less(np.abs(f64(y) - exact), tol)


def lowered_text(fn, args, platform):
  traced = jax.jit(fn).trace(*args)
  return traced.lower(lowering_platforms=(platform,)).as_text()


# Mosaic TPU kernels and Triton kernels (``__gpu$xla.gpu.triton``).


class NMPallasLoweringTest(parameterized.TestCase):
  @parameterized.product(
    platform=["tpu", "cuda"],
    rows=[8, 128],
    pattern=[(2, 4, 512), (4, 8, 1280)],
  )
  def test_forward_and_grad_lower_without_hardware(
    self, platform, rows, pattern
  ):
    n, m, k = pattern
    packed = pack_nm(jnp.zeros((k, 512), jnp.bfloat16), js.NM(n, m))
    x = jnp.zeros((rows, k), jnp.bfloat16)
    kind = "tpu" if platform == "tpu" else "gpu"

    def fwd(x, values):
      p = dataclasses.replace(packed, values=values)
      return nm_pallas.nm_matmul_pallas(x, p, platform=kind)

    def loss(x, values):
      return jnp.sum(fwd(x, values).astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1))
    text = lowered_text(fwd, (x, packed.values), platform)
    self.assertLen(re.findall(KERNEL_CALL[platform], text), 1)
    text = lowered_text(grad, (x, packed.values), platform)
    # Forward (saved for the VJP), dx and dvalues kernels.
    self.assertLen(re.findall(KERNEL_CALL[platform], text), 3)

  @parameterized.parameters((2, 4, 512, 384, 8), (3, 4, 1024, 128, 40))
  def test_triton_modules_verify(self, n, m, k, cols, rows):
    # N = 384 and n = 3 give non-power-of-two whole-array blocks; the loads
    # must still be power-of-two tiles.
    packed = pack_nm(jnp.zeros((k, cols), jnp.bfloat16), js.NM(n, m))
    x = jnp.zeros((rows, k), jnp.bfloat16)

    def loss(x, values):
      p = dataclasses.replace(packed, values=values)
      y = nm_pallas.nm_matmul_pallas(x, p, platform="gpu")
      return jnp.sum(y.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1))
    with verified_triton_modules() as verified:
      text = lowered_text(grad, (x, packed.values), "cuda")
    self.assertLen(re.findall(KERNEL_CALL["cuda"], text), 3)
    self.assertLen(verified, 3)


class NMPallasUnsupportedTest(parameterized.TestCase):
  def test_supported_shapes_give_none(self):
    packed = random_packed(5, 2, 4, 512, 256, "bfloat16")
    for platform in ("tpu", "gpu"):
      self.assertIsNone(
        nm_pallas.nm_pallas_unsupported(packed, (4, 7, 512), platform)
      )

  @parameterized.named_parameters(
    ("groups_not_multiple_of_fields", 2, 4, 24, 128, "tpu", "multiple of 4"),
    ("three_bit_groups", 2, 8, 64, 128, "tpu", "multiple of 10"),
    ("tpu_columns", 2, 4, 64, 1032, "tpu", "N=1032"),
    ("triton_columns", 2, 4, 256, 24, "gpu", "N=24"),
    ("triton_word_rows", 2, 4, 128, 32, "gpu", "G_w=8"),
  )
  def test_reasons(self, n, m, k, cols, platform, reason):
    packed = random_packed(6, n, m, k, cols, "float32")
    got = nm_pallas.nm_pallas_unsupported(packed, (3, k), platform)
    self.assertIsNotNone(got)
    self.assertIn(reason, got)
    with self.assertRaisesRegex(ValueError, re.escape(reason)):
      nm_pallas.nm_matmul_pallas(
        jnp.zeros((3, k)), packed, platform=platform, interpret=True
      )

  def test_other_reasons(self):
    packed = random_packed(7, 2, 4, 64, 32, "float32")
    unsupported = nm_pallas.nm_pallas_unsupported
    self.assertIn("K=64", unsupported(packed, (3, 32), "tpu"))
    self.assertIn("platform", unsupported(packed, (3, 64), "cpu"))
    self.assertIn("float64", unsupported(packed, (3, 64), "tpu", np.float64))
    self.assertIn("block_b=12", unsupported(packed, (3, 64), "tpu", block_b=12))
    self.assertIn("VMEM", unsupported(packed, (3, 64), "tpu", block_b=2**16))


if __name__ == "__main__":
  absltest.main()
