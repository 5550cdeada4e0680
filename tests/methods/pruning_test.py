"""Pruning methods against plain-numpy statements of their rules, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from tests.methods import conformance as cf


def numpy_topk_mask(values: np.ndarray, kept: int) -> np.ndarray:
  """Han et al's rule: keep the ``kept`` largest |w| (ties: lower index)."""
  flat = np.abs(values).ravel()
  order = np.lexsort((np.arange(flat.size), -flat))
  mask = np.zeros(flat.size, bool)
  mask[order[:kept]] = True
  return mask.reshape(values.shape)


class MagnitudeRuleTest(parameterized.TestCase):
  def test_scores_current_params_then_applies_update(self):
    # Masks are chosen on the params the step starts from; the update then
    # moves only the kept entries.
    params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    updates = {"w": jnp.array([[5.0, 0.0], [0.0, -4.0]])}
    tx = js.magnitude_pruning(0.5, update_every=1)
    out, state = tx.update(updates, tx.init(params), params)
    np.testing.assert_array_equal(
      np.asarray(state.masks["w"]), [[False, False], [True, True]]
    )
    new = optax.apply_updates(params, out)["w"]
    np.testing.assert_array_equal(np.asarray(new), [[0.0, 0.0], [3.0, 0.0]])

  def test_each_update_matches_numpy_topk(self):
    schedule = js.gmp(0.9, 0, 8)
    tx = optax.chain(
      optax.sgd(0.05), js.magnitude_pruning(schedule, update_every=2)
    )
    prev = cf.make_params()
    for count, params, state in cf.run(tx, prev, 9, jax.jit(tx.update)):
      if count % 2 == 0 or count == 8:
        masks = js.masks(state)
        for name in ("dense0", "dense1"):
          mask = np.asarray(masks[name]["kernel"])
          # Scored on the params the step started from.
          current = np.asarray(prev[name]["kernel"])
          s = float(schedule(count))
          kept = mask.size - int(
            np.round(np.float32(s) * np.float32(mask.size))
          )
          np.testing.assert_array_equal(mask, numpy_topk_mask(current, kept))
      prev = params

  def test_gmp_reaches_final_sparsity_at_end_step(self):
    tx = optax.chain(
      optax.sgd(0.01),
      js.magnitude_pruning(
        js.gmp(0.8, 2, 9), update_every=4, begin_step=2, end_step=9
      ),
    )
    densities = [
      js.masking.density(js.masks(state))
      for _, _, state in cf.run(tx, cf.make_params(), 12, jax.jit(tx.update))
    ]
    # Updates at steps 2 (GMP still at 0), 6 and 9 (end_step always updates).
    self.assertEqual(densities[:6], [1.0] * 6)
    want_6 = 0.8 * (1 - (1 - 4 / 7) ** 3)
    self.assertAlmostEqual(1 - densities[6], want_6, places=2)
    self.assertEqual(densities[6], densities[8])
    self.assertAlmostEqual(1 - densities[9], 0.8, places=2)
    self.assertEqual(densities[9], densities[11])

  def test_global_keeps_largest_across_layers(self):
    tx = optax.chain(optax.sgd(0.0), js.global_magnitude_pruning(0.9))
    params = cf.make_params()
    _, params, state = next(cf.run(tx, params, 1))
    masks = js.masks(state)
    kernels = [
      params["conv"]["kernel"],
      params["dense0"]["kernel"],
      params["dense1"]["kernel"],
    ]
    mask_list = [
      masks["conv"]["kernel"],
      masks["dense0"]["kernel"],
      masks["dense1"]["kernel"],
    ]
    kept = np.concatenate(
      [np.abs(np.asarray(k))[np.asarray(m)] for k, m in zip(kernels, mask_list)]
    )
    original = cf.make_params()
    pruned = np.concatenate(
      [
        np.abs(np.asarray(o))[~np.asarray(m)]
        for o, m in zip(
          [
            original["conv"]["kernel"],
            original["dense0"]["kernel"],
            original["dense1"]["kernel"],
          ],
          mask_list,
        )
      ]
    )
    total = sum(k.size for k in kernels)
    self.assertEqual(kept.size, total - round(0.9 * total))
    self.assertGreaterEqual(kept.min(), pruned.max())
    # Layers end up with different densities (it is global, not uniform).
    densities = {float(np.asarray(m).mean()) for m in mask_list}
    self.assertGreater(len(densities), 1)

  def test_default_where_skips_biases_and_embeddings(self):
    tx = js.magnitude_pruning(0.5)
    masks = tx.init(cf.make_params()).masks
    self.assertIsNone(masks["embed"]["embedding"])
    self.assertIsNone(masks["dense0"]["bias"])
    self.assertEqual(masks["dense0"]["kernel"].shape, (16, 32))


class RandomRuleTest(parameterized.TestCase):
  def test_static_and_seeded(self):
    def final_masks(seed, steps=5):
      tx = js.sparsify(
        optax.sgd(0.1), js.random_pruning(0.6, seed=seed, update_every=2)
      )
      run = cf.run(tx, cf.make_params(), steps, jax.jit(tx.update))
      return [js.masks(state) for _, _, state in run]

    first = final_masks(0)
    for masks in first[1:]:  # static: unchanged by later updates
      jax.tree.map(np.testing.assert_array_equal, first[0], masks)
    same = final_masks(0)[-1]
    jax.tree.map(np.testing.assert_array_equal, first[-1], same)
    other = final_masks(1)[-1]
    self.assertFalse(
      np.array_equal(first[-1]["dense0"]["kernel"], other["dense0"]["kernel"])
    )

  def test_independent_of_magnitude(self):
    # Random masks do not favour large weights: kept mean |w| ~ overall mean.
    params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    tx = js.random_pruning(0.5)
    _, state = tx.update(
      jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    w, m = np.abs(np.asarray(params["w"])), np.asarray(state.masks["w"])
    self.assertAlmostEqual(w[m].mean() / w.mean(), 1.0, delta=0.02)


class LargeModelTest(parameterized.TestCase):
  """Global counts past 2^31 (x64 off): the update lowers, counts in uint32
  pairs (``threshold.Count``); nothing is allocated (abstract params)."""

  @parameterized.parameters("global_magnitude", "lamp", "st3")
  def test_lowers_past_two_to_the_33_selected_weights(self, name):
    params = {
      f"w{i}": jax.ShapeDtypeStruct((2**15, 2**15), jnp.float32)
      for i in range(9)
    }
    tx = {
      "global_magnitude": lambda: optax.chain(
        optax.sgd(0.1), js.global_magnitude_pruning(0.9, update_every=1)
      ),
      "lamp": lambda: optax.chain(
        optax.sgd(0.1), js.lamp_pruning(0.9, update_every=1)
      ),
      "st3": lambda: js.sparsify(optax.sgd(0.1), js.st3(0.9)),
    }[name]()
    state = jax.eval_shape(tx.init, params)
    jax.jit(tx.update).lower(params, state, params)


class ErrorTest(parameterized.TestCase):
  @parameterized.parameters(1.0, -0.1, 1.2)
  def test_sparsity_outside_unit_interval(self, value):
    with self.assertRaisesRegex(ValueError, r"sparsity=.* outside \[0, 1\)"):
      js.magnitude_pruning(value)

  def test_schedule_reaching_one(self):
    with self.assertRaisesRegex(ValueError, r"sparsity\(0\)=1.0 is outside"):
      js.magnitude_pruning(lambda count: 1.0)

  def test_n_greater_than_m(self):
    with self.assertRaisesRegex(ValueError, r"NM\(n=4, m=2.*0 < n <= m"):
      js.magnitude_pruning(pattern=js.NM(4, 2))

  def test_m_not_dividing_axis_names_leaf(self):
    params = {"layer": {"kernel": jnp.ones((6, 8))}}
    tx = js.magnitude_pruning(pattern=js.NM(2, 4))
    with self.assertRaisesRegex(
      ValueError, r"layer/kernel: axis -2 has size 6"
    ):
      tx.init(params)

  def test_block_not_dividing_names_leaf(self):
    params = {"dense": {"kernel": jnp.ones((8, 6))}}
    with self.assertRaisesRegex(ValueError, r"dense/kernel: shape \(8, 6\)"):
      js.magnitude_pruning(0.5, pattern=js.Block(4, 4)).init(params)

  def test_integer_param_names_leaf(self):
    params = {
      "table": {"ids": jnp.ones((4, 4), jnp.int32)},
      "w": jnp.ones((4, 4)),
    }
    with self.assertRaisesRegex(
      ValueError, r"table/ids has dtype int32.*`where=`"
    ):
      js.magnitude_pruning(0.5).init(params)

  def test_method_needs_params(self):
    params = cf.make_params()
    for tx in (
      js.magnitude_pruning(0.5),
      js.sparsify(optax.sgd(0.1), js.random_pruning(0.5)),
    ):
      with self.assertRaisesRegex(ValueError, r"`params` is required"):
        tx.update(params, tx.init(params))

  def test_where_selects_nothing(self):
    with self.assertRaisesRegex(ValueError, r"selects no param.*dense0/kernel"):
      js.magnitude_pruning(0.5, where="no_such_layer").init(cf.make_params())

  def test_exclude_matching_nothing(self):
    where = js.default_where(exclude=("Dense_7",))
    with self.assertRaisesRegex(
      ValueError, r"exclude='Dense_7' matches no param"
    ):
      js.magnitude_pruning(0.5, where=where).init(cf.make_params())

  def test_nm_sparsity_mismatch(self):
    with self.assertRaisesRegex(ValueError, r"sparsity=0.9 does not match NM"):
      js.magnitude_pruning(0.9, pattern=js.NM(2, 4))

  def test_nm_schedule_beyond_level(self):
    with self.assertRaisesRegex(ValueError, r"reaches 0.9 at step .* NM"):
      js.magnitude_pruning(js.gmp(0.9, 0, 10), pattern=js.NM(2, 4))
    js.magnitude_pruning(js.gmp(0.5, 0, 10), pattern=js.NM(2, 4))  # fine

  def test_nm_with_erk(self):
    with self.assertRaisesRegex(ValueError, "cannot redistribute"):
      js.magnitude_pruning(pattern=js.NM(2, 4), allocation=js.erk())

  def test_global_needs_unstructured(self):
    with self.assertRaisesRegex(ValueError, "needs pattern=js.Unstructured"):
      js.global_magnitude_pruning(0.5, pattern=js.Block(2, 2))

  def test_bad_cadence(self):
    with self.assertRaisesRegex(ValueError, "update_every=0"):
      js.magnitude_pruning(0.5, update_every=0)
    with self.assertRaisesRegex(
      ValueError, "end_step=3 is before begin_step=5"
    ):
      js.magnitude_pruning(0.5, begin_step=5, end_step=3)


if __name__ == "__main__":
  absltest.main()
