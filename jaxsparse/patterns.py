"""Sparsity patterns: which entries of a leaf may be pruned together.

A pattern turns per-entry scores and a sparsity into a mask with an exact
count:

* :class:`Unstructured`: any entries; ``size - round(s * size)`` are kept.
* :class:`NM`: in every group of ``m`` consecutive entries along ``axis``,
  exactly ``n`` are kept (NVIDIA's 2:4 is ``NM(2, 4)``).
* :class:`Block`: whole ``rows x cols`` tiles of the last two axes, scored by
  the sum of their entries' scores.
* :class:`Channel`: whole slices along ``axis`` (output channels by
  default), scored by the sum over every other axis.

The functions here act on the array they are given; methods give them each
kernel matrix ``[K, N]`` of a leaf (see :mod:`jaxsparse.layout`), so the last
two axes are the contraction and the outputs.
"""

from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse import threshold


def typed_eq(self: tuple, other: object) -> bool:
  """Tuple equality that also compares types: ``NM(2, 4) != Block(2, 4)``."""
  return type(self) is type(other) and tuple.__eq__(self, other)


def typed_ne(self: tuple, other: object) -> bool:
  return not typed_eq(self, other)


def typed_hash(self: tuple) -> int:
  return hash((type(self).__qualname__, tuple(self)))


class Unstructured(NamedTuple):
  """Any entry may be pruned on its own."""

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class NM(NamedTuple):
  """``n`` kept entries in every group of ``m`` along ``axis``.

  Methods apply a pattern to each kernel matrix ``[K, N]`` of a leaf's
  :class:`~jaxsparse.layout.Layout`, so the default ``axis=-2`` groups
  along the contraction ``K``, as sparse tensor cores require, whatever the
  leaf's own shape (attention, ``Einsum``, transposed or stacked kernels).
  """

  n: int
  m: int
  axis: int = -2

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class Block(NamedTuple):
  """Whole ``rows x cols`` tiles of the last two axes are kept or pruned."""

  rows: int
  cols: int

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class Channel(NamedTuple):
  """Whole slices along ``axis`` (default: output channels) kept or pruned."""

  axis: int = -1

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


Pattern: TypeAlias = Unstructured | NM | Block | Channel
PATTERNS = (Unstructured, NM, Block, Channel)


def check_pattern(pattern: object) -> None:
  """Raises ``ValueError`` for a pattern that no leaf could satisfy."""
  if not isinstance(pattern, PATTERNS):
    raise ValueError(
      f"pattern={pattern!r} is not a pattern; use js.Unstructured(), "
      "js.NM(n, m), js.Block(rows, cols) or js.Channel(axis)."
    )
  if isinstance(pattern, NM):
    if not (isinstance(pattern.n, int) and isinstance(pattern.m, int)):
      raise ValueError(f"{pattern!r}: n and m must be Python ints.")
    if not 0 < pattern.n <= pattern.m:
      swapped = 0 < pattern.m < pattern.n
      hint = (
        f"did you mean NM({pattern.m}, {pattern.n})?"
        if swapped
        else "n is the number kept per group, at least 1 (to prune a layer "
        "entirely, exclude it with `where=`)."
      )
      raise ValueError(
        f"{pattern!r}: need 0 < n <= m (n kept out of every m); {hint}"
      )
    if pattern.m > 16:
      raise ValueError(f"{pattern!r}: m must be at most 16.")
  if isinstance(pattern, Block) and not (pattern.rows > 0 and pattern.cols > 0):
    raise ValueError(f"{pattern!r}: block rows and cols must be positive.")


def check_leaf(pattern: Pattern, shape: tuple[int, ...], path: str) -> None:
  """Raises ``ValueError`` naming ``path`` if ``shape`` does not fit."""
  if isinstance(pattern, NM):
    if len(shape) == 0 or not -len(shape) <= pattern.axis < len(shape):
      raise ValueError(
        f"{path}: {pattern!r} groups along axis {pattern.axis}, but the param "
        f"has shape {shape}; exclude it with `where=` or pick another axis."
      )
    size = shape[pattern.axis]
    if size % pattern.m:
      raise ValueError(
        f"{path}: axis {pattern.axis} has size {size}, which {pattern!r} "
        f"cannot split into groups of {pattern.m}; exclude it with `where=` "
        "or choose m dividing that size."
      )
  elif isinstance(pattern, Block):
    if len(shape) < 2:
      raise ValueError(
        f"{path}: {pattern!r} needs a param with at least 2 axes, got shape "
        f"{shape}; exclude it with `where=`."
      )
    rows, cols = shape[-2:]
    if rows % pattern.rows or cols % pattern.cols:
      raise ValueError(
        f"{path}: shape {shape} is not tiled by {pattern!r} (last two axes "
        f"{rows}x{cols}); choose a block size dividing them or exclude the "
        "param with `where=`."
      )
  elif isinstance(pattern, Channel):
    if len(shape) == 0 or not -len(shape) <= pattern.axis < len(shape):
      raise ValueError(
        f"{path}: {pattern!r} has no axis {pattern.axis} in shape {shape}; "
        "exclude the param with `where=`."
      )


def num_kept(size: int, sparsity: Float[ArrayLike, ""]) -> Int[Array, ""]:
  """Entries kept out of ``size`` at ``sparsity``: ``size - round(s * size)``.

  ``round`` is round-half-to-even, computed in float32; the rule is
  :func:`jaxsparse.threshold.num_kept`'s, given here as an int32 for sizes
  below ``2**31`` (groups, fan-ins, columns).
  """
  if size >= 2**31:
    raise ValueError(
      f"size={size}: an int32 count needs fewer than 2**31 entries; use "
      "jaxsparse.threshold.num_kept, which is exact for any size."
    )
  return threshold.num_kept(size, sparsity).lo.astype(jnp.int32)


def unit_scores(pattern: Pattern, scores: Float[Array, "..."]) -> Array:
  """Scores of the units the pattern keeps or prunes together."""
  if isinstance(pattern, Block):
    *lead, rows, cols = scores.shape
    tiled = scores.reshape(
      *lead,
      rows // pattern.rows,
      pattern.rows,
      cols // pattern.cols,
      pattern.cols,
    )
    return tiled.sum(axis=(-3, -1))
  if isinstance(pattern, Channel):
    axis = pattern.axis % scores.ndim
    others = tuple(a for a in range(scores.ndim) if a != axis)
    return scores.sum(axis=others)
  return scores


def expand_units(
  pattern: Pattern, keep: Bool[Array, "..."], shape: tuple[int, ...]
) -> Bool[Array, "..."]:
  """Inverse of :func:`unit_scores` for masks: one unit back to its entries."""
  if isinstance(pattern, Block):
    keep = jnp.repeat(keep, pattern.rows, axis=-2)
    return jnp.repeat(keep, pattern.cols, axis=-1)
  if isinstance(pattern, Channel):
    axis = pattern.axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(keep.reshape(view), shape)
  return keep


def nm_kept_per_group(pattern: NM, sparsity: Float[ArrayLike, ""]) -> Array:
  """Entries kept per group: ``clip(m - round(s * m), n, m)``.

  A sparsity at or above the N:M level ``1 - n/m`` keeps exactly ``n``; a
  smaller one (early in a schedule) keeps more, so a schedule ramps from dense
  to N:M through k:M masks.
  """
  return jnp.clip(num_kept(pattern.m, sparsity), pattern.n, pattern.m)


def _group_view(x: Array, pattern: NM) -> Array:
  moved = jnp.moveaxis(x, pattern.axis, -1)
  return moved.reshape(
    *moved.shape[:-1], moved.shape[-1] // pattern.m, pattern.m
  )


def _ungroup(x: Array, pattern: NM, shape: tuple[int, ...]) -> Array:
  moved_shape = np.moveaxis(np.empty(shape, bool), pattern.axis, -1).shape
  return jnp.moveaxis(x.reshape(moved_shape), -1, pattern.axis)


def nm_select(
  pattern: NM, scores: Float[Array, "..."], kept: Int[ArrayLike, ""]
) -> Bool[Array, "..."]:
  """Keeps the ``kept`` largest scores in every group of ``m`` along the axis.

  Ranks are computed by pairwise comparison inside each group (``m <= 16``),
  ties going to the lower index, so each group keeps exactly ``kept``.
  """
  groups = _group_view(scores, pattern)
  later = groups[..., None, :]  # [..., i, j] -> score j
  here = groups[..., :, None]  # [..., i, j] -> score i
  lower = np.tril(np.ones((pattern.m, pattern.m), bool), -1)
  lower = jnp.asarray(lower.reshape((1,) * (groups.ndim - 1) + lower.shape))
  beats = (later > here) | ((later == here) & lower)
  rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  return _ungroup(rank < kept, pattern, scores.shape)


def explicit_sharding(x: Array) -> jax.sharding.NamedSharding | None:
  """The sharding of ``x`` if it is sharded over Explicit mesh axes."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return None
  return sharding


def _regrouped_axes(pattern: Pattern, ndim: int) -> tuple[int, ...]:
  """Axes a structured pattern splits into groups (reshapes)."""
  if isinstance(pattern, NM):
    return (pattern.axis % ndim,)
  if isinstance(pattern, Block):
    return (ndim - 2, ndim - 1)
  return tuple(range(ndim))  # Channel reduces over and re-broadcasts all


def _whole_groups_per_shard(pattern: Pattern, scores: Array) -> bool:
  """Whether every shard of the N:M axis holds whole groups of ``m``."""
  if not isinstance(pattern, NM):
    return False
  sharding = explicit_sharding(scores)
  axis = pattern.axis % scores.ndim
  names = sharding.spec[axis] if axis < len(sharding.spec) else None
  if names is None:
    return True
  names = (names,) if isinstance(names, str) else tuple(names)
  shards = int(np.prod([sharding.mesh.shape[name] for name in names]))
  return (scores.shape[axis] // shards) % pattern.m == 0


def select(
  pattern: Pattern, scores: Float[Array, "..."], sparsity: Float[ArrayLike, ""]
) -> Bool[Array, "..."]:
  """Mask keeping the highest-scoring units of one leaf at ``sparsity``.

  Exact counts: ``num_kept`` units for :class:`Unstructured`, :class:`Block`
  and :class:`Channel`; :func:`nm_kept_per_group` per group for :class:`NM`.

  Unstructured selection is local to each shard (only counts are reduced).
  Structured patterns regroup axes: when one of those axes is sharded over
  Explicit mesh axes, the leaf is gathered on purpose for the (amortised) mask
  update and the mask is resharded like the leaf; N:M along an unsharded
  axis stays local.
  """
  scores = jnp.asarray(scores, jnp.float32)
  if isinstance(pattern, Unstructured):
    (keep,) = threshold.topk_masks(
      [scores], threshold.num_kept(scores.size, sparsity)
    )
    return keep
  sharding = explicit_sharding(scores)
  if sharding is not None and not any(
    sharding.spec[axis] is not None
    for axis in _regrouped_axes(pattern, scores.ndim)
    if axis < len(sharding.spec)
  ):
    sharding = None  # the regrouped axes are local to every shard
  if sharding is not None and _whole_groups_per_shard(pattern, scores):
    sharding = None  # N:M groups never straddle a shard boundary
  if sharding is not None:
    replicated = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec()
    )
    scores = jax.sharding.reshard(scores, replicated)
  if isinstance(pattern, NM):
    mask = nm_select(pattern, scores, nm_kept_per_group(pattern, sparsity))
  else:
    units = unit_scores(pattern, scores)
    (keep,) = threshold.topk_masks(
      [units], threshold.num_kept(units.size, sparsity)
    )
    mask = expand_units(pattern, keep, scores.shape)
  if sharding is not None:
    mask = jax.sharding.reshard(mask, sharding)
  return mask


def follows(pattern: Pattern, mask: ArrayLike) -> bool:
  """Whether a concrete mask obeys the pattern (host-side check).

  N:M: every group holds exactly ``n`` kept entries. Block and Channel: every
  unit is all kept or all pruned. Unstructured: always.
  """
  mask = np.asarray(mask, bool)
  if isinstance(pattern, NM):
    moved = np.moveaxis(mask, pattern.axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, pattern.m)
    return bool(np.all(groups.sum(-1) == pattern.n))
  if isinstance(pattern, (Block, Channel)):
    units = np.asarray(unit_scores(pattern, jnp.asarray(mask, jnp.float32)))
    full = np.asarray(unit_scores(pattern, jnp.ones(mask.shape, jnp.float32)))
    return bool(np.all((units == 0) | (units == full)))
  return True
