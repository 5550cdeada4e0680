"""AC/DC: the phase schedule, masks per phase, and moment resets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse import patterns
from jaxsparse.methods.acdc import ACDCSchedule, ACDCState, acdc, acdc_schedule
from tests.methods import conformance as cf

KERNELS = (("conv", "kernel"), ("dense0", "kernel"), ("dense1", "kernel"))


def python_phases(total, warmup, phase, final_dense, final_sparse):
  """The AC/DC schedule written out: 'D' dense, 'S' sparse, one per step.

  Dense warm-up; alternating sparse/dense phases (sparse first) until the
  last dense phase; then the final sparse phase.
  """
  alternating = total - warmup - final_dense - final_sparse
  cycle = ["S"] * phase + ["D"] * phase
  middle = (cycle * (alternating // len(cycle) + 1))[:alternating]
  return ["D"] * warmup + middle + ["D"] * final_dense + ["S"] * final_sparse


def numpy_global_topk(values, kept):
  flat = np.concatenate([np.abs(v).ravel() for v in values])
  order = np.lexsort((np.arange(flat.size), -flat))
  keep = np.zeros(flat.size, bool)
  keep[order[:kept]] = True
  out, start = [], 0
  for v in values:
    out.append(keep[start : start + v.size].reshape(v.shape))
    start += v.size
  return out


class ScheduleTest(parameterized.TestCase):
  @parameterized.parameters(
    (100, 10, 5, 10, 15),
    (40, 3, 4, 0, 5),
    (23, 0, 3, 2, 4),
    (12, 2, 1, 1, 1),
    (10, 9, 1, 0, 1),
  )
  def test_matches_python_statement(self, *lengths):
    total, warmup, phase, final_dense, final_sparse = lengths
    schedule = acdc_schedule(
      total,
      warmup_steps=warmup,
      phase_steps=phase,
      final_dense_steps=final_dense,
      final_sparse_steps=final_sparse,
    )
    got = ["S" if schedule.is_sparse(t) else "D" for t in range(total + 3)]
    want = python_phases(*lengths) + ["S"] * 3  # sparse after the end
    self.assertEqual("".join(got), "".join(want))

  def test_paper_defaults(self):
    # ImageNet, 100 epochs: dense 0-10, sparse/dense every 5 epochs, sparse
    # 70-75, dense 75-85, sparse 85-100 (the authors' ResNet50 config).
    schedule = acdc_schedule(100)
    self.assertEqual(schedule, ACDCSchedule(100, 10, 5, 10, 15))
    sparse = [int(t) for t in range(100) if schedule.is_sparse(t)]
    want = [t for s in range(10, 75, 10) for t in range(s, s + 5)]
    self.assertEqual(sparse, want + list(range(85, 100)))

  def test_jittable_with_traced_count(self):
    schedule = acdc_schedule(
      12,
      warmup_steps=2,
      phase_steps=1,
      final_dense_steps=1,
      final_sparse_steps=1,
    )
    got = jax.jit(jax.vmap(schedule.is_sparse))(jnp.arange(12))
    want = python_phases(12, 2, 1, 1, 1)
    self.assertEqual(["S" if g else "D" for g in np.asarray(got)], want)


class PhaseMasksTest(parameterized.TestCase):
  LENGTHS = dict(
    total_steps=10,
    warmup_steps=2,
    phase_steps=2,
    final_dense_steps=1,
    final_sparse_steps=3,
  )  # t = 0..10: D D S S D D D S S S S (sparse after the end too)

  def run_steps(self, method, steps=11, optimizer=None):
    tx = js.sparsify(optimizer or optax.sgd(0.05), method)
    prev = cf.make_params()
    out = []
    for count, params, state in cf.run(tx, prev, steps, jax.jit(tx.update)):
      out.append((count, prev, params, state))
      prev = params
    return out

  def test_masks_per_phase_and_exact_global_counts(self):
    phases = python_phases(10, 2, 2, 1, 3) + ["S"]
    previous_masks = None
    for count, before, after, state in self.run_steps(
      acdc(0.8, **self.LENGTHS)
    ):
      masks = [np.asarray(state.method.masks[n][k]) for n, k in KERNELS]
      self.assertIsInstance(state.method, ACDCState)
      if phases[count] == "D":
        for m in masks:
          self.assertTrue(m.all(), f"step {count} is dense")
      else:
        total = sum(m.size for m in masks)
        self.assertEqual(
          sum(int(m.sum()) for m in masks), total - round(0.8 * total)
        )
        starts = count == 0 or phases[count - 1] == "D"
        if starts:  # top-k |w| of the weights the step starts from
          weights = [np.asarray(before[n][k]) for n, k in KERNELS]
          kept = total - round(0.8 * total)
          for m, want in zip(masks, numpy_global_topk(weights, kept)):
            np.testing.assert_array_equal(m, want)
        else:  # fixed during the phase
          for m, old in zip(masks, previous_masks):
            np.testing.assert_array_equal(m, old)
        for (n, k), m in zip(KERNELS, masks):
          self.assertTrue(np.all(np.asarray(after[n][k])[~m] == 0))
      # A dense phase restores the pruned weights from zero.
      if count > 0 and phases[count] == "D" and phases[count - 1] == "S":
        for (n, k), old in zip(KERNELS, previous_masks):
          self.assertTrue(np.all(np.asarray(before[n][k])[~old] == 0))
      previous_masks = masks
    self.assertEqual(phases[-1], "S")  # the run ends sparse

  def test_regrown_flags_every_phase_switch(self):
    phases = "DDSSDDDSSSS"
    flags = [
      bool(state.method.regrown)
      for _, _, _, state in self.run_steps(acdc(0.5, **self.LENGTHS))
    ]
    want = [t > 0 and phases[t] != phases[t - 1] for t in range(11)]
    self.assertEqual(flags, want)

  def test_moments_of_pruned_weights_reset_and_stay_zero(self):
    run = self.run_steps(
      acdc(0.5, **self.LENGTHS), steps=6, optimizer=optax.adam(1e-2)
    )
    pruned = None
    for count, _, _, state in run:
      adam = state.inner[0]
      if count == 2:  # first sparse step: moments zeroed where pruned
        pruned = [~np.asarray(state.method.masks[n][k]) for n, k in KERNELS]
        self.assertTrue(any(p.any() for p in pruned))
      if count in (2, 3, 4):  # zero through the phase, and at the restore
        for (n, k), p in zip(KERNELS, pruned):
          self.assertTrue(np.all(np.asarray(adam.mu[n][k])[p] == 0))
          self.assertTrue(np.all(np.asarray(adam.nu[n][k])[p] == 0))
      if count == 5:  # trained again in the dense phase
        mu = np.asarray(adam.mu["dense0"]["kernel"])[pruned[1]]
        self.assertTrue(np.any(mu != 0))

  def test_block_pattern_uniform(self):
    method = acdc(
      0.75, pattern=js.Block(4, 4), allocation=js.uniform(), **self.LENGTHS
    )
    for count, _, _, state in self.run_steps(method, steps=4):
      for n, k in KERNELS:
        m = np.asarray(state.method.masks[n][k])
        self.assertTrue(patterns.follows(js.Block(4, 4), m))
        blocks = m.size // 16  # whole 4x4 blocks, kept by count
        kept = blocks if count < 2 else blocks - round(0.75 * blocks)
        self.assertEqual(int(m.sum()), 16 * kept)


class ErrorTest(parameterized.TestCase):
  def test_total_steps_required_and_positive(self):
    with self.assertRaisesRegex(ValueError, "total_steps=0 must be a positive"):
      acdc(0.9, total_steps=0)

  @parameterized.parameters("phase_steps", "final_sparse_steps")
  def test_phase_lengths_positive(self, name):
    with self.assertRaisesRegex(ValueError, f"{name}=0 must be an int >= 1"):
      acdc(0.9, total_steps=100, **{name: 0})

  def test_negative_warmup(self):
    with self.assertRaisesRegex(ValueError, "warmup_steps=-1 must be an int"):
      acdc(0.9, total_steps=100, warmup_steps=-1)

  def test_phases_longer_than_training(self):
    with self.assertRaisesRegex(ValueError, "= 60 exceeds total_steps=50"):
      acdc(
        0.9,
        total_steps=50,
        warmup_steps=20,
        final_dense_steps=20,
        final_sparse_steps=20,
      )

  def test_sparsity_outside_unit_interval(self):
    with self.assertRaisesRegex(ValueError, r"sparsity=1.0 is outside"):
      acdc(1.0, total_steps=100)

  def test_structured_pattern_with_global_allocation(self):
    with self.assertRaisesRegex(ValueError, "needs pattern=js.Unstructured"):
      acdc(0.5, total_steps=100, pattern=js.Block(4, 4))

  def test_block_not_dividing_names_leaf(self):
    tx = acdc(
      0.5, total_steps=100, pattern=js.Block(4, 4), allocation=js.uniform()
    )
    with self.assertRaisesRegex(ValueError, r"acdc: w: shape \(8, 6\)"):
      tx.init({"w": jnp.ones((8, 6))})

  def test_needs_params(self):
    params = cf.make_params()
    tx = acdc(0.5, total_steps=100)
    with self.assertRaisesRegex(ValueError, r"acdc: `params` is required"):
      tx.update(params, tx.init(params))


if __name__ == "__main__":
  absltest.main()
