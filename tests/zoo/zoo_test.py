"""The outside-model zoo: every model through training, one-shot and packing.

For each model of :mod:`tests.zoo.models` (flax's own layers, linen and nnx;
Hugging Face Flax GPT-2, BERT, Llama; flaxmodels ResNet-18), written by
others and run as their library intends:

* the kernels are found from the traced computation with the contraction
  axes the library's layer definitions give, and embeddings, position
  tables, norms and biases stay dense;
* GMP, RigL, SR-STE 2:4 and global magnitude training steps keep exact
  counts per kernel matrix (in total for global), exact zeros, and N:M
  groups along each kernel's contraction;
* one-shot magnitude, Wanda and SparseGPT (unstructured and 2:4) prune block
  by block with per-layer reconstruction errors;
* ``js.nn.pack`` + ``js.nn.apply`` run the unchanged model with output equal
  to the masked dense model (the reference: the library's own forward pass
  on masked weights), which also checks that each kernel's matrices are
  the ones the model multiplies by.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
import jaxsparse.nn as jsnn
from tests.zoo.models import MODELS

NAMES = list(MODELS)
SPARSITY = 0.5


@functools.cache
def model(name):
  return MODELS[name]()


@functools.cache
def all_kernels(name):
  m = model(name)
  return js.find_kernels(m.apply_fn, m.params, m.batch)


def kernels(name):
  """The kernels the zoo sparsifies (a subset for large models)."""
  found, subset = all_kernels(name), model(name).subset
  if subset is None:
    return found
  drop = [p for p in found.selected if not re.search(subset, p)]
  return found.exclude(*(f"^{re.escape(p)}$" for p in drop))


def nm_kernels(name, m=4, packable=False):
  """The kernels whose matrices have ``K`` divisible by ``m`` (N:M-able);
  ``packable``: matmul kernels only (convolutions do not run packed)."""
  found = kernels(name)
  params = by_path(model(name).params)
  odd = [
    p
    for p in found.selected
    if found[p].layout.matrix_shape(params[p].shape)[0] % m
    or (packable and found[p].layout.kind == "conv")
  ]
  return found.exclude(*(f"^{re.escape(p)}$" for p in odd)) if odd else found


def matrices(x, layout):
  return np.asarray(js.layout.to_matrices(np.asarray(x), layout))


def by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is None
  )[0]
  return {js.masking.path_str(key): leaf for key, leaf in flat}


def loss_fn(apply_fn, batch):
  return lambda p: jnp.mean(jnp.square(apply_fn(p, batch).astype(jnp.float32)))


class KernelsTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_layouts_and_dense_leaves(self, name):
    m, found = model(name), all_kernels(name)
    self.assertGreaterEqual(len(found.selected), 2, str(found))
    for path, contract in m.layouts.items():
      with self.subTest(path):
        self.assertEqual(found[path].role, "kernel", str(found))
        self.assertEqual(found[path].layout.contract, contract)
    for regex in m.not_kernels:
      hits = [p for p in found if re.search(regex, p)]
      self.assertNotEmpty(hits, regex)
      for path in hits:
        self.assertNotEqual(found[path].role, "kernel", path)


class TrainingTest(parameterized.TestCase):
  def run_steps(self, name, tx, steps, where):
    m = model(name)
    loss = loss_fn(m.apply_fn, m.batch)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params, state = m.params, tx.init(m.params)
    history = []
    for _ in range(steps):
      params, state = step(params, state)
      history.append((params, js.masks(state)))
    masks = history[-1][1]
    found = kernels(name)
    for path, mask in by_path(masks).items():
      if mask is None:
        self.assertNotIn(path, where.selected)
        continue
      self.assertIn(path, where.selected)
      p = np.asarray(by_path(params)[path])
      np.testing.assert_array_equal(p[~np.asarray(mask)], 0, path)
    return history, found

  def per_matrix_counts(self, name, masks):
    found = kernels(name)
    out = {}
    for path, mask in by_path(masks).items():
      if mask is not None:
        out[path] = matrices(mask, found[path].layout).sum((1, 2))
    return out

  def expected_kept(self, name, path):
    found = kernels(name)
    shape = by_path(model(name).params)[path].shape
    k, n = found[path].layout.matrix_shape(shape)
    return k * n - int(np.round(np.float32(SPARSITY) * np.float32(k * n)))

  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_gmp(self, name):
    where = kernels(name)
    tx = optax.chain(
      optax.sgd(1e-3),
      js.magnitude_pruning(js.gmp(SPARSITY, 0, 2), update_every=1, where=where),
    )
    history, _ = self.run_steps(name, tx, 3, where)
    for path, counts in self.per_matrix_counts(name, history[-1][1]).items():
      np.testing.assert_array_equal(
        counts, self.expected_kept(name, path), path
      )

  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_rigl(self, name):
    where = kernels(name)
    tx = js.sparsify(
      optax.sgd(1e-3),
      js.rigl(SPARSITY, allocation=js.uniform(), update_every=1, where=where),
    )
    history, _ = self.run_steps(name, tx, 2, where)
    for _, masks in history:  # the random start, then one rewiring
      for path, counts in self.per_matrix_counts(name, masks).items():
        np.testing.assert_array_equal(
          counts, self.expected_kept(name, path), path
        )

  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_sr_ste_2_4_along_the_contraction(self, name):
    where = nm_kernels(name)
    tx = js.sparsify(optax.sgd(1e-3), js.sr_ste(js.NM(2, 4), where=where))
    history, found = self.run_steps(name, tx, 2, where)
    params, masks = history[-1]
    for path, mask in by_path(masks).items():
      if mask is None:
        continue
      groups = matrices(mask, found[path].layout)  # [S, K, N]
      s, k, n = groups.shape
      per_group = groups.reshape(s, k // 4, 4, n).sum(2)
      np.testing.assert_array_equal(per_group, 2, path)
    report = js.summary(params, masks, js.NM(2, 4), kernels=found)
    self.assertTrue(all(r.pattern_ok for r in report.records), str(report))

  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_global_magnitude(self, name):
    where = kernels(name)
    tx = optax.chain(
      optax.sgd(1e-3),
      js.global_magnitude_pruning(SPARSITY, update_every=1, where=where),
    )
    history, _ = self.run_steps(name, tx, 1, where)
    masks = [m for m in by_path(history[-1][1]).values() if m is not None]
    total = sum(m.size for m in masks)
    kept = total - int(np.round(np.float32(SPARSITY) * np.float32(total)))
    self.assertEqual(sum(int(np.asarray(m).sum()) for m in masks), kept)


ONESHOT = {
  "magnitude": (js.oneshot.magnitude, js.Unstructured()),
  "wanda": (js.oneshot.wanda, js.Unstructured()),
  "sparsegpt": (js.oneshot.sparsegpt, js.Unstructured()),
  "sparsegpt_2_4": (js.oneshot.sparsegpt, js.NM(2, 4)),
}


class OneShotTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (f"{n}_{method}", n, method) for n in NAMES for method in ONESHOT
  )
  def test_block_by_block(self, name, method):
    m = model(name)
    make, pattern = ONESHOT[method]
    nm = isinstance(pattern, js.NM)
    where = nm_kernels(name) if nm else kernels(name)
    result = js.oneshot.prune(
      m.apply_fn,
      m.params,
      [m.batch],
      make(),
      sparsity=None if nm else SPARSITY,
      pattern=pattern,
      where=where,
    )
    self.assertNotEmpty(result.layers)
    groups = {r.group for r in result.layers.values()}
    if m.blocks:
      self.assertGreater(len(groups), 1, groups)
    found = kernels(name)
    shapes = by_path(m.params)
    for label, record in result.layers.items():
      path = label.split("[")[0]
      k, n = found[path].layout.matrix_shape(shapes[path].shape)
      # Magnitude keeps an exact count per matrix, Wanda and SparseGPT per
      # output (column): round-half-even of s times the count.
      size = k * n if method == "magnitude" and not nm else k
      pruned = int(np.round(np.float32(SPARSITY) * np.float32(size)))
      self.assertAlmostEqual(record.sparsity, pruned / size, 6, label)
      self.assertTrue(np.isfinite(record.error), label)
      self.assertGreaterEqual(record.error, 0.0, label)
    masks = by_path(result.masks)
    params = by_path(result.params)
    for path in where.selected:
      mask = np.asarray(masks[path])
      np.testing.assert_array_equal(np.asarray(params[path])[~mask], 0)
      spec = js.masking.LeafSpec(path, pattern, found[path].layout)
      self.assertTrue(spec.follows(mask), path)
    report = js.summary(result.params, result.masks, pattern, kernels=found)
    self.assertTrue(all(r.pattern_ok for r in report.records), str(report))


class PackedTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in NAMES)
  def test_packed_model_equals_masked_dense_model(self, name):
    m = model(name)
    where = nm_kernels(name, packable=True)
    specs = js.masking.leaf_specs(where, m.params, "zoo", js.NM(2, 4))
    masks = jax.tree.map(
      lambda p, s: s.select(jnp.abs(p), SPARSITY) if s else None,
      m.params,
      specs,
    )
    packed = jsnn.pack(m.params, masks, js.NM(2, 4), kernels=kernels(name))
    run = jax.jit(lambda q, x: jsnn.apply(m.apply_fn, q, x, impl="reference"))
    y = run(packed, m.batch)
    expected = m.apply_fn(js.apply_masks(m.params, masks), m.batch)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)

  @parameterized.named_parameters(
    (n, n) for n in NAMES if "conv" in n or "resnet" in n
  )
  def test_conv_kernels_are_refused_by_name(self, name):
    m, found = model(name), kernels(name)
    conv = next(p for p in found.selected if found[p].layout.kind == "conv")
    masks = jax.tree_util.tree_map_with_path(
      lambda k, p: (
        jnp.ones(p.shape, bool) if js.masking.path_str(k) == conv else None
      ),
      m.params,
    )
    with self.assertRaisesRegex(ValueError, f"{conv}: is a convolution"):
      jsnn.pack(m.params, masks, js.NM(2, 4), kernels=found)


if __name__ == "__main__":
  absltest.main()
