"""js.fixed_masks: given masks (e.g. one-shot's) held fixed while training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

import jaxsparse as js
from jaxsparse import oneshot


def pruned_mlp():
  model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
  x = jax.random.normal(jax.random.key(0), (64, 16))
  y = jax.random.randint(jax.random.key(1), (64,), 0, 4)
  params = model.init(jax.random.key(2), x)["params"]
  result = oneshot.prune(
    lambda p, x: model.apply({"params": p}, x),
    params,
    [x],
    oneshot.wanda(),
    sparsity=0.75,
  )

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return result, loss_fn


def train(tx, params, loss_fn, steps):
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


class FixedMasksTest(absltest.TestCase):
  def test_one_shot_masks_stay_fixed_and_zero_while_loss_falls(self):
    result, loss_fn = pruned_mlp()
    tx = js.sparsify(optax.adam(1e-2), js.fixed_masks(result.masks))
    params, state = train(tx, result.params, loss_fn, steps=20)

    def check(p, m, m0):
      if m0 is None:
        self.assertIsNone(m)
        return
      np.testing.assert_array_equal(m, m0)
      self.assertTrue(np.all(np.asarray(p)[~np.asarray(m)] == 0))

    jax.tree.map(
      check, params, js.masks(state), result.masks, is_leaf=lambda x: x is None
    )
    self.assertLess(loss_fn(params), loss_fn(result.params))

  def test_chained_projection_equals_the_rule_and_jit(self):
    result, loss_fn = pruned_mlp()
    tx = optax.chain(optax.sgd(0.1), js.fixed_masks(result.masks))
    eager, _ = train(tx, result.params, loss_fn, steps=3)
    # eager == jit for the transform (same grads in; the model's own
    # gradient may differ by an ulp between eager and fused code).
    grads = jax.grad(loss_fn)(eager)
    state = tx.init(eager)
    jax.tree.map(
      np.testing.assert_array_equal,
      tx.update(grads, state, eager),
      jax.jit(tx.update)(grads, state, eager),
    )
    # The rule in plain jnp: p <- where(m, p - lr * g, 0).
    p = result.params
    for _ in range(3):
      g = jax.grad(loss_fn)(p)
      p = jax.tree.map(
        lambda p, g, m: (
          p - 0.1 * g if m is None else jnp.where(m, p - 0.1 * g, 0)
        ),
        p,
        g,
        result.masks,
        is_leaf=lambda x: x is None,
      )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      eager,
      p,
    )

  def test_a_mask_that_does_not_fit_names_the_leaf(self):
    result, _ = pruned_mlp()
    bad = jax.tree.map(lambda m: m, result.masks)
    bad["layers_0"]["kernel"] = jnp.ones((3, 3), bool)
    tx = js.fixed_masks(bad)
    with self.assertRaisesRegex(ValueError, "layers_0/kernel: mask shape"):
      tx.init(result.params)


if __name__ == "__main__":
  absltest.main()
