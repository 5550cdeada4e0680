"""Schedules: GMP equals Zhu & Gupta's eq. 1; the update cadence."""

import numpy as np
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse import schedules


class GmpTest(parameterized.TestCase):
  def test_zhu_gupta_equation(self):
    s_i, s_f, t0, end = 0.1, 0.9, 100, 1100
    schedule = js.gmp(s_f, t0, end, initial_sparsity=s_i)
    for t in [0, 100, 350, 600, 1099, 1100, 5000]:
      progress = np.clip((t - t0) / (end - t0), 0, 1)
      want = s_f + (s_i - s_f) * (1 - progress) ** 3
      self.assertAlmostEqual(float(schedule(t)), want, places=6)

  @parameterized.parameters(1.0, -0.1, 1.5)
  def test_bad_sparsity(self, value):
    with self.assertRaisesRegex(
      ValueError, r"final_sparsity=.* outside \[0, 1\)"
    ):
      js.gmp(value, 0, 10)

  def test_bad_steps(self):
    with self.assertRaisesRegex(ValueError, "begin_step < end_step"):
      js.gmp(0.5, 10, 10)


class CadenceTest(parameterized.TestCase):
  def test_update_steps(self):
    steps = [t for t in range(40) if schedules.is_update_step(t, 10, 5, 32)]
    self.assertEqual(steps, [5, 15, 25, 32])
    steps = [t for t in range(30) if schedules.is_update_step(t, 7, 0, None)]
    self.assertEqual(steps, [0, 7, 14, 21, 28])


if __name__ == "__main__":
  absltest.main()
