"""Packed storage for structured-sparse weights: N:M and block-sparse (BCSR).

Weights are Flax kernels ``W: [K, N]`` (in, out), applied as ``y = x @ W``.

* :class:`PackedNM` (NVIDIA's 2:4 generalised, Mishra et al. 2021,
  "Accelerating Sparse Deep Neural Networks"): every group of ``m``
  consecutive rows of a column keeps ``n`` values. ``values[g*n + j, c]`` is
  the ``j``-th kept value (in row order) of group ``g`` of column ``c``, and
  its row is ``W[g*m + idx, c]`` where ``idx`` (``0..m-1``) is stored in
  ``b = max(1, ceil(log2 m))`` bits, ``8 // b`` per ``uint8`` word (or
  ``32 // b`` per ``uint32`` word when ``b = 3``), packed along ``K``.
  Bytes: ``K n/m N itemsize + ceil(K n/(m w)) N word_bytes`` with ``w``
  fields per word; 2:4 in bfloat16 with ``K % 8 == 0`` is exactly
  ``0.5625`` of the dense bytes.
* :class:`PackedBlock` (BCSR over block rows): block row ``r`` stores its
  ``counts[r]`` nonzero ``rows x cols`` blocks in ascending block-column
  order in ``blocks[r, :counts[r]]`` with block columns ``cols[r, :counts[r]]``;
  slots ``j >= counts[r]`` are padding (zero blocks, column 0) so shapes
  stay static, and every consumer ignores them through ``counts``.

Both are pytrees: arrays are leaves, the pattern and dense shape are static.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from jaxsparse.patterns import NM, Block, check_pattern


def _static():
  return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNM:
  """N:M-sparse ``W: [K, N]``: kept values plus bit-packed positions.

  Attributes:
    values: ``[K*n/m, N]`` kept values in group order, ``W``'s dtype.
    indices: ``[ceil(K*n/m / per_word), N]`` unsigned words holding each kept
      value's position in its group (see :func:`index_layout`).
    n, m: the pattern (static).
    shape: the dense shape ``(K, N)`` (static).
  """

  # Leaves are Any, not Array: transforms rebuild the pytree with
  # ShapeDtypeStructs, tracers or sentinels in their place.
  values: Any
  indices: Any
  n: int = _static()
  m: int = _static()
  shape: tuple[int, int] = _static()

  @property
  def pattern(self) -> NM:
    return NM(self.n, self.m)

  @property
  def dtype(self):
    return self.values.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBlock:
  """Block-sparse ``W: [K, N]`` in BCSR form over ``K/rows`` block rows.

  Attributes:
    blocks: ``[K/rows, max_blocks, rows, cols]`` stored blocks, ``W``'s dtype.
    cols: int32 ``[K/rows, max_blocks]`` block-column index of each block;
      ``0`` in padding slots.
    counts: int32 ``[K/rows]`` stored blocks per block row; slots
      ``j >= counts[r]`` are padding (zero blocks) and are ignored.
    rows, cols_per_block: the block shape (static).
    shape: the dense shape ``(K, N)`` (static).
  """

  blocks: Any  # leaves are Any for the same reason as in PackedNM
  cols: Any
  counts: Any
  rows: int = _static()
  cols_per_block: int = _static()
  shape: tuple[int, int] = _static()

  @property
  def pattern(self) -> Block:
    return Block(self.rows, self.cols_per_block)

  @property
  def max_blocks(self) -> int:
    return self.blocks.shape[1]

  @property
  def dtype(self):
    return self.blocks.dtype


def index_layout(m: int) -> tuple[int, int, np.dtype]:
  """``(bits, fields_per_word, word_dtype)`` for positions in groups of ``m``.

  ``bits = max(1, ceil(log2 m))``; ``uint8`` words when ``bits`` divides 8
  (1, 2, 4 bits), else ``uint32`` words holding ``32 // bits`` fields.
  """
  bits = max(1, (m - 1).bit_length())
  if 8 % bits == 0:
    return bits, 8 // bits, np.dtype(np.uint8)
  return bits, 32 // bits, np.dtype(np.uint32)


def packed_nbytes(packed: PackedNM | PackedBlock) -> int:
  """Bytes of every array leaf of a packed weight (metadata included)."""
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(packed))


def _concrete(x: Array) -> np.ndarray | None:
  """``x`` as a NumPy array, or ``None`` while tracing."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_2d(w: Array, name: str) -> None:
  if w.ndim != 2:
    raise ValueError(
      f"{name}: expected a 2-D kernel [in, out], got shape {w.shape}; "
      "reshape it (e.g. w.reshape(-1, w.shape[-1])) before packing."
    )


def _check_nm(w: Array, pattern: object) -> None:
  if not isinstance(pattern, NM):
    raise ValueError(
      f"pack_nm needs pattern=js.NM(n, m), got {pattern!r}; use pack_block "
      "for js.Block."
    )
  check_pattern(pattern)
  _check_2d(w, "pack_nm: w")
  if pattern.axis % 2 != 0:
    raise ValueError(
      f"{pattern!r}: packed N:M groups run along the reduction axis (-2) of "
      f"W: [K, N]; use NM({pattern.n}, {pattern.m}, axis=-2) or transpose W."
    )
  if w.shape[0] % pattern.m:
    raise ValueError(
      f"pack_nm: K={w.shape[0]} (axis -2 of shape {w.shape}) is not a "
      f"multiple of m={pattern.m}; pad K or choose m dividing it."
    )


def _pack_bits(fields: Array, m: int) -> Array:
  """``[L, N]`` positions (< m) into ``[ceil(L / per_word), N]`` words."""
  bits, per, word = index_layout(m)
  length, cols = fields.shape
  words = -(-length // per)
  padded = (
    jnp.zeros((words * per, cols), word).at[:length].set(fields.astype(word))
  )
  shifts = jnp.asarray(np.arange(per, dtype=word) * word.type(bits))
  grouped = padded.reshape(words, per, cols) << shifts[None, :, None]
  # Disjoint bit ranges: the sum is the bitwise OR, and cannot overflow.
  return jnp.sum(grouped, axis=1, dtype=word)


def _unpack_bits(words: Array, m: int, length: int) -> Array:
  """Inverse of :func:`_pack_bits`: ``[length, N]`` int32 positions."""
  bits, per, word = index_layout(m)
  shifts = jnp.asarray(np.arange(per, dtype=word) * word.type(bits))
  low = jnp.asarray(word.type((1 << bits) - 1))
  fields = (words[:, None, :] >> shifts[None, :, None]) & low
  return fields.reshape(-1, words.shape[1])[:length].astype(jnp.int32)


def pack_nm(
  w: ArrayLike, pattern: NM, mask: ArrayLike | None = None
) -> PackedNM:
  """Packs ``W: [K, N]`` with N:M groups along ``K`` into a :class:`PackedNM`.

  Kept set per group of ``m`` rows of a column: ``mask`` when given (it must
  hold exactly ``n`` per group; entries outside it are dropped, so
  ``unpack_nm(pack_nm(w, p, mask)) == where(mask, w, 0)``); otherwise the
  nonzeros of ``w`` (``w != 0``; at most ``n`` per group), completed to ``n``
  with the lowest-indexed zero positions, so the round trip is exact
  (bitwise, except that ``-0.0`` may come back as ``+0.0``).

  Jittable. The per-group checks need concrete inputs and are skipped while
  tracing (a group with more than ``n`` then keeps its first ``n``).
  """
  w = jnp.asarray(w)
  _check_nm(w, pattern)
  n, m = pattern.n, pattern.m
  k, cols = w.shape
  groups = w.reshape(k // m, m, cols)
  if mask is None:
    keep = groups != 0
    count = keep.sum(axis=1, keepdims=True, dtype=jnp.int32)
    seen = _concrete(count)
    if seen is not None and (seen > n).any():
      g, _, c = np.argwhere(seen > n)[0]
      raise ValueError(
        f"pack_nm: w has {int(seen[g, 0, c])} nonzeros in rows "
        f"{g * m}..{g * m + m - 1} of column {c}, more than {pattern!r} "
        "keeps; prune w to the pattern first (e.g. with "
        "js.patterns.select) or pass mask=."
      )
    zero_rank = jnp.cumsum(~keep, axis=1, dtype=jnp.int32) - 1
    keep = keep | (~keep & (zero_rank < n - count))
  else:
    mask = jnp.asarray(mask)
    if mask.shape != w.shape:
      raise ValueError(
        f"pack_nm: mask has shape {mask.shape} but w has shape {w.shape}; "
        "pass the mask of this leaf."
      )
    keep = mask.astype(bool).reshape(groups.shape)
    seen = _concrete(keep.sum(axis=1, dtype=jnp.int32))
    if seen is not None and (seen != n).any():
      g, c = np.argwhere(seen != n)[0]
      raise ValueError(
        f"pack_nm: mask keeps {int(seen[g, c])} entries in rows "
        f"{g * m}..{g * m + m - 1} of column {c}, but {pattern!r} needs "
        f"exactly {n} per group; build it with js.patterns.select(pattern, "
        "scores, 1 - n/m) or check it with js.patterns.follows."
      )
    groups = jnp.where(keep, groups, jnp.zeros((), w.dtype))
  position = jnp.arange(m, dtype=jnp.int32)[None, :, None]
  order = jnp.argsort(jnp.where(keep, position, m + position), axis=1)
  idx = order[:, :n, :]
  values = jnp.take_along_axis(groups, idx, axis=1)
  return PackedNM(
    values=values.reshape(-1, cols),
    indices=_pack_bits(idx.reshape(-1, cols), m),
    n=n,
    m=m,
    shape=(k, cols),
  )


def nm_positions(packed: PackedNM) -> Array:
  """int32 ``[K*n/m, N]``: each kept value's position (``0..m-1``)."""
  k, cols = packed.shape
  return _unpack_bits(packed.indices, packed.m, k * packed.n // packed.m)


def unpack_nm(packed: PackedNM) -> Array:
  """Dense ``W: [K, N]``: ``W[g*m + idx, c] = values[g*n + j, c]``."""
  k, cols = packed.shape
  n, m = packed.n, packed.m
  idx = nm_positions(packed).reshape(k // m, n, cols)
  values = packed.values.reshape(k // m, n, cols)
  dense = jnp.zeros((k // m, m, cols), packed.values.dtype)
  dense = jnp.put_along_axis(dense, idx, values, axis=1, inplace=False)
  return dense.reshape(k, cols)


def _check_block(w: Array, pattern: object) -> None:
  if not isinstance(pattern, Block):
    raise ValueError(
      f"pack_block needs pattern=js.Block(rows, cols), got {pattern!r}; use "
      "pack_nm for js.NM."
    )
  check_pattern(pattern)
  _check_2d(w, "pack_block: w")
  k, cols = w.shape
  if k % pattern.rows or cols % pattern.cols:
    raise ValueError(
      f"pack_block: shape {w.shape} is not tiled by {pattern!r}; choose a "
      "block size dividing both dimensions or pad W."
    )


def pack_block(
  w: ArrayLike, pattern: Block, max_blocks: int | None = None
) -> PackedBlock:
  """Packs ``W: [K, N]`` into BCSR :class:`PackedBlock` over block rows.

  A block is stored when any of its entries is nonzero (``w != 0``); block
  row ``r`` keeps its nonzero blocks in ascending column order, then padding.
  ``max_blocks`` (static) is the slots per block row; ``None`` uses the
  largest count, which needs a concrete ``w`` (pass it under ``jit``). With a
  concrete ``w``, fewer slots than nonzero blocks is a ``ValueError``; while
  tracing the extra blocks are dropped. ``unpack_block(pack_block(w, p))``
  equals ``w`` (bitwise, except ``-0.0`` in all-zero blocks becomes ``+0.0``).
  """
  w = jnp.asarray(w)
  _check_block(w, pattern)
  br, bc = pattern.rows, pattern.cols
  k, n = w.shape
  nrows, ncols = k // br, n // bc
  tiles = w.reshape(nrows, br, ncols, bc).transpose(0, 2, 1, 3)
  nonzero = jnp.any(tiles != 0, axis=(2, 3))
  counts = nonzero.sum(axis=1, dtype=jnp.int32)
  seen = _concrete(counts)
  if max_blocks is None:
    if seen is None:
      raise ValueError(
        "pack_block: max_blocks=None needs a concrete w to count blocks; "
        "under jax.jit pass a static max_blocks= (at most the block columns, "
        f"{ncols})."
      )
    max_blocks = max(1, int(seen.max(initial=0)))
  if not (isinstance(max_blocks, int) and 0 < max_blocks <= ncols):
    raise ValueError(
      f"pack_block: max_blocks={max_blocks!r} must be a Python int in "
      f"1..{ncols} (the block columns of shape {w.shape} by {pattern!r})."
    )
  if seen is not None and (seen > max_blocks).any():
    r = int(np.argmax(seen))
    raise ValueError(
      f"pack_block: block row {r} has {int(seen[r])} nonzero blocks but "
      f"max_blocks={max_blocks}; pass max_blocks>={int(seen.max())} or prune "
      "w further."
    )
  position = jnp.arange(ncols, dtype=jnp.int32)[None, :]
  order = jnp.argsort(jnp.where(nonzero, position, ncols + position), axis=1)
  order = order[:, :max_blocks].astype(jnp.int32)
  counts = jnp.minimum(counts, max_blocks)
  valid = jnp.arange(max_blocks, dtype=jnp.int32)[None, :] < counts[:, None]
  blocks = jnp.take_along_axis(tiles, order[:, :, None, None], axis=1)
  blocks = jnp.where(valid[:, :, None, None], blocks, jnp.zeros((), w.dtype))
  return PackedBlock(
    blocks=blocks,
    cols=jnp.where(valid, order, 0),
    counts=counts,
    rows=br,
    cols_per_block=bc,
    shape=(k, n),
  )


def block_valid(packed: PackedBlock) -> Array:
  """bool ``[K/rows, max_blocks]``: which slots hold real blocks."""
  slots = jnp.arange(packed.max_blocks, dtype=jnp.int32)
  return slots[None, :] < packed.counts[:, None]


def unpack_block(packed: PackedBlock) -> Array:
  """Dense ``W: [K, N]`` from the stored blocks (padding slots ignored)."""
  k, n = packed.shape
  br, bc = packed.rows, packed.cols_per_block
  nrows, ncols = k // br, n // bc
  # Padding slots scatter out of bounds and are dropped.
  target = jnp.where(block_valid(packed), packed.cols, ncols)
  dense = jnp.zeros((nrows, ncols, br, bc), packed.blocks.dtype)
  dense = dense.at[jnp.arange(nrows)[:, None], target].set(
    packed.blocks, mode="drop"
  )
  return dense.transpose(0, 2, 1, 3).reshape(k, n)


def nm_dense_fraction(pattern: NM, itemsize: int, k: int) -> float:
  """Packed/dense byte ratio of a ``[k, N]`` N:M weight (any ``N``)."""
  _, per, word = index_layout(pattern.m)
  kept = k * pattern.n // pattern.m
  packed = kept * itemsize + math.ceil(kept / per) * word.itemsize
  return packed / (k * itemsize)
