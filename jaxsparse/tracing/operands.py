"""A kernel's operand as its layer inputs ``[..., K]``, and back."""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse.tracing.origins import Origin, dot_operands, flat_axes


def var_order(origin: Origin, dims: Sequence[int]) -> tuple[int, ...]:
  """The leaf axes spanned by the value axes ``dims``, in value order."""
  return flat_axes([origin.axes[d] for d in dims])


def split_to_leaf_axes(
  x: jax.Array,
  x_dims: Sequence[int],
  origin: Origin,
  kernel_dims: Sequence[int],
  leaf_shape: Sequence[int],
) -> tuple[jax.Array, list[int]]:
  """Splits each axis ``x_dims[j]`` of ``x`` (paired with the kernel value's
  axis ``kernel_dims[j]``) into the leaf axes it spans.

  Returns:
    ``(x', axes)``: ``x'`` with the split axes moved last, in ascending leaf
    axis order, and ``axes`` those leaf axes.
  """
  moved = jnp.moveaxis(x, tuple(x_dims), tuple(range(-len(x_dims), 0)))
  lead = moved.shape[: moved.ndim - len(x_dims)]
  leaf_axes = [a for d in kernel_dims for a in origin.axes[d]]
  sizes = [leaf_shape[a] for a in leaf_axes]
  split = moved.reshape(*lead, *sizes)
  order = sorted(range(len(leaf_axes)), key=lambda i: leaf_axes[i])
  perm = tuple(range(len(lead))) + tuple(len(lead) + i for i in order)
  return split.transpose(perm), sorted(leaf_axes)


class Unsupported(ValueError):
  """A parameter is consumed in a way a hook cannot handle."""


def dot_rows(
  eqn: Any,
  values: Sequence[Any],
  origin: Origin,
  kernel_index: int,
  leaf_shape: Sequence[int],
) -> tuple[jax.Array, tuple[int, ...]]:
  """The other operand of a ``dot_general`` on a kernel, as the kernel's
  layer inputs ``[*batch, *tokens, K]``.

  ``K`` is the kernel's contracted leaf axes flattened in ascending order,
  ``batch`` the operand's batch axes (paired with the kernel's batch axes,
  ordered by their leaf axis), ``tokens`` its other axes in their order.

  Returns:
    ``(rows, batch leaf axes)``.
  """
  operands = dot_operands(eqn)
  _, k_contract, k_batch = operands[kernel_index]
  _, x_contract, x_batch = operands[1 - kernel_index]
  x = values[1 - kernel_index]
  if any(len(origin.axes[d]) != 1 for d in k_batch):
    raise Unsupported("a dot_general whose batch axis spans several axes")
  batch_axes = [origin.axes[d][0] for d in k_batch]
  order = sorted(range(len(x_batch)), key=lambda j: batch_axes[j])
  rest = [d for d in range(x.ndim) if d not in x_batch]
  x = jnp.moveaxis(x, [x_batch[j] for j in order], list(range(len(order))))
  contract = [len(order) + rest.index(d) for d in x_contract]
  rows, axes = split_to_leaf_axes(x, contract, origin, k_contract, leaf_shape)
  k = math.prod(leaf_shape[a] for a in axes)
  lead = rows.shape[: rows.ndim - len(axes)]
  return rows.reshape(*lead, k), tuple(sorted(batch_axes))


def dot_output(
  y: jax.Array,
  eqn: Any,
  origin: Origin,
  kernel_index: int,
  leaf_shape: Sequence[int],
  outputs: Sequence[int],
) -> jax.Array:
  """The ``dot_general``'s output from ``y = rows @ W``.

  ``y: [*batch, *tokens, N]`` with ``rows`` as :func:`dot_rows` builds them
  and ``N`` the kernel's ``outputs`` leaf axes flattened in ascending order.
  """
  operands = dot_operands(eqn)
  _, k_contract, k_batch = operands[kernel_index]
  nb = len(k_batch)
  batch_axes = [origin.axes[d][0] for d in k_batch]
  sorted_batch = sorted(batch_axes)
  k_free = [
    d
    for d in range(len(origin.axes))
    if d not in k_contract and d not in k_batch
  ]
  free_axes = [a for d in k_free for a in origin.axes[d]]
  lead = y.shape[:-1]
  y = y.reshape(*lead, *(leaf_shape[a] for a in sorted(outputs)))
  tokens = len(lead) - nb
  out_first = nb + tokens
  perm = [sorted_batch.index(a) for a in batch_axes]  # batch in eqn order
  perm += list(range(nb, out_first))
  perm += [out_first + sorted(outputs).index(a) for a in free_axes]
  y = y.transpose(perm)
  sizes = [math.prod(leaf_shape[a] for a in origin.axes[d]) for d in k_free]
  y = y.reshape(*y.shape[:out_first], *sizes)
  if kernel_index == 0:  # lhs: its free axes come before the other's
    y = jnp.moveaxis(
      y,
      list(range(out_first, y.ndim)),
      list(range(nb, nb + len(k_free))),
    )
  return y


def leaf_view(value: jax.Array, origin: Origin) -> jax.Array:
  """The traced value that ``origin`` describes, built from the leaf.

  ``value`` is the leaf with the ``origin.indexed`` axes already taken away
  (a scan slice). Transposes and reshapes it into the value's layout.
  """
  gone = origin.indexed
  remaining = [a for a in range(value.ndim + len(gone)) if a not in gone]
  position = {a: i for i, a in enumerate(remaining)}
  order = [position[a] for a in (*flat_axes(origin.axes), *origin.dropped)]
  moved = value.transpose(order) if order else value
  shape = [
    math.prod(value.shape[position[a]] for a in group) for group in origin.axes
  ]
  return moved.reshape(shape)
