"""Packed sparse weights on unchanged Flax models (``jaxsparse.nn``).

Reference: the same model run on the masked dense params
``js.apply_masks(params, masks)``; the packed run must match it.
"""

import os
import tempfile
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl.testing import absltest, parameterized
from flax import nnx

import jaxsparse as js
import jaxsparse.nn as jsnn
from jaxsparse import kernels

PATTERNS = {"nm24": js.NM(2, 4), "block8": js.Block(8, 8)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# rtol/atol: float32 differs only by the summation order; bfloat16 layers
# round every output to 8 bits and relu can flip on a rounded value.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}


class LinenMLP(nn.Module):
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  features: tuple[int, ...] = (32, 32, 16)

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for features in self.features[:-1]:
      x = nn.relu(nn.Dense(features, **kw)(x))
    return nn.Dense(self.features[-1], **kw)(x)


class Attention(nn.Module):
  """Projections shaped as in attention: ``DenseGeneral`` kernels
  ``[in, heads, head_dim]`` and ``[heads, head_dim, out]``, plus one that
  contracts a middle axis."""

  @nn.compact
  def __call__(self, x):  # x: [batch, tokens, 32]
    q = nn.DenseGeneral((4, 8), name="query")(x)
    v = nn.DenseGeneral((4, 8), use_bias=False, name="value")(x)
    h = nn.tanh(q) * v  # [batch, tokens, heads, head_dim]
    out = nn.DenseGeneral(32, axis=(-2, -1), name="out")(h)
    mixed = nn.DenseGeneral(16, axis=1, name="mix")(jnp.swapaxes(out, 1, 2))
    return mixed  # [batch, 32, 16]


class NnxMLP(nnx.Module):
  def __init__(self, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden = nnx.Linear(32, 32, **kw)
    self.layers = nnx.List([nnx.Linear(32, 32, **kw), nnx.Linear(32, 16, **kw)])

  def __call__(self, x):
    x = jax.nn.relu(self.hidden(x))
    x = jax.nn.relu(self.layers[0](x))
    return self.layers[1](x)


def make_masks(params, pattern, kernels=None):
  """Masks on every kernel, built on the matrices ``[K, N]`` of its layout
  (from ``kernels``, else ``[..., in, out]``)."""

  def mask(path, w):
    path = js.masking.path_str(path)
    if path.split("/")[-1] != "kernel":
      return None
    layout = js.layout.leaf_layout(kernels, path, w.shape)
    scores = jnp.abs(w.astype(jnp.float32))
    return js.layout.on_matrices(
      lambda s: js.patterns.select(pattern, s, 0.5), layout, scores
    )

  return jax.tree_util.tree_map_with_path(mask, params)


def inputs(shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(1), shape, dtype)


class PackTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("nm24", js.NM(2, 4), kernels.PackedNM),
    ("block8", js.Block(8, 8), kernels.PackedBlock),
  )
  def test_pack_stores_the_masked_kernels(self, pattern, kind):
    model = LinenMLP()
    params = model.init(jax.random.key(0), inputs((2, 32)))["params"]
    masks = make_masks(params, pattern)
    packed = jsnn.pack(params, masks, pattern)
    self.assertIsInstance(packed["Dense_1"]["kernel"], kind)
    chex.assert_trees_all_equal(
      packed["Dense_1"]["bias"], params["Dense_1"]["bias"]
    )
    chex.assert_trees_all_equal(
      jsnn.unpack(packed), js.apply_masks(params, masks)
    )
    dense = sum(x.nbytes for x in jax.tree.leaves(params))
    self.assertLess(sum(x.nbytes for x in jax.tree.leaves(packed)), dense)

  def test_nm_pack_under_jit_equals_eager(self):
    model = LinenMLP()
    params = model.init(jax.random.key(0), inputs((2, 32)))["params"]
    masks = make_masks(params, js.NM(2, 4))
    jitted = jax.jit(lambda p, m: jsnn.pack(p, m, js.NM(2, 4)))
    chex.assert_trees_all_equal(
      jitted(params, masks), jsnn.pack(params, masks, js.NM(2, 4))
    )
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel.*outside jax.jit"):
      jax.jit(lambda p, m: jsnn.pack(p, m, js.Block(8, 8)))(params, masks)


class LinenTest(parameterized.TestCase):
  @parameterized.product(
    pattern=list(PATTERNS), dtype=list(DTYPES), jit=[False, True]
  )
  def test_mlp_matches_masked_dense(self, pattern, dtype, jit):
    pattern_, dtype_ = PATTERNS[pattern], DTYPES[dtype]
    model = LinenMLP(dtype=dtype_, param_dtype=dtype_)
    x = inputs((4, 32), dtype_)
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, pattern_)
    packed = jsnn.pack(params, masks, pattern_)
    run = lambda p, x: jsnn.apply(model, p, x)
    dense = lambda p, x: model.apply({"params": p}, x)
    if jit:
      run, dense = jax.jit(run), jax.jit(dense)
    y = run(packed, x)
    expected = dense(js.apply_masks(params, masks), x)
    self.assertEqual(y.dtype, expected.dtype)
    rtol, atol = TOL[dtype]
    chex.assert_trees_all_close(y, expected, rtol=rtol, atol=atol)

  def test_float32_input_promotes_bfloat16_params(self):
    model = LinenMLP(param_dtype=jnp.bfloat16)  # dtype=None: promote
    x = inputs((4, 32))
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, js.NM(2, 4))
    y = jsnn.apply(model, jsnn.pack(params, masks, js.NM(2, 4)), x)
    expected = model.apply({"params": js.apply_masks(params, masks)}, x)
    self.assertEqual(y.dtype, jnp.float32)
    chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(("nm24", "nm24"), ("block8", "block8"))
  def test_dense_general_matches_masked_dense(self, pattern):
    pattern = PATTERNS[pattern]
    model = Attention()
    x = inputs((2, 8, 32))
    params = model.init(jax.random.key(0), x)["params"]
    kernels = js.find_kernels(
      lambda p, x: model.apply({"params": p}, x), params, x
    )
    self.assertEqual(kernels["out/kernel"].layout.contract, (0, 1))
    self.assertEqual(kernels["query/kernel"].layout.contract, (0,))
    masks = make_masks(params, pattern, kernels)
    packed = jsnn.pack(params, masks, pattern, kernels=kernels)
    self.assertIsInstance(packed["query"]["kernel"], jsnn.PackedKernel)
    self.assertEqual(packed["out"]["kernel"].packed.shape, (32, 32))
    self.assertEqual(packed["mix"]["kernel"].shape, (32, 16))
    y = jax.jit(lambda p, x: jsnn.apply(model, p, x))(packed, x)
    expected = model.apply({"params": js.apply_masks(params, masks)}, x)
    chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(
      jsnn.unpack(packed), js.apply_masks(params, masks)
    )

  def test_other_collections_and_mutable(self):
    # Before, js.nn.apply took {"params": ...} only: a model with
    # batch_stats could not run packed without hand-written code.
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(16)(nn.relu(x))

    model = Net()
    x = inputs((3, 32))
    variables = model.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    masks = make_masks(params, js.NM(2, 4))
    packed = jsnn.pack(params, masks, js.NM(2, 4))
    masked = {"params": js.apply_masks(params, masks), "batch_stats": stats}
    for train in (False, True):
      run = jax.jit(
        lambda p, x, train=train: jsnn.apply(
          model,
          p,
          x,
          variables={"batch_stats": stats},
          train=train,
          mutable=["batch_stats"] if train else False,
          impl="reference",
        )
      )
      expected = model.apply(
        masked, x, train=train, mutable=["batch_stats"] if train else False
      )
      chex.assert_trees_all_close(
        run(packed, x), expected, rtol=1e-5, atol=1e-5
      )
    # The same model as a function of its params.
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, False)
    chex.assert_trees_all_close(
      jsnn.apply(fn, packed, x),
      model.apply(masked, x, train=False),
      rtol=1e-5,
      atol=1e-5,
    )

  def test_partly_packed_params(self):
    model = LinenMLP()
    x = inputs((3, 32))
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, js.NM(2, 4))
    masks["Dense_2"]["kernel"] = None  # the last layer stays dense
    packed = jsnn.pack(params, masks, js.NM(2, 4))
    self.assertIs(packed["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    expected = model.apply({"params": js.apply_masks(params, masks)}, x)
    chex.assert_trees_all_close(
      jsnn.apply(model, packed, x), expected, rtol=1e-5, atol=1e-5
    )

  def test_for_batch_packs_only_where_the_measured_table_says_it_pays(self):
    model = LinenMLP()
    x = inputs((3, 32))
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, js.NM(2, 4))

    def case(batch, packed_s):
      seconds = {"jnp.dot": 1.0, "reference": packed_s, "dense": 3.0}
      return dict(
        op="nm", pattern="2:4", k=32, n=32, batch=batch, density=0.5,
        seconds=seconds, best="reference",
      )  # fmt: skip

    # Measured: at batch 1 a packed matmul took 0.5 s against jnp.dot's 1 s,
    # at batch 4096 it took 2 s.
    table = {"cpu": {"entries": [case(1, 0.5), case(4096, 2.0)]}}
    with mock.patch.object(kernels.ops, "_tables", lambda: table):
      small = jsnn.pack(params, masks, js.NM(2, 4), for_batch=2)
      large = jsnn.pack(params, masks, js.NM(2, 4), for_batch=2048)
    masked = js.apply_masks(params, masks)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
      self.assertTrue(jsnn.is_packed(small[name]["kernel"]), name)
      self.assertFalse(jsnn.is_packed(large[name]["kernel"]), name)
      np.testing.assert_array_equal(
        large[name]["kernel"], masked[name]["kernel"]
      )
    expected = model.apply({"params": masked}, x)
    for packed in (small, large):
      chex.assert_trees_all_close(
        jsnn.apply(model, packed, x), expected, rtol=1e-5, atol=1e-5
      )


class NnxTest(parameterized.TestCase):
  @parameterized.product(pattern=list(PATTERNS), dtype=list(DTYPES))
  def test_mlp_matches_masked_dense(self, pattern, dtype):
    pattern_, dtype_ = PATTERNS[pattern], DTYPES[dtype]
    model = NnxMLP(nnx.Rngs(0), dtype=dtype_, param_dtype=dtype_)
    x = inputs((4, 32), dtype_)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = make_masks(params, pattern_)
    nnx.update(model, js.apply_masks(params, masks))
    expected = model(x)
    jsnn.pack_nnx(model, masks, pattern_)
    self.assertIsInstance(model.hidden, jsnn.PackedLinear)
    self.assertIsInstance(model.layers[1], jsnn.PackedLinear)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    self.assertEqual(y.dtype, expected.dtype)
    rtol, atol = TOL[dtype]
    chex.assert_trees_all_close(y, expected, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(model(x), y, rtol=rtol, atol=atol)

  def test_masks_from_nnx_optimizer_state(self):
    import optax

    model = NnxMLP(nnx.Rngs(0))
    method = js.magnitude_pruning(0.5, pattern=js.NM(2, 4), update_every=1)
    optimizer = nnx.Optimizer(
      model, js.sparsify(optax.sgd(1e-2), method), wrt=nnx.Param
    )
    x = inputs((4, 32))
    optimizer.update(model, nnx.grad(lambda m: m(x).sum())(model))
    expected = model(x)  # params are already masked
    jsnn.pack_nnx(model, js.masks(optimizer.opt_state), js.NM(2, 4))
    self.assertIsInstance(model.layers[0], jsnn.PackedLinear)
    chex.assert_trees_all_close(model(x), expected, rtol=1e-5, atol=1e-5)

  def test_mask_on_a_non_linear_param_names_it(self):
    class WithNorm(nnx.Module):
      def __init__(self, rngs):
        self.linear = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)

    model = WithNorm(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = jax.tree.map(lambda p: None, params)
    masks["norm"]["scale"] = jnp.ones(8, bool)
    with self.assertRaisesRegex(ValueError, "norm/scale"):
      jsnn.pack_nnx(model, masks, js.NM(2, 4))
    masks = {"linear": {"kernel": jnp.ones((8, 8), bool)}}
    with self.assertRaisesRegex(ValueError, "does not match"):
      jsnn.pack_nnx(model, masks, js.NM(2, 4))


class ErrorTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.model = LinenMLP()
    self.x = inputs((2, 32))
    self.params = self.model.init(jax.random.key(0), self.x)["params"]

  def test_mask_not_following_nm_names_the_leaf(self):
    masks = make_masks(self.params, js.NM(2, 4))
    masks["Dense_1"]["kernel"] = (
      masks["Dense_1"]["kernel"].at[0, 0].set(~masks["Dense_1"]["kernel"][0, 0])
    )
    with self.assertRaisesRegex(ValueError, "Dense_1/kernel.*exactly 2 of"):
      jsnn.pack(self.params, masks, js.NM(2, 4))

  def test_mask_not_following_block_names_the_leaf(self):
    masks = make_masks(self.params, js.Unstructured())
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel.*8x8 block"):
      jsnn.pack(self.params, masks, js.Block(8, 8))

  @parameterized.named_parameters(
    ("unstructured", js.Unstructured(), "no packed format"),
    ("channel", js.Channel(), "no packed format"),
    ("nm_axis", js.NM(2, 4, axis=-1), "input axis"),
  )
  def test_wrong_pattern(self, pattern, message):
    masks = make_masks(self.params, js.NM(2, 4))
    with self.assertRaisesRegex(ValueError, message):
      jsnn.pack(self.params, masks, pattern)

  def test_mask_tree_not_matching_params(self):
    masks = make_masks(self.params, js.NM(2, 4))
    del masks["Dense_2"]
    with self.assertRaisesRegex(ValueError, "js.nn.pack: .*structure"):
      jsnn.pack(self.params, masks, js.NM(2, 4))

  def test_mask_on_a_leaf_the_model_does_not_multiply_by(self):
    kernels = js.find_kernels(
      lambda p, x: self.model.apply({"params": p}, x), self.params, self.x
    )
    masks = make_masks(self.params, js.NM(2, 4))
    masks["Dense_0"]["bias"] = jnp.ones(32, bool)
    with self.assertRaisesRegex(ValueError, "Dense_0/bias.*dense"):
      jsnn.pack(self.params, masks, js.NM(2, 4), kernels=kernels)

  def test_mask_on_bias_names_the_leaf(self):
    masks = make_masks(self.params, js.NM(2, 4))
    masks["Dense_0"]["bias"] = jnp.ones(32, bool)
    with self.assertRaisesRegex(ValueError, "Dense_0/bias.*not a kernel"):
      jsnn.pack(self.params, masks, js.NM(2, 4))

  def test_shape_not_divisible_names_the_leaf(self):
    params = {"Dense_0": {"kernel": jnp.ones((6, 8))}}
    masks = {"Dense_0": {"kernel": jnp.ones((6, 8), bool)}}
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel.*K=6"):
      jsnn.pack(params, masks, js.NM(2, 4))
    with self.assertRaisesRegex(ValueError, "Dense_0/kernel.*not tiled"):
      jsnn.pack(params, masks, js.Block(4, 4))

  def test_dense_general_packed_without_its_layout(self):
    model = Attention()
    x = inputs((2, 8, 32))
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, js.NM(2, 4))  # [..., in, out] layouts
    packed = jsnn.pack(params, masks, js.NM(2, 4))  # query as [32 * 4, 8]
    with self.assertRaisesRegex(
      ValueError,
      r"query/kernel was packed with contraction axes \(0, 1\)"
      r".*contracts \(0,\).*find_kernels",
    ):
      jsnn.apply(model, packed, x)

  def test_conv_kernels_are_refused_with_the_leaf_named(self):
    # Before, packing a conv kernel said "input size K=3 is not a multiple
    # of m=4"; now the layout says it is a convolution.
    model = nn.Conv(8, (3, 3))
    x = inputs((1, 6, 6, 4))
    params = model.init(jax.random.key(0), x)["params"]
    masks = {"kernel": jnp.ones((3, 3, 4, 8), bool), "bias": None}
    kernels = js.find_kernels(
      lambda p, x: model.apply({"params": p}, x), params, x
    )
    with self.assertRaisesRegex(ValueError, "kernel: is a convolution"):
      jsnn.pack(params, masks, js.NM(2, 4), kernels=kernels)
    # Packed without the model's layouts, the conv refuses it when run.
    packed = jsnn.pack(params, masks, js.Block(4, 8))
    with self.assertRaisesRegex(
      ValueError, "kernel is packed .*conv_general_dilated"
    ):
      jsnn.apply(model, packed, x)


def disk_bytes(directory):
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )


class CheckpointTest(absltest.TestCase):
  def test_packed_checkpoint_is_smaller_and_restores(self):
    model = LinenMLP(param_dtype=jnp.bfloat16, features=(256, 256, 16))
    x = inputs((2, 256))
    params = model.init(jax.random.key(0), x)["params"]
    masks = make_masks(params, js.NM(2, 4))
    dense = js.apply_masks(params, masks)
    packed = jsnn.pack(params, masks, js.NM(2, 4))
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    sizes = {}
    with ocp.StandardCheckpointer() as checkpointer:
      for name, tree in (("dense", dense), ("packed", packed)):
        checkpointer.save(os.path.join(tmp.name, name), tree)
      checkpointer.wait_until_finished()
      sizes = {
        name: disk_bytes(os.path.join(tmp.name, name))
        for name in ("dense", "packed")
      }
      # The restore target from shapes alone: pack under eval_shape.
      target = jax.eval_shape(
        lambda p, m: jsnn.pack(p, m, js.NM(2, 4)),
        jax.eval_shape(model.init, jax.random.key(0), x)["params"],
        jax.eval_shape(lambda: masks),
      )
      restored = checkpointer.restore(os.path.join(tmp.name, "packed"), target)
    # Default orbax compresses (zstd): the zeros of the dense kernels
    # compress too, so packed saves less than the byte ratio, but saves.
    self.assertLess(sizes["packed"], sizes["dense"])
    chex.assert_trees_all_equal(restored, packed)
    self.assertIsInstance(restored["Dense_0"]["kernel"], kernels.PackedNM)
    chex.assert_trees_all_equal(
      jsnn.apply(model, restored, x), jsnn.apply(model, packed, x)
    )

  def test_nnx_packed_state_round_trip(self):
    model = NnxMLP(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jsnn.pack_nnx(model, make_masks(params, js.Block(8, 8)), js.Block(8, 8))
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    path = os.path.join(tmp.name, "state")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, nnx.state(model))
      checkpointer.wait_until_finished()
      graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model))
      restored = nnx.merge(graphdef, checkpointer.restore(path, abstract))
    self.assertIsInstance(restored.layers[0], jsnn.PackedLinear)
    chex.assert_trees_all_equal(nnx.state(restored), nnx.state(model))
    x = inputs((2, 32))
    chex.assert_trees_all_equal(restored(x), model(x))

  def test_uncompressed_checkpoint_bytes_follow_the_packed_bytes(self):
    params = {
      "Dense_0": {
        "kernel": inputs((512, 256), jnp.bfloat16),
        "bias": jnp.zeros(256, jnp.bfloat16),
      }
    }
    masks = make_masks(params, js.NM(2, 4))
    dense = js.apply_masks(params, masks)
    packed = jsnn.pack(params, masks, js.NM(2, 4))
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
      for name, tree in (("dense", dense), ("packed", packed)):
        path = os.path.join(tmp.name, name)
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
    on_disk = {
      name: disk_bytes(os.path.join(tmp.name, name))
      for name in ("dense", "packed")
    }
    in_memory = {
      name: sum(x.nbytes for x in jax.tree.leaves(tree))
      for name, tree in (("dense", dense), ("packed", packed))
    }
    # Kernel bytes: 2:4 bfloat16 with K % 16 == 0 is 0.5625 of dense.
    kernel = kernels.packed_nbytes(packed["Dense_0"]["kernel"])
    self.assertEqual(kernel, 0.5625 * 512 * 256 * 2)
    for name in on_disk:  # every array byte, plus a few KB of metadata
      self.assertBetween(on_disk[name] - in_memory[name], 0, 32_000)
    self.assertLess(on_disk["packed"] / on_disk["dense"], 0.62)


if __name__ == "__main__":
  absltest.main()
