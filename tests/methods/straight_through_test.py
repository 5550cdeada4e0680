"""STE, SR-STE, ST-3(σ) and S-STE against plain-numpy statements of rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse.methods.straight_through import s_ste, sr_ste, st3, ste
from tests.methods import conformance as cf


def numpy_topk_mask(scores: np.ndarray, kept: int) -> np.ndarray:
  """Keep the ``kept`` largest scores (ties: lower flat index)."""
  flat = scores.ravel()
  order = np.lexsort((np.arange(flat.size), -flat))
  mask = np.zeros(flat.size, bool)
  mask[order[:kept]] = True
  return mask.reshape(scores.shape)


def numpy_nm_mask(values: np.ndarray, n: int, m: int) -> np.ndarray:
  """N:M along axis -2 of a 2-D array: ``n`` largest |w| per group."""
  rows, cols = values.shape
  mask = np.zeros(values.shape, bool)
  for g in range(rows // m):
    for c in range(cols):
      block = np.abs(values[g * m : (g + 1) * m, c])
      order = np.lexsort((np.arange(m), -block))
      mask[g * m + order[:n], c] = True
  return mask


def numpy_s_ste(values: np.ndarray, n: int, m: int) -> np.ndarray:
  """S-STE's S(w) along axis -2: shrink each group by its largest pruned |w|."""
  out = np.zeros_like(values)
  rows, cols = values.shape
  for g in range(rows // m):
    for c in range(cols):
      block = values[g * m : (g + 1) * m, c]
      t = np.sort(np.abs(block))[m - n - 1]  # largest of the m - n smallest
      out[g * m : (g + 1) * m, c] = np.sign(block) * np.maximum(
        np.abs(block) - t, 0
      )
  return out


def quadratic_grads(params, anchor):
  """Gradient of 0.5 ||W - A||^2 at the sparse weights the model runs on."""
  return jax.tree.map(lambda w, a: w - a, params, anchor)


class SteTest(parameterized.TestCase):
  @parameterized.product(wrap=["sparsify", "chain"])
  def test_matches_numpy_loop(self, wrap):
    key_w, key_a = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(key_w, (6, 4))}
    anchor = {"w": jax.random.normal(key_a, (6, 4))}
    lr, sparsity = 0.3, 0.5
    if wrap == "sparsify":
      tx = js.sparsify(optax.sgd(lr), ste(sparsity))
    else:
      tx = optax.chain(optax.sgd(lr), ste(sparsity))
    state = tx.init(params)
    step = jax.jit(tx.update)
    dense = np.asarray(params["w"])
    sparse = dense.copy()  # the first forward pass is dense
    a = np.asarray(anchor["w"])
    kept = dense.size - round(sparsity * dense.size)
    for _ in range(6):
      grads = quadratic_grads(params, anchor)
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      # W̃ ← W̃ - η ∇_W L(W);  m = top-k |W̃|;  W = m ⊙ W̃.
      dense = dense + np.float32(-lr) * (sparse - a)
      mask = numpy_topk_mask(np.abs(dense), kept)
      sparse = np.where(mask, dense, 0).astype(np.float32)
      np.testing.assert_array_equal(np.asarray(js.masks(state)["w"]), mask)
      np.testing.assert_allclose(params["w"], sparse, rtol=1e-6, atol=1e-7)

  def test_pruned_weight_grows_back(self):
    params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    tx = js.sparsify(optax.sgd(1.0), ste(0.5))
    state = tx.init(params)
    zero = {"w": jnp.zeros((2, 2))}
    updates, state = tx.update(zero, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], [[0.0, 0.0], [3.0, 4.0]])
    # The pruned weight 1.0 gets a gradient (straight-through) and grows to
    # 11 in the dense copy, so it re-enters the mask; 3.0 drops out.
    grads = {"w": jnp.array([[-10.0, 0.0], [0.0, 0.0]])}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], [[11.0, 0.0], [0.0, 4.0]])
    np.testing.assert_array_equal(
      state.method.dense["w"], [[11.0, 2.0], [3.0, 4.0]]
    )

  @parameterized.product(dtype=["float32", "bfloat16"])
  def test_params_are_exactly_mask_times_dense(self, dtype):
    tx = js.sparsify(optax.adam(0.1), ste(0.7))
    for _, params, state in cf.run(
      tx, cf.make_params(jnp.dtype(dtype)), 3, jax.jit(tx.update)
    ):
      dense, masks = state.method.dense, state.method.masks
      for name in ("conv", "dense0", "dense1"):
        d, m = dense[name]["kernel"], masks[name]["kernel"]
        np.testing.assert_array_equal(
          np.asarray(params[name]["kernel"]),
          np.asarray(jnp.where(m, d, jnp.zeros_like(d))),
        )
      self.assertIsNone(dense["dense0"]["bias"])
      self.assertIsNone(dense["embed"]["embedding"])

  def test_nm_groups(self):
    tx = optax.chain(optax.sgd(0.1), ste(pattern=js.NM(2, 4)))
    for _, params, state in cf.run(tx, cf.make_params(), 2, jax.jit(tx.update)):
      w = np.asarray(params["dense0"]["kernel"])
      mask = numpy_nm_mask(np.asarray(state[1].dense["dense0"]["kernel"]), 2, 4)
      np.testing.assert_array_equal(
        np.asarray(js.masks(state)["dense0"]["kernel"]), mask
      )
      self.assertTrue(np.all((w != 0) <= mask))


class SrSteTest(parameterized.TestCase):
  def test_optimizer_gradients_add_decay_on_pruned(self):
    method = sr_ste(js.NM(2, 4), decay=0.25)
    params = {"w": jax.random.normal(jax.random.key(1), (8, 3))}
    state = method.init(params)
    updates, state = method.update(
      {"w": jnp.zeros((8, 3))}, state, params, grads=params
    )
    params = optax.apply_updates(params, updates)
    grads = {"w": jax.random.normal(jax.random.key(2), (8, 3))}
    seen = method.optimizer_gradients(grads, state, params)
    g = np.asarray(grads["w"])
    m = np.asarray(state.masks["w"])
    dense = np.asarray(state.dense["w"])
    self.assertFalse(m.all())
    want = g + np.float32(0.25) * (1 - m) * dense  # eq. 3
    np.testing.assert_allclose(seen["w"], want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen["w"])[m], g[m])

  @parameterized.named_parameters(("2_4", 2), ("1_4", 1))
  def test_matches_numpy_loop_and_groups_hold_n(self, n):
    lr, decay = 0.2, 0.5
    key_w, key_a = jax.random.split(jax.random.key(3))
    params = {"w": jax.random.normal(key_w, (8, 4))}
    anchor = {"w": jax.random.normal(key_a, (8, 4))}
    tx = js.sparsify(optax.sgd(lr), sr_ste(js.NM(n, 4), decay=decay))
    state = tx.init(params)
    step = jax.jit(tx.update)
    dense = np.asarray(params["w"])
    sparse, mask = dense.copy(), np.ones(dense.shape, bool)
    a = np.asarray(anchor["w"])
    for _ in range(5):
      updates, state = step(quadratic_grads(params, anchor), state, params)
      params = optax.apply_updates(params, updates)
      # W̃ ← W̃ - η (∇_W L + λ (1 - m) ⊙ W̃), m the forward pass's mask.
      grad = (sparse - a) + np.float32(decay) * (1 - mask) * dense
      dense = dense + np.float32(-lr) * grad
      mask = numpy_nm_mask(dense, n, 4)
      sparse = np.where(mask, dense, 0).astype(np.float32)
      np.testing.assert_allclose(params["w"], sparse, rtol=1e-5, atol=1e-6)
      groups = (np.asarray(params["w"]) != 0).reshape(2, 4, 4).sum(axis=1)
      np.testing.assert_array_equal(groups, n)
      self.assertTrue(js.patterns.follows(js.NM(n, 4), js.masks(state)["w"]))

  def test_chain_raises(self):
    tx = optax.chain(optax.sgd(0.1), sr_ste())
    params = cf.make_params()
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, r"sr_ste.*js\.sparsify"):
      tx.update(cf.fake_grads(params, 0), state, params)


def numpy_st3(leaves, sparsity, sigma=False, rescale=False):
  """ST-3(σ): one global threshold; ``sign(w) (|w| - τ_l)_+`` on kept entries.

  Scores ``|w| / σ_l`` (``σ_l = 1 / sqrt(sum of dims)`` for ST-3σ, else 1);
  the masks keep the ``k`` largest scores over all leaves; ``τ`` is the
  largest pruned score and ``τ_l = σ_l τ``.
  """
  inv_sigma = [math.sqrt(sum(w.shape)) if sigma else 1.0 for w in leaves]
  scores = [np.abs(w) * np.float32(c) for w, c in zip(leaves, inv_sigma)]
  flat = np.concatenate([s.ravel() for s in scores])
  total = flat.size
  kept = total - int(np.round(np.float32(sparsity) * np.float32(total)))
  mask = numpy_topk_mask(flat, kept)
  tau = flat[~mask].max() if (~mask).any() else 0.0
  out, masks, start = [], [], 0
  for w, c in zip(leaves, inv_sigma):
    m = mask[start : start + w.size].reshape(w.shape)
    start += w.size
    soft = np.where(
      m, np.sign(w) * np.maximum(np.abs(w) - tau / np.float32(c), 0), 0
    )
    if rescale:
      axes = tuple(range(w.ndim - 1))
      r = (np.mean(np.abs(w) * m, axis=axes, keepdims=True) + 1e-6) / (
        np.mean(np.abs(w), axis=axes, keepdims=True) + 1e-6
      )
      soft = soft * (1.01 / (r + 0.01))
    out.append(soft)
    masks.append(m)
  return out, masks, kept


KERNELS = ("conv", "dense0", "dense1")


class St3Test(parameterized.TestCase):
  @parameterized.product(sigma=[False, True], rescale=[False, True])
  def test_matches_numpy_with_exact_global_count(self, sigma, rescale):
    schedule = js.gmp(0.9, 0, 4)
    tx = js.sparsify(
      optax.adam(0.05), st3(schedule, sigma=sigma, rescale=rescale)
    )
    for count, params, state in cf.run(
      tx, cf.make_params(), 6, jax.jit(tx.update)
    ):
      dense = [np.asarray(state.method.dense[k]["kernel"]) for k in KERNELS]
      want, masks, kept = numpy_st3(
        dense, float(schedule(count)), sigma, rescale
      )
      got_masks = js.masks(state)
      self.assertEqual(
        sum(int(np.asarray(got_masks[k]["kernel"]).sum()) for k in KERNELS),
        kept,
      )
      for k, w, m in zip(KERNELS, want, masks):
        np.testing.assert_array_equal(np.asarray(got_masks[k]["kernel"]), m)
        np.testing.assert_allclose(params[k]["kernel"], w, rtol=1e-5, atol=1e-6)
        self.assertTrue(np.all(np.asarray(params[k]["kernel"])[~m] == 0))

  def test_sigma_spreads_sparsity_more_evenly(self):
    # Weights drawn at std 1 / sqrt(sum of dims): plain ST-3 prunes the wide
    # layer (small weights) first; ST-3σ's scores |w| / σ_l are alike in
    # every layer, so both end up near the target density.
    shapes = {"a": (64, 64), "b": (8, 8)}
    params = {
      name: {
        "kernel": jax.random.normal(jax.random.key(i), shape)
        / math.sqrt(sum(shape))
      }
      for i, (name, shape) in enumerate(shapes.items())
    }
    density = {}
    for sigma in (False, True):
      tx = js.sparsify(optax.sgd(0.0), st3(0.5, sigma=sigma))
      _, state = jax.jit(tx.update)(params, tx.init(params), params)
      masks = js.masks(state)
      density[sigma] = [
        float(np.asarray(masks[k]["kernel"]).mean()) for k in shapes
      ]
    self.assertGreater(density[False][1], 0.75)
    for d in density[True]:
      self.assertBetween(d, 0.3, 0.7)

  def test_zero_sparsity_keeps_dense_weights(self):
    params = cf.make_params()
    tx = js.sparsify(optax.sgd(0.0), st3(js.gmp(0.5, 2, 4)))
    _, new, _ = next(cf.run(tx, params, 1))
    for k in KERNELS:
      np.testing.assert_array_equal(new[k]["kernel"], params[k]["kernel"])


class SSteTest(parameterized.TestCase):
  def test_hand_written_group(self):
    # One group of 4 along axis -2: pruned |w| are 1.0 and 0.5, so t = 1.0.
    params = {"w": jnp.array([[3.0], [1.0], [-3.0], [-0.5]])}
    tx = js.sparsify(optax.sgd(0.0), s_ste(js.NM(2, 4)))
    state = tx.init(params)
    # β = <w, S(w)> / <S(w), S(w)> with S(w) = [2, 0, -2, 0]: 12 / 8.
    self.assertEqual(float(state.method.scale["w"]), 1.5)
    updates, state = tx.update(params, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["w"].ravel(), [3.0, 0.0, -3.0, 0.0])
    np.testing.assert_array_equal(
      state.method.masks["w"].ravel(), [True, False, True, False]
    )

  def test_matches_formula_with_frozen_scale(self):
    key_w, key_a = jax.random.split(jax.random.key(5))
    params = {"w": jax.random.normal(key_w, (8, 6))}
    anchor = {"w": 3.0 * jax.random.normal(key_a, (8, 6))}
    tx = js.sparsify(optax.sgd(0.5), s_ste(js.NM(2, 4)))
    state = tx.init(params)
    w0 = np.asarray(params["w"])
    s0 = numpy_s_ste(w0, 2, 4)
    beta = np.float32((w0 * s0).sum() / (s0 * s0).sum())
    np.testing.assert_allclose(state.method.scale["w"], beta, rtol=1e-6)
    frozen = float(state.method.scale["w"])
    step = jax.jit(tx.update)
    for _ in range(4):
      updates, state = step(quadratic_grads(params, anchor), state, params)
      params = optax.apply_updates(params, updates)
      dense = np.asarray(state.method.dense["w"])
      # β stays the initial one although W̃ moved.
      self.assertEqual(float(state.method.scale["w"]), frozen)
      s = numpy_s_ste(dense, 2, 4)
      refit = (dense * s).sum() / (s * s).sum()
      self.assertNotAlmostEqual(float(refit), float(beta), places=3)
      np.testing.assert_allclose(params["w"], beta * s, rtol=1e-5, atol=1e-6)
      mask = np.asarray(js.masks(state)["w"])
      np.testing.assert_array_equal(mask, numpy_nm_mask(dense, 2, 4))
      self.assertTrue(js.patterns.follows(js.NM(2, 4), mask))
      nonzero = (np.asarray(params["w"]) != 0).reshape(2, 4, 6).sum(axis=1)
      self.assertTrue(np.all(nonzero <= 2))


class ErrorTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("ste_sparsity", lambda: ste(1.0), r"sparsity=1\.0 is outside \[0, 1\)"),
    ("ste_missing", lambda: ste(), r"ste: pass a sparsity"),
    (
      "ste_nm_mismatch",
      lambda: ste(0.3, pattern=js.NM(2, 4)),
      r"ste: sparsity=0\.3 does not match NM",
    ),
    ("sr_ste_decay", lambda: sr_ste(decay=-1.0), r"sr_ste: decay=-1\.0"),
    (
      "sr_ste_unstructured",
      lambda: sr_ste(js.Unstructured()),
      r"sr_ste: pass a sparsity",
    ),
    (
      "st3_pattern",
      lambda: st3(0.5, pattern=js.NM(2, 4)),
      r"st3: pattern=NM.*Unstructured",
    ),
    ("st3_sparsity", lambda: st3(1.5), r"st3: sparsity=1\.5"),
    ("s_ste_pattern", lambda: s_ste(js.Block(2, 2)), r"s_ste: pattern=Block"),
    ("s_ste_nm", lambda: s_ste(js.NM(4, 2)), r"NM\(n=4, m=2.*n <= m"),
  )
  def test_bad_configuration(self, make, message):
    with self.assertRaisesRegex(ValueError, message):
      make()

  def test_leaf_not_divisible_by_m_names_leaf(self):
    params = {"layer": {"kernel": jnp.ones((6, 4))}}
    with self.assertRaisesRegex(ValueError, r"s_ste: layer/kernel.*size 6"):
      s_ste().init(params)

  def test_missing_params(self):
    method = ste(0.5)
    state = method.init({"w": jnp.ones((4, 4))})
    with self.assertRaisesRegex(ValueError, r"ste: `params` is required"):
      method.update({"w": jnp.ones((4, 4))}, state)


if __name__ == "__main__":
  absltest.main()
