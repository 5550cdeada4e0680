"""Calibration batches sharded over a data axis give the 1-device result.

The per-layer sums are reductions over the sharded batch axis: XLA sums each
shard and all-reduces the partial sums, so they are added in another order
than on one device. Statistics therefore agree to float32 rounding (rtol
1e-5), not bitwise; Wanda's masks are equal (no score is within rounding of
the selection threshold on this data) and, since Wanda keeps the kept
weights unchanged, so are the pruned kernels, bitwise.
"""

import jax
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse import oneshot
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


if __name__ == "__main__":
  absltest.main()
