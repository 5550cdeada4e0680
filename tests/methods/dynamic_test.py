"""SET and RigL against plain-numpy statements of their rewiring rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse.methods import dynamic
from tests.methods import conformance as cf


def numpy_rigl(mask, weights, grads, fraction):
  """RigL's update (Evci et al 2020, Algorithm 1) for one layer.

  Drop floor(f n) active weights with the smallest |w|, then grow as many
  with the largest |g| among the weights not kept; ties go to the lower
  flat index.
  """
  flat_mask, w, g = mask.ravel(), np.abs(weights).ravel(), np.abs(grads).ravel()
  active = int(flat_mask.sum())
  dropped = int(np.floor(np.float32(fraction) * np.float32(active)))
  index = np.arange(flat_mask.size)
  drop_order = np.lexsort((index, -np.where(flat_mask, w, -np.inf)))
  kept = np.zeros_like(flat_mask)
  kept[drop_order[: active - dropped]] = True
  grow_order = np.lexsort((index, -np.where(kept, -np.inf, g)))
  grown = np.zeros_like(flat_mask)
  grown[grow_order[:dropped]] = True
  return (kept | grown).reshape(mask.shape)


class DropAndGrowTest(parameterized.TestCase):
  def test_hand_computed_4x4(self):
    mask = np.array(
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool
    )
    weights = np.array(
      [
        [0.9, 0.1, 0.0, 0.0],
        [0.5, -0.2, 0.0, 0.0],
        [0.0, 0.0, 0.3, -0.8],
        [0.0, 0.0, 0.05, 0.6],
      ],
      np.float32,
    )
    grads = np.array(
      [
        [0.0, 0.0, 2.0, 0.1],
        [0.0, 0.0, 0.0, -3.0],
        [0.5, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
      ],
      np.float32,
    )
    # 8 active, f = 0.5: drop 4 smallest |w| (0.05, 0.1, -0.2, 0.3), grow the
    # 4 largest |g| elsewhere (-3.0, 2.0, 1.0, 0.5).
    new = dynamic.drop_and_grow(
      jnp.asarray(mask), jnp.abs(weights), jnp.abs(grads), 0.5
    )
    want = np.array(
      [[1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], bool
    )
    np.testing.assert_array_equal(np.asarray(new), want)

  def test_matches_numpy_rule_random(self):
    for seed in range(5):
      keys = jax.random.split(jax.random.key(seed), 3)
      mask = np.asarray(jax.random.bernoulli(keys[0], 0.3, (16, 12)))
      w = np.asarray(jax.random.normal(keys[1], (16, 12))) * mask
      g = np.asarray(jax.random.normal(keys[2], (16, 12)))
      new = dynamic.drop_and_grow(
        jnp.asarray(mask), jnp.abs(w), jnp.abs(g), 0.3
      )
      np.testing.assert_array_equal(
        np.asarray(new), numpy_rigl(mask, w, g, 0.3)
      )
      self.assertEqual(int(new.sum()), int(mask.sum()))


class RiglTest(parameterized.TestCase):
  def test_transform_follows_rule_and_cosine(self):
    alpha, end = 0.4, 8
    tx = js.sparsify(
      optax.sgd(0.01),
      js.rigl(0.75, drop_fraction=alpha, update_every=2, end_step=end),
    )
    step = jax.jit(tx.update)
    params = cf.make_params()
    state = tx.init(params)
    for count in range(10):
      grads = cf.fake_grads(params, count)
      old = js.masks(state)["dense0"]["kernel"]
      updates, state = step(grads, state, params)
      new = np.asarray(js.masks(state)["dense0"]["kernel"])
      if count % 2 == 0 and 0 < count < end:
        # Eq. 1 of the paper, to float tolerance; the float32 value the
        # transform uses decides floor(f n) exactly.
        fraction = float(dynamic.cosine_drop_fraction(alpha, end)(count))
        self.assertAlmostEqual(
          fraction, float(optax.cosine_decay_schedule(alpha, end)(count))
        )
        self.assertAlmostEqual(
          fraction, alpha / 2 * (1 + math.cos(math.pi * count / end)), places=6
        )
        want = numpy_rigl(
          np.asarray(old),
          np.asarray(params["dense0"]["kernel"]),
          np.asarray(grads["dense0"]["kernel"]),
          fraction,
        )
        np.testing.assert_array_equal(new, want)
        # Genuinely new connections replace dropped ones one for one, at
        # most floor(f n) of them (a dropped weight may be regrown).
        grown = new & ~np.asarray(old)
        self.assertEqual(grown.sum(), (np.asarray(old) & ~new).sum())
        self.assertLessEqual(
          grown.sum(), int(np.floor(np.float32(fraction) * old.sum()))
        )
      elif count > 0:
        np.testing.assert_array_equal(new, np.asarray(old))
      params = optax.apply_updates(params, updates)
      # Grown weights start at zero; pruned ones are zero.
      kernel = np.asarray(params["dense0"]["kernel"])
      self.assertTrue(np.all(kernel[~new] == 0))
      if count > 0 and count % 2 == 0 and count < end:
        self.assertTrue(np.all(kernel[new & ~np.asarray(old)] == 0))

  def test_needs_sparsify(self):
    tx = optax.chain(optax.sgd(0.1), js.rigl(0.5))
    params = cf.make_params()
    with self.assertRaisesRegex(
      ValueError, r"rigl grows connections.*sparsify"
    ):
      tx.update(params, tx.init(params), params)

  def test_errors(self):
    # With the jaxtyping/beartype hook on, the annotation rejects it first.
    with self.assertRaisesRegex((ValueError, TypeError), "sparsity"):
      js.rigl(js.gmp(0.9, 0, 10))
    with self.assertRaisesRegex(ValueError, "keeps per-layer counts"):
      js.rigl(0.9, allocation=js.global_threshold())
    with self.assertRaisesRegex(ValueError, r"drop_fraction=1.5"):
      js.set_sparse(0.9, drop_fraction=1.5)


class SetTest(absltest.TestCase):
  def test_drops_smallest_and_regrows_randomly(self):
    tx = optax.chain(
      optax.sgd(0.0), js.set_sparse(0.5, drop_fraction=0.25, update_every=1)
    )
    params = {"w": jax.random.normal(jax.random.key(0), (32, 32))}
    state = tx.init(params)
    updates, state = tx.update(params, state, params)  # initial random mask
    params = optax.apply_updates(params, updates)
    old = np.asarray(js.masks(state)["w"])
    updates, state = tx.update(params, state, params)
    new = np.asarray(js.masks(state)["w"])
    w = np.abs(np.asarray(params["w"]))
    self.assertEqual(new.sum(), old.sum())
    # Every weight dropped (and not regrown) is among the floor(ζ n) smallest
    # active ones; as many new connections replace them.
    k = int(np.floor(np.float32(0.25) * np.float32(old.sum())))
    kth_smallest = np.sort(w[old])[k - 1]
    self.assertLessEqual(w[old & ~new].max(), kth_smallest)
    self.assertEqual((new & ~old).sum(), (old & ~new).sum())
    self.assertGreater((new & ~old).sum(), k // 2)


if __name__ == "__main__":
  absltest.main()
