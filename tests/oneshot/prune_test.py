"""The one-shot driver: sequential statistics, outputs and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

import jaxsparse as js
from jaxsparse import oneshot
from jaxsparse.patterns import follows
from tests import oneshot as tiny

GROUPS = {
  "Block_0": tiny.KERNELS[:2],
  "Block_1": tiny.KERNELS[2:4],
  "head": tiny.KERNELS[4:],
}


def wanda_with_gram():
  """Wanda that also gathers ``XᵀX``, so the driver reports errors."""
  return oneshot.OneShotMethod("wanda", True, oneshot.wanda().prune_layer)


def replace(params, new, paths):
  """``params`` with the leaves at ``paths`` taken from ``new``."""
  return jax.tree_util.tree_map_with_path(
    lambda p, a, b: b if js.masking.path_str(p) in paths else a, params, new
  )


class PruneTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params, cls.xs = tiny.setup()
    cls.sequential = oneshot.prune(
      tiny.apply_fn, cls.params, cls.xs, wanda_with_gram(), sparsity=0.5
    )

  def test_outputs_masks_and_params(self):
    result = self.sequential
    self.assertEqual(list(result.layers), tiny.KERNELS)
    flat_masks = {
      js.masking.path_str(p): m
      for p, m in jax.tree_util.tree_flatten_with_path(
        result.masks, is_leaf=lambda x: x is None
      )[0]
    }
    for path, mask in flat_masks.items():
      if path in tiny.KERNELS:
        w = tiny.kernel(self.params, path)
        new = tiny.kernel(result.params, path)
        self.assertEqual(mask.dtype, jnp.bool_)
        np.testing.assert_array_equal(new, np.where(mask, w, 0))
        np.testing.assert_array_equal(
          mask.sum(0), np.full(w.shape[1], w.shape[0] // 2)
        )
        self.assertEqual(result.layers[path].sparsity, 0.5)
        self.assertEqual(result.layers[path].target, 0.5)
      else:
        self.assertIsNone(mask, path)
        np.testing.assert_array_equal(
          tiny.kernel(result.params, path), tiny.kernel(self.params, path)
        )
    chex_like = jax.tree.map(lambda a: (a.shape, a.dtype), result.params)
    self.assertEqual(
      chex_like, jax.tree.map(lambda a: (a.shape, a.dtype), self.params)
    )
    # The mask tree plugs into jaxsparse's mask utilities.
    pruned = js.apply_masks(self.params, result.masks)
    jax.tree.map(np.testing.assert_array_equal, pruned, result.params)

  def test_each_group_sees_the_earlier_groups_pruned(self):
    # Reference: numpy Wanda on activations of a model in which exactly the
    # earlier groups carry the driver's pruned kernels.
    pruned_before: list[str] = []
    for group, paths in GROUPS.items():
      partial = replace(self.params, self.sequential.params, pruned_before)
      inputs = tiny.reference_inputs(partial, self.xs)
      for path in paths:
        with self.subTest(path):
          w = tiny.kernel(self.params, path)
          x = inputs[path]
          expected = tiny.wanda_mask(w, x, 0.5)
          mask = tiny.leaf(self.sequential.masks, path)
          np.testing.assert_array_equal(mask, expected)
          self.assertEqual(self.sequential.layers[path].group, group)
          delta = w - np.where(expected, w, 0)
          error = np.sum((x @ delta) ** 2) / np.sum((x @ w) ** 2)
          np.testing.assert_allclose(
            self.sequential.layers[path].error, error, rtol=1e-4
          )
      pruned_before += paths

  def test_non_sequential_uses_dense_statistics(self):
    result = oneshot.prune(
      tiny.apply_fn,
      self.params,
      self.xs,
      oneshot.wanda(),
      sparsity=0.5,
      sequential=False,
    )
    inputs = tiny.reference_inputs(self.params, self.xs)
    differs = []
    for path in tiny.KERNELS:
      expected = tiny.wanda_mask(
        tiny.kernel(self.params, path), inputs[path], 0.5
      )
      new = tiny.kernel(result.params, path)
      mask = new != 0
      np.testing.assert_array_equal(mask, expected)
      # Every method reports its layers' relative reconstruction error.
      x, w = inputs[path], tiny.kernel(self.params, path)
      error = np.sum((x @ w - x @ new) ** 2) / np.sum((x @ w) ** 2)
      np.testing.assert_allclose(result.layers[path].error, error, rtol=1e-4)
      differs.append(
        not np.array_equal(mask, tiny.kernel(self.sequential.params, path) != 0)
      )
    # The first group sees the same inputs either way; later ones do not.
    self.assertEqual(differs[:2], [False, False])
    self.assertTrue(any(differs[2:]))

  def test_one_group_equals_non_sequential(self):
    kwargs = dict(sparsity=0.5, where=r"Block_.*kernel")
    one = oneshot.prune(
      tiny.apply_fn,
      self.params,
      self.xs[:1],
      oneshot.wanda(),
      group=lambda path: "all",
      **kwargs,
    )
    dense = oneshot.prune(
      tiny.apply_fn,
      self.params,
      self.xs[:1],
      oneshot.wanda(),
      sequential=False,
      **kwargs,
    )
    self.assertEqual(list(one.layers), tiny.KERNELS[:4])
    self.assertEqual({r.group for r in one.layers.values()}, {"all"})
    jax.tree.map(np.testing.assert_array_equal, one.params, dense.params)

  def test_nm_pattern_and_bfloat16(self):
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), self.params)
    result = oneshot.prune(
      tiny.apply_fn,
      params,
      self.xs[:1],
      oneshot.magnitude(),
      pattern=js.NM(2, 4),
    )
    for path in tiny.KERNELS:
      new = tiny.kernel(result.params, path)
      self.assertTrue(follows(js.NM(2, 4), new != 0), path)
      self.assertEqual(result.layers[path].target, 0.5)
    self.assertEqual(
      jax.tree.map(lambda p: p.dtype, result.params),
      jax.tree.map(lambda p: p.dtype, params),
    )

  def test_default_where_skips_params_no_dense_layer_uses(self):
    params = {**self.params, "pos": jnp.ones((4, 16))}
    apply = lambda p, x: tiny.apply_fn(
      {k: v for k, v in p.items() if k != "pos"}, x + p["pos"][None]
    )
    result = oneshot.prune(
      apply, params, self.xs[:1], oneshot.magnitude(), sparsity=0.5
    )
    self.assertEqual(list(result.layers), tiny.KERNELS)
    self.assertIsNone(result.masks["pos"])
    np.testing.assert_array_equal(result.params["pos"], params["pos"])

  def check_driver_invariants(self, method):
    # Driver invariants only (each method's maths is tested with it):
    # exact count per output, zeros where the mask is False, a relative
    # reconstruction error reported for every layer.
    result = oneshot.prune(
      tiny.apply_fn, self.params, self.xs[:1], method, sparsity=0.5
    )
    for path in tiny.KERNELS:
      mask = tiny.leaf(result.masks, path)
      new = tiny.kernel(result.params, path)
      np.testing.assert_array_equal(new[~mask], 0)
      np.testing.assert_array_equal(mask.sum(0), mask.shape[0] // 2)
      error = result.layers[path].error
      self.assertTrue(0 < error < 1, (path, error))

  def test_sparsegpt_through_the_driver(self):
    self.check_driver_invariants(oneshot.sparsegpt())

  @pytest.mark.slow
  def test_dsnot_through_the_driver(self):
    self.check_driver_invariants(oneshot.dsnot())

  def test_dense_general_kernels_are_pruned_flattened(self):
    model = nn.DenseGeneral((5, 2), axis=(-2, -1))
    x = jax.random.normal(jax.random.key(0), (3, 4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    result = oneshot.prune(
      lambda p, x: model.apply({"params": p}, x),
      params,
      [x],
      oneshot.wanda(),
      sparsity=0.25,
    )
    w = np.asarray(params["kernel"], np.float64)
    expected = tiny.wanda_mask(
      w.reshape(24, 10), np.asarray(x, np.float64).reshape(3, 24), 0.25
    ).reshape(w.shape)
    np.testing.assert_array_equal(result.masks["kernel"], expected)
    np.testing.assert_array_equal(
      result.params["kernel"], np.where(expected, w, 0)
    )

  def test_errors(self):
    p, xs = self.params, self.xs[:1]
    call = lambda **kw: oneshot.prune(
      tiny.apply_fn,
      kw.pop("params", p),
      kw.pop("xs", xs),
      oneshot.wanda(),
      **kw,
    )
    cases = [
      (dict(sparsity=1.0), "sparsity=1.0"),
      (dict(sparsity=-0.1), "sparsity=-0.1"),
      (dict(), "pass sparsity="),
      (dict(sparsity=0.5, where="nothing"), "selects no param"),
      (dict(pattern=js.NM(2, 4), allocation=oneshot.owl()), "OWL"),
      (dict(sparsity=0.3, pattern=js.NM(2, 4)), "conflicts"),
      (dict(sparsity=0.5, pattern=js.Block(2, 2)), "Block"),
      (dict(sparsity=0.5, allocation="erk"), "allocation"),
      (dict(sparsity=0.5, xs=[]), "empty"),
      (dict(sparsity=0.5, xs=iter(xs)), "iterator"),
      (
        dict(
          sparsity=0.5,
          params={**p, "extra": {"kernel": jnp.ones((4, 4))}},
          where=js.default_where(),
        ),
        "extra/kernel",
      ),
      (dict(pattern=js.NM(2, 3)), "groups of 3"),
    ]
    for kwargs, message in cases:
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          call(**kwargs)


if __name__ == "__main__":
  absltest.main()
