"""Packed storage for structured-sparse weights: N:M and block-sparse (BCSR).

Weights are Flax kernels ``W: [K, N]`` (in, out), applied as ``y = x @ W``.
Both layouts are chosen so that a kernel tile needs no in-kernel reshape or
gather: only 2-D loads, shifts, selects and dots.

* :class:`PackedNM` (NVIDIA's 2:4 generalised, Mishra et al. 2021,
  "Accelerating Sparse Deep Neural Networks"): every group ``g`` of ``m``
  consecutive rows of a column keeps ``n`` values. Slot-major planes:
  ``values[j, g, c]`` is the ``j``-th kept value (in row order) of group
  ``g`` of column ``c``, stored at ``W[g*m + idx[j, g, c], c]``. The position
  ``idx`` (``0..m-1``) takes ``b = max(1, ceil(log2 m))`` bits, ``w = 8 // b``
  per ``uint8`` word (``32 // b`` per ``uint32`` word when ``b = 3``); field
  ``f`` of word ``indices[j, u, c]`` holds group ``g = f*G_w + u`` with
  ``G_w = ceil(G / w)`` (groups split into ``w`` contiguous runs, one per
  field). Bytes: ``n G N itemsize + n G_w N word_bytes``; 2:4 in bfloat16
  with ``K % 16 == 0`` is exactly ``0.5625`` of the dense bytes.
* :class:`PackedBlock` (BCSR of ``Wᵀ``, i.e. by output block column): output
  block column ``c`` stores its ``counts[c]`` nonzero ``rows x cols`` blocks
  ``W[r*rows:(r+1)*rows, c*cols:(c+1)*cols]`` in ascending block-row order
  in ``blocks[c, :counts[c]]``, with block rows ``indices[c, :counts[c]]``.
  Slots ``j >= counts[c]`` are padding (zero blocks whose index repeats the
  last stored one, or ``0``), so shapes stay static, a kernel walking the
  slots re-reads no new block, and every consumer ignores them through
  ``counts``.

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


def static_field():
  """A dataclass field that is pytree metadata (static), not a leaf."""
  return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNM:
  """N:M-sparse ``W: [K, N]``: kept values plus bit-packed positions.

  Attributes:
    values: ``[n, K/m, N]`` kept values, slot-major, ``W``'s dtype.
    indices: ``[n, ceil(K/m / per_word), N]`` unsigned words holding each
      kept value's position in its group (see :func:`index_layout` and the
      module docstring for the field order).
    n, m: the pattern (static).
    shape: the dense shape ``(K, N)`` (static).
  """

  # Leaves are Any, not Array: transforms rebuild the pytree with
  # ShapeDtypeStructs, tracers or sentinels in their place.
  values: Any
  indices: Any
  n: int = static_field()
  m: int = static_field()
  shape: tuple[int, int] = static_field()

  @property
  def pattern(self) -> NM:
    return NM(self.n, self.m)

  @property
  def dtype(self):
    return self.values.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBlock:
  """Block-sparse ``W: [K, N]``, BCSR of ``Wᵀ`` over ``N/cols`` block columns.

  Attributes:
    blocks: ``[N/cols, max_blocks, rows, cols]`` stored blocks of ``W``
      (each oriented as in ``W``), ``W``'s dtype.
    indices: int32 ``[N/cols, max_blocks]`` block-row (``K``) index of each
      block; padding slots repeat the last stored index (``0`` if none).
    counts: int32 ``[N/cols]`` stored blocks per block column; slots
      ``j >= counts[c]`` are padding (zero blocks) and are ignored.
    rows, cols_per_block: the block shape (static).
    shape: the dense shape ``(K, N)`` (static).
  """

  blocks: Any  # leaves are Any for the same reason as in PackedNM
  indices: Any
  counts: Any
  rows: int = static_field()
  cols_per_block: int = static_field()
  shape: tuple[int, int] = static_field()

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


def concrete(x: Any) -> np.ndarray | None:
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
  """``[n, G, N]`` positions (< m) into ``[n, ceil(G / per_word), N]`` words.

  Field ``f`` of word ``u`` holds group ``f * G_w + u``; groups past ``G``
  are zero fields.
  """
  bits, per, word = index_layout(m)
  slots, groups, cols = fields.shape
  words = -(-groups // per)
  padded = (
    jnp.zeros((slots, words * per, cols), word)
    .at[:, :groups]
    .set(fields.astype(word))
  )
  shifts = jnp.asarray(np.arange(per, dtype=word) * word.type(bits))
  planes = padded.reshape(slots, per, words, cols)
  planes = planes << shifts[None, :, None, None]
  # Disjoint bit ranges: the sum is the bitwise OR, and cannot overflow.
  return jnp.sum(planes, axis=1, dtype=word)


def _unpack_bits(words: Array, m: int, groups: int) -> Array:
  """Inverse of :func:`_pack_bits`: ``[n, groups, N]`` int32 positions."""
  bits, per, word = index_layout(m)
  slots, count, cols = words.shape
  shifts = jnp.asarray(np.arange(per, dtype=word) * word.type(bits))
  low = jnp.asarray(word.type((1 << bits) - 1))
  fields = (words[:, None] >> shifts[None, :, None, None]) & low
  fields = fields.reshape(slots, per * count, cols)[:, :groups]
  return fields.astype(jnp.int32)


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
    seen = concrete(count)
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
    seen = concrete(keep.sum(axis=1, dtype=jnp.int32))
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
    values=values.transpose(1, 0, 2),
    indices=_pack_bits(idx.transpose(1, 0, 2), m),
    n=n,
    m=m,
    shape=(k, cols),
  )


def nm_positions(packed: PackedNM) -> Array:
  """int32 ``[n, K/m, N]``: each kept value's position (``0..m-1``)."""
  k, _ = packed.shape
  return _unpack_bits(packed.indices, packed.m, k // packed.m)


def unpack_nm(packed: PackedNM) -> Array:
  """Dense ``W: [K, N]``: ``W[g*m + idx[j, g, c], c] = values[j, g, c]``.

  Built as the kernels build it, without a scatter: row ``q`` of every
  group is ``sum_j where(idx[j] == q, values[j], 0)`` (positions within a
  group are distinct), interleaved back to ``K`` rows.
  """
  k, cols = packed.shape
  idx = nm_positions(packed)
  zero = jnp.zeros(packed.values.shape[1:], packed.values.dtype)
  rows = []
  for q in range(packed.m):
    row = zero
    for j in range(packed.n):
      row = jnp.where(idx[j] == q, packed.values[j], row)
    rows.append(row)
  return jnp.stack(rows, axis=1).reshape(k, cols)


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
  """Packs ``W: [K, N]`` into a :class:`PackedBlock` (BCSR of ``Wᵀ``).

  A block is stored when any of its entries is nonzero (``w != 0``); block
  column ``c`` keeps its nonzero blocks in ascending block-row order, then
  padding. ``max_blocks`` (static) is the slots per block column; ``None``
  uses the largest count, which needs a concrete ``w`` (pass it under
  ``jit``). With a concrete ``w``, fewer slots than nonzero blocks is a
  ``ValueError``; while tracing the extra blocks are dropped.
  ``unpack_block(pack_block(w, p))`` equals ``w`` (bitwise, except ``-0.0``
  in all-zero blocks becomes ``+0.0``).
  """
  w = jnp.asarray(w)
  _check_block(w, pattern)
  br, bc = pattern.rows, pattern.cols
  k, n = w.shape
  nrows, ncols = k // br, n // bc
  tiles = w.reshape(nrows, br, ncols, bc).transpose(2, 0, 1, 3)
  nonzero = jnp.any(tiles != 0, axis=(2, 3))
  counts = nonzero.sum(axis=1, dtype=jnp.int32)
  seen = concrete(counts)
  if max_blocks is None:
    if seen is None:
      raise ValueError(
        "pack_block: max_blocks=None needs a concrete w to count blocks; "
        "under jax.jit pass a static max_blocks= (at most the block rows, "
        f"{nrows})."
      )
    max_blocks = max(1, int(seen.max(initial=0)))
  if not (isinstance(max_blocks, int) and 0 < max_blocks <= nrows):
    raise ValueError(
      f"pack_block: max_blocks={max_blocks!r} must be a Python int in "
      f"1..{nrows} (the block rows of shape {w.shape} by {pattern!r})."
    )
  if seen is not None and (seen > max_blocks).any():
    c = int(np.argmax(seen))
    raise ValueError(
      f"pack_block: block column {c} has {int(seen[c])} nonzero blocks but "
      f"max_blocks={max_blocks}; pass max_blocks>={int(seen.max())} or prune "
      "w further."
    )
  position = jnp.arange(nrows, dtype=jnp.int32)[None, :]
  order = jnp.argsort(jnp.where(nonzero, position, nrows + position), axis=1)
  order = order[:, :max_blocks].astype(jnp.int32)
  counts = jnp.minimum(counts, max_blocks)
  slots = jnp.arange(max_blocks, dtype=jnp.int32)[None, :]
  valid = slots < counts[:, None]
  blocks = jnp.take_along_axis(tiles, order[:, :, None, None], axis=1)
  blocks = jnp.where(valid[:, :, None, None], blocks, jnp.zeros((), w.dtype))
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[:, None], axis=1)
  last = jnp.where(counts[:, None] > 0, last, 0)
  return PackedBlock(
    blocks=blocks,
    indices=jnp.where(valid, order, last),
    counts=counts,
    rows=br,
    cols_per_block=bc,
    shape=(k, n),
  )


def block_valid(packed: PackedBlock) -> Array:
  """bool ``[N/cols, max_blocks]``: which slots hold real blocks."""
  slots = jnp.arange(packed.max_blocks, dtype=jnp.int32)
  return slots[None, :] < packed.counts[:, None]


def unpack_block(packed: PackedBlock) -> Array:
  """Dense ``W: [K, N]`` from the stored blocks (padding slots ignored)."""
  k, n = packed.shape
  br, bc = packed.rows, packed.cols_per_block
  nrows, ncols = k // br, n // bc
  # Padding slots scatter out of bounds and are dropped.
  target = jnp.where(block_valid(packed), packed.indices, nrows)
  dense = jnp.zeros((ncols, nrows, br, bc), packed.blocks.dtype)
  dense = dense.at[jnp.arange(ncols)[:, None], target].set(
    packed.blocks, mode="drop"
  )
  return dense.transpose(1, 2, 0, 3).reshape(k, n)


def nm_dense_fraction(pattern: NM, itemsize: int, k: int) -> float:
  """Packed/dense byte ratio of a ``[k, N]`` N:M weight (any ``N``)."""
  _, per, word = index_layout(pattern.m)
  groups = k // pattern.m
  packed = pattern.n * (
    groups * itemsize + math.ceil(groups / per) * word.itemsize
  )
  return packed / (k * itemsize)
