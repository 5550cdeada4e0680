"""SparseGPT against a textbook sequential OBS written in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsparse.oneshot.base import LayerStatistics
from jaxsparse.oneshot.sparsegpt import reconstruct, sparsegpt
from jaxsparse.patterns import NM, Block, Unstructured, follows

DAMP = 0.01


def correlated_inputs(seed: int, tokens: int, n_in: int) -> np.ndarray:
  """Inputs with correlated features and a nonzero mean."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in) + np.eye(n_in)
  x = rng.normal(size=(tokens, n_in)) @ mix + rng.normal(size=n_in)
  return x.astype(np.float32)


def stats_of(x: np.ndarray) -> LayerStatistics:
  x = jnp.asarray(x)
  return LayerStatistics(
    count=jnp.float32(x.shape[0]),
    sum=x.sum(0),
    sq_sum=(x**2).sum(0),
    gram=x.T @ x,
  )


def ref_hessian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``H = 2XᵀX/n``, dead inputs set to ``H_ii = 1``, dampened (float64)."""
  x = x.astype(np.float64)
  h = 2 * x.T @ x / x.shape[0]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  h += DAMP * np.mean(np.diag(h)) * np.eye(len(h))
  return h, dead


def ref_obs(
  w: np.ndarray, h: np.ndarray, keep_fn, *, nm: NM | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Sequential OBS per output, inputs in order, float64.

  At input ``q``: if pruned, ``w ← w - w_q / [H⁻¹]_qq · H⁻¹[:, q]``; kept or
  not, ``q`` is then removed from ``H⁻¹`` by Gaussian elimination
  ``H⁻¹ ← H⁻¹ - H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq`` (which freezes it).
  ``keep_fn(o)`` gives a fixed keep mask for output ``o``; with ``nm``, every
  ``m`` inputs the ``n`` largest ``w_i² / d_i`` of the current weights are
  kept, with SparseGPT's ``d_i = [H_{i:,i:}⁻¹]_00`` (the squared diagonal of
  the Cholesky factor of ``H⁻¹``).
  """
  n_in, n_out = w.shape
  d = np.array([np.linalg.inv(h[i:, i:])[0, 0] for i in range(n_in)])
  new = w.astype(np.float64).copy()
  keep = np.zeros(w.shape, bool)
  for o in range(n_out):
    v = new[:, o]
    hinv = np.linalg.inv(h)
    k = None if nm else keep_fn(o)
    if nm:
      k = np.zeros(n_in, bool)
    for q in range(n_in):
      if nm and q % nm.m == 0:
        scores = v[q : q + nm.m] ** 2 / d[q : q + nm.m]
        k[q + np.argsort(-scores, kind="stable")[: nm.n]] = True
      if not k[q]:
        v -= v[q] / hinv[q, q] * hinv[:, q]
        v[q] = 0.0
      hinv = hinv - np.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    new[:, o] = v
    keep[:, o] = k
  return new, keep


def ref_saliency_mask(w: np.ndarray, h: np.ndarray, sparsity: float):
  """One block: per output keep the largest ``w_i² / [H_{i:,i:}⁻¹]_00``."""
  n_in = w.shape[0]
  d = np.array([np.linalg.inv(h[i:, i:])[0, 0] for i in range(n_in)])
  scores = w.astype(np.float64) ** 2 / d[:, None]
  kept = n_in - int(np.round(np.float32(sparsity) * np.float32(n_in)))
  order = np.argsort(-scores, axis=0, kind="stable")
  mask = np.zeros(w.shape, bool)
  np.put_along_axis(mask, order[:kept], True, axis=0)
  return mask


def output_error(x, w, new):
  x = np.asarray(x, np.float64)
  return float(np.sum((x @ np.asarray(w) - x @ np.asarray(new)) ** 2))


class SparseGPTTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.x = correlated_inputs(0, 256, 16)
    self.w = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    self.h, _ = ref_hessian(self.x)

  def test_fixed_mask_matches_sequential_obs(self):
    mask = np.random.default_rng(2).random((16, 16)) < 0.5
    want, _ = ref_obs(self.w, self.h, lambda o: mask[:, o])
    with jax.numpy_dtype_promotion("strict"):
      got = reconstruct(self.w, stats_of(self.x), mask, blocksize=16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)

  @parameterized.parameters(1, 5)
  def test_lazy_blocks_are_exact(self, blocksize):
    mask = np.random.default_rng(3).random((16, 16)) < 0.4
    stats = stats_of(self.x)
    one = reconstruct(self.w, stats, mask, blocksize=16)
    lazy = reconstruct(self.w, stats, mask, blocksize=blocksize)
    np.testing.assert_allclose(lazy, one, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(0.25, 0.5, 0.75)
  def test_unstructured_mask_is_saliency_choice(self, sparsity):
    method = sparsegpt(blocksize=16)
    self.assertTrue(method.needs_gram)
    with jax.numpy_dtype_promotion("strict"):
      got, mask = method.prune_layer(
        jnp.asarray(self.w), stats_of(self.x), sparsity, Unstructured()
      )
    want_mask = ref_saliency_mask(self.w, self.h, sparsity)
    np.testing.assert_array_equal(mask, want_mask)
    want, _ = ref_obs(self.w, self.h, lambda o: want_mask[:, o])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)

  def test_nm_matches_sequential_obs(self):
    pattern = NM(2, 4)
    got, mask = sparsegpt(blocksize=8).prune_layer(
      jnp.asarray(self.w), stats_of(self.x), 0.0, pattern
    )
    want, want_mask = ref_obs(self.w, self.h, None, nm=pattern)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    self.assertTrue(follows(pattern, mask))

  @parameterized.parameters((NM(1, 4), 4))
  def test_nm_exact_per_group(self, pattern, blocksize):
    x = correlated_inputs(4, 128, 32)
    w = np.random.default_rng(5).normal(size=(32, 24)).astype(np.float32)
    got, mask = sparsegpt(blocksize=blocksize).prune_layer(
      jnp.asarray(w), stats_of(x), 0.5, pattern
    )
    self.assertTrue(follows(pattern, mask))
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)

  @parameterized.parameters((20, 8, 0.3), (20, 8, 0.9), (20, 8, 0.55))
  def test_exact_count_per_output(self, n_in, blocksize, sparsity):
    x = correlated_inputs(6, 64, n_in)
    w = np.random.default_rng(7).normal(size=(n_in, 12)).astype(np.float32)
    got, mask = sparsegpt(blocksize=blocksize).prune_layer(
      jnp.asarray(w), stats_of(x), sparsity, Unstructured()
    )
    kept = n_in - int(np.round(np.float32(sparsity) * np.float32(n_in)))
    np.testing.assert_array_equal(np.asarray(mask).sum(0), kept)
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)

  def test_beats_magnitude_and_wanda(self):
    x = correlated_inputs(8, 512, 64)
    rng = np.random.default_rng(9)
    w = (rng.normal(size=(64, 32)) * rng.gamma(1.0, size=(64, 1))).astype(
      np.float32
    )
    stats = stats_of(x)
    got, _ = sparsegpt(blocksize=16).prune_layer(
      jnp.asarray(w), stats, 0.5, Unstructured()
    )
    norm = np.sqrt(np.asarray(stats.sq_sum))[:, None]
    for score in (np.abs(w), np.abs(w) * norm):
      order = np.argsort(-score, axis=0, kind="stable")
      mask = np.zeros(w.shape, bool)
      np.put_along_axis(mask, order[:32], True, axis=0)
      base = output_error(x, w, w * mask)
      self.assertLess(output_error(x, w, got), 0.9 * base)

  def test_jit_matches_eager(self):
    method = sparsegpt(blocksize=16)
    w, stats = jnp.asarray(self.w), stats_of(self.x)
    jitted = jax.jit(
      lambda w, s, p: method.prune_layer(w, s, p, Unstructured())
    )
    got, mask = jitted(w, stats, jnp.float32(0.5))
    want, want_mask = method.prune_layer(w, stats, 0.5, Unstructured())
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_mask_only_keeps_weights_and_dead_inputs(self):
    x = self.x.copy()
    x[:, 3] = 0.0  # a dead input
    stats = stats_of(x)
    w = jnp.asarray(self.w)
    kernel, mask = sparsegpt(blocksize=16, update_weights=False).prune_layer(
      w, stats, 0.5, Unstructured()
    )
    _, want_mask = sparsegpt(blocksize=16).prune_layer(
      w, stats, 0.5, Unstructured()
    )
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(kernel, jnp.where(mask, w, 0.0))
    self.assertFalse(np.asarray(mask)[3].any())  # dead weights score 0
    self.assertTrue(np.isfinite(np.asarray(kernel)).all())

  def test_bad_input(self):
    method = sparsegpt()
    w, stats = jnp.asarray(self.w), stats_of(self.x)
    with self.assertRaisesRegex(ValueError, "not supported"):
      method.prune_layer(w, stats, 0.5, Block(2, 2))
    with self.assertRaisesRegex(ValueError, "gram"):
      method.prune_layer(w, stats._replace(gram=None), 0.5, Unstructured())
    with self.assertRaisesRegex(ValueError, "blocksize"):
      sparsegpt(blocksize=6).prune_layer(w, stats, 0.5, NM(2, 4))
    with self.assertRaisesRegex(ValueError, "sparsity"):
      method.prune_layer(w, stats, 1.0, Unstructured())


if __name__ == "__main__":
  absltest.main()
