"""OWL: outlier ratios and layer sparsities against the paper's formula."""

import jax
import numpy as np
from absl.testing import absltest

from jaxsparse import oneshot
from jaxsparse.oneshot.owl import outlier_ratio, owl_sparsities
from tests import oneshot as tiny
from tests.oneshot.prune_test import GROUPS


def numpy_owl(ratios, sparsity, lam):
  """S_l = S - (D'_l - mean D'), D' = 2λ (D - min D) / (max D - min D)."""
  d = np.asarray(ratios, np.float64)
  scaled = 2 * lam * (d - d.min()) / (d.max() - d.min())
  return sparsity - scaled + scaled.mean()


class OwlTest(absltest.TestCase):
  def test_sparsities_by_hand(self):
    # D' = [0, .16, .08], mean .08: sparsities .7 + .08 - D'.
    np.testing.assert_allclose(
      owl_sparsities([0.01, 0.03, 0.02], 0.7, 0.08), [0.78, 0.62, 0.70]
    )

  def test_sparsities_mean_and_band(self):
    ratios = np.random.default_rng(0).uniform(0, 0.1, 12)
    out = owl_sparsities(ratios, 0.6, 0.05)
    np.testing.assert_allclose(out, numpy_owl(ratios, 0.6, 0.05))
    np.testing.assert_allclose(out.mean(), 0.6)
    np.testing.assert_allclose(out.max() - out.min(), 0.1)
    self.assertEqual(int(np.argmin(out)), int(np.argmax(ratios)))

  def test_equal_ratios_are_uniform_and_bad_values_raise(self):
    np.testing.assert_array_equal(owl_sparsities([0.2, 0.2], 0.5, 0.08), 0.5)
    with self.assertRaisesRegex(ValueError, "smaller lam"):
      owl_sparsities([0.0, 1.0], 0.02, 0.08)
    with self.assertRaisesRegex(ValueError, "lam"):
      oneshot.owl(lam=-0.1)
    with self.assertRaisesRegex(ValueError, "threshold_m"):
      oneshot.owl(threshold_m=0.0)

  def test_outlier_ratio_over_the_concatenation(self):
    rng = np.random.default_rng(1)
    a, b = rng.exponential(size=(8, 4)), rng.exponential(size=(5,)) * 3
    both = np.concatenate([a.ravel(), b])
    expected = np.mean(both > 2.0 * both.mean())
    self.assertAlmostEqual(outlier_ratio([a, b], 2.0), expected, places=6)

  def test_driver_allocates_per_group_from_dense_statistics(self):
    params, xs = tiny.setup()
    # A few heavy input rows in Block_1 give that group more outliers.
    params = jax.tree.map(lambda w: w, params)
    block = params["Block_1"]["Dense_0"]
    block["kernel"] = block["kernel"].at[:2].multiply(10.0)
    m, lam, target = 3.0, 0.1, 0.5
    result = oneshot.prune(
      tiny.apply_fn,
      params,
      xs,
      oneshot.wanda(),
      sparsity=target,
      allocation=oneshot.owl(threshold_m=m, lam=lam),
    )
    inputs = tiny.reference_inputs(params, xs)
    ratios = []
    for paths in GROUPS.values():
      scores = np.concatenate(
        [
          (
            np.abs(tiny.kernel(params, path))
            * np.sqrt((inputs[path] ** 2).sum(0))[:, None]
          ).ravel()
          for path in paths
        ]
      )
      ratios.append(np.mean(scores > m * scores.mean()))
    self.assertGreater(np.ptp(ratios), 0)
    expected = numpy_owl(ratios, target, lam)
    for s, paths in zip(expected, GROUPS.values()):
      for path in paths:
        layer = result.layers[path]
        self.assertAlmostEqual(layer.target, s, places=5)
        rows, cols = tiny.kernel(params, path).shape
        kept = rows - int(np.round(np.float32(layer.target) * rows))
        mask = tiny.leaf(result.masks, path)
        np.testing.assert_array_equal(mask.sum(0), np.full(cols, kept))


if __name__ == "__main__":
  absltest.main()
