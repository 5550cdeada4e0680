"""SNIP, GraSP and SynFlow against plain statements of their rules; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.flatten_util import ravel_pytree

import jaxsparse as js
from jaxsparse.methods.init_pruning import (
  InitPruningState,
  grasp,
  grasp_scores,
  snip,
  snip_scores,
  synflow,
  synflow_scores,
)


def numpy_keep_top(scores: np.ndarray, kept: int) -> np.ndarray:
  """Keeps the ``kept`` largest scores of a flat array (ties: lower index)."""
  order = np.lexsort((np.arange(scores.size), -scores))
  mask = np.zeros(scores.size, bool)
  mask[order[:kept]] = True
  return mask


def num_kept(size: int, sparsity: float) -> int:
  return size - int(np.round(np.float32(sparsity) * np.float32(size)))


def flat_masks(masks, names):
  return np.concatenate([np.asarray(masks[n]).ravel() for n in names])


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# A bias-free two-layer linear model and a squared loss on a known batch.
X = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]], np.float32)
Y = np.array([[1.0, 0.0], [-1.0, 2.0]], np.float32)


def linear_params():
  return {"w1": normal(0, (3, 4)), "w2": normal(1, (4, 2))}


def linear_loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w1"] @ params["w2"] - y) ** 2)


class SnipTest(parameterized.TestCase):
  def test_scores_are_closed_form_saliency(self):
    params = linear_params()
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    # L = sum(r^2) / r.size with r = X w1 w2 - Y.
    residual = X @ w1 @ w2 - Y
    d_out = 2 * residual / residual.size
    g1 = X.T @ d_out @ w2.T
    g2 = (X @ w1).T @ d_out
    scores = jax.jit(snip_scores, static_argnums=0)(linear_loss, params, (X, Y))
    np.testing.assert_allclose(
      scores["w1"], np.abs(g1 * w1), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
      scores["w2"], np.abs(g2 * w2), rtol=1e-4, atol=1e-6
    )

  @parameterized.parameters(0.5, 0.75)
  def test_mask_is_global_top_k_of_saliency(self, sparsity):
    params = linear_params()
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    residual = X @ w1 @ w2 - Y
    d_out = 2 * residual / residual.size
    saliency = np.concatenate(
      [
        np.abs(X.T @ d_out @ w2.T * w1).ravel(),
        np.abs((X @ w1).T @ d_out * w2).ravel(),
      ]
    )
    kept = num_kept(saliency.size, sparsity)
    masks = snip(sparsity, linear_loss, (X, Y)).init(params).masks
    got = flat_masks(masks, ("w1", "w2"))
    self.assertEqual(int(got.sum()), kept)
    np.testing.assert_array_equal(got, numpy_keep_top(saliency, kept))

  def test_masks_fixed_and_pruned_weights_zero_after_first_step(self):
    params = linear_params()
    tx = optax.chain(optax.sgd(0.1), snip(0.5, linear_loss, (X, Y)))
    state = tx.init(params)
    first = js.masks(state)
    step = jax.jit(tx.update)
    for count in range(3):
      grads = jax.grad(linear_loss)(params, (X, Y))
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      jax.tree.map(np.testing.assert_array_equal, js.masks(state), first)
      for name in ("w1", "w2"):
        pruned = np.asarray(params[name])[~np.asarray(first[name])]
        np.testing.assert_array_equal(pruned, 0.0)
      self.assertEqual(int(state[1].count), count + 1)
    self.assertIsInstance(state[1], InitPruningState)

  def test_apply_masks_starts_sparse(self):
    params = linear_params()
    masks = snip(0.5, linear_loss, (X, Y)).init(params).masks
    sparse = js.apply_masks(params, masks)
    for name in ("w1", "w2"):
      kept = np.asarray(masks[name])
      np.testing.assert_array_equal(np.asarray(sparse[name])[~kept], 0.0)
      np.testing.assert_array_equal(
        np.asarray(sparse[name])[kept], np.asarray(params[name])[kept]
      )
    self.assertEqual(sum(int(m.sum()) for m in masks.values()), 10)

  def test_structured_pattern_with_uniform_allocation(self):
    params = {"w1": normal(0, (8, 4)), "w2": normal(1, (4, 2))}
    x = np.ones((2, 8), np.float32)
    y = np.zeros((2, 2), np.float32)
    tx = snip(
      None, linear_loss, (x, y), pattern=js.NM(2, 4), allocation=js.uniform()
    )
    masks = tx.init(params).masks
    for m in masks.values():
      self.assertTrue(js.patterns.follows(js.NM(2, 4), m))


# GraSP on a tiny tanh network (24 params) where the dense Hessian is cheap.
def tanh_params():
  return {
    "w1": normal(2, (3, 4)),
    "b1": normal(3, (4,)) * 0.1,
    "w2": normal(4, (4, 2)),
  }


def tanh_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return optax.softmax_cross_entropy(h @ params["w2"], y).mean()


ONE_HOT = np.eye(2, dtype=np.float32)[[0, 1]]
jit_grasp_scores = jax.jit(
  grasp_scores, static_argnums=0, static_argnames="where"
)


class GraspTest(parameterized.TestCase):
  def reference_hg(self, params, selected):
    """``H_ss g_s`` (``s``: selected entries) from the dense Hessian."""
    flat, unravel = ravel_pytree(params)
    loss = lambda v: tanh_loss(unravel(v), (X, ONE_HOT))
    hessian = np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)
    g = np.asarray(jax.jit(jax.grad(loss))(flat), np.float64)
    keep = np.asarray(ravel_pytree(selected)[0]) > 0
    return (hessian @ np.where(keep, g, 0.0)), unravel

  def test_hvp_equals_dense_hessian_times_gradient(self):
    params = tanh_params()
    everything = jax.tree.map(jnp.ones_like, params)
    hg, unravel = self.reference_hg(params, everything)
    scores = jit_grasp_scores(
      tanh_loss, params, (X, ONE_HOT), where=lambda path, leaf: True
    )
    want = unravel(jnp.asarray(np.asarray(ravel_pytree(params)[0]) * hg))
    for name in params:
      np.testing.assert_allclose(scores[name], want[name], rtol=1e-4, atol=1e-6)

  def test_selected_block_of_hessian_only(self):
    # As in the reference code, g and H cover the pruned weights: the bias's
    # gradient does not enter Hg.
    params = tanh_params()
    kernels = {"w1": jnp.ones(1), "b1": jnp.zeros(1), "w2": jnp.ones(1)}
    kernels = jax.tree.map(
      lambda p, s: jnp.broadcast_to(s, p.shape), params, kernels
    )
    hg, unravel = self.reference_hg(params, kernels)
    # Default selection: the kernels.
    scores = jit_grasp_scores(tanh_loss, params, (X, ONE_HOT))
    want = unravel(jnp.asarray(np.asarray(ravel_pytree(params)[0]) * hg))
    for name in ("w1", "w2"):
      np.testing.assert_allclose(scores[name], want[name], rtol=1e-4, atol=1e-6)

  @parameterized.parameters(0.25, 0.5, 0.8)
  def test_removes_the_top_paper_scores(self, sparsity):
    params = tanh_params()
    kernels = jax.tree.map(
      lambda p: jnp.full(p.shape, p.ndim == 2, jnp.float32), params
    )
    hg, _ = self.reference_hg(params, kernels)
    theta = np.asarray(ravel_pytree(params)[0], np.float64)
    paper_score = -theta * hg  # S(-w) = -w ⊙ Hg, eq. 8
    is_kernel = np.asarray(ravel_pytree(kernels)[0]) > 0
    # ravel_pytree orders leaves by key: b1, w1, w2.
    s = paper_score[is_kernel]
    removed = int(np.round(np.float32(sparsity) * np.float32(s.size)))
    order = np.argsort(-s, kind="stable")
    want = np.ones(s.size, bool)
    want[order[:removed]] = False
    masks = grasp(sparsity, tanh_loss, (X, ONE_HOT)).init(params).masks
    self.assertIsNone(masks["b1"])
    got = flat_masks(masks, ("w1", "w2"))
    np.testing.assert_array_equal(got, want)


# SynFlow: for R = 1ᵀ (1 |W1| |W2|), dR/dW1[i, j] = sum_k |W2[j, k]| and
# dR/dW2[j, k] = sum_i |W1[i, j]|.
def linear_apply(params, x):
  return x @ params["w1"] @ params["w2"]


jit_synflow_scores = jax.jit(synflow_scores, static_argnums=(0, 3))


def synflow_closed_form(w1, w2, m1=None, m2=None):
  a1 = np.abs(w1) * (1 if m1 is None else m1)
  a2 = np.abs(w2) * (1 if m2 is None else m2)
  return a1 * a2.sum(1)[None, :], a2 * a1.sum(0)[:, None]


class SynflowTest(parameterized.TestCase):
  def test_scores_closed_form(self):
    params = linear_params()
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    s1, s2 = synflow_closed_form(w1, w2)
    scores = jit_synflow_scores(linear_apply, params, None, (1, 3))
    np.testing.assert_allclose(scores["w1"], s1, rtol=1e-5)
    np.testing.assert_allclose(scores["w2"], s2, rtol=1e-5)
    # With masks: pruned entries count as zero weights.
    m1 = np.asarray(normal(5, (3, 4))) > 0
    masks = {"w1": jnp.asarray(m1), "w2": None}
    s1, s2 = synflow_closed_form(w1, w2, m1=m1)
    scores = jit_synflow_scores(linear_apply, params, masks, (1, 3))
    np.testing.assert_allclose(scores["w1"], s1, rtol=1e-5)
    np.testing.assert_allclose(scores["w2"], s2, rtol=1e-5)

  def test_one_iteration_is_global_top_k(self):
    params = linear_params()
    s1, s2 = synflow_closed_form(
      np.asarray(params["w1"]), np.asarray(params["w2"])
    )
    scores = np.concatenate([s1.ravel(), s2.ravel()])
    kept = num_kept(scores.size, 0.7)
    masks = synflow(0.7, linear_apply, (1, 3), iterations=1).init(params).masks
    got = flat_masks(masks, ("w1", "w2"))
    np.testing.assert_array_equal(got, numpy_keep_top(scores, kept))

  def test_iterations_follow_exponential_schedule(self):
    # Two rounds by hand: density sqrt(d), then d, rescoring on the mask.
    params = linear_params()
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    sparsity = 0.75
    size = w1.size + w2.size
    m1, m2 = np.ones(w1.shape), np.ones(w2.shape)
    for level in (1 - np.sqrt(np.float32(1 - sparsity)), sparsity):
      s1, s2 = synflow_closed_form(w1, w2, m1, m2)
      scores = np.concatenate([s1.ravel(), s2.ravel()])
      scores = np.where(
        np.concatenate([m1.ravel(), m2.ravel()]) > 0, scores, -1
      )
      keep = numpy_keep_top(scores, num_kept(size, level))
      m1, m2 = (
        keep[: w1.size].reshape(w1.shape),
        keep[w1.size :].reshape(w2.shape),
      )
    tx = synflow(sparsity, linear_apply, (1, 3), iterations=2)
    masks = tx.init(params).masks
    np.testing.assert_array_equal(masks["w1"], m1)
    np.testing.assert_array_equal(masks["w2"], m2)

  def test_iterating_avoids_layer_collapse(self):
    # Scores of each layer sum to R, so one-shot pruning at 99% spends the
    # budget on the small layers and disconnects the large one.
    params = {
      "w1": normal(6, (30, 30)),
      "w2": normal(7, (30, 2)),
      "w3": normal(8, (2, 1)),
    }
    apply_fn = lambda p, x: x @ p["w1"] @ p["w2"] @ p["w3"]
    size = sum(p.size for p in params.values())
    one_shot = synflow(0.99, apply_fn, (1, 30), iterations=1).init(params)
    iterative = synflow(0.99, apply_fn, (1, 30), iterations=20).init(params)
    for state in (one_shot, iterative):
      total = sum(int(m.sum()) for m in state.masks.values())
      self.assertEqual(total, num_kept(size, 0.99))
    self.assertEqual(int(one_shot.masks["w1"].sum()), 0)
    for m in iterative.masks.values():
      self.assertGreater(int(m.sum()), 0)
    # The kept network still carries flow from input to output.
    a1, a2, a3 = (
      np.abs(np.asarray(params[n])) * np.asarray(iterative.masks[n])
      for n in ("w1", "w2", "w3")
    )
    self.assertGreater(float((np.ones(30) @ a1 @ a2 @ a3)[0]), 0.0)

  def test_compiles_once_for_any_number_of_iterations(self):
    # fori_loop: the model is traced once however many rounds run.
    traces = []

    def apply_fn(p, x):
      traces.append(None)
      return linear_apply(p, x)

    synflow(0.5, apply_fn, (1, 3), iterations=20).init(linear_params())
    self.assertLessEqual(len(traces), 2)  # the loop body (+ a shape probe)


class ErrorTest(parameterized.TestCase):
  @parameterized.parameters(1.0, -0.1, 1.5)
  def test_sparsity_outside_unit_interval(self, value):
    for make in (
      lambda: snip(value, linear_loss, (X, Y)),
      lambda: grasp(value, linear_loss, (X, Y)),
      lambda: synflow(value, linear_apply, (1, 3)),
    ):
      with self.assertRaisesRegex(ValueError, r"sparsity=.* outside \[0, 1\)"):
        make()

  def test_loss_fn_not_callable(self):
    # The runtime type checker of the test suite may answer first.
    with self.assertRaisesRegex((TypeError, ValueError), "loss_fn"):
      snip(0.5, "loss", (X, Y))
    with self.assertRaisesRegex((TypeError, ValueError), "apply_fn"):
      synflow(0.5, None, (1, 3))

  def test_loss_fn_not_scalar(self):
    tx = snip(0.5, lambda p, b: b[0] @ p["w1"] @ p["w2"], (X, Y))
    with self.assertRaisesRegex(ValueError, r"snip_scores: loss_fn.*scalar"):
      tx.init(linear_params())

  @parameterized.parameters((js.NM(2, 4),), (js.Block(2, 2),))
  def test_global_allocation_with_structured_pattern(self, pattern):
    for make in (snip, grasp):
      with self.assertRaisesRegex(
        ValueError,
        rf"{make.__name__}: .*allocation=js.uniform\(\)|Unstructured",
      ):
        make(0.5, linear_loss, (X, Y), pattern=pattern)

  def test_pattern_not_fitting_names_leaf(self):
    tx = snip(
      0.5, linear_loss, (X, Y), pattern=js.NM(2, 4), allocation=js.uniform()
    )
    with self.assertRaisesRegex(ValueError, r"snip: w1: axis -2 has size 3"):
      tx.init(linear_params())

  @parameterized.parameters(0, -3)
  def test_iterations(self, iterations):
    with self.assertRaisesRegex(ValueError, r"iterations=.* must be an int"):
      synflow(0.5, linear_apply, (1, 3), iterations=iterations)

  def test_input_shape(self):
    with self.assertRaisesRegex(ValueError, r"input_shape must be a tuple"):
      synflow(0.5, linear_apply, (1, 0))

  def test_needs_params(self):
    params = linear_params()
    tx = snip(0.5, linear_loss, (X, Y))
    with self.assertRaisesRegex(ValueError, r"snip: `params` is required"):
      tx.update(params, tx.init(params))


if __name__ == "__main__":
  absltest.main()
