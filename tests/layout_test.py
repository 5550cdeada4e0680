"""Kernel layouts from the model, and the failures they fixed.

Each test here reproduces a failure seen when jaxsparse met model code
written elsewhere (attention kernels, scanned stacks, nnx, Einsum,
transposed storage, ``multi_transform``); before the layouts, each one
crashed, gave a wrong result silently, or raised an unhelpful error.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

import jaxsparse as js
import jaxsparse.nn as jsnn
from jaxsparse import masking, oneshot


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=4)(x)


def attention():
  model = Attention()
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  params = model.init(jax.random.key(1), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, x


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return x + nn.Dense(8)(jnp.tanh(nn.Dense(16)(x))), None

    stack = nn.scan(
      nn.remat(Layer),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=4,
    )
    return stack(name="layers")(x, None)[0]


def scanned():
  model = Scanned()
  x = jax.random.normal(jax.random.key(0), (5, 8))
  params = model.init(jax.random.key(1), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, x


def leaf(tree, path):
  return dict(
    (masking.path_str(k), v)
    for k, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None
    )[0]
  )[path]


class FindKernelsTest(absltest.TestCase):
  def test_roles_and_layouts(self):
    apply_fn, params, x = attention()
    found = js.find_kernels(apply_fn, params, x)
    prefix = "MultiHeadDotProductAttention_0/"
    self.assertEqual(found[prefix + "query/kernel"].layout, js.Layout((0,)))
    self.assertEqual(found[prefix + "out/kernel"].layout, js.Layout((0, 1)))
    self.assertEqual(found[prefix + "query/bias"].role, "dense")
    self.assertIn("out/kernel", repr(found))

  def test_transposed_storage_like_hf_conv1d(self):
    # Hugging Face's FlaxConv1D stores [out, in] and multiplies by its
    # transpose: the contraction is axis 1, and N:M groups run along it.
    params = {
      "c_attn": {"kernel": jax.random.normal(jax.random.key(0), (12, 8))}
    }
    apply_fn = lambda p, x: x @ p["c_attn"]["kernel"].T
    x = jnp.ones((3, 8))
    found = js.find_kernels(apply_fn, params, x)
    self.assertEqual(found["c_attn/kernel"].layout, js.Layout((1,)))
    tx = js.magnitude_pruning(pattern=js.NM(2, 4), where=found)
    masks = js.masks(tx.update(params, tx.init(params), params)[1])
    groups = np.asarray(masks["c_attn"]["kernel"]).reshape(12, 2, 4)
    np.testing.assert_array_equal(groups.sum(-1), 2)  # along the inputs

  def test_embeddings_tied_or_not_and_position_tables_stay_dense(self):
    class LM(nn.Module):
      @nn.compact
      def __call__(self, ids):
        embed = nn.Embed(16, 8)
        pos = self.param("pos_embedding", nn.initializers.ones, (1, 4, 8))
        h = embed(ids) + pos
        return embed.attend(nn.Dense(8)(h))

    model = LM()
    ids = jnp.zeros((2, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    found = js.find_kernels(
      lambda p, x: model.apply({"params": p}, x), params, ids
    )
    self.assertEqual(found["Embed_0/embedding"].role, "embedding")
    self.assertEqual(found["pos_embedding"].role, "dense")
    self.assertEqual(found.selected, ("Dense_0/kernel",))

  def test_exclude_and_where_from_other_params(self):
    apply_fn, params, x = attention()
    found = js.find_kernels(apply_fn, params, x)
    fewer = found.exclude("out/kernel$")
    self.assertLen(fewer.selected, 3)
    with self.assertRaisesRegex(ValueError, "matches no kernel"):
      found.exclude("nothing")
    tx = js.magnitude_pruning(0.5, where=found)
    with self.assertRaisesRegex(ValueError, "js.Kernels found on other"):
      tx.init({"w": jnp.ones((4, 4))})

  def test_layouts_given_by_hand(self):
    params = {"attn": {"out": jnp.ones((4, 8, 32))}, "b": jnp.ones(4)}
    guessed = js.Kernels.guess(params)
    self.assertEqual(guessed.selected, ("attn/out",))
    self.assertEqual(guessed["attn/out"].layout, js.Layout((0, 1)))
    fixed = guessed.with_layouts({"attn/out": js.Layout((1,), (0,))})
    tx = js.magnitude_pruning(0.5, where=fixed)
    masks = js.masks(tx.update(params, tx.init(params), params)[1])
    # Four matrices [8, 32], each keeping exactly half.
    np.testing.assert_array_equal(masks["attn"]["out"].sum((1, 2)), 128)
    with self.assertRaisesRegex(ValueError, "not a params path"):
      guessed.with_layouts({"nope": js.Layout((0,))})


class AttentionKernelsTest(absltest.TestCase):
  def test_sparsegpt_prunes_multi_axis_dense_general(self):
    # Seen: ValueError "Incompatible shapes for broadcasting: shapes=[(32,
    # 32), (32, 4, 8)]" for any DenseGeneral kernel with more than 2 axes.
    model = nn.DenseGeneral(features=(4, 8))
    x = jax.random.normal(jax.random.key(0), (16, 32))
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    for pattern, sparsity in ((None, 0.5), (js.NM(2, 4), None)):
      result = oneshot.prune(
        apply_fn,
        params,
        [x],
        oneshot.sparsegpt(),
        sparsity=sparsity,
        pattern=pattern,
      )
      mask = np.asarray(result.masks["kernel"]).reshape(32, 32)
      np.testing.assert_array_equal(mask.sum(0), 16)
      if pattern is not None:
        np.testing.assert_array_equal(mask.reshape(8, 4, 32).sum(1), 2)
      self.assertLess(result.layers["kernel"].error, 1.0)

  def test_nm_training_summary_one_shot_and_packing_agree(self):
    # Seen: NM(2, 4, axis=-2) grouped a query kernel [embed, heads,
    # head_dim] along heads; summary said ok, pack refused, and one-shot
    # masks (along embed) were flagged by summary.
    apply_fn, params, x = attention()
    found = js.find_kernels(apply_fn, params, x)
    tx = js.magnitude_pruning(pattern=js.NM(2, 4), where=found)
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    masks = js.masks(state)
    query = "MultiHeadDotProductAttention_0/query/kernel"
    groups = np.asarray(leaf(masks, query)).reshape(8, 4, 4, 8)  # [e/4,4,h,d]
    np.testing.assert_array_equal(groups.sum(1), 2)  # along embed
    out = "MultiHeadDotProductAttention_0/out/kernel"
    rows = np.asarray(leaf(masks, out)).reshape(32, 32)  # [(h, d), embed]
    np.testing.assert_array_equal(rows.reshape(8, 4, 32).sum(1), 2)
    pruned = js.apply_masks(params, masks)
    report = js.summary(pruned, masks, js.NM(2, 4), kernels=found)
    self.assertTrue(all(r.pattern_ok for r in report.records), str(report))
    packed = jsnn.pack(pruned, masks, js.NM(2, 4), kernels=found)
    np.testing.assert_allclose(
      jsnn.apply(apply_fn, packed, x), apply_fn(pruned, x), atol=1e-5
    )
    result = oneshot.prune(
      apply_fn, params, [x], oneshot.wanda(), pattern=js.NM(2, 4)
    )
    report = js.summary(result.params, result.masks, js.NM(2, 4), kernels=found)
    self.assertTrue(all(r.pattern_ok for r in report.records), str(report))
    # Without the model the layout is guessed as [..., in, out]: the
    # one-shot masks then fail the check, which says so.
    records = {
      r.path: r
      for r in js.summary(result.params, result.masks, js.NM(2, 4)).records
    }
    self.assertFalse(records[query].pattern_ok)


class ScannedStackTest(absltest.TestCase):
  def test_default_where_keeps_stacked_biases_and_tables_dense(self):
    # Seen: the default selected stacked biases [layers, features] and
    # learned position tables [1, L, D].
    _, params, _ = scanned()
    params = {
      **params,
      "posembed_output": {"pos_embedding": jnp.ones((1, 4, 8))},
    }
    chosen = masking.resolve_where(None, params, "test")
    selected = [
      p
      for p, c in zip(masking.leaf_paths(params), jax.tree.leaves(chosen))
      if c
    ]
    self.assertEqual(
      selected, ["layers/Dense_0/kernel", "layers/Dense_1/kernel"]
    )

  def test_counts_and_erk_per_layer_of_the_stack(self):
    # Seen: sparsity was allocated over the whole stack, not per layer.
    apply_fn, params, x = scanned()
    found = js.find_kernels(apply_fn, params, x)
    self.assertEqual(
      found["layers/Dense_0/kernel"].layout, js.Layout((1,), (0,))
    )
    scores = jax.tree.map(jnp.abs, params)
    scores = jax.tree.map(
      lambda s: (
        s * jnp.arange(1, 5, dtype=s.dtype).reshape(-1, *[1] * (s.ndim - 1))
      ),
      scores,
    )  # later layers score higher: a whole-stack top-k keeps them only
    specs = masking.leaf_specs(found, params, "test")
    masks = masking.masks_from_scores(
      jax.tree.map(lambda s, c: s if c else None, scores, specs),
      0.75,
      pattern=specs,
      allocation=js.uniform(),
    )
    kept = np.asarray(masks["layers"]["Dense_0"]["kernel"]).sum((1, 2))
    np.testing.assert_array_equal(kept, 8 * 16 // 4)
    # ERK over the stack equals ERK over the same layers unstacked.
    stacked = js.layer_sparsities(
      js.erk(), [(8, 16), (16, 8)], 0.8, sizes=[4 * 128, 4 * 128]
    )
    unstacked = js.layer_sparsities(
      js.erk(), [(8, 16)] * 4 + [(16, 8)] * 4, 0.8
    )
    np.testing.assert_allclose(stacked[0], unstacked[0], rtol=1e-6)
    np.testing.assert_allclose(stacked[1], unstacked[4], rtol=1e-6)

  def test_one_shot_prunes_a_scanned_remat_stack_layer_by_layer(self):
    # Seen: oneshot.prune refused scanned and remat'd models.
    apply_fn, params, x = scanned()
    result = oneshot.prune(
      apply_fn, params, [x], oneshot.sparsegpt(), sparsity=0.5
    )
    self.assertEqual(
      [r.group for r in result.layers.values()],
      [f"layers[{i}]" for i in range(4) for _ in range(2)],
    )
    for name in ("Dense_0", "Dense_1"):
      for i in range(4):
        mask = np.asarray(result.masks["layers"][name]["kernel"][i])
        np.testing.assert_array_equal(mask.sum(0), mask.shape[0] // 2)


class OtherModelsTest(parameterized.TestCase):
  def test_one_shot_on_nnx_with_einsum(self):
    # Seen: "`where` selects no param" on nnx models and Einsum kernels.
    class Model(nnx.Module):
      def __init__(self, rngs):
        self.up = nnx.Einsum("btd,dnh->btnh", (16, 2, 8), rngs=rngs)
        self.down = nnx.Linear(16, 16, rngs=rngs)

      def __call__(self, x):
        h = jnp.tanh(self.up(x)).reshape(*x.shape[:2], 16)
        return self.down(h)

    graphdef, state = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(jax.random.key(1), (2, 4, 16))
    result = oneshot.prune(apply_fn, state, [x], oneshot.wanda(), sparsity=0.5)
    self.assertEqual(set(result.layers), {"up/kernel", "down/kernel"})
    report = js.summary(
      result.params, result.masks, kernels=js.find_kernels(apply_fn, state, x)
    )
    self.assertTrue(all(r.pattern_ok for r in report.records))

  def test_blocks_under_one_top_level_module(self):
    # Seen: blocks under `decoder/...` made one group, so sequential
    # pruning silently pruned everything from the dense model.
    self.assertEqual(
      oneshot.block_of("decoder/layers_3/mlp/kernel"), "decoder/layers_3"
    )
    self.assertEqual(
      oneshot.block_of("bert/encoder/layer/0/q/kernel"), "bert/encoder/layer/0"
    )
    self.assertEqual(oneshot.block_of("head/kernel"), "head")

    class Decoder(nn.Module):
      @nn.compact
      def __call__(self, x):
        for i in range(3):
          x = x + nn.Dense(8, name=f"layers_{i}")(x)
        return x

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        return Decoder(name="decoder")(x)

    model = Model()
    x = jnp.ones((4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    result = oneshot.prune(
      lambda p, x: model.apply({"params": p}, x),
      params,
      [x],
      oneshot.magnitude(),
      sparsity=0.5,
    )
    self.assertEqual(
      [r.group for r in result.layers.values()],
      ["decoder/layers_0", "decoder/layers_1", "decoder/layers_2"],
    )


class SmallErrorsTest(absltest.TestCase):
  def test_multi_transform_masks(self):
    # Seen: two sparsify partitions -> pytree error on MaskedNode; one
    # sparsify + one plain -> MaskedNode leaves summary/apply_masks refused.
    params = {k: {"kernel": jnp.arange(16.0).reshape(4, 4)} for k in "abc"}
    labels = {"a": {"kernel": "x"}, "b": {"kernel": "y"}, "c": {"kernel": "z"}}
    tx = optax.multi_transform(
      {
        "x": js.sparsify(optax.sgd(0.0), js.magnitude_pruning(0.5)),
        "y": optax.chain(optax.sgd(0.0), js.magnitude_pruning(0.75)),
        "z": optax.sgd(0.0),
      },
      labels,
    )
    updates, state = tx.update(params, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    masks = js.masks(state)
    self.assertIsNone(masks["c"]["kernel"])
    self.assertEqual(int(masks["a"]["kernel"].sum()), 8)
    self.assertEqual(int(masks["b"]["kernel"].sum()), 4)
    jax.tree.map(np.testing.assert_array_equal, js.apply_masks(new, masks), new)
    self.assertTrue(all(r.pattern_ok for r in js.summary(new, masks).records))

  def test_summary_of_nnx_state_with_optimizer_masks(self):
    class Model(nnx.Module):
      def __init__(self, rngs):
        self.lin = nnx.Linear(8, 4, rngs=rngs)

      def __call__(self, x):
        return self.lin(x)

    model = Model(nnx.Rngs(0))
    opt = nnx.Optimizer(
      model,
      js.sparsify(optax.sgd(0.1), js.magnitude_pruning(0.5)),
      wrt=nnx.Param,
    )
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 8)))))(model)
    opt.update(model, grads)
    report = js.summary(nnx.state(model, nnx.Param), js.masks(opt.opt_state))
    records = {r.path: r for r in report.records}
    self.assertEqual(records["lin/kernel"].density, 0.5)
    self.assertTrue(all(r.pattern_ok for r in report.records))

  def test_messages(self):
    with self.assertRaisesRegex(ValueError, "n is the number kept"):
      js.magnitude_pruning(pattern=js.NM(0, 4))
    with self.assertRaisesRegex(ValueError, r"did you mean NM\(2, 4\)"):
      js.magnitude_pruning(pattern=js.NM(4, 2))
    apply_fn, params, x = attention()
    with self.assertRaisesRegex(ValueError, "one array of shape"):
      oneshot.prune(apply_fn, params, x, oneshot.wanda(), sparsity=0.5)
    tx = js.magnitude_pruning(0.5)
    state = tx.init(params)
    with self.assertRaisesRegex(
      ValueError, r"other leaves than init.*params/.*variables\['params'\]"
    ):
      tx.update({"params": params}, state, {"params": params})

  def test_an_empty_layer_is_reported(self):
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4)) * 10}
    masks = {"a": jnp.zeros((4, 4), bool), "b": jnp.ones((4, 4), bool)}
    with self.assertWarnsRegex(UserWarning, r"\['a'\] keep no weight"):
      js.summary(js.apply_masks(params, masks), masks)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      js.summary(params, {"a": None, "b": masks["b"]})


if __name__ == "__main__":
  absltest.main()
