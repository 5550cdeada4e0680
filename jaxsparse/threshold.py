"""Exact top-k selection by bisection on counts.

Selecting the ``k`` largest scores is usually written as a sort. Here it is a
32-step bisection on the float32 bit pattern: each step counts the entries
above a candidate threshold, so the cost is 32 fused reductions, no
concatenation of leaves is ever built, and sharded inputs need only
all-reduced counts (no gather). Ties at the threshold are broken by leaf order
and then by flat index with a second bisection, so exactly ``k`` entries are
selected.

Counts are exact past ``2**31`` without 64-bit types: each leaf (below
``2**32`` entries) is counted in uint32, and sums over leaves, ``k`` and the
comparisons ``count >= k`` use :class:`Count`, an unsigned 64-bit integer
held as two uint32 words, ``hi * 2**32 + lo``.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Integer, UInt32

_SIGN = 0x80000000
_WORD = 2**32
# A leaf is counted in uint32, so it must hold fewer than 2**32 entries.
MAX_LEAF_SIZE = _WORD - 1


class Count(NamedTuple):
  """A count ``hi * 2**32 + lo`` in ``[0, 2**64)``, exact with x64 disabled.

  Attributes:
    hi: uint32 scalar, the high word.
    lo: uint32 scalar, the low word.
  """

  hi: UInt32[Array, ""]
  lo: UInt32[Array, ""]


def as_count(value: int | Integer[ArrayLike, ""] | Count) -> Count:
  """A :class:`Count` from a Python int, an integer scalar or a ``Count``.

  Python ints must lie in ``[0, 2**64)``; a negative integer array counts as
  0 (so a negative ``k`` keeps nothing, as before).
  """
  if isinstance(value, Count):
    return value
  if isinstance(value, (int, np.integer)):
    value = int(value)
    if not 0 <= value < _WORD * _WORD:
      raise ValueError(f"count {value} is outside [0, 2**64).")
    return Count(jnp.uint32(value // _WORD), jnp.uint32(value % _WORD))
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.integer) or value.ndim:
    raise ValueError(
      f"a count must be an integer scalar, got {value.dtype}{value.shape}."
    )
  if jnp.issubdtype(value.dtype, jnp.signedinteger):
    value = jnp.maximum(value, jnp.zeros([], value.dtype))
  return Count(jnp.uint32(0), value.astype(jnp.uint32))


def add(a: Count, b: Count) -> Count:
  """``a + b`` (modulo ``2**64``): word sums with the low word's carry."""
  lo = a.lo + b.lo
  carry = (lo < a.lo).astype(jnp.uint32)
  return Count(a.hi + b.hi + carry, lo)


def subtract(a: Count, b: Count) -> Count:
  """``a - b`` for ``a >= b`` (modulo ``2**64`` otherwise)."""
  borrow = (a.lo < b.lo).astype(jnp.uint32)
  return Count(a.hi - b.hi - borrow, a.lo - b.lo)


def greater_equal(a: Count, b: Count) -> Bool[Array, ""]:
  """``a >= b``, exact."""
  return (a.hi > b.hi) | ((a.hi == b.hi) & (a.lo >= b.lo))


def minimum(a: Count, b: Count) -> Count:
  """``min(a, b)``."""
  take_a = greater_equal(b, a)
  return Count(jnp.where(take_a, a.hi, b.hi), jnp.where(take_a, a.lo, b.lo))


def _from_integral_float(f: Float[Array, ""]) -> Count:
  """An integral float32 in ``[0, 2**64)`` as a :class:`Count`, exactly.

  ``hi = floor(f / 2**32)`` is exact (a power-of-two scale); so is
  ``f - hi * 2**32``: it is below ``2**32`` and a multiple of the ulp of ``f``,
  which is at least ``2**9`` when ``hi > 0``, so it fits in 24 bits.
  """
  hi = jnp.floor(f * jnp.float32(1 / _WORD))
  lo = f - hi * jnp.float32(_WORD)
  return Count(hi.astype(jnp.uint32), lo.astype(jnp.uint32))


def num_kept(size: int, sparsity: Float[ArrayLike, ""]) -> Count:
  """Entries kept out of ``size`` at ``sparsity``: ``size - round(s size)``.

  As :func:`jaxsparse.patterns.num_kept` (``round`` half to even of the
  float32 product ``s * float32(size)``), but exact for any ``size`` below
  ``2**63``: the rounded product is converted to a :class:`Count` exactly and
  subtracted from the exact ``size``; the result is clipped to
  ``[0, size]``.
  """
  if not 0 <= size < 2**63:
    raise ValueError(f"size={size} must lie in [0, 2**63).")
  s = jnp.asarray(sparsity, jnp.float32)
  pruned = jnp.clip(jnp.round(s * jnp.float32(size)), 0, None)
  total = as_count(size)
  return subtract(total, minimum(_from_integral_float(pruned), total))


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


def _check_sizes(arrays: Sequence[Array]) -> None:
  for i, a in enumerate(arrays):
    if a.size > MAX_LEAF_SIZE:
      raise ValueError(
        f"leaf {i} of shape {a.shape} has {a.size} entries; exact counts "
        f"need fewer than 2**32 per leaf: split it into smaller params."
      )


def _count(mask: Array) -> UInt32[Array, ""]:
  """Number of True entries of one leaf (fewer than ``2**32``), as uint32.

  Row sums along the last axis use a narrow accumulator (uint8 up to 255
  columns, uint16 up to 65535): on XLA:CPU a direct 4-byte sum writes a
  4-byte copy of the mask before reducing, which dominated the bisection's
  time. The sum stays exact and local to each shard of the leading axes;
  across shards it is an all-reduce in uint32, exact below ``2**32``.
  """
  if mask.ndim == 0 or mask.shape[-1] > 65535:
    return jnp.sum(mask, dtype=jnp.uint32)
  narrow = jnp.uint8 if mask.shape[-1] <= 255 else jnp.uint16
  return jnp.sum(jnp.sum(mask, axis=-1, dtype=narrow), dtype=jnp.uint32)


def total_count(masks: Sequence[Array]) -> Count:
  """Number of True entries over all ``masks``, exact below ``2**64``."""
  _check_sizes(masks)
  total = as_count(0)
  for mask in masks:
    total = add(total, Count(jnp.uint32(0), _count(mask)))
  return total


def kth_largest_key(
  keys: Sequence[Array], k: int | Integer[ArrayLike, ""] | Count
) -> UInt32[Array, ""]:
  """The largest key ``t`` with at least ``k`` keys ``>= t`` over all leaves.

  Built bit by bit from the most significant: 32 counting passes. For
  ``k == 0`` this is ``0xFFFFFFFF``.
  """
  k = as_count(k)

  def step(i, t):
    bit = jnp.left_shift(jnp.uint32(1), jnp.uint32(31) - i.astype(jnp.uint32))
    candidate = t | bit
    count = total_count([key >= candidate for key in keys])
    return jnp.where(greater_equal(count, k), candidate, t)

  return jax.lax.fori_loop(0, 32, step, jnp.uint32(0))


def _flat_index(shape: tuple[int, ...]) -> UInt32[Array, "..."]:
  """Row-major flat index (uint32) from per-axis iotas (shards like input)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride)
    stride *= shape[axis]
  return index


def first_n(
  candidates: Bool[Array, "..."], n: int | Integer[ArrayLike, ""]
) -> Bool[Array, "..."]:
  """Keeps the first ``n`` True entries of ``candidates`` in row-major order.

  A bisection on the flat index: the largest ``T`` with at most ``n``
  candidates below it (``T`` is then the position of candidate ``n + 1``,
  below the size); skipped when all or none are kept. ``n`` below 0 keeps
  none.
  """
  _check_sizes([candidates])
  n = as_count(n)
  n = jnp.where(n.hi > 0, jnp.uint32(MAX_LEAF_SIZE), n.lo)
  total = _count(candidates)

  def bisect():
    index = _flat_index(candidates.shape)
    bits = max(candidates.size - 1, 0).bit_length()

    def step(i, t):
      shift = (jnp.int32(bits - 1) - i).astype(jnp.uint32)
      candidate = t | jnp.left_shift(jnp.uint32(1), shift)
      below = _count(candidates & (index < candidate))
      return jnp.where(below <= n, candidate, t)

    limit = jax.lax.fori_loop(0, bits, step, jnp.uint32(0))
    return candidates & (index < limit)

  return jax.lax.cond(
    (n >= total) | (n == 0),
    lambda: candidates & (n > 0),
    bisect,
  )


def topk_masks(
  scores: Sequence[ArrayLike], k: int | Integer[ArrayLike, ""] | Count
) -> list[Bool[Array, "..."]]:
  """Marks exactly the ``k`` largest entries over all ``scores`` arrays.

  Args:
    scores: arrays of any shapes, compared as float32; each below ``2**32``
      entries (the total may be larger).
    k: how many entries to keep in total (traced is fine): an integer
      scalar, a Python int or a :class:`Count` (e.g. from :func:`num_kept`,
      for totals past ``2**31``); clipped to ``[0, total size]``.

  Returns:
    One bool array per input, True at the kept entries. Ties are resolved in
    favour of earlier arrays, then of smaller row-major index.
  """
  scores = [jnp.asarray(s) for s in scores]
  _check_sizes(scores)
  # One compiled computation (inlined under an outer jit): eagerly, the
  # scalar count arithmetic would otherwise dispatch op by op.
  return _topk_masks(scores, as_count(k))


@jax.jit
def _topk_masks(scores: list[Array], k: Count) -> list[Bool[Array, "..."]]:
  keys = [ordered_keys(s) for s in scores]
  total = sum(key.size for key in keys)
  k = minimum(k, as_count(total))
  t = kth_largest_key(keys, k)
  above = [key > t for key in keys]
  ties = [key == t for key in keys]
  # k >= count(> t) by the choice of t; the rest are taken from the ties.
  needed = subtract(k, total_count(above))
  before = as_count(0)
  out = []
  for a, tie in zip(above, ties):
    tie_count = Count(jnp.uint32(0), _count(tie))
    rest = subtract(needed, minimum(before, needed))
    out.append(a | first_n(tie, minimum(rest, tie_count).lo))
    before = add(before, tie_count)
  return out
