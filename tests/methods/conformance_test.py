"""Every method through the invariants of DESIGN.md (see conformance.py)."""

import tempfile

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest, parameterized
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse import patterns
from tests.methods import conformance as cf

NAMES = sorted(cf.CONFIGS)


def _named(**kwargs):
  return [dict(testcase_name=name, name=name, **kwargs) for name in NAMES]


def _zeros_cases(combinations):
  return [
    dict(
      testcase_name=f"{name}_{dtype}_{wrap}", name=name, dtype=dtype, wrap=wrap
    )
    for name in NAMES
    for dtype, wrap in combinations
  ]


def check_zeros_and_counts(testcase, name, dtype, wrap):
  """Seven steps: pruned entries bitwise zero, masks follow the pattern and
  hold the expected counts after every step."""
  config = cf.CONFIGS[name]
  method = config.make()
  if wrap == "sparsify" or config.needs_grads:
    tx = js.sparsify(optax.adam(1e-2), method)
  else:
    tx = optax.chain(optax.sgd(1e-2, momentum=0.9), method)
  step = jax.jit(tx.update)
  initial = cf.make_params(jnp.dtype(dtype))
  for count, params, state in cf.run(tx, initial, 7, step):
    masks = js.masks(state)
    cf.assert_pruned_are_zero(testcase, params, masks)
    for m in jax.tree.leaves(masks):
      testcase.assertTrue(patterns.follows(config.pattern, m))
    if config.exact_counts:
      testcase.assertEqual(
        cf.kept_counts(
          params, masks, isinstance(config.allocation, js.GlobalThreshold)
        ),
        cf.expected_counts(config, params, masks, config.last_update(count)),
      )


class ConformanceTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()

  @parameterized.named_parameters(
    _zeros_cases((("float32", "sparsify"), ("bfloat16", "chain")))
  )
  def test_zeros_after_every_step_and_exact_counts(self, name, dtype, wrap):
    check_zeros_and_counts(self, name, dtype, wrap)

  @parameterized.named_parameters(_named())
  def test_eager_equals_jit(self, name):
    tx = js.sparsify(optax.sgd(1e-2), cf.CONFIGS[name].make())
    params = cf.make_params()
    eager = list(cf.run(tx, params, 3))[-1]
    jitted = list(cf.run(tx, params, 3, jax.jit(tx.update)))[-1]
    chex.assert_trees_all_equal(eager[1], jitted[1])
    chex.assert_trees_all_equal(js.masks(eager[2]), js.masks(jitted[2]))

  @parameterized.named_parameters(_named())
  def test_eval_shape_init(self, name):
    tx = js.sparsify(optax.adam(1e-3), cf.CONFIGS[name].make())
    params = cf.make_params()
    abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
    )
    shapes = jax.eval_shape(tx.init, abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, tx.init(params))

  @parameterized.named_parameters(_named())
  def test_no_retrace_as_schedule_advances(self, name):
    tx = js.sparsify(optax.adam(1e-3), cf.CONFIGS[name].make())

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params):
      return tx.update(grads, state, params)

    list(cf.run(tx, cf.make_params(), 7, step))

  @parameterized.named_parameters(_named())
  def test_strict_dtype_promotion(self, name):
    method = cf.CONFIGS[name].make()
    if cf.CONFIGS[name].needs_grads:
      tx = js.sparsify(optax.sgd(0.1), method)
    else:
      tx = optax.chain(optax.sgd(0.1), method)
    # Traced under the strict setting (part of jit's cache key); init runs
    # eagerly under it too.
    with jax.numpy_dtype_promotion("strict"):
      step = jax.jit(tx.update)
      for _, params, state in cf.run(tx, cf.make_params(jnp.bfloat16), 3, step):
        cf.assert_pruned_are_zero(self, params, js.masks(state))

  @parameterized.named_parameters(_named())
  def test_sharded_state_and_one_vs_eight_devices(self, name):
    mesh = jax.make_mesh((8,), ("x",))
    tx = js.sparsify(optax.adam(1e-2), cf.CONFIGS[name].make())
    params = cf.make_params()

    def spec(p):
      return P(*([None] * (p.ndim - 1)), "x") if p.shape[-1] % 8 == 0 else P()

    sharded = jax.tree.map(
      lambda p: jax.device_put(p, NamedSharding(mesh, spec(p))), params
    )
    state = tx.init(sharded)
    masks = js.masks(state)
    jax.tree.map(
      lambda p, m: (
        None if m is None else self.assertEqual(m.sharding, p.sharding)
      ),
      sharded,
      masks,
    )
    single = list(cf.run(tx, params, 5, jax.jit(tx.update)))[-1]
    multi = list(cf.run(tx, sharded, 5, jax.jit(tx.update)))[-1]
    chex.assert_trees_all_equal(single[1], multi[1])
    chex.assert_trees_all_equal(js.masks(single[2]), js.masks(multi[2]))

  @parameterized.named_parameters(_named())
  def test_checkpoint_round_trip(self, name):
    tx = js.sparsify(optax.adam(1e-2), cf.CONFIGS[name].make())
    params = cf.make_params()
    _, params, state = list(cf.run(tx, params, 3, jax.jit(tx.update)))[-1]
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    directory = epath.Path(tmp.name) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory, state)
      checkpointer.wait_until_finished()
      target = jax.eval_shape(tx.init, params)
      restored = checkpointer.restore(directory, target)
    chex.assert_trees_all_equal(restored, state)
    # The restored state carries on exactly as the original.
    grads = cf.fake_grads(params, 3)
    step = jax.jit(tx.update)
    chex.assert_trees_all_equal(
      step(grads, restored, params), step(grads, state, params)
    )

  def test_inject_hyperparams_changes_sparsity_without_retrace(self):
    tx = optax.chain(
      optax.sgd(0.0),
      optax.inject_hyperparams(
        js.magnitude_pruning,
        static_args=("pattern", "allocation", "where", "update_every"),
      )(sparsity=0.5, update_every=1),
    )
    params = cf.make_params()
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params):
      return tx.update(grads, state, params)

    for sparsity in (0.5, 0.75, 0.9):
      state[1].hyperparams["sparsity"] = jnp.asarray(sparsity, jnp.float32)
      updates, state = step(cf.fake_grads(params, 0), state, params)
      masks = js.masks(state)
      kernel = masks["dense0"]["kernel"]
      self.assertEqual(
        int(kernel.sum()), kernel.size - round(sparsity * kernel.size)
      )


@pytest.mark.slow
class SlowConformanceTest(parameterized.TestCase):
  """The other two dtype/wrapper combinations (``pytest -m slow``)."""

  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()

  @parameterized.named_parameters(
    _zeros_cases((("float32", "chain"), ("bfloat16", "sparsify")))
  )
  def test_zeros_after_every_step_and_exact_counts(self, name, dtype, wrap):
    check_zeros_and_counts(self, name, dtype, wrap)


if __name__ == "__main__":
  absltest.main()
