"""Exact top-k selection by bisection on counts.

Selecting the ``k`` largest scores is usually written as a sort. Here it is a
32-step bisection on the float32 bit pattern: each step counts the entries
above a candidate threshold, so the cost is 32 fused reductions, no
concatenation of leaves is ever built, and sharded inputs need only
all-reduced counts (no gather). Ties at the threshold are broken by leaf order
and then by flat index with a second bisection, so exactly ``k`` entries are
selected.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int, UInt32

_SIGN = 0x80000000


def ordered_keys(scores: ArrayLike) -> UInt32[Array, "..."]:
  """Maps float32 scores to uint32 keys with the same order.

  Non-negative floats get their sign bit set; negative floats have every bit
  flipped, so unsigned comparison of keys equals float comparison of scores
  (-0.0 is mapped to +0.0 first, so the two zeros tie as floats do). Only
  integer operations are used, so subnormals keep their IEEE order even where
  the backend flushes them to zero in float comparisons.
  """
  bits = jax.lax.bitcast_convert_type(
    jnp.asarray(scores, jnp.float32), jnp.uint32
  )
  bits = jnp.where(bits == jnp.uint32(_SIGN), jnp.uint32(0), bits)
  negative = (bits & jnp.uint32(_SIGN)) != 0
  return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN))


def _count(mask: Array) -> Int[Array, ""]:
  """Number of True entries, as int32.

  Row sums along the last axis use a narrow accumulator (uint8 up to 255
  columns, uint16 up to 65535): on XLA:CPU a direct int32 sum writes a 4-byte
  copy of the mask before reducing, which dominated the bisection's time.
  The sum stays exact and local to each shard of the leading axes.
  """
  if mask.ndim == 0 or mask.shape[-1] > 65535:
    return jnp.sum(mask, dtype=jnp.int32)
  narrow = jnp.uint8 if mask.shape[-1] <= 255 else jnp.uint16
  return jnp.sum(jnp.sum(mask, axis=-1, dtype=narrow), dtype=jnp.int32)


def kth_largest_key(
  keys: Sequence[Array], k: Int[ArrayLike, ""]
) -> UInt32[Array, ""]:
  """The largest key ``t`` with at least ``k`` keys ``>= t`` over all leaves.

  Built bit by bit from the most significant: 32 counting passes. For
  ``k == 0`` this is ``0xFFFFFFFF``.
  """
  k = jnp.asarray(k, jnp.int32)

  def step(i, t):
    bit = jnp.left_shift(jnp.uint32(1), jnp.uint32(31) - i.astype(jnp.uint32))
    candidate = t | bit
    count = sum(_count(key >= candidate) for key in keys)
    return jnp.where(count >= k, candidate, t)

  return jax.lax.fori_loop(0, 32, step, jnp.uint32(0))


def _flat_index(shape: tuple[int, ...]) -> Int[Array, "..."]:
  """Row-major flat index built from per-axis iotas (shards like its input)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    index = index + iota * jnp.int32(stride)
    stride *= shape[axis]
  return index


def first_n(candidates: Bool[Array, "..."], n: Int[ArrayLike, ""]) -> Array:
  """Keeps the first ``n`` True entries of ``candidates`` in row-major order.

  A bisection on the flat index: the largest ``T`` with at most ``n``
  candidates below it; skipped when all or none are kept.
  """
  n = jnp.asarray(n, jnp.int32)
  total = _count(candidates)

  def bisect():
    index = _flat_index(candidates.shape)
    bits = max(candidates.size, 1).bit_length()

    def step(i, t):
      candidate = t | jnp.left_shift(jnp.int32(1), jnp.int32(bits) - i)
      below = _count(candidates & (index < candidate))
      return jnp.where(below <= n, candidate, t)

    limit = jax.lax.fori_loop(0, bits + 1, step, jnp.int32(0))
    return candidates & (index < limit)

  return jax.lax.cond(
    (n >= total) | (n <= 0),
    lambda: candidates & (n > 0),
    bisect,
  )


def topk_masks(
  scores: Sequence[ArrayLike], k: Int[ArrayLike, ""]
) -> list[Bool[Array, "..."]]:
  """Marks exactly the ``k`` largest entries over all ``scores`` arrays.

  Args:
    scores: arrays of any shapes, compared as float32.
    k: how many entries to keep in total (traced is fine); clipped to
      ``[0, total size]``.

  Returns:
    One bool array per input, True at the kept entries. Ties are resolved in
    favour of earlier arrays, then of smaller row-major index.
  """
  keys = [ordered_keys(s) for s in scores]
  total = sum(key.size for key in keys)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
  t = kth_largest_key(keys, k)
  above = [key > t for key in keys]
  ties = [key == t for key in keys]
  needed = k - sum(_count(a) for a in above)
  tie_counts = jnp.stack([_count(tie) for tie in ties])
  before = jnp.cumsum(tie_counts) - tie_counts
  take = jnp.clip(needed - before, 0, tie_counts)
  return [
    a | first_n(tie, take[i]) for i, (a, tie) in enumerate(zip(above, ties))
  ]
