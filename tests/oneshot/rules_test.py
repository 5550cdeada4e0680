"""Magnitude and Wanda rules against their statement in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse import oneshot
from jaxsparse.patterns import follows
from tests.oneshot import wanda_mask


def layer(seed, shape=(24, 10), tokens=40):
  k1, k2 = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(k1, shape)
  # Feature scales spread over two decades so ‖x‖ matters.
  x = (
    jax.random.normal(k2, (tokens, shape[0]))
    * jnp.logspace(-1, 1, shape[0])[None]
  )
  stats = oneshot.LayerStatistics(
    jnp.float32(tokens), x.sum(0), (x * x).sum(0), None
  )
  return w, np.asarray(x, np.float64), stats


def nm_reference(scores, n, m):
  """Keep the n largest of each group of m rows, per column (stable)."""
  rows, cols = scores.shape
  groups = scores.reshape(rows // m, m, cols)
  order = np.argsort(-groups, axis=1, kind="stable")
  mask = np.zeros(groups.shape, bool)
  np.put_along_axis(mask, order[:, :n], True, axis=1)
  return mask.reshape(rows, cols)


class WandaTest(parameterized.TestCase):
  @parameterized.parameters(0.0, 0.25, 0.5, 0.9)
  def test_per_column_top_k_of_weight_times_input_norm(self, sparsity):
    w, x, stats = layer(0)
    new, mask = jax.jit(oneshot.wanda().prune_layer, static_argnums=(2, 3))(
      w, stats, sparsity, js.Unstructured()
    )
    expected = wanda_mask(np.asarray(w, np.float64), x, sparsity)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(new, np.where(expected, w, 0))
    kept = 24 - round(sparsity * 24)
    np.testing.assert_array_equal(mask.sum(0), np.full(10, kept))

  def test_differs_from_magnitude(self):
    w, _, stats = layer(1)
    _, wanda = oneshot.wanda().prune_layer(w, stats, 0.5, js.Unstructured())
    _, per_column_magnitude = oneshot.wanda().prune_layer(
      w, stats._replace(sq_sum=jnp.ones(24)), 0.5, js.Unstructured()
    )
    self.assertFalse(np.array_equal(wanda, per_column_magnitude))

  def test_ties_keep_an_exact_count(self):
    w = jnp.ones((8, 3))
    stats = oneshot.LayerStatistics(
      jnp.float32(1), jnp.zeros(8), jnp.ones(8), None
    )
    _, mask = oneshot.wanda().prune_layer(w, stats, 0.375, js.Unstructured())
    np.testing.assert_array_equal(mask.sum(0), [5, 5, 5])
    np.testing.assert_array_equal(mask[:5], True)  # ties to the lower row

  @parameterized.parameters((2, 4), (1, 4), (3, 8))
  def test_nm_along_the_reduction_axis(self, n, m):
    w, x, stats = layer(2)
    new, mask = oneshot.wanda().prune_layer(w, stats, 0.0, js.NM(n, m))
    scores = (
      np.abs(np.asarray(w, np.float64)) * np.sqrt((x * x).sum(0))[:, None]
    )
    np.testing.assert_array_equal(mask, nm_reference(scores, n, m))
    self.assertTrue(follows(js.NM(n, m), mask))
    np.testing.assert_array_equal(new, np.where(mask, w, 0))


class MagnitudeTest(parameterized.TestCase):
  @parameterized.parameters(0.1, 0.5, 0.8)
  def test_layer_wise_top_k_of_abs_weight(self, sparsity):
    w, _, stats = layer(3)
    new, mask = oneshot.magnitude().prune_layer(
      w, stats, sparsity, js.Unstructured()
    )
    a = np.abs(np.asarray(w)).ravel()
    kept = a.size - round(sparsity * a.size)
    expected = np.zeros(a.size, bool)
    expected[np.argsort(-a, kind="stable")[:kept]] = True
    np.testing.assert_array_equal(mask, expected.reshape(w.shape))
    np.testing.assert_array_equal(new, np.where(mask, w, 0))

  def test_nm(self):
    w, _, stats = layer(4)
    _, mask = oneshot.magnitude().prune_layer(w, stats, 0.5, js.NM(2, 4))
    np.testing.assert_array_equal(
      mask, nm_reference(np.abs(np.asarray(w)), 2, 4)
    )

  def test_unsupported_pattern_is_an_error(self):
    w, _, stats = layer(5)
    for method in (oneshot.magnitude(), oneshot.wanda()):
      with self.assertRaisesRegex(ValueError, "Block"):
        method.prune_layer(w, stats, 0.5, js.Block(2, 2))


if __name__ == "__main__":
  absltest.main()
