"""Packing masked kernels: the flax-free half of :mod:`jaxsparse.nn`.

:func:`pack` turns each masked kernel of a params tree into a packed pytree
that stores only the kept values plus their positions
(:class:`~jaxsparse.kernels.PackedNM` for ``js.NM(n, m)``,
:class:`~jaxsparse.kernels.PackedBlock` for ``js.Block(rows, cols)``), so
the params and their orbax checkpoints get smaller (2:4 in bfloat16:
``0.5625`` of the kernel bytes).

A kernel is packed as the matrices of its
:class:`~jaxsparse.layout.Layout` (``[K, N]``: contracted axes by outputs,
one per layer of a stack), the view in which training, one-shot pruning and
``js.summary`` build and check masks. A plain ``[in, out]`` kernel becomes a
``PackedNM``/``PackedBlock``; any other a :class:`PackedKernel` holding its
matrices, packed, with the stack axes leading.

References:
  Mishra et al, `Accelerating Sparse Deep Neural Networks
  <https://arxiv.org/abs/2104.08378>`_, 2021 (2:4 storage).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from jaxsparse import layout as layout_lib
from jaxsparse import masking
from jaxsparse import patterns as patterns_lib
from jaxsparse.kernels import ops, packing
from jaxsparse.kernels.packing import PackedBlock, PackedNM
from jaxsparse.types import MaskTree, Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedKernel:
  """A packed kernel that is not a plain ``[in, out]`` matrix.

  Attributes:
    packed: its matrices ``[K, N]``, packed; with stack axes, every array
      of the packed format has them leading (in leaf order).
    shape: the kernel's own shape (static).
    layout: its :class:`~jaxsparse.layout.Layout` (static).
  """

  packed: PackedNM | PackedBlock
  shape: tuple[int, ...] = packing.static_field()
  layout: layout_lib.Layout = packing.static_field()

  @property
  def dtype(self):
    return self.packed.dtype


_PACKED = (PackedNM, PackedBlock, PackedKernel)


def is_packed(x: Any) -> bool:
  """Whether ``x`` is a packed kernel (:func:`pack`'s output leaves)."""
  return isinstance(x, _PACKED)


def check_pattern(pattern: Any, name: str) -> None:
  if not isinstance(pattern, patterns_lib.NM | patterns_lib.Block):
    raise ValueError(
      f"{name}: pattern={pattern!r} has no packed format; pass js.NM(n, m) "
      "or js.Block(rows, cols) (for other patterns keep the masked dense "
      "params: js.apply_masks(params, masks))."
    )
  patterns_lib.check_pattern(pattern)
  if isinstance(pattern, patterns_lib.NM) and pattern.axis % 2 != 0:
    raise ValueError(
      f"{name}: {pattern!r}: packed N:M groups run along the kernel's input "
      f"axis; use js.NM({pattern.n}, {pattern.m}) (axis=-2)."
    )


def _block_slots(masks: np.ndarray, pattern: patterns_lib.Block) -> int:
  """Most kept blocks of one block column over matrices ``[S, K, N]``."""
  s, k, _ = masks.shape
  tiles = masks.reshape(s, k // pattern.rows, pattern.rows, -1, pattern.cols)
  counts = tiles.any(axis=(2, 4)).sum(axis=1)
  return max(1, int(counts.max(initial=0)))


def _pack_matrix(w, mask, pattern, slots):
  if isinstance(pattern, patterns_lib.NM):
    return packing.pack_nm(w, pattern, mask=mask)
  return packing.pack_block(w, pattern, slots)


def _check_matrices(path, w, mask, pattern, layout, shape):
  """Raises ``ValueError`` (without the path) if the matrices do not fit."""
  k, n = w.shape[1:]
  view = (
    ""
    if layout.is_plain(len(shape))
    else (
      f" (its matrices {layout.describe(shape)}, contracting axes "
      f"{layout.contract} of shape {tuple(shape)})"
    )
  )
  seen = packing.concrete(mask)
  if isinstance(pattern, patterns_lib.NM):
    if k % pattern.m:
      raise ValueError(
        f"input size K={k}{view} is not a multiple of m={pattern.m}; choose "
        "m dividing it or keep this kernel dense (mask None)."
      )
    if seen is not None and not all(
      patterns_lib.follows(pattern, m) for m in seen
    ):
      raise ValueError(
        f"the mask does not keep exactly {pattern.n} of every {pattern.m} "
        f"consecutive inputs of each output{view}; build it along the "
        "contraction: train or prune with where=js.find_kernels(...) (or "
        "js.patterns.select on each matrix)."
      )
    return
  if k % pattern.rows or n % pattern.cols:
    raise ValueError(
      f"shape {tuple(shape)}{view} is not tiled by {pattern!r}; choose a "
      "block size dividing both sides or keep this kernel dense (mask None)."
    )
  if seen is None:
    raise ValueError(
      f"packing with {pattern!r} counts the kept blocks of the mask, which "
      "needs concrete masks; call js.nn.pack outside jax.jit."
    )
  if not all(patterns_lib.follows(pattern, m) for m in seen):
    raise ValueError(
      f"the mask keeps part of some {pattern.rows}x{pattern.cols} block"
      f"{view}; build it with js.patterns.select({pattern!r}, scores, "
      "sparsity) on each matrix."
    )


def pack_leaf(
  path: str,
  kernel: ArrayLike,
  mask: ArrayLike,
  pattern: patterns_lib.Pattern,
  layout: layout_lib.Layout | None = None,
) -> PackedNM | PackedBlock | PackedKernel:
  """Packs one kernel ``where(mask, kernel, 0)``; errors name ``path``.

  Args:
    path: the leaf's ``a/b/kernel`` path (for error messages).
    kernel: the kernel, any shape with at least 2 axes.
    mask: bool, the kernel's shape; must follow ``pattern`` on each matrix.
    pattern: ``js.NM(n, m)`` or ``js.Block(rows, cols)`` (static).
    layout: the kernel's :class:`~jaxsparse.layout.Layout` (static);
      default ``[..., in, out]`` (:func:`~jaxsparse.layout.default_layout`).

  Returns:
    The packed 2-D kernel, or a :class:`PackedKernel`.
  """
  check_pattern(pattern, path)
  kernel = jnp.asarray(kernel)
  mask = jnp.asarray(mask)
  shape = tuple(kernel.shape)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(
      f"{path}: dtype {kernel.dtype} is not floating point; only float "
      "kernels are packed: set its mask to None."
    )
  if len(shape) < 2:
    raise ValueError(
      f"{path}: has a mask but is not a kernel (shape {shape}); only "
      "matrices and kernels with more axes are packed: set its mask to None."
    )
  layout = layout_lib.default_layout(shape) if layout is None else layout
  if layout.kind != "dot":
    raise ValueError(
      f"{path}: is a convolution kernel; packed kernels run matmuls "
      "(dot_general) only, so it cannot run packed: set its mask to None "
      "(keep it masked dense)."
    )
  layout_lib.check_layout(layout, shape, path)
  w = layout_lib.to_matrices(
    jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)), layout
  )
  m = layout_lib.to_matrices(mask, layout)
  try:
    _check_matrices(path, w, m, pattern, layout, shape)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  slots = 0
  if isinstance(pattern, patterns_lib.Block):
    slots = _block_slots(np.asarray(m), pattern)
  if layout.is_plain(len(shape)):
    return _pack_matrix(w[0], m[0], pattern, slots)
  mats = [_pack_matrix(w[i], m[i], pattern, slots) for i in range(w.shape[0])]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *mats)
  sizes = tuple(shape[a] for a in layout.stack)
  stacked = jax.tree.map(
    lambda x: x.reshape(*sizes, *x.shape[1:]) if sizes else x[0], stacked
  )
  return PackedKernel(stacked, shape, layout)


def pack(
  params: Params,
  masks: MaskTree,
  pattern: patterns_lib.Pattern,
  *,
  kernels: layout_lib.Kernels | None = None,
  for_batch: int | None = None,
  platform: str | None = None,
) -> PyTree:
  """Packs every masked kernel of a params tree.

  Each leaf with a mask becomes the packed ``where(mask, w, 0)``: a
  :class:`~jaxsparse.kernels.PackedNM` or
  :class:`~jaxsparse.kernels.PackedBlock` for a plain ``[in, out]`` kernel,
  a :class:`PackedKernel` for any other layout. Leaves whose mask is
  ``None`` stay as they are. The result goes through ``jax.jit``,
  :func:`jaxsparse.nn.apply` and orbax like any params. N:M packing also
  runs under ``jax.jit`` (the pattern checks need concrete masks and are
  then skipped) and ``jax.eval_shape`` (abstract targets to restore a
  packed checkpoint); Block packing sizes its arrays by the most kept
  blocks of a block column, so it needs concrete masks.

  Args:
    params: a params tree.
    masks: params-shaped tree, bool where a kernel is sparse, else ``None``
      (``js.masks(opt_state)``, ``oneshot.prune(...).masks``); each mask
      must follow ``pattern`` on the kernel's matrices.
    pattern: ``js.NM(n, m)`` (groups along the contraction) or
      ``js.Block(rows, cols)`` (static).
    kernels: the model's kernels (:func:`jaxsparse.find_kernels`), whose
      layouts say how each kernel is multiplied; without it every kernel is
      taken as ``[..., in, out]``, which is right for ``nn.Dense`` only.
    for_batch: pack for speed at this many rows per call: a layer is packed
      only where :func:`jaxsparse.kernels.ops.packing_pays` (the timings
      measured on ``platform`` by ``benchmarks/kernels.py``) says a packed
      matmul beats ``jnp.dot`` on the dense weight; elsewhere the masked
      dense kernel ``where(mask, w, 0)`` stays. ``None`` packs every masked
      kernel (smallest memory).
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` for ``for_batch`` (default:
      ``jax.default_backend()``).

  Returns:
    The params tree with packed kernels.

  Raises:
    ValueError: naming the leaf and the fix, when the mask tree does not
      match the params, the pattern has no packed format, a masked leaf is
      not a matmul kernel (a bias, a convolution), a shape is not
      divisible, or a mask breaks the pattern on the kernel's matrices.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxsparse as js
    >>> import jaxsparse.nn as jsnn
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> params = {"Dense_0": {"kernel": w, "bias": jnp.zeros(4)}}
    >>> mask = js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5)
    >>> masks = {"Dense_0": {"kernel": mask, "bias": None}}
    >>> packed = jsnn.pack(params, masks, js.NM(2, 4))
    >>> packed["Dense_0"]["kernel"].values.shape  # [n, K/m, N]
    (2, 2, 4)
  """
  name = "js.nn.pack"
  check_pattern(pattern, name)
  try:
    masking.check_masks(params, masks)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for (key, p), m in zip(flat, masking.treedef_leaves(params, masks)):
    if m is None:
      leaves.append(p)
      continue
    path = masking.path_str(key)
    layout = None
    if kernels is not None:
      record = kernels.get(path)
      if record is None or record.layout is None:
        role = "not a params leaf" if record is None else record.role
        raise ValueError(
          f"{name}: {path} has a mask but the model does not multiply by it "
          f"as a kernel ({role}); set its mask to None."
        )
      layout = record.layout
    leaf = pack_leaf(path, p, m, pattern, layout)
    if for_batch is not None:
      inner = leaf.packed if isinstance(leaf, PackedKernel) else leaf
      k = inner.shape[0]
      if not ops.packing_pays(
        _one_matrix(inner), (for_batch, k), platform, p.dtype
      ):
        leaf = jnp.where(m, p, jnp.zeros((), p.dtype))
    leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _one_matrix(packed: PackedNM | PackedBlock) -> PackedNM | PackedBlock:
  """One matrix of a (possibly stacked) packed kernel, for its shapes."""
  lead = _stack_ndim(packed)
  return jax.tree.map(lambda x: x[(0,) * lead], packed)


def _stack_ndim(packed: PackedNM | PackedBlock) -> int:
  base = 3 if isinstance(packed, PackedNM) else 4
  first = packed.values if isinstance(packed, PackedNM) else packed.blocks
  return first.ndim - base


def unpack_matrices(packed: PackedNM | PackedBlock) -> Array:
  """The dense matrices of a packed format, stack axes leading."""
  unpack = (
    packing.unpack_nm if isinstance(packed, PackedNM) else packing.unpack_block
  )
  for _ in range(_stack_ndim(packed)):
    unpack = jax.vmap(unpack)
  return unpack(packed)


def unpack_leaf(packed: Any) -> Array:
  """The dense kernel (its own shape) of a packed leaf."""
  if not isinstance(packed, PackedKernel):
    return unpack_matrices(packed)
  dense = unpack_matrices(packed.packed)
  k, n = dense.shape[-2:]
  return layout_lib.from_matrices(
    dense.reshape(-1, k, n), packed.layout, packed.shape
  )


def unpack(packed_params: PyTree) -> Params:
  """Inverse of :func:`pack`: dense kernels ``where(mask, w, 0)``."""
  return jax.tree.map(
    lambda x: unpack_leaf(x) if is_packed(x) else x,
    packed_params,
    is_leaf=is_packed,
  )
