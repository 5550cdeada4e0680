"""Calibration capture: statistics equal numpy sums of the real inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import jaxsparse as js
from jaxsparse import oneshot
from jaxsparse.oneshot import capture
from tests import oneshot as tiny


def assert_stats(test, stats, rows, gram=True):
  rows = np.asarray(rows, np.float64)
  test.assertEqual(float(stats.count), rows.shape[0])
  np.testing.assert_allclose(stats.sum, rows.sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(stats.sq_sum, (rows**2).sum(0), rtol=1e-5)
  if gram:
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
  else:
    test.assertIsNone(stats.gram)


class CaptureTest(absltest.TestCase):
  def test_statistics_equal_sums_of_captured_activations(self):
    params, xs = tiny.setup()
    stats = oneshot.layer_statistics(
      tiny.apply_fn, params, xs, tiny.KERNELS, gram=True
    )
    reference = tiny.reference_inputs(params, xs)
    self.assertEqual(list(stats), tiny.KERNELS)
    for path in tiny.KERNELS:
      with self.subTest(path):
        assert_stats(self, stats[path], reference[path])
        self.assertEqual(stats[path].sum.dtype, jnp.float32)

  def test_only_requested_layers_and_no_gram_by_default(self):
    params, xs = tiny.setup()
    path = "Block_1/Dense_1/kernel"
    stats = oneshot.layer_statistics(tiny.apply_fn, params, xs[:1], [path])
    self.assertEqual(list(stats), [path])
    assert_stats(
      self, stats[path], tiny.reference_inputs(params, xs[:1])[path], False
    )

  def test_layers_in_call_order(self):
    params, xs = tiny.setup()
    layers = oneshot.layers(tiny.apply_fn, params, xs[0])
    self.assertEqual([layer.path for layer in layers], tiny.KERNELS)
    self.assertEqual(layers[0].shape, (16, 32))
    self.assertEqual(layers[1].layout, js.Layout((0,)))
    self.assertEqual(layers[-1].shape, (16, 8))
    self.assertEqual({layer.calls for layer in layers}, {1})

  def test_variables_tree_with_params_prefix(self):
    params, xs = tiny.setup()
    variables = {"params": params}
    layers = oneshot.layers(
      lambda v, x: tiny.MODEL.apply(v, x), variables, xs[0]
    )
    self.assertEqual(
      [layer.path for layer in layers], ["params/" + p for p in tiny.KERNELS]
    )

  def test_shared_layer_accumulates_every_call(self):
    class Shared(nn.Module):
      @nn.compact
      def __call__(self, x):
        dense = nn.Dense(6)
        return dense(nn.relu(dense(x)))

    model = Shared()
    x = jax.random.normal(jax.random.key(0), (5, 6))
    params = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    stats = oneshot.layer_statistics(apply, params, [x], ["Dense_0/kernel"])
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["Dense_0"]["bias"], np.float64)
    first = np.asarray(x, np.float64)
    second = np.maximum(first @ w + b, 0)
    assert_stats(
      self, stats["Dense_0/kernel"], np.concatenate([first, second]), False
    )
    (layer,) = oneshot.layers(apply, params, x)
    self.assertEqual(layer.calls, 2)

  def test_dense_general_contracting_axes(self):
    x = jax.random.normal(jax.random.key(0), (3, 4, 6))
    for axis, rows in [
      ((-2, -1), np.asarray(x).reshape(3, 24)),
      (1, np.moveaxis(np.asarray(x), 1, -1).reshape(18, 4)),
    ]:
      with self.subTest(axis=axis):
        model = nn.DenseGeneral((5, 2), axis=axis)
        params = model.init(jax.random.key(1), x)["params"]
        apply = lambda p, x, model=model: model.apply({"params": p}, x)
        (layer,) = oneshot.layers(apply, params, x)
        self.assertEqual(layer.shape, (rows.shape[1], 10))
        stats = oneshot.layer_statistics(
          apply, params, [x], ["kernel"], gram=True
        )
        assert_stats(self, stats["kernel"], rows)

  def test_dense_general_batch_dims_gives_one_matrix_per_batch_entry(self):
    # Before, capture refused batch_dims; a batch axis of the kernel indexes
    # separate matrices, each with its own inputs.
    model = nn.DenseGeneral(3, axis=-1, batch_dims=(0,))
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    (layer,) = oneshot.layers(apply, params, x)
    self.assertEqual(layer.layout, js.Layout((1,), (0,)))
    self.assertEqual((layer.shape, layer.matrices), ((4, 3), 2))
    stats = oneshot.layer_statistics(apply, params, [x], ["kernel"], gram=True)
    for b in range(2):
      assert_stats(self, capture.stack_index(stats["kernel"], (b,)), x[b])

  def test_dense_inside_remat_and_scan_is_captured(self):
    # Before, lifted transforms were refused; now a remat'd layer is read
    # inside the remat, and a scanned stack gives statistics per layer.
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return jnp.tanh(nn.Dense(4)(x)), None

    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        scan = nn.scan(
          nn.remat(Layer),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          length=3,
        )
        return scan()(x, None)[0]

    model = Stack()
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    path = "ScanCheckpointLayer_0/Dense_0/kernel"
    stats = oneshot.layer_statistics(apply, params, [x], [path], gram=True)
    dense = params["ScanCheckpointLayer_0"]["Dense_0"]
    h = np.asarray(x, np.float64)
    for i in range(3):
      assert_stats(self, capture.stack_index(stats[path], (i,)), h)
      w = np.asarray(dense["kernel"][i], np.float64)
      h = np.tanh(h @ w + np.asarray(dense["bias"][i], np.float64))

  def test_uncalled_path_and_empty_calibration_are_errors(self):
    params, xs = tiny.setup()
    with self.assertRaisesRegex(ValueError, "Block_0/Dense_0/bias.*never"):
      oneshot.layer_statistics(
        tiny.apply_fn, params, xs, ["Block_0/Dense_0/bias"]
      )
    with self.assertRaisesRegex(ValueError, "no batch"):
      oneshot.layer_statistics(tiny.apply_fn, params, [], tiny.KERNELS)


if __name__ == "__main__":
  absltest.main()
