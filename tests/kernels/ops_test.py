"""The public sparse matmuls: implementations agree, the dispatcher follows
its measured table, and sharded inputs run per shard without collectives."""

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType

import jaxsparse as js
from jaxsparse import kernels
from jaxsparse.kernels import ops


def nm_weight(seed, k, n, dtype=np.float32):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((k, n)).astype(np.float32)
  mask = np.asarray(js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5))
  w = np.where(mask, w, 0).astype(dtype)
  return w, kernels.pack_nm(w, js.NM(2, 4), mask=mask)


def block_weight(seed, k, n, block, density, dtype=np.float32):
  rng = np.random.default_rng(seed)
  keep = rng.random((k // block, n // block)) < density
  full = np.repeat(np.repeat(keep, block, 0), block, 1)
  w = np.where(full, rng.standard_normal((k, n)), 0).astype(dtype)
  return w, kernels.pack_block(w, js.Block(block, block))


class ImplementationsTest(parameterized.TestCase):
  @parameterized.product(
    kind=["nm", "block"], impl=["auto", "reference", "dense"]
  )
  def test_every_impl_is_x_at_w(self, kind, impl):
    if kind == "nm":
      w, packed = nm_weight(0, 32, 24)
    else:
      w, packed = block_weight(0, 32, 24, 8, 0.5)
    x = np.random.default_rng(1).standard_normal((2, 3, 32))
    x = x.astype(np.float32)
    y = jax.jit(lambda x, p: ops.sparse_matmul(x, p, impl=impl))(x, packed)
    self.assertEqual(y.shape, (2, 3, 24))
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)

  def test_auto_without_a_table_is_reference_on_cpu_dense_elsewhere(self):
    _, packed = nm_weight(0, 32, 8)
    with _table({}):
      self.assertEqual(ops.choose(packed, (4, 32), "cpu"), "reference")
      self.assertEqual(ops.choose(packed, (4, 32), "gpu"), "dense")
      self.assertEqual(ops.choose(packed, (4, 32), "tpu"), "dense")

  def test_errors_name_the_fix(self):
    w, packed = nm_weight(0, 32, 8)
    x = np.zeros((2, 32), np.float32)
    with self.assertRaisesRegex(ValueError, "impl='fast' is not one of"):
      kernels.nm_matmul(x, packed, impl="fast")
    with self.assertRaisesRegex(ValueError, "use block_sparse_matmul"):
      kernels.nm_matmul(x, kernels.pack_block(w, js.Block(8, 8)))
    with self.assertRaisesRegex(ValueError, "use nm_matmul"):
      kernels.block_sparse_matmul(x, packed)
    with self.assertRaisesRegex(ValueError, "no CPU kernel"):
      kernels.nm_matmul(x, packed, impl="pallas")
    with self.assertRaisesRegex(ValueError, "platform='gpu'"):
      kernels.nm_matmul(x, packed, impl="pallas", interpret=True)
    with self.assertRaisesRegex(ValueError, "expected 'cpu', 'gpu'"):
      kernels.nm_matmul(x, packed, platform="metal")


def _table(tables):
  """Temporarily replaces the measured table the dispatcher reads."""
  return mock.patch.object(ops, "_tables", lambda: tables)


def entry(op, pattern, k, batch, density, best, dot=1.0):
  """A measured case where ``best`` took 0.5 s, the others 2 s, and
  ``jnp.dot`` on the dense weight ``dot`` s."""
  seconds = {"jnp.dot": dot, "pallas": 2.0, "reference": 2.0, "dense": 2.0}
  seconds[best] = 0.5
  return dict(
    op=op,
    pattern=pattern,
    k=k,
    n=k,
    batch=batch,
    density=density,
    seconds=seconds,
    best=best,
  )


class ChooseTest(parameterized.TestCase):
  def test_nearest_measured_case_wins(self):
    _, packed = nm_weight(0, 256, 256)
    table = {
      "gpu": {
        "entries": [
          entry("nm", "2:4", 256, 1, 0.5, "pallas")
          | {
            "seconds": {
              "jnp.dot": 1.0,
              "pallas": 0.5,
              "reference": 1.5,
              "dense": 2.0,
            }
          },
          entry("nm", "2:4", 256, 512, 0.5, "dense"),
          entry("nm", "1:4", 256, 1, 0.25, "reference"),
          entry("block", "2:4", 256, 1, 0.5, "reference"),
        ]
      }
    }
    supported = mock.patch.object(ops, "_unsupported", lambda *a: None)
    with _table(table), supported:
      self.assertEqual(ops.choose(packed, (1, 256), "gpu"), "pallas")
      self.assertEqual(ops.choose(packed, (8, 256), "gpu"), "pallas")
      self.assertEqual(ops.choose(packed, (4, 64, 256), "gpu"), "dense")
    # A shape the kernel refuses takes the fastest of the others.
    refused = mock.patch.object(ops, "_unsupported", lambda *a: "not tiled")
    with _table(table), refused:
      self.assertEqual(ops.choose(packed, (1, 256), "gpu"), "reference")

  def test_packing_pays_only_where_a_packed_matmul_beat_jnp_dot(self):
    _, packed = nm_weight(0, 256, 256)
    table = {
      "cpu": {
        "entries": [
          entry("nm", "2:4", 256, 1, 0.5, "reference", dot=1.0),
          entry("nm", "2:4", 256, 512, 0.5, "reference", dot=0.1),
        ]
      }
    }
    with _table(table):
      self.assertTrue(ops.packing_pays(packed, (1, 256), "cpu"))
      self.assertFalse(ops.packing_pays(packed, (1024, 256), "cpu"))
    with _table({}):
      self.assertFalse(ops.packing_pays(packed, (1, 256), "cpu"))

  def test_block_density_is_the_static_slot_fraction(self):
    _, packed = block_weight(2, 64, 64, 8, 0.3)
    self.assertEqual(ops.static_density(packed), packed.max_blocks / 8)
    table = {
      "cpu": {
        "entries": [
          entry("block", "8x8", 64, 8, 0.125, "reference"),
          entry("block", "8x8", 64, 8, 1.0, "dense"),
        ]
      }
    }
    diagonal = np.kron(np.eye(8), np.ones((8, 8))).astype(np.float32)
    sparse = kernels.pack_block(diagonal, js.Block(8, 8))
    full = kernels.pack_block(np.ones((64, 64), np.float32), js.Block(8, 8))
    self.assertEqual(ops.static_density(sparse), 0.125)
    with _table(table):
      self.assertEqual(ops.choose(sparse, (8, 64), "cpu"), "reference")
      self.assertEqual(ops.choose(full, (8, 64), "cpu"), "dense")

  def test_shipped_table_is_well_formed(self):
    tables = ops._tables()
    for platform, table in tables.items():
      self.assertIn(platform, ("cpu", "gpu", "tpu"))
      for key in ("device_kind", "date", "jax", "command", "entries"):
        self.assertIn(key, table)
      for e in table["entries"]:
        self.assertIn(e["op"], ("nm", "block"))
        candidates = {
          k: v
          for k, v in e["seconds"].items()
          if k in ("pallas", "reference", "dense")
        }
        # The recorded winner is the fastest measured candidate.
        self.assertEqual(e["best"], min(candidates, key=candidates.get))
        self.assertIn("jnp.dot", e["seconds"])


def mesh(types):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(types,) * 2)


class ShardedTest(parameterized.TestCase):
  @parameterized.product(
    kind=["nm", "block"],
    types=[AxisType.Explicit, AxisType.Auto],
    axes=[("data", "model"), ("data", None), (None, "model")],
  )
  def test_per_shard_kernels_equal_the_unsharded_op(self, kind, types, axes):
    if kind == "nm":
      w, packed = nm_weight(3, 64, 32)
    else:
      w, packed = block_weight(3, 64, 32, 8, 0.4)
    x = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    batch_axis, column_axis = axes
    m = mesh(types)

    @jax.jit
    def f(x, packed):
      return ops.sharded_matmul(
        x, packed, m, batch_axis=batch_axis, column_axis=column_axis
      )

    y = f(x, packed)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
    spec = tuple(y.sharding.spec) + (None, None)
    self.assertEqual(spec[:2], (batch_axis, column_axis))
    hlo = f.lower(x, packed).compile().as_text()
    self.assertIsNone(
      re.search(r"(all-gather|all-reduce|all-to-all|collective-permute)", hlo)
    )

  @parameterized.product(kind=["nm", "block"], platform=["gpu", "tpu"])
  def test_pallas_kernels_run_per_shard_in_shard_map(self, kind, platform):
    # Interpret mode stands in for the device: the same kernel the GPU/TPU
    # would run, once per (data, model) shard of a 2x4 mesh.
    if kind == "nm":
      w, packed = nm_weight(5, 256, 64)
    elif platform == "gpu":
      w, packed = block_weight(5, 256, 64, 16, 0.4)
    else:  # TPU blocks span (8, 128) tiles: whole K rows, 16 columns
      w, packed = block_weight(5, 256, 64, 16, 1.0)
      packed = kernels.pack_block(w, js.Block(256, 16))
    x = np.random.default_rng(6).standard_normal((4, 256)).astype(np.float32)
    m = mesh(AxisType.Explicit)

    @jax.jit
    def f(x, packed):
      return ops.sharded_matmul(
        x,
        packed,
        m,
        batch_axis="data",
        column_axis="model",
        impl="pallas",
        platform=platform,
        interpret=True,
      )

    y = f(x, packed)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-4, atol=1e-4)
    want = ops.sparse_matmul(x, packed, impl="reference")
    np.testing.assert_allclose(
      np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5
    )

  def test_bad_axes_and_shapes_are_errors(self):
    _, packed = nm_weight(3, 64, 30)
    x = np.zeros((8, 64), np.float32)
    m = mesh(AxisType.Auto)
    with self.assertRaisesRegex(ValueError, "column_axis='rows' is not"):
      ops.sharded_matmul(x, packed, m, column_axis="rows")
    with self.assertRaisesRegex(ValueError, "30 output columns"):
      ops.sharded_matmul(x, packed, m, column_axis="model")
    with self.assertRaisesRegex(ValueError, "leading \\(batch\\) axis"):
      ops.sharded_matmul(x[:3], packed, m, batch_axis="data")


if __name__ == "__main__":
  absltest.main()
