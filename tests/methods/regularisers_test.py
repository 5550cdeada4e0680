"""LOBSTER and proximal group lasso against plain-numpy statements."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse.methods.regularisers import (
  GroupLassoState,
  LobsterState,
  group_lasso,
  group_prox,
  lobster,
)
from tests.methods import conformance as cf


def numpy_lobster_step(w, g, lr, lam):
  """Tartaglione et al: w - η g - λ w max(0, 1 - |g|) (plain SGD)."""
  return w - lr * g - lam * w * np.maximum(0.0, 1.0 - np.abs(g))


def numpy_channel_prox(w, tau, axis):
  """Block soft thresholding of every slice along `axis`."""
  moved = np.moveaxis(np.asarray(w, np.float64), axis, 0)
  out = np.zeros_like(moved)
  for c in range(moved.shape[0]):
    norm = np.linalg.norm(moved[c])
    if norm > tau:
      out[c] = moved[c] * (1 - tau / norm)
  return np.moveaxis(out, 0, axis)


def numpy_block_prox(w, tau, rows, cols):
  """Block soft thresholding of every rows x cols tile of the last two axes
  (separately for each index of the leading axes)."""
  w = np.asarray(w, np.float64)
  out = np.zeros_like(w)
  for lead in np.ndindex(*w.shape[:-2]):
    for i in range(0, w.shape[-2], rows):
      for j in range(0, w.shape[-1], cols):
        tile = w[lead][i : i + rows, j : j + cols]
        norm = np.linalg.norm(tile)
        if norm > tau:
          out[lead][i : i + rows, j : j + cols] = tile * (1 - tau / norm)
  return out


class LobsterRuleTest(parameterized.TestCase):
  def test_one_step_matches_paper_update(self):
    params = {"w": jnp.array([[0.5, -2.0], [1.5, 0.25]]), "b": jnp.ones(2)}
    grads = {"w": jnp.array([[0.2, -0.5], [1.5, -0.1]]), "b": jnp.ones(2)}
    tx = js.sparsify(optax.sgd(0.1), lobster(0.3, 1e-3))
    updates, state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    want = numpy_lobster_step(
      np.asarray(params["w"]), np.asarray(grads["w"]), 0.1, 0.3
    )
    np.testing.assert_allclose(np.asarray(new["w"]), want, rtol=1e-6)
    # Not selected (a bias): plain SGD.
    np.testing.assert_allclose(np.asarray(new["b"]), 0.9 * np.ones(2))
    self.assertIsInstance(state.method, LobsterState)

  def test_matches_numpy_over_steps_with_pruning(self):
    threshold, lam, lr = 0.4, 0.2, 0.05
    tx = js.sparsify(optax.sgd(lr), lobster(lam, threshold, prune_every=2))
    prev = cf.make_params()
    mask = np.ones((16, 32), bool)
    for count, params, state in cf.run(tx, prev, 5, jax.jit(tx.update)):
      w = np.asarray(prev["dense0"]["kernel"], np.float64)
      g = np.asarray(cf.fake_grads(prev, count)["dense0"]["kernel"])
      if count % 2 == 0:  # prune |w| < T on the weights the step starts from
        mask = mask & (np.abs(w) >= threshold)
      want = np.where(mask, numpy_lobster_step(w, g, lr, lam), 0.0)
      got = np.asarray(params["dense0"]["kernel"])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
      np.testing.assert_array_equal(
        np.asarray(state.method.masks["dense0"]["kernel"]), mask
      )
      prev = params

  def test_pruned_never_regrow(self):
    tx = js.sparsify(optax.sgd(1.0), lobster(0.0, 0.5, prune_every=1))
    params = {"w": jnp.array([[0.1, 2.0], [3.0, -0.2]])}
    grads = {"w": jnp.full((2, 2), -5.0)}  # would push every weight to >= 4.8
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(
      np.asarray(state.method.masks["w"]), [[False, True], [True, False]]
    )
    self.assertEqual(float(params["w"][0, 0]), 0.0)
    self.assertEqual(float(params["w"][1, 1]), 0.0)

  def test_sensitive_weights_untouched_by_regulariser(self):
    # |g| >= 1: no shrinkage; g = 0: full decay λ w.
    params = {"w": jnp.array([[1.0, 1.0]])}
    grads = {"w": jnp.array([[1.5, 0.0]])}
    tx = js.sparsify(optax.sgd(0.0), lobster(0.25, 1e-3))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [[0.0, -0.25]])


class GroupProxTest(parameterized.TestCase):
  @parameterized.parameters(-1, 0, 2)
  def test_channel_prox_matches_numpy(self, axis):
    w = jax.random.normal(jax.random.key(axis + 1), (3, 4, 6))
    others = tuple(a for a in range(3) if a != axis % 3)
    tau = float(np.median(np.linalg.norm(np.asarray(w), axis=others)))
    prox = jax.jit(group_prox, static_argnames="pattern")
    out, kept = prox(w, tau, js.Channel(axis))
    want = numpy_channel_prox(np.asarray(w), tau, axis)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(kept), want != 0)
    self.assertTrue(np.any(want == 0) and np.any(want != 0))

  def test_block_prox_matches_numpy(self):
    w = jax.random.normal(jax.random.key(0), (2, 8, 12))
    prox = jax.jit(group_prox, static_argnames="pattern")
    out, kept = prox(w, 2.5, js.Block(2, 3))  # tile norms ~2.4
    want = numpy_block_prox(np.asarray(w), 2.5, 2, 3)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(kept), want != 0)
    self.assertTrue(np.any(want == 0) and np.any(want != 0))

  def test_hand_computed(self):
    w = jnp.array([[3.0, 0.5], [4.0, 0.5]])  # column norms 5 and 0.707
    out, kept = group_prox(w, 2.5, js.Channel())
    np.testing.assert_allclose(np.asarray(out), [[1.5, 0.0], [2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(kept), [[True, False]] * 2)


class GroupLassoRuleTest(parameterized.TestCase):
  @parameterized.parameters(
    dict(pattern=js.Channel(), prox=lambda w, t: numpy_channel_prox(w, t, -1)),
    dict(
      pattern=js.Block(4, 4), prox=lambda w, t: numpy_block_prox(w, t, 4, 4)
    ),
  )
  def test_prox_after_sgd_step_matches_numpy(self, pattern, prox):
    lr, lam = 0.1, 8.0
    tx = optax.chain(optax.sgd(lr), group_lasso(lam, lr, pattern))
    prev = cf.make_params()
    for count, params, state in cf.run(tx, prev, 4, jax.jit(tx.update)):
      for name in ("conv", "dense0", "dense1"):
        w = np.asarray(prev[name]["kernel"], np.float64)
        g = np.asarray(cf.fake_grads(prev, count)[name]["kernel"])
        want = prox(w - lr * g, lr * lam)
        got = np.asarray(params[name]["kernel"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        mask = np.asarray(state[1].masks[name]["kernel"])
        np.testing.assert_array_equal(mask, want != 0)
        self.assertTrue(np.all(got[~mask] == 0))
      # Biases are not selected: plain SGD.
      np.testing.assert_allclose(
        np.asarray(params["dense0"]["bias"]),
        np.asarray(prev["dense0"]["bias"])
        - lr * np.asarray(cf.fake_grads(prev, count)["dense0"]["bias"]),
        rtol=1e-6,
      )
      prev = params
    self.assertIsInstance(state[1], GroupLassoState)

  def test_learning_rate_schedule(self):
    schedule = optax.linear_schedule(1.0, 0.0, 4)
    tx = group_lasso(2.0, schedule, js.Channel())
    params = {"w": jnp.array([[3.0, 1.0], [4.0, 1.0]])}
    zero = {"w": jnp.zeros((2, 2))}
    state = tx.init(params)
    for count in range(3):
      updates, state = tx.update(zero, state, params)
      new = optax.apply_updates(params, updates)
      tau = float(schedule(count)) * 2.0
      want = numpy_channel_prox(np.asarray(params["w"]), tau, -1)
      np.testing.assert_allclose(np.asarray(new["w"]), want, rtol=1e-6)
      params = new

  def test_zero_group_regrows_when_gradient_exceeds_threshold(self):
    # Proximal SGD: a zero group moves iff its step is longer than η λ.
    lr, lam = 1.0, 1.0
    tx = optax.chain(optax.sgd(lr), group_lasso(lam, lr, js.Channel()))
    params = {"w": jnp.zeros((2, 2))}
    grads = {"w": jnp.array([[-3.0, -0.3], [-4.0, -0.4]])}  # norms 5, 0.5
    updates, state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), [[2.4, 0.0], [3.2, 0.0]])
    np.testing.assert_array_equal(
      np.asarray(state[1].masks["w"]), [[True, False], [True, False]]
    )


class ErrorTest(parameterized.TestCase):
  def test_lobster_needs_gradients(self):
    params = cf.make_params()
    tx = optax.chain(optax.sgd(0.1), lobster(0.1, 0.01))
    with self.assertRaisesRegex(ValueError, r"lobster .*js\.sparsify"):
      tx.update(params, tx.init(params), params)

  def test_lobster_needs_params(self):
    params = cf.make_params()
    tx = js.sparsify(optax.sgd(0.1), lobster(0.1, 0.01))
    with self.assertRaisesRegex(ValueError, r"`params` is required"):
      tx.update(params, tx.init(params))

  @parameterized.parameters(0.0, -1.0)
  def test_lobster_bad_threshold(self, value):
    with self.assertRaisesRegex(ValueError, r"lobster: threshold=.* > 0"):
      lobster(0.1, value)

  def test_lobster_negative_decay(self):
    with self.assertRaisesRegex(
      ValueError, r"lobster: decay=-0.1 must be >= 0"
    ):
      lobster(-0.1, 0.01)
    with self.assertRaisesRegex(ValueError, r"decay\(0\)=-1.0 must be >= 0"):
      lobster(lambda count: -1.0, 0.01)

  def test_lobster_bad_cadence(self):
    with self.assertRaisesRegex(ValueError, "lobster: prune_every=0 must be"):
      lobster(0.1, 0.01, prune_every=0)
    with self.assertRaisesRegex(ValueError, "end_step=1 is before begin"):
      lobster(0.1, 0.01, begin_step=3, end_step=1)

  @parameterized.parameters((js.Unstructured(),), (js.NM(2, 4),))
  def test_group_lasso_needs_groups(self, pattern):
    with self.assertRaisesRegex(
      ValueError, r"group_lasso: pattern=.*js.Channel\(axis\) or js.Block"
    ):
      group_lasso(0.1, 0.1, pattern)

  def test_group_lasso_negative_strength(self):
    with self.assertRaisesRegex(
      ValueError, r"group_lasso: strength=-1.0 must be >= 0"
    ):
      group_lasso(-1.0, 0.1)
    with self.assertRaisesRegex(
      ValueError, r"group_lasso: learning_rate\(0\)=-0.5 must be >= 0"
    ):
      group_lasso(1.0, lambda count: -0.5)

  def test_group_lasso_block_not_dividing_names_leaf(self):
    tx = group_lasso(0.1, 0.1, js.Block(4, 4))
    with self.assertRaisesRegex(
      ValueError, r"group_lasso: dense/kernel: shape \(8, 6\)"
    ):
      tx.init({"dense": {"kernel": jnp.ones((8, 6))}})

  def test_group_lasso_channel_axis_out_of_range(self):
    tx = group_lasso(0.1, 0.1, js.Channel(axis=3))
    with self.assertRaisesRegex(ValueError, r"group_lasso: w: .* no axis 3"):
      tx.init({"w": jnp.ones((8, 6))})


if __name__ == "__main__":
  absltest.main()
