"""Partition rules: presets, validation, and optimizer-state shardings."""

import re

import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse import sharding
from jaxsparse.masking import path_str


def mlp_params():
  """A digits-sized MLP's params: 64-256-128-10 and a 1-D norm scale."""
  sizes = [(64, 256), (256, 128), (128, 10)]
  params = {}
  for i, (n, m) in enumerate(sizes):
    params[f"Dense_{i}"] = {
      "kernel": jnp.ones((n, m), jnp.float32) * (i + 1),
      "bias": jnp.zeros((m,), jnp.float32),
    }
  params["norm"] = {"scale": jnp.ones((10,), jnp.float32)}
  return params


def divides(spec, shape, mesh):
  for dim, entry in zip(shape, spec):
    if entry is not None and dim % mesh.shape[entry]:
      return False
  return True


def reference_state_spec(path, shape, param_specs):
  """A state leaf's expected spec: its param's if the path ends with it."""
  name = path_str(path)
  for param_path, (param_shape, spec) in param_specs.items():
    if shape == param_shape and (
      name == param_path or name.endswith("/" + param_path)
    ):
      return spec
  return P()


MESHES = {
  "data8": ((8,), ("data",)),
  "data2_model4": ((2, 4), ("data", "model")),
}


class PresetTest(parameterized.TestCase):
  @parameterized.product(
    preset=["data_parallel", "fsdp", "tensor_parallel"],
    mesh_name=["data8", "data2_model4"],
    axis_type=[AxisType.Explicit, AxisType.Auto],
  )
  def test_specs_divide_and_place_arrays(self, preset, mesh_name, axis_type):
    shape, axes = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes))
    params = mlp_params()
    if preset == "tensor_parallel" and "model" not in axes:
      with self.assertRaisesRegex(ValueError, "mesh axis 'model'.*add the"):
        sharding.param_shardings(params, mesh, sharding.PRESETS[preset]())
      return
    shardings = sharding.param_shardings(
      params, mesh, sharding.PRESETS[preset]()
    )
    for (path, p), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(shardings),
    ):
      self.assertTrue(divides(s.spec, p.shape, mesh), (path, s.spec))
      placed = jax.device_put(p, s)  # fails if the spec does not fit
      self.assertEqual(placed.sharding.spec, s.spec)
      self.assertTrue(bool(jnp.array_equal(placed, p)))

  def test_fsdp_splits_the_largest_divisible_dim(self):
    mesh = jax.make_mesh((8,), ("data",))
    params = mlp_params()
    specs = sharding.param_specs(params, mesh, sharding.fsdp())
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
      spec = specs
      for key in path:
        spec = spec[key.key]
      fits = [d for d in p.shape if d % 8 == 0]
      if not fits:
        self.assertEqual(spec, P(), path_str(path))
        continue
      dim = spec.index("data")
      self.assertEqual(p.shape[dim], max(fits), path_str(path))
    # 64x256: the 256 side; the 10-wide bias: replicated.
    self.assertEqual(specs["Dense_0"]["kernel"], P(None, "data"))
    self.assertEqual(specs["Dense_2"]["bias"], P())

  def test_tensor_parallel_splits_outputs_where_they_divide(self):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = sharding.param_specs(mlp_params(), mesh, sharding.tensor_parallel())
    self.assertEqual(specs["Dense_0"]["kernel"], P(None, "model"))
    self.assertEqual(specs["Dense_0"]["bias"], P("model"))
    self.assertEqual(specs["Dense_2"]["kernel"], P())  # 10 % 4 != 0
    self.assertEqual(specs["norm"]["scale"], P())

  def test_first_matching_rule_wins(self):
    mesh = jax.make_mesh((8,), ("data",))
    rules = [
      (r"Dense_0/kernel", P("data")),
      (r"Dense_1/kernel", P(None, "data")),
    ]
    specs = sharding.param_specs(mlp_params(), mesh, rules)
    self.assertEqual(specs["Dense_0"]["kernel"], P("data"))
    self.assertEqual(specs["Dense_1"]["kernel"], P(None, "data"))
    self.assertEqual(specs["Dense_1"]["bias"], P())  # unmatched: replicated


class ValidationTest(parameterized.TestCase):
  def test_non_dividing_spec_names_the_leaf_and_fix(self):
    mesh = jax.make_mesh((8,), ("data",))
    rules = [(r"Dense_2/kernel", P(None, "data"))]
    with self.assertRaisesRegex(
      ValueError, r"Dense_2/kernel: dimension 10 .* size 8 .* replicate"
    ):
      sharding.param_specs(mlp_params(), mesh, rules)

  def test_unknown_axis_and_too_long_spec(self):
    mesh = jax.make_mesh((8,), ("data",))
    with self.assertRaisesRegex(ValueError, r"Dense_0/bias.*'model'"):
      sharding.param_specs(mlp_params(), mesh, [(r"bias", P("model"))])
    with self.assertRaisesRegex(ValueError, r"Dense_0/bias.*2 entries"):
      sharding.param_specs(mlp_params(), mesh, [(r"bias", P(None, None))])

  def test_strict_rejects_unmatched_params(self):
    mesh = jax.make_mesh((8,), ("data",))
    with self.assertRaisesRegex(ValueError, r"norm/scale: no partition rule"):
      sharding.param_specs(mlp_params(), mesh, [(r"Dense", P())], strict=True)


def methods():
  return {
    "magnitude": js.sparsify(
      optax.adam(1e-3), js.magnitude_pruning(0.5, update_every=1)
    ),
    "rigl": js.sparsify(optax.adam(1e-3), js.rigl(0.5, update_every=1)),
    "sr_ste": js.sparsify(optax.sgd(0.1, momentum=0.9), js.sr_ste()),
    "st3": js.sparsify(optax.adam(1e-3), js.st3(0.5)),
    "adam": optax.adam(1e-3),
  }


class StateShardingTest(parameterized.TestCase):
  @parameterized.product(
    method=["magnitude", "rigl", "sr_ste", "st3", "adam"],
    preset=["fsdp", "tensor_parallel"],
  )
  def test_state_specs_match_params(self, method, preset):
    self.check_state(method, preset, AxisType.Auto, run=False)

  @parameterized.parameters(
    ("magnitude", "fsdp", AxisType.Explicit),
    ("rigl", "tensor_parallel", AxisType.Auto),
    ("sr_ste", "fsdp", AxisType.Auto),
    ("st3", "tensor_parallel", AxisType.Explicit),
    ("adam", "fsdp", AxisType.Explicit),
  )
  def test_jitted_update_keeps_state_shardings(self, method, preset, axis):
    self.check_state(method, preset, axis, run=True)

  def check_state(self, method, preset, axis_type, run):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    rules = (
      sharding.fsdp("model")
      if preset == "fsdp"
      else (sharding.tensor_parallel())
    )
    params = mlp_params()
    tx = methods()[method]
    p_shardings = sharding.param_shardings(params, mesh, rules)
    s_shardings = sharding.state_shardings(tx, params, p_shardings)

    # Reference: path suffix + shape, from the params' specs.
    param_specs = {
      path_str(path): (p.shape, s.spec)
      for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(p_shardings),
      )
    }
    shapes = jax.eval_shape(tx.init, params)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_shardings = jax.tree.leaves(
      s_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    self.assertLen(flat_shardings, len(flat_shapes))
    sharded_leaves = 0
    for (path, leaf), s in zip(flat_shapes, flat_shardings):
      expected = reference_state_spec(path, leaf.shape, param_specs)
      self.assertEqual(s.spec, expected, path_str(path))
      sharded_leaves += expected != P()
    # Masks (and moments / dense weights) are there and sharded.
    mask_count = sum("masks" in path_str(p) for p, _ in flat_shapes)
    self.assertGreater(sharded_leaves, mask_count)

    if not run:
      return
    # The sharded init and one jitted, donated update keep the shardings.
    placed = jax.device_put(params, p_shardings)
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init, out_shardings=s_shardings)(placed)
      grads = jax.tree.map(lambda p: 0.01 * p, placed)

      def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      new_params, new_state = jax.jit(
        step,
        in_shardings=(p_shardings, s_shardings, p_shardings),
        out_shardings=(p_shardings, s_shardings),
        donate_argnums=(1,),
      )(placed, state, grads)
    for leaf, s in zip(
      jax.tree.leaves(new_state),
      jax.tree.leaves(
        s_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
      ),
    ):
      self.assertEqual(leaf.sharding.spec, s.spec)
    for leaf, s in zip(
      jax.tree.leaves(new_params), jax.tree.leaves(p_shardings)
    ):
      self.assertEqual(leaf.sharding.spec, s.spec)

  def test_mask_leaves_take_their_params_sharding(self):
    mesh = jax.make_mesh((8,), ("data",))
    params = mlp_params()
    tx = methods()["magnitude"]
    p_shardings = sharding.param_shardings(params, mesh, sharding.fsdp())
    s_shardings = sharding.state_shardings(tx, params, p_shardings)
    masks = {
      path_str(path): s.spec
      for path, s in jax.tree_util.tree_flatten_with_path(
        s_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
      )[0]
      if "masks" in path_str(path)
    }
    self.assertLen(masks, 3)  # the three kernels (biases: None)
    for path, spec in masks.items():
      expected = P(None, "data") if "Dense_0" in path else P("data", None)
      self.assertEqual(spec, expected, path)

  def test_spec_table_lists_every_leaf(self):
    mesh = jax.make_mesh((8,), ("data",))
    table = sharding.spec_table(
      sharding.param_shardings(mlp_params(), mesh, sharding.fsdp())
    )
    self.assertLen(table.splitlines(), 7)
    self.assertTrue(re.search(r"Dense_0/kernel: .*'data'", table))


if __name__ == "__main__":
  absltest.main()
