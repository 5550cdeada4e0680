"""Packed 2:4 checkpoints: bytes on disk against the masked dense params.

Command (from the repository root)::

  python -m benchmarks.packed_checkpoint           # 4 blocks, 1024 -> 4096
  python -m benchmarks.packed_checkpoint --quick   # 2 blocks, 256 -> 512

The model is a linen stack of transformer-sized MLP blocks in bfloat16
(``Dense(hidden)``, gelu, ``Dense(width)`` per block, plus biases). Every
kernel gets a 2:4 mask (``js.patterns.select(js.NM(2, 4), |w|, 0.5)``);
the baseline is what a sparse run saves today, the masked dense params
``js.apply_masks(params, masks)``; the packed params are
``js.nn.pack(params, masks, js.NM(2, 4))``. Both are saved with orbax

* ``StandardCheckpointer`` (orbax's default: OCDBT + zarr3, zstd), and
* ``PyTreeCheckpointHandler(use_compression=False)`` (raw bytes),

and measured as the sum of the file sizes under each checkpoint directory.
The packed kernels hold ``n G N`` bfloat16 values plus ``n ceil(G/4) N``
``uint8`` position words (``G = K/4`` groups): ``0.5625`` of the dense kernel
bytes. zstd also shrinks the dense zeros, so on disk the default format
gains less than the byte ratio. The script checks that each restored packed
checkpoint equals the saved params and that ``js.nn.apply`` on them matches
the masked dense model.
"""

import argparse
import datetime
import os
import platform
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxsparse as js
import jaxsparse.nn as jsnn


class MLPStack(nn.Module):
  """``blocks`` x (Dense(hidden), gelu, Dense(width)), residual, bfloat16."""

  width: int
  hidden: int
  blocks: int

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for _ in range(self.blocks):
      h = nn.gelu(nn.Dense(self.hidden, **kw)(x))
      x = x + nn.Dense(self.width, **kw)(h)
    return x


def disk_bytes(directory: str) -> int:
  """Sum of the sizes of the files under ``directory``."""
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )


def array_bytes(tree) -> int:
  """Bytes of every array leaf (packed leaves: values and index words)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def kernel_bytes(masked, masks, packed) -> tuple[int, int]:
  """``(dense, packed)`` bytes of the masked kernels alone."""
  dense = sum(
    int(w.nbytes)
    for w, m in zip(
      jax.tree.leaves(masked), js.masking.treedef_leaves(masked, masks)
    )
    if m is not None
  )
  packed_sum = sum(
    js.kernels.packed_nbytes(leaf)
    for leaf in jax.tree.leaves(packed, is_leaf=jsnn.is_packed)
    if jsnn.is_packed(leaf)
  )
  return dense, packed_sum


def kernel_masks(params):
  def mask(path, w):
    if js.masking.path_str(path).split("/")[-1] != "kernel":
      return None
    return js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5)

  return jax.tree_util.tree_map_with_path(mask, params)


def save_default(path: str, tree, target) -> tuple[float, object]:
  with ocp.StandardCheckpointer() as checkpointer:
    start = time.perf_counter()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    seconds = time.perf_counter() - start
    restored = checkpointer.restore(path, target)
  return seconds, restored


def save_raw(path: str, tree, target) -> tuple[float, object]:
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  with ocp.Checkpointer(handler) as checkpointer:
    start = time.perf_counter()
    checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
    seconds = time.perf_counter() - start
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
    )
  return seconds, restored


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="2 blocks of 256 -> 512 (smoke test)"
  )
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--hidden", type=int, default=None)
  parser.add_argument("--blocks", type=int, default=None)
  args = parser.parse_args()
  width = args.width or (256 if args.quick else 1024)
  hidden = args.hidden or (512 if args.quick else 4096)
  blocks = args.blocks or (2 if args.quick else 4)

  model = MLPStack(width, hidden, blocks)
  x = jax.random.normal(jax.random.key(1), (8, width), jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  masks = jax.jit(kernel_masks)(params)
  dense = jax.jit(js.apply_masks)(params, masks)
  del params
  packed = jsnn.pack(dense, masks, js.NM(2, 4))

  # The packed model computes the masked dense model.
  y = jax.jit(lambda p, x: jsnn.apply(model, p, x))(packed, x)
  y_dense = jax.jit(model.apply)({"params": dense}, x)
  np.testing.assert_allclose(
    np.asarray(y, np.float32), np.asarray(y_dense, np.float32), atol=0.1
  )

  kernels_dense, kernels_packed = kernel_bytes(dense, masks, packed)
  count = sum(int(w.size) for w in jax.tree.leaves(dense))
  print(f"# packed 2:4 checkpoints, {datetime.date.today()}")
  print(
    f"# jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, "
    f"{platform.machine()} {os.cpu_count()} CPUs, devices {jax.devices()}"
  )
  print(
    f"# MLPStack: {blocks} blocks of Dense({hidden}) + Dense({width}), "
    f"input {width}, bfloat16, {count / 1e6:.2f}M params; 2:4 on every kernel"
  )
  print(
    f"# kernel bytes in memory: packed {kernels_packed} / dense "
    f"{kernels_dense} = {kernels_packed / kernels_dense:.4f}"
  )
  print()
  print(
    "| format | params | array bytes | bytes on disk | disk / dense "
    "| disk / arrays | save s | restored equal |"
  )
  print("|" + " --- |" * 8)
  with tempfile.TemporaryDirectory() as tmp:
    for fmt, save in (
      ("orbax default (zstd)", save_default),
      ("uncompressed", save_raw),
    ):
      base = None
      for name, tree in (("masked dense", dense), ("packed", packed)):
        path = os.path.join(tmp, f"{save.__name__}_{name.replace(' ', '_')}")
        target = jax.eval_shape(lambda t=tree: t)
        seconds, restored = save(path, tree, target)
        same = all(
          np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree))
        ) and jax.tree.structure(restored) == jax.tree.structure(tree)
        if not same:
          raise AssertionError(f"{fmt} {name}: restored params differ")
        on_disk = disk_bytes(path)
        base = base or on_disk
        in_memory = array_bytes(tree)
        print(
          f"| {fmt} | {name} | {in_memory} | {on_disk} "
          f"| {on_disk / base:.4f} | {on_disk / in_memory:.4f} "
          f"| {seconds:.2f} | {same} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
