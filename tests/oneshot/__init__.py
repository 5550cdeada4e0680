"""A tiny residual MLP and reference activations for the one-shot tests.

The reference inputs of each Dense layer are rebuilt from the module outputs
that ``capture_intermediates`` records (never from the interceptor under
test): ``Block_i/Dense_0`` sees the block's input, ``Block_i/Dense_1`` sees
``relu(Dense_0(.))`` and ``head`` sees the last block's output.
"""

import flax.linen as nn
import jax
import numpy as np

WIDTH = 16
BLOCKS = 2


class Block(nn.Module):
  width: int = WIDTH

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(2 * self.width)(x))
    return x + nn.Dense(self.width)(h)


class Tiny(nn.Module):
  blocks: int = BLOCKS
  width: int = WIDTH

  @nn.compact
  def __call__(self, x):
    for _ in range(self.blocks):
      x = Block(self.width)(x)
    return nn.DenseGeneral(8, name="head")(x)


MODEL = Tiny()
KERNELS = [
  "Block_0/Dense_0/kernel",
  "Block_0/Dense_1/kernel",
  "Block_1/Dense_0/kernel",
  "Block_1/Dense_1/kernel",
  "head/kernel",
]


def apply_fn(params, x):
  return MODEL.apply({"params": params}, x)


def setup(seed=0, batches=3, batch=8, tokens=4):
  """Trained-looking params and a list of calibration batches."""
  keys = jax.random.split(jax.random.key(seed), batches + 1)
  xs = [jax.random.normal(k, (batch, tokens, WIDTH)) for k in keys[1:]]
  params = MODEL.init(keys[0], xs[0])["params"]
  return params, xs


def reference_inputs(params, xs):
  """``{kernel path: float64 [tokens, in]}`` over all batches."""
  out = {path: [] for path in KERNELS}
  for x in xs:
    _, state = MODEL.apply(
      {"params": params},
      x,
      capture_intermediates=True,
      mutable=["intermediates"],
    )
    inter = state["intermediates"]
    block_in = np.asarray(x, np.float64)
    for i in range(BLOCKS):
      block = inter[f"Block_{i}"]
      hidden = np.maximum(np.asarray(block["Dense_0"]["__call__"][0]), 0)
      out[f"Block_{i}/Dense_0/kernel"].append(block_in)
      out[f"Block_{i}/Dense_1/kernel"].append(hidden)
      block_in = np.asarray(block["__call__"][0], np.float64)
    out["head/kernel"].append(block_in)
  return {
    path: np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays])
    for path, arrays in out.items()
  }


def leaf(tree, path):
  """The leaf at ``a/b/kernel`` of a nested dict, as numpy."""
  node = tree
  for part in path.split("/"):
    node = node[part]
  return np.asarray(node)


def leaf_array(tree, path):
  """The leaf at ``a/b/kernel`` of a nested dict, as it is (a jax.Array)."""
  node = tree
  for part in path.split("/"):
    node = node[part]
  return node


def kernel(params, path):
  """The kernel at ``a/b/kernel`` as float64 numpy."""
  return leaf(params, path).astype(np.float64)


def wanda_mask(w, x, sparsity):
  """Wanda in numpy: per column keep the ``in - round(s*in)`` largest
  ``|W_ij| * ||X_i||`` (stable: ties to the lower row)."""
  scores = np.abs(w) * np.sqrt((x * x).sum(0))[:, None]
  kept = w.shape[0] - int(np.round(np.float32(sparsity) * w.shape[0]))
  order = np.argsort(-scores, axis=0, kind="stable")
  mask = np.zeros(w.shape, bool)
  np.put_along_axis(mask, order[:kept], True, axis=0)
  return mask
