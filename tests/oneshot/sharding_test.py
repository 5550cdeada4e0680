"""Calibration batches sharded over a data axis give the 1-device result.

The per-layer sums are reductions over the sharded batch axis: XLA sums each
shard and all-reduces the partial sums, so they are added in another order
than on one device. Statistics therefore agree to float32 rounding (rtol
1e-5), not bitwise; Wanda's masks are equal (no score is within rounding of
the selection threshold on this data) and, since Wanda keeps the kept
weights unchanged, so are the pruned kernels, bitwise.

Tensor-parallel layers (kernels split by output neurons) are pruned where
they lie: SparseGPT's sweep treats each output independently given the
replicated Hessian, so the compiled rule has no collective at all, and the
result equals the 1-device one to float32 rounding of the matmuls.
"""

import re

import jax
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse import oneshot, sharding
from tests import oneshot as tiny


def wanda_with_gram():
  return oneshot.OneShotMethod("wanda", True, oneshot.wanda().prune_layer)


def sharded_setup(axis_type):
  params, xs = tiny.setup(batches=2)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
  return params, xs, sharded


class ShardingTest(parameterized.TestCase):
  @parameterized.parameters(AxisType.Explicit, AxisType.Auto)
  def test_sharded_statistics_match_one_device(self, axis_type):
    params, xs, sharded = sharded_setup(axis_type)
    self.assertLen(sharded[0].sharding.device_set, 8)
    one = oneshot.layer_statistics(
      tiny.apply_fn, params, xs, tiny.KERNELS, gram=True
    )
    many = oneshot.layer_statistics(
      tiny.apply_fn, params, sharded, tiny.KERNELS, gram=True
    )
    for path in tiny.KERNELS:
      for a, b in zip(one[path], many[path]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_sharded_prune_matches_one_device(self):
    params, xs, sharded = sharded_setup(AxisType.Explicit)
    method = wanda_with_gram()
    single = oneshot.prune(tiny.apply_fn, params, xs, method, sparsity=0.5)
    multi = oneshot.prune(tiny.apply_fn, params, sharded, method, sparsity=0.5)
    jax.tree.map(np.testing.assert_array_equal, single.masks, multi.masks)
    jax.tree.map(np.testing.assert_array_equal, single.params, multi.params)
    for path in tiny.KERNELS:
      np.testing.assert_allclose(
        single.layers[path].error, multi.layers[path].error, rtol=1e-4
      )

  @parameterized.parameters(
    (AxisType.Explicit, None), (AxisType.Auto, js.NM(2, 4))
  )
  def test_tensor_parallel_sparsegpt_matches_one_device(
    self, axis_type, pattern
  ):
    params, xs = tiny.setup(batches=2)
    mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
    shardings = sharding.param_shardings(
      params, mesh, sharding.tensor_parallel("model")
    )
    split = jax.device_put(params, shardings)
    kw = {"sparsity": 0.5} if pattern is None else {"pattern": pattern}
    method = oneshot.sparsegpt(blocksize=8)
    single = oneshot.prune(tiny.apply_fn, params, xs, method, **kw)
    multi = oneshot.prune(tiny.apply_fn, split, xs, method, **kw)
    jax.tree.map(np.testing.assert_array_equal, single.masks, multi.masks)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      single.params,
      multi.params,
    )
    for path in tiny.KERNELS:  # pruned kernels stay split by outputs
      self.assertEqual(
        tiny.leaf_array(multi.params, path).sharding.spec, P(None, "model")
      )

  def test_sparsegpt_rule_on_output_split_kernel_has_no_collectives(self):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(0), (128, 32))
    stats = oneshot.LayerStatistics(
      x.shape[0] * 1.0, x.sum(0), (x * x).sum(0), x.T @ x
    )
    w = jax.device_put(
      jax.random.normal(jax.random.key(1), (32, 64)),
      NamedSharding(mesh, P(None, "model")),
    )
    rule = jax.jit(
      oneshot.sparsegpt(blocksize=16).prune_layer, static_argnums=(2, 3)
    )
    hlo = rule.lower(w, stats, 0.5, js.Unstructured()).compile().as_text()
    found = re.findall(
      r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)",
      hlo,
    )
    self.assertEmpty(found)


if __name__ == "__main__":
  absltest.main()
