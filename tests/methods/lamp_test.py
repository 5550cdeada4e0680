"""LAMP scores and pruning against a plain-numpy statement of eq. 2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxsparse import scores
from jaxsparse.methods.pruning import lamp_pruning
from tests.methods import conformance as cf


def numpy_lamp(weights: np.ndarray) -> np.ndarray:
  """Lee et al 2021, eq. 2, in float64.

  Sort the entries by ascending |w| (equal ones by flat index); the score of
  the u-th is w_u^2 / sum_{v >= u} w_v^2 (0 when that sum is 0).
  """
  flat = np.asarray(weights, np.float64).ravel()
  order = np.argsort(flat**2, kind="stable")
  out = np.zeros(flat.size)
  for rank, index in enumerate(order):
    tail = np.sum(flat[order[rank:]] ** 2)
    out[index] = flat[index] ** 2 / tail if tail > 0 else 0.0
  return out.reshape(np.shape(weights))


def numpy_global_topk(score_list, kept):
  """Keep the `kept` largest scores over all leaves; ties: earlier leaf, then
  lower index (the order jaxsparse's top-k resolves ties in)."""
  flat = np.concatenate([s.ravel() for s in score_list])
  order = np.lexsort((np.arange(flat.size), -flat))
  keep = np.zeros(flat.size, bool)
  keep[order[:kept]] = True
  out, start = [], 0
  for s in score_list:
    out.append(keep[start : start + s.size].reshape(s.shape))
    start += s.size
  return out


KERNELS = (("conv", "kernel"), ("dense0", "kernel"), ("dense1", "kernel"))


class LampScoreTest(parameterized.TestCase):
  def test_hand_computed(self):
    # Ascending: 1, 2, -3: 1/(1+4+9), 4/(4+9), 9/9.
    got = np.asarray(scores.lamp(jnp.array([1.0, -3.0, 2.0])))
    np.testing.assert_allclose(got, [1 / 14, 1.0, 4 / 13], rtol=1e-6)

  def test_ties_ordered_by_flat_index(self):
    # |w| = 2, 2, 1: order idx2 (1), idx0 (2), idx1 (2).
    got = np.asarray(scores.lamp(jnp.array([2.0, -2.0, 1.0])))
    np.testing.assert_allclose(got, [4 / 8, 1.0, 1 / 9], rtol=1e-6)

  def test_zero_leaf_scores_zero(self):
    got = np.asarray(scores.lamp(jnp.zeros((3, 4))))
    np.testing.assert_array_equal(got, np.zeros((3, 4)))

  @parameterized.parameters("float32", "bfloat16")
  def test_matches_numpy_eq2(self, dtype):
    params = cf.make_params(jnp.dtype(dtype), seed=3)
    got = jax.jit(scores.lamp)(params)
    for name, leaf in KERNELS:
      weights = np.asarray(params[name][leaf], np.float32)
      score = got[name][leaf]
      self.assertEqual(score.dtype, jnp.float32)
      np.testing.assert_allclose(
        np.asarray(score), numpy_lamp(weights), rtol=2e-5, atol=1e-7
      )

  def test_largest_scores_one_and_all_in_unit_interval(self):
    params = cf.make_params()
    got = jax.jit(scores.lamp)(params)
    for name, leaf in KERNELS:
      score = np.asarray(got[name][leaf])
      weights = np.abs(np.asarray(params[name][leaf]))
      self.assertEqual(score.flat[np.argmax(weights)], 1.0)
      self.assertTrue(np.all((score >= 0) & (score <= 1)))

  def test_invariant_to_layer_scale(self):
    w = jax.random.normal(jax.random.key(0), (8, 8))
    np.testing.assert_allclose(
      np.asarray(scores.lamp(w)), np.asarray(scores.lamp(1e-3 * w)), rtol=1e-5
    )


class LampPruningTest(parameterized.TestCase):
  @parameterized.parameters(0.5, 0.9, 0.99)
  def test_masks_are_global_topk_of_lamp_scores(self, sparsity):
    params = cf.make_params(seed=1)
    tx = optax.chain(optax.sgd(0.0), lamp_pruning(sparsity))
    _, state = jax.jit(tx.update)(
      cf.fake_grads(params, 0), tx.init(params), params
    )
    masks = state[1].masks
    weights = [np.asarray(params[n][k]) for n, k in KERNELS]
    total = sum(w.size for w in weights)
    kept = total - int(np.round(np.float32(sparsity) * np.float32(total)))
    want = numpy_global_topk([numpy_lamp(w) for w in weights], kept)
    for (name, leaf), mask in zip(KERNELS, want):
      np.testing.assert_array_equal(np.asarray(masks[name][leaf]), mask)
    self.assertIsNone(masks["dense0"]["bias"])
    self.assertIsNone(masks["embed"]["embedding"])

  def test_largest_weight_of_each_layer_survives(self):
    # dense1 is 1000x smaller than the rest: global magnitude pruning would
    # empty it, LAMP keeps at least its largest weight.
    params = cf.make_params(seed=2)
    params["dense1"]["kernel"] = 1e-3 * params["dense1"]["kernel"]
    tx = optax.chain(optax.sgd(0.0), lamp_pruning(0.995))
    updates, state = jax.jit(tx.update)(
      jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    new = optax.apply_updates(params, updates)
    for name, leaf in KERNELS:
      weights = np.abs(np.asarray(params[name][leaf]))
      mask = np.asarray(state[1].masks[name][leaf])
      self.assertTrue(mask.flat[np.argmax(weights)], name)
      self.assertNotEqual(float(np.abs(np.asarray(new[name][leaf])).max()), 0)

  def test_scores_current_params_at_each_update(self):
    # Iterative LAMP: re-scored every `update_every` steps on the weights the
    # step starts from.
    schedule = lambda count: jnp.minimum(count, 4) * 0.2
    tx = optax.chain(optax.sgd(0.05), lamp_pruning(schedule, update_every=2))
    prev = cf.make_params()
    run = cf.run(tx, prev, 5, jax.jit(tx.update))
    for count, params, state in run:
      if count % 2 == 0:
        weights = [np.asarray(prev[n][k]) for n, k in KERNELS]
        total = sum(w.size for w in weights)
        s = np.float32(min(count, 4) * 0.2)
        kept = total - int(np.round(s * np.float32(total)))
        want = numpy_global_topk([numpy_lamp(w) for w in weights], kept)
        for (name, leaf), mask in zip(KERNELS, want):
          got = np.asarray(state[1].masks[name][leaf])
          np.testing.assert_array_equal(got, mask)
      prev = params


class LampErrorTest(parameterized.TestCase):
  @parameterized.parameters(1.0, -0.1)
  def test_sparsity_outside_unit_interval(self, value):
    with self.assertRaisesRegex(ValueError, r"sparsity=.* outside \[0, 1\)"):
      lamp_pruning(value)

  def test_needs_params(self):
    params = cf.make_params()
    tx = lamp_pruning(0.5)
    with self.assertRaisesRegex(ValueError, r"lamp_pruning: `params`"):
      tx.update(params, tx.init(params))

  def test_bad_cadence(self):
    with self.assertRaisesRegex(ValueError, "update_every=0"):
      lamp_pruning(0.5, update_every=0)


if __name__ == "__main__":
  absltest.main()
