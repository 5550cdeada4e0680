"""Sharded mask updates: no parameter gather where the criterion is local.

The compiled HLO of one jitted ``tx.update`` (a mask update: every step here
updates masks) is read for collectives. Global allocations reduce only
counts, so they must compile to all-reduces of scalars and no all-gather, for
params sharded by columns, FSDP-style on their first axis, and over a 2-D
``('data', 'model')`` mesh, with Explicit and Auto mesh axes.
"""

import re

import jax
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse import patterns

COLLECTIVE = (
  r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
)
# `%name = f32[64,32]{1,0} all-gather(...)`: the gathered result's shape.
GATHER = r"= \(?(\w+)\[([\d,]*)\][^ ]* all-gather(?:-start)?\("
SHAPES = {"a": (64, 32), "b": (32, 24)}

# name -> (mesh shape, mesh axes, spec of every param)
SHARDINGS = {
  "columns": ((8,), ("x",), P(None, "x")),
  "fsdp": ((8,), ("x",), P("x", None)),
  "data_model": ((4, 2), ("data", "model"), P("data", "model")),
}


def methods(name):
  """A fresh transform (chained after sgd, or wrapped by js.sparsify)."""
  chained = {
    "global_magnitude": lambda: js.global_magnitude_pruning(
      0.9, update_every=1
    ),
    "global_allocation": lambda: js.magnitude_pruning(
      0.9, allocation=js.global_threshold(), update_every=1
    ),
    "uniform": lambda: js.magnitude_pruning(0.9, update_every=1),
    "erk": lambda: js.magnitude_pruning(
      0.9, allocation=js.erk(), update_every=1
    ),
    "acdc_global": lambda: js.acdc(
      0.8, total_steps=8, warmup_steps=0, phase_steps=2
    ),
    "lamp": lambda: js.lamp_pruning(0.9, update_every=1),
    "nm_unsharded_axis": lambda: js.magnitude_pruning(
      pattern=js.NM(2, 4), update_every=1
    ),
  }
  wrapped = {
    "st3": lambda: js.st3(0.9),
    "st3_sigma": lambda: js.st3(0.9, sigma=True),
  }
  if name in wrapped:
    return js.sparsify(optax.sgd(0.1), wrapped[name]())
  return optax.chain(optax.sgd(0.1), chained[name]())


def compiled_update(name, sharding, axis_type):
  """Compiled HLO text of one mask-updating step on sharded params."""
  shape, axes, spec = SHARDINGS[sharding]
  mesh = jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes))
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    leaf: jax.device_put(
      jax.random.normal(key, SHAPES[leaf]), NamedSharding(mesh, spec)
    )
    for leaf, key in zip(SHAPES, keys)
  }
  tx = methods(name)
  state = tx.init(params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def collectives(hlo):
  return set(re.findall(COLLECTIVE, hlo))


def gathered_shapes(hlo):
  return [
    tuple(int(d) for d in dims.split(",") if d)
    for _, dims in re.findall(GATHER, hlo)
  ]


class ShardingTest(parameterized.TestCase):
  @parameterized.product(
    name=[
      "global_magnitude",
      "global_allocation",
      "uniform",
      "erk",
      "acdc_global",
      "st3",
      "st3_sigma",
    ],
    sharding=list(SHARDINGS),
    axis_type=[AxisType.Explicit, AxisType.Auto],
  )
  def test_mask_update_gathers_no_params(self, name, sharding, axis_type):
    hlo = compiled_update(name, sharding, axis_type)
    found = collectives(hlo)
    self.assertNotIn("all-gather", found)
    self.assertNotIn("all-to-all", found)
    self.assertNotIn("collective-permute", found)
    # The counts are all-reduced (the test would pass vacuously if nothing
    # were sharded).
    self.assertIn("all-reduce", found)

  @parameterized.parameters(
    ("columns", AxisType.Explicit),
    ("columns", AxisType.Auto),
    ("fsdp", AxisType.Explicit),
    ("fsdp", AxisType.Auto),
  )
  def test_nm_along_an_unsharded_axis_gathers_nothing(
    self, sharding, axis_type
  ):
    # N:M groups run along axis -2: local for column sharding. With FSDP the
    # grouped axis is sharded, but every shard holds whole groups of 4, so
    # the selection stays local on Explicit and Auto meshes alike.
    found = collectives(
      compiled_update("nm_unsharded_axis", sharding, axis_type)
    )
    self.assertNotIn("all-gather", found)
    self.assertNotIn("all-to-all", found)

  @parameterized.parameters((64, 4), (16, 4), (24, 2))
  def test_nm_on_a_sharded_grouped_axis_equals_one_device(self, rows, m):
    # 64/8 rows per shard hold whole groups (local); 16/8 and 24/8 do not
    # (gathered for the update): the masks equal the 1-device ones either
    # way and keep the params' sharding.
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    params = {"a": jax.random.normal(jax.random.key(3), (rows, 16))}
    split = jax.device_put(params, NamedSharding(mesh, P("x", None)))
    tx = optax.chain(
      optax.sgd(0.1),
      js.magnitude_pruning(pattern=js.NM(1, m), update_every=1),
    )
    one = js.masks(jax.jit(tx.update)(params, tx.init(params), params)[1])
    many = js.masks(jax.jit(tx.update)(split, tx.init(split), split)[1])
    np.testing.assert_array_equal(one["a"], many["a"])
    self.assertTrue(patterns.follows(js.NM(1, m), many["a"]))
    self.assertEqual(many["a"].sharding.spec, P("x", None))

  @parameterized.product(
    sharding=list(SHARDINGS),
    axis_type=[AxisType.Explicit, AxisType.Auto],
  )
  def test_lamp_gathers_each_leaf_once_for_its_sort(self, sharding, axis_type):
    # LAMP's score is w_u^2 over the sum of the squares not smaller than
    # w_u: a per-leaf sorted suffix sum, so each leaf is gathered (on
    # purpose, only when masks are updated) for one sort. The global
    # threshold over the scores still reduces only counts: nothing larger
    # than one leaf is ever gathered, and no concatenation of leaves.
    hlo = compiled_update("lamp", sharding, axis_type)
    gathered = sorted(int(np.prod(s)) for s in gathered_shapes(hlo))
    sizes = sorted(int(np.prod(s)) for s in SHAPES.values())
    # Each leaf is gathered in full exactly once (over a 2-D mesh, in two
    # steps, the first of which yields a partial, smaller block).
    self.assertEqual([g for g in gathered if g in sizes], sizes)
    self.assertLessEqual(max(gathered), max(sizes))
    self.assertLessEqual(sum(gathered), 2 * sum(sizes))
    self.assertNotIn("all-to-all", collectives(hlo))

  def test_block_over_a_sharded_axis_gathers_on_purpose(self):
    method = js.magnitude_pruning(0.5, pattern=js.Block(4, 4), update_every=1)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    params = {
      "a": jax.device_put(
        jax.random.normal(jax.random.key(0), (64, 32)),
        NamedSharding(mesh, P(None, "x")),
      )
    }
    tx = optax.chain(optax.sgd(0.1), method)
    state = tx.init(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    self.assertIn("all-gather", collectives(hlo))


if __name__ == "__main__":
  absltest.main()
