"""js.sparsify: moment reset on regrowth and straight-through dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

import jaxsparse as js


class MomentResetTest(absltest.TestCase):
  def test_rewiring_zeroes_adam_moments_of_inactive_weights(self):
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    tx = js.sparsify(
      optax.adam(1e-2), js.set_sparse(0.5, drop_fraction=0.5, update_every=3)
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    for count in range(7):
      grads = {"w": jax.random.normal(jax.random.key(count + 1), (8, 8))}
      old_masks = js.masks(state)["w"]
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      masks = js.masks(state)["w"]
      adam = state.inner[0]
      inactive = ~np.asarray(masks)
      if count % 3 == 0:  # a rewiring step (count 0: the initial mask)
        self.assertTrue(bool(state.method.regrown))
        np.testing.assert_array_equal(np.asarray(adam.mu["w"])[inactive], 0)
        np.testing.assert_array_equal(np.asarray(adam.nu["w"])[inactive], 0)
        grown = np.asarray(masks) & ~np.asarray(old_masks)
        if count > 0:
          self.assertTrue(grown.any())
      else:
        self.assertFalse(bool(state.method.regrown))
    # Grown weights start with zero moments: after rewiring, their moments
    # come from the masked gradient of one step only.
    self.assertGreater(int(np.asarray(masks).sum()), 0)

  def test_reset_moments_false_keeps_them(self):
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    method = js.set_sparse(0.5, drop_fraction=0.5, update_every=1)
    kept = js.sparsify(optax.adam(1e-2), method, reset_moments=False)
    state = kept.init(params)
    # A non-zero first moment everywhere, then a rewiring step.
    state = state._replace(
      inner=(state.inner[0]._replace(mu={"w": jnp.ones((8, 8))}),)
      + state.inner[1:]
    )
    grads = {"w": jnp.zeros((8, 8))}
    _, state = kept.update(grads, state, params)
    self.assertTrue(np.all(np.asarray(state.inner[0].mu["w"]) != 0))


class StraightThroughDispatchTest(absltest.TestCase):
  def test_optimizer_sees_hooked_unmasked_gradients(self):
    seen = []

    def init(params):
      return {"masks": jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)}

    def update(updates, state, params=None, grads=None):
      del params, grads
      return updates, state

    def optimizer_gradients(grads, state, params):
      del state, params
      return jax.tree.map(lambda g: 2 * g, grads)

    def record(updates, state, params=None):
      del params
      seen.append(updates)
      return updates, state

    method = js.StraightThrough(init, update, optimizer_gradients)
    spy = optax.GradientTransformation(lambda p: optax.EmptyState(), record)
    tx = js.sparsify(spy, method)
    params = {"w": jnp.ones((2, 2))}
    tx.update({"w": jnp.full((2, 2), 3.0)}, tx.init(params), params)
    # All-False masks would zero every gradient; the hook doubled them.
    np.testing.assert_array_equal(seen[0]["w"], np.full((2, 2), 6.0))


if __name__ == "__main__":
  absltest.main()
