"""js.summary: records, text, and the pattern check."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import jaxsparse as js


class SummaryTest(absltest.TestCase):
  def test_records_and_text(self):
    w = jnp.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]]).T  # 4x2
    params = {"w": w, "b": jnp.ones(2)}
    masks = {"w": w != 0, "b": None}
    report = js.summary(params, masks, js.NM(2, 4))
    rec = {r.path: r for r in report.records}
    self.assertEqual(rec["w"].nnz, 4)
    self.assertEqual(rec["w"].density, 0.5)
    self.assertTrue(rec["w"].pattern_ok)
    self.assertEqual(rec["b"].pattern, "dense")
    self.assertIn("total (masked)", str(report))
    self.assertIn("NM(n=2, m=4, axis=-2)", report.text)

  def test_check_fails_on_bad_pattern_or_nonzero_pruned(self):
    w = jnp.ones((4, 2))
    bad_nm = {
      "w": jnp.asarray(np.array([[1, 1], [1, 0], [0, 0], [0, 0]], bool))
    }
    self.assertFalse(
      js.summary({"w": w * bad_nm["w"]}, bad_nm, js.NM(2, 4))
      .records[0]
      .pattern_ok
    )
    mask = {"w": jnp.asarray(np.eye(4, 2, dtype=bool))}
    self.assertFalse(js.summary({"w": w}, mask).records[0].pattern_ok)
    self.assertIn("FAIL", js.summary({"w": w}, mask).text)


if __name__ == "__main__":
  absltest.main()
