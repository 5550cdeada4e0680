"""Selection (`where`), key paths, mask projection and `js.masks`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

import jaxsparse as js
from jaxsparse import masking


class Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Embed(10, 8)(x)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


class Nnx(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)


def chosen_paths(where, params):
  chosen = masking.resolve_where(where, params, "test")
  return [
    path
    for path, c in zip(masking.leaf_paths(params), jax.tree.leaves(chosen))
    if c
  ]


class WhereTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.linen = Linen().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))[
      "params"
    ]
    self.nnx = nnx.state(Nnx(nnx.Rngs(0)), nnx.Param)

  def test_paths_are_normalised(self):
    self.assertIn("Dense_0/kernel", masking.leaf_paths(self.linen))
    self.assertIn("hidden/kernel", masking.leaf_paths(self.nnx))

  def test_default_selects_kernels_only(self):
    self.assertEqual(
      chosen_paths(None, self.linen), ["Dense_0/kernel", "Dense_1/kernel"]
    )
    self.assertEqual(
      chosen_paths(None, self.nnx), ["hidden/kernel", "out/kernel"]
    )

  def test_exclude_first_and_last(self):
    where = js.default_where(exclude=("Dense_1",))
    self.assertEqual(chosen_paths(where, self.linen), ["Dense_0/kernel"])

  def test_regex_predicate_and_tree(self):
    self.assertEqual(
      chosen_paths(r"out/", self.nnx), ["out/bias", "out/kernel"]
    )
    self.assertEqual(
      chosen_paths(lambda path, leaf: leaf.shape == (16, 4), self.linen),
      ["Dense_1/kernel"],
    )
    tree = {"Dense_0": True, "Dense_1": False, "Embed_0": False}
    self.assertEqual(
      chosen_paths(tree, self.linen), ["Dense_0/bias", "Dense_0/kernel"]
    )

  def test_tree_that_does_not_match(self):
    with self.assertRaisesRegex(ValueError, "does not match the params"):
      masking.resolve_where({"nope": True}, self.linen, "test")


class MasksTest(parameterized.TestCase):
  def test_found_through_wrappers(self):
    params = {"w": jnp.arange(16.0).reshape(4, 4)}
    method = js.magnitude_pruning(0.5)
    for tx in [
      js.sparsify(optax.adam(1e-3), method),
      optax.chain(optax.adam(1e-3), method),
      optax.chain(optax.clip(1.0), js.sparsify(optax.sgd(0.1), method)),
      optax.inject_hyperparams(js.magnitude_pruning)(sparsity=0.5),
      optax.multi_transform({"a": method}, {"w": "a"}),
    ]:
      state = tx.init(params)
      self.assertEqual(js.masks(state)["w"].shape, (4, 4))

  def test_no_sparsity_state(self):
    with self.assertRaisesRegex(ValueError, "no sparsity state"):
      js.masks(optax.adam(1e-3).init({"w": jnp.ones(3)}))

  def test_apply_masks_and_mismatch(self):
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
    masks = {"a": jnp.array([[True, False], [False, True]]), "b": None}
    out = js.apply_masks(params, masks)
    np.testing.assert_array_equal(np.asarray(out["a"]), [[1, 0], [0, 1]])
    with self.assertRaisesRegex(
      ValueError, r"a: mask shape \(2,\) does not fit"
    ):
      js.apply_masks(params, {"a": jnp.ones(2, bool), "b": None})
    with self.assertRaisesRegex(
      ValueError, "does not have the params' structure"
    ):
      js.apply_masks(params, {"a": None})

  def test_projection_is_exact_in_bfloat16(self):
    p = jax.random.normal(jax.random.key(0), (64,)).astype(jnp.bfloat16)
    u = jax.random.normal(jax.random.key(1), (64,)).astype(jnp.bfloat16)
    m = jnp.arange(64) % 3 == 0
    new = optax.apply_updates(p, masking.project_updates(u, p, m))
    bits = np.asarray(new).view(np.uint16)
    self.assertTrue(np.all(bits[~np.asarray(m)] == 0))


if __name__ == "__main__":
  absltest.main()
