"""The README's first Python example: every `tx = ...` in it works."""

import ast
import pathlib
import re

import jax
import numpy as np
import optax
from absl.testing import absltest

import jaxsparse as js

README = pathlib.Path(__file__).parent.parent / "README.md"


def readme_transforms() -> list[optax.GradientTransformation]:
  code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  tree = ast.parse(code)
  namespace: dict = {}
  exec(
    compile(
      ast.Module([n for n in tree.body if isinstance(n, ast.Import)], []),
      "README",
      "exec",
    ),
    namespace,
  )
  return [
    eval(compile(ast.Expression(node.value), "README", "eval"), namespace)
    for node in tree.body
    if isinstance(node, ast.Assign) and node.targets[0].id == "tx"
  ]


class ReadmeTest(absltest.TestCase):
  def test_first_example(self):
    sparsify_tx, chain_tx = readme_transforms()
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    grads = jax.tree.map(lambda p: 0.01 * p, params)

    # js.sparsify(adamw, gmp(0.9, 1000, 8000)): dense until step 1000,
    # exactly 90% sparse from step 8000 on (masks update every 100 steps).
    state = sparsify_tx.init(params)
    step = jax.jit(sparsify_tx.update)
    for count in range(8001):
      updates, state = step(grads, state, params)
      if count in (999, 8000):
        kernel = np.asarray(
          optax.apply_updates(params, updates)["dense"]["kernel"]
        )
        zeros = int((kernel == 0).sum())
        self.assertEqual(zeros, 0 if count == 999 else round(0.9 * 32))

    # optax.chain(adamw, magnitude_pruning(pattern=NM(2, 4))): 2:4 at once.
    state = chain_tx.init(params)
    updates, state = chain_tx.update(grads, state, params)
    kernel = np.asarray(optax.apply_updates(params, updates)["dense"]["kernel"])
    np.testing.assert_array_equal((kernel != 0).reshape(2, 4, 4).sum(1), 2)
    np.testing.assert_array_equal(
      kernel != 0, js.masks(state)["dense"]["kernel"]
    )


if __name__ == "__main__":
  absltest.main()
