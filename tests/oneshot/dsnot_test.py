"""DSnoT against a plain numpy loop over the documented swap rule."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.oneshot.dsnot import AUTHORS_UPDATE_THRESHOLD, dsnot
from jaxsparse.oneshot.sparsegpt import sparsegpt
from jaxsparse.patterns import NM, Block, Unstructured, follows


def shifted_inputs(seed: int, tokens: int, n_in: int) -> np.ndarray:
  """Correlated inputs with a nonzero mean per feature."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in) + np.eye(n_in)
  shift = rng.normal(size=n_in) * 1.5
  scale = rng.uniform(0.3, 1.5, size=n_in)
  x = (rng.normal(size=(tokens, n_in)) @ mix) * scale + shift
  return x.astype(np.float32)


def stats_of(x: np.ndarray, gram: bool = False) -> LayerStatistics:
  x = jnp.asarray(x)
  return LayerStatistics(
    count=jnp.float32(x.shape[0]),
    sum=x.sum(0),
    sq_sum=(x**2).sum(0),
    gram=x.T @ x if gram else None,
  )


def fixed_base(mask: np.ndarray) -> OneShotMethod:
  """A base method returning a given mask (so tests control the start)."""

  def prune_layer(kernel, stats, sparsity, pattern):
    del stats, sparsity, pattern
    keep = jnp.asarray(mask)
    return jnp.where(keep, kernel, 0.0), keep

  return OneShotMethod("fixed", False, prune_layer)


def ref_wanda_mask(w, x, sparsity=None, nm=None):
  score = np.abs(w) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[:, None]
  mask = np.zeros(w.shape, bool)
  if nm is None:
    kept = w.shape[0] - int(np.round(np.float32(sparsity) * w.shape[0]))
    order = np.argsort(-score, axis=0, kind="stable")
    np.put_along_axis(mask, order[:kept], True, axis=0)
  else:
    for g in range(0, w.shape[0], nm.m):
      order = np.argsort(-score[g : g + nm.m], axis=0, kind="stable")
      np.put_along_axis(mask[g : g + nm.m], order[: nm.n], True, axis=0)
  return mask


def ref_dsnot(
  w,
  x,
  mask,
  *,
  cycles,
  threshold,
  power,
  nm=None,
  same_sign,
  monotone=True,
  v=None,
):
  """Per output, per cycle: recompute the candidate sets and take argmax.

  ``V`` = ``v`` where kept, ``W`` where pruned (``V = W`` if ``v`` is None);
  ``D_i = V_i E[x_i]``; ``Δ = Σ_i (W_i - M_i V_i) E[x_i]``; grow the
  originally pruned, still pruned ``i`` maximising ``sign(Δ) D_i / Var_i^p``
  (must be > 0); prune the originally kept, still kept ``i`` minimising
  ``|V_i| ‖x_i‖`` with ``sign(Δ) D_i < 0`` (N:M: any kept one in the grown
  weight's group). An output stops at the first swap that is not made.
  """
  x = x.astype(np.float64)
  mean, var = x.mean(0), x.var(0)
  norm = np.sqrt((x**2).sum(0))
  v = w if v is None else np.where(mask, v, w)
  out = mask.copy()
  for j in range(w.shape[1]):
    d = v[:, j] * mean
    grow = d / np.maximum(var, 1e-12) ** power if power else d.copy()
    imp = np.abs(v[:, j]) * norm
    keep0 = mask[:, j].copy()
    keep = keep0.copy()
    delta = ((w[:, j] - np.where(keep, v[:, j], 0.0)) * mean).sum()
    sign0 = np.sign(delta)
    for _ in range(cycles):
      if abs(delta) <= threshold:
        break
      s = np.sign(delta)
      can_grow = ~keep0 & ~keep & (s * grow > 0)
      if not can_grow.any():
        break
      g = int(np.argmax(np.where(can_grow, s * grow, -np.inf)))
      can_prune = keep0 & keep
      if nm is None:
        can_prune &= s * d < 0
      else:
        in_group = np.arange(len(d)) // nm.m == g // nm.m
        can_prune &= in_group
      if not can_prune.any():
        break
      q = int(np.argmin(np.where(can_prune, imp, np.inf)))
      after = delta + d[q] - d[g]
      if same_sign and np.sign(after) != sign0:
        break
      if monotone and abs(after) >= abs(delta):
        break
      keep[g], keep[q] = True, False
      delta = after
    out[:, j] = keep
  return out


def output_error(x, w, mask, v=None):
  """``‖X W - X (M ⊙ V)‖²`` against the dense layer (``V = W`` default)."""
  x = x.astype(np.float64)
  v = w if v is None else v
  return float(np.sum((x @ w - x @ (v * mask)) ** 2))


class DSnoTTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.x = shifted_inputs(0, 256, 32)
    rng = np.random.default_rng(1)
    self.w = rng.normal(size=(32, 12)).astype(np.float32)

  @parameterized.parameters(
    (1.0, False, True, 0.1),
    (0.0, False, True, 0.5),
    (1.0, True, True, 0.1),
    (0.5, False, False, 0.1),
  )
  def test_unstructured_matches_reference(
    self, power, same_sign, monotone, threshold
  ):
    base = ref_wanda_mask(self.w, self.x, 0.5)
    method = dsnot(
      fixed_base(base),
      max_cycles=8,
      update_threshold=threshold,
      pow_of_var_regrowing=power,
      same_sign=same_sign,
      monotone=monotone,
    )
    self.assertFalse(method.needs_gram)
    with jax.numpy_dtype_promotion("strict"):
      kernel, mask = method.prune_layer(
        jnp.asarray(self.w), stats_of(self.x), 0.5, Unstructured()
      )
    want = ref_dsnot(
      self.w,
      self.x,
      base,
      cycles=8,
      threshold=threshold,
      power=power,
      same_sign=same_sign,
      monotone=monotone,
    )
    self.assertGreater((want != base).sum(), 0)  # some swaps happened
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(kernel, np.where(want, self.w, 0.0))

  def test_nm_matches_reference(self):
    pattern = NM(2, 4)
    method = dsnot(max_cycles=6)  # the default base is Wanda
    self.assertEqual(method.name, "dsnot(wanda)")
    kernel, mask = method.prune_layer(
      jnp.asarray(self.w), stats_of(self.x), 0.5, pattern
    )
    base = ref_wanda_mask(self.w, self.x, nm=pattern)
    want = ref_dsnot(
      self.w,
      self.x,
      base,
      cycles=6,
      threshold=AUTHORS_UPDATE_THRESHOLD,
      power=1.0,
      nm=pattern,
      same_sign=True,
    )
    self.assertGreater((want != base).sum(), 0)
    np.testing.assert_array_equal(mask, want)
    self.assertTrue(follows(pattern, mask))
    np.testing.assert_array_equal(kernel, np.where(want, self.w, 0.0))

  @parameterized.parameters(0.3, 0.5, 0.8)
  def test_counts_kept_and_error_reduced(self, sparsity):
    x = shifted_inputs(2, 512, 64)
    w = np.random.default_rng(3).normal(size=(64, 24)).astype(np.float32)
    base = ref_wanda_mask(w, x, sparsity)
    _, mask = dsnot(fixed_base(base), update_threshold=0.01).prune_layer(
      jnp.asarray(w), stats_of(x), sparsity, Unstructured()
    )
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask.sum(0), base.sum(0))
    self.assertGreater((mask != base).sum(), 0)
    self.assertLess(output_error(x, w, mask), output_error(x, w, base))

  @parameterized.parameters(0.5, 0.7)
  def test_sparsegpt_base_keeps_reconstruction(self, sparsity):
    x = shifted_inputs(5, 512, 64)
    w = np.random.default_rng(6).normal(size=(64, 24)).astype(np.float32)
    stats = stats_of(x, gram=True)
    base = sparsegpt(blocksize=16)
    base_kernel, base_mask = base.prune_layer(
      jnp.asarray(w), stats, sparsity, Unstructured()
    )
    base_kernel, base_mask = np.asarray(base_kernel), np.asarray(base_mask)
    method = dsnot(base, update_threshold=0.01)
    self.assertTrue(method.needs_gram)
    kernel, mask = method.prune_layer(
      jnp.asarray(w), stats, sparsity, Unstructured()
    )
    kernel, mask = np.asarray(kernel), np.asarray(mask)
    want = ref_dsnot(
      w,
      x,
      base_mask,
      cycles=50,
      threshold=0.01,
      power=1.0,
      same_sign=False,
      v=base_kernel,
    )
    np.testing.assert_array_equal(mask, want)
    grown = mask & ~base_mask
    self.assertGreater(grown.sum(), 0)
    np.testing.assert_array_equal(mask.sum(0), base_mask.sum(0))
    # Kept: SparseGPT's reconstructed values; grown: the dense weights.
    np.testing.assert_array_equal(
      kernel[mask & base_mask], base_kernel[mask & base_mask]
    )
    np.testing.assert_array_equal(kernel[grown], w[grown])
    np.testing.assert_array_equal(kernel[~mask], 0.0)
    self.assertLessEqual(
      output_error(x, w, mask, kernel),
      output_error(x, w, base_mask, base_kernel),
    )

  def test_jit_matches_eager(self):
    method = dsnot(fixed_base(ref_wanda_mask(self.w, self.x, 0.5)))
    w, stats = jnp.asarray(self.w), stats_of(self.x)
    jitted = jax.jit(lambda w, s: method.prune_layer(w, s, 0.5, Unstructured()))
    got, mask = jitted(w, stats)
    want, want_mask = method.prune_layer(w, stats, 0.5, Unstructured())
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(got, want)

  def test_zero_cycles_is_the_base(self):
    base = np.random.default_rng(4).random(self.w.shape) < 0.5
    _, mask = dsnot(fixed_base(base), max_cycles=0).prune_layer(
      jnp.asarray(self.w), stats_of(self.x), 0.5, Unstructured()
    )
    np.testing.assert_array_equal(mask, base)

  def test_bad_input(self):
    w, stats = jnp.asarray(self.w), stats_of(self.x)
    with self.assertRaisesRegex(ValueError, "not supported"):
      dsnot().prune_layer(w, stats, 0.5, Block(2, 2))
    with self.assertRaisesRegex(ValueError, "axis"):
      dsnot().prune_layer(w, stats, 0.5, NM(2, 4, axis=-1))


if __name__ == "__main__":
  absltest.main()
