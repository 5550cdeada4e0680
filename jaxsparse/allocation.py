"""Allocation: per-leaf sparsities from one global target.

* :func:`uniform`: every selected leaf gets the target sparsity ``s``.
* :func:`er` / :func:`erk`: Erdős–Rényi(-Kernel) as in RigL. Leaf ``l`` gets
  density ``eps * p_l`` with ``p_l = (n_in + n_out) / (n_in n_out)`` (ER, last
  two axes) or ``p_l = (sum of dims / prod of dims) ** power`` (ERK), and
  ``eps`` solves ``sum_l eps p_l N_l = (1 - s) sum_l N_l``. A leaf whose
  density would exceed 1 is made dense and ``eps`` is solved again over the
  rest, exactly as RigL's ``get_sparsities_erdos_renyi``.
* :func:`global_threshold`: one score threshold over all leaves, found by an
  exact bisection on counts (see :mod:`jaxsparse.threshold`); the total number
  of kept entries is exact.

The target may be a traced value (a schedule): the ER/ERK redistribution is
computed in ``jnp`` over the static leaf shapes.

References:
  Evci et al, `Rigging the Lottery: Making All Tickets Winners
  <https://arxiv.org/abs/1911.11134>`_, 2020.
  Mocanu et al, `Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science
  <https://arxiv.org/abs/1707.04780>`_, 2018.
"""

from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxsparse.patterns import typed_eq, typed_hash, typed_ne


class Uniform(NamedTuple):
  """Every leaf gets the same sparsity."""

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class ER(NamedTuple):
  """Erdős–Rényi: density proportional to ``(n_in + n_out) / (n_in n_out)``."""

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class ERK(NamedTuple):
  """Erdős–Rényi-Kernel: density proportional to ``(sum/prod dims)**power``."""

  power: float = 1.0

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


class GlobalThreshold(NamedTuple):
  """One threshold over every selected leaf; exact total count."""

  __eq__ = typed_eq
  __ne__ = typed_ne
  __hash__ = typed_hash


Allocation: TypeAlias = Uniform | ER | ERK | GlobalThreshold
ALLOCATIONS = (Uniform, ER, ERK, GlobalThreshold)


def uniform() -> Uniform:
  """Same sparsity in every selected leaf."""
  return Uniform()


def er() -> ER:
  """Erdős–Rényi allocation (Mocanu et al 2018; RigL's ``erdos_renyi``)."""
  return ER()


def erk(power: float = 1.0) -> ERK:
  """Erdős–Rényi-Kernel allocation (RigL's ``erdos_renyi_kernel``).

  Args:
    power: exponent on the raw ratio (RigL's ``erk_power_scale``); below 1
      makes the allocation closer to uniform.
  """
  return ERK(power)


def global_threshold() -> GlobalThreshold:
  """One global score threshold, found by exact bisection on counts."""
  return GlobalThreshold()


def check_allocation(allocation: object) -> None:
  """Raises ``ValueError`` for something that is not an allocation."""
  if not isinstance(allocation, ALLOCATIONS):
    raise ValueError(
      f"allocation={allocation!r} is not an allocation; use js.uniform(), "
      "js.er(), js.erk() or js.global_threshold()."
    )


def raw_density(allocation: ER | ERK, shape: tuple[int, ...]) -> float:
  """The un-normalised density ``p_l`` of one leaf."""
  if len(shape) < 2:
    # A vector has no fan-in/fan-out: its ratio (n + 1) / n is the ER value of
    # a 1 x n matrix.
    shape = (1, *shape)
  if isinstance(allocation, ER):
    n_in, n_out = shape[-2:]
    return (n_in + n_out) / (n_in * n_out)
  return float((np.sum(shape) / np.prod(shape)) ** allocation.power)


def layer_sparsities(
  allocation: Allocation,
  shapes: Sequence[tuple[int, ...]],
  sparsity: Float[ArrayLike, ""],
  sizes: Sequence[int] | None = None,
) -> list[Float[Array, ""]]:
  """Per-leaf sparsities whose size-weighted mean is ``sparsity``.

  Args:
    allocation: :func:`uniform`, :func:`er` or :func:`erk`.
    shapes: the selected leaves' shapes (static): the shape of one layer,
      from which ER/ERK read the raw density.
    sparsity: the global target, possibly traced.
    sizes: the entries of each leaf (static); default ``prod(shape)``. A
      stack of ``L`` layers passes one layer's shape and ``L`` times its
      size: its layers are then allocated together, as RigL's loop treats
      layers of equal raw density.

  Returns:
    One float32 scalar per shape.
  """
  s = jnp.asarray(sparsity, jnp.float32)
  if isinstance(allocation, Uniform):
    return [s for _ in shapes]
  if isinstance(allocation, GlobalThreshold):
    raise ValueError("global_threshold() has no per-leaf sparsities.")
  if sizes is None:
    sizes = [np.prod(shape) for shape in shapes]
  sizes = np.array(sizes, np.float64)
  raw = np.array([raw_density(allocation, shape) for shape in shapes])
  # RigL's loop makes the leaf with the largest raw density dense until eps is
  # valid. Dense sets are therefore prefixes of the leaves sorted by raw
  # density; try every prefix length j at once and take the first valid one.
  order = np.argsort(-raw, kind="stable")
  sorted_sizes = jnp.asarray(sizes[order], jnp.float32)
  sorted_raw = jnp.asarray(raw[order], jnp.float32)
  dense_sizes = jnp.concatenate(
    [jnp.zeros(1, jnp.float32), jnp.cumsum(sorted_sizes)]
  )  # [j] = total size of the first j leaves
  weighted = sorted_raw * sorted_sizes
  rest_weighted = jnp.concatenate(
    [jnp.cumsum(weighted[::-1])[::-1], jnp.zeros(1, jnp.float32)]
  )  # [j] = sum over leaves j.. of p_l N_l
  rest_sizes = jnp.sum(sorted_sizes) - dense_sizes
  rhs = (1 - s) * rest_sizes - s * dense_sizes
  eps = rhs / jnp.where(rest_weighted > 0, rest_weighted, 1)
  max_raw = jnp.concatenate([sorted_raw, jnp.zeros(1, jnp.float32)])
  valid = (eps * max_raw <= 1) | (jnp.arange(len(shapes) + 1) == len(shapes))
  j = jnp.argmax(valid)
  eps_j = eps[j]
  rank = np.empty(len(shapes), np.int32)
  rank[order] = np.arange(len(shapes))
  sparsities = []
  for leaf in range(len(shapes)):
    density = jnp.where(
      int(rank[leaf]) < j, 1.0, jnp.clip(eps_j * float(raw[leaf]), 0.0, 1.0)
    )
    sparsities.append((1 - density).astype(jnp.float32))
  return sparsities
