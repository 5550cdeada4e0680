"""jaxsparse inside flax: linen TrainState and nnx.Optimizer, unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from flax import nnx
from flax.training import train_state

import jaxsparse as js


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 32, rngs=rngs)
    self.out = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def batch(step):
  key = jax.random.fold_in(jax.random.key(0), step)
  x = jax.random.normal(key, (16, 8))
  return x, (x[:, :4].sum(-1) > 0).astype(jnp.int32) + 2 * (x[:, 4] > 0)


def loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def method():
  return js.magnitude_pruning(js.gmp(0.75, 0, 4), update_every=2)


def assert_masked(testcase, kernel, mask):
  testcase.assertTrue(np.all(np.asarray(kernel)[~np.asarray(mask)] == 0))


class FlaxTest(absltest.TestCase):
  def test_linen_train_state(self):
    model = LinenMLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=js.sparsify(optax.adam(1e-2), method()),
    )

    @jax.jit
    def step(state, x, y):
      grads = jax.grad(lambda p: loss(state.apply_fn({"params": p}, x), y))(
        state.params
      )
      return state.apply_gradients(grads=grads)

    for t in range(6):
      state = step(state, *batch(t))
      masks = js.masks(state.opt_state)
      for layer in ("Dense_0", "Dense_1"):
        assert_masked(
          self, state.params[layer]["kernel"], masks[layer]["kernel"]
        )
    kernel_mask = masks["Dense_0"]["kernel"]
    self.assertEqual(int(kernel_mask.sum()), kernel_mask.size // 4)

  def test_nnx_optimizer(self):
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
      model, js.sparsify(optax.adam(1e-2), method()), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, optimizer, x, y):
      grads = nnx.grad(lambda m: loss(m(x), y))(model)
      optimizer.update(model, grads)

    for t in range(6):
      step(model, optimizer, *batch(t))
      masks = js.masks(optimizer.opt_state)
      assert_masked(self, model.hidden.kernel[...], masks["hidden"]["kernel"])
      assert_masked(self, model.out.kernel[...], masks["out"]["kernel"])
    self.assertIsNone(masks["hidden"]["bias"])
    self.assertEqual(int(np.asarray(masks["out"]["kernel"]).sum()), 32)


if __name__ == "__main__":
  absltest.main()
