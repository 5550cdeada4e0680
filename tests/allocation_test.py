"""Allocation: ER/ERK against RigL's loop written in plain Python."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import jaxsparse as js


def rigl_erdos_renyi(shapes, sparsity, include_kernel, power=1.0):
  """RigL's ``get_sparsities_erdos_renyi`` rule with real-valued counts."""
  dense = set()
  while True:
    divisor, rhs, raw = 0.0, 0.0, {}
    for i, shape in enumerate(shapes):
      n = float(np.prod(shape))
      if i in dense:
        rhs -= sparsity * n
      else:
        rhs += (1 - sparsity) * n
        if include_kernel:
          raw[i] = (np.sum(shape) / np.prod(shape)) ** power
        else:
          raw[i] = (shape[-2] + shape[-1]) / (shape[-2] * shape[-1])
        divisor += raw[i] * n
    eps = rhs / divisor
    max_prob = max(raw.values())
    if max_prob * eps > 1:
      dense.update(i for i, p in raw.items() if p == max_prob)
    else:
      break
  return [0.0 if i in dense else 1 - eps * raw[i] for i in range(len(shapes))]


SHAPES = [(3, 3, 3, 64), (3, 3, 64, 128), (784, 300), (300, 100), (100, 10)]


class AllocationTest(parameterized.TestCase):
  @parameterized.product(
    sparsity=[0.5, 0.8, 0.9, 0.95, 0.99], kind=["er", "erk", "erk_half"]
  )
  def test_matches_rigl(self, sparsity, kind):
    allocation = {"er": js.er(), "erk": js.erk(), "erk_half": js.erk(0.5)}[kind]
    with jax.numpy_dtype_promotion("strict"):
      got = jax.jit(lambda s: js.layer_sparsities(allocation, SHAPES, s))(
        jnp.float32(sparsity)
      )
    want = rigl_erdos_renyi(
      SHAPES, sparsity, kind != "er", 0.5 if kind == "erk_half" else 1.0
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    sizes = np.array([np.prod(s) for s in SHAPES])
    total_sparsity = np.sum(np.asarray(got) * sizes) / sizes.sum()
    self.assertAlmostEqual(total_sparsity, sparsity, places=5)

  def test_redistribution_makes_small_layers_dense(self):
    got = np.asarray(js.layer_sparsities(js.erk(), SHAPES, 0.5))
    self.assertEqual(got[0], 0.0)  # the first conv would exceed density 1
    self.assertGreater(got[2], got[4])

  def test_uniform(self):
    got = js.layer_sparsities(js.uniform(), SHAPES, 0.7)
    np.testing.assert_allclose(np.asarray(got), 0.7)

  def test_zero_sparsity_is_dense(self):
    got = js.layer_sparsities(js.erk(), SHAPES, 0.0)
    np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-6)

  def test_not_an_allocation(self):
    # With the jaxtyping/beartype hook on, the annotation rejects it first.
    with self.assertRaisesRegex((ValueError, TypeError), "allocation"):
      js.magnitude_pruning(0.5, allocation="erk")
    with self.assertRaisesRegex(ValueError, "is not an allocation"):
      js.allocation.check_allocation("erk")


if __name__ == "__main__":
  absltest.main()
