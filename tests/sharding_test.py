"""Sharded mask updates: no parameter gather where the criterion is local."""

import re

import jax
import optax
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js

COLLECTIVE = (
  r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
)


def compiled_collectives(method, axis_type):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    "a": jax.random.normal(keys[0], (64, 32)),
    "b": jax.random.normal(keys[1], (32, 16)),
  }
  params = jax.tree.map(
    lambda p: jax.device_put(p, NamedSharding(mesh, P(None, "x"))), params
  )
  tx = optax.chain(optax.sgd(0.1), method)
  state = tx.init(params)
  hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  return set(re.findall(COLLECTIVE, hlo))


class ShardingTest(parameterized.TestCase):
  @parameterized.product(
    name=["global", "uniform", "nm_unsharded_axis"],
    axis_type=[AxisType.Explicit, AxisType.Auto],
  )
  def test_mask_update_gathers_no_params(self, name, axis_type):
    method = {
      "global": js.global_magnitude_pruning(0.9, update_every=1),
      "uniform": js.magnitude_pruning(0.9, update_every=1),
      "nm_unsharded_axis": js.magnitude_pruning(
        pattern=js.NM(2, 4), update_every=1
      ),
    }[name]
    collectives = compiled_collectives(method, axis_type)
    self.assertNotIn("all-gather", collectives)
    self.assertNotIn("all-to-all", collectives)

  def test_block_over_a_sharded_axis_gathers_on_purpose(self):
    method = js.magnitude_pruning(0.5, pattern=js.Block(4, 4), update_every=1)
    self.assertIn("all-gather", compiled_collectives(method, AxisType.Explicit))


if __name__ == "__main__":
  absltest.main()
