"""Public structured-sparse matmuls: ``nm_matmul`` and ``block_sparse_matmul``.

Each op computes ``y = x @ W`` for ``x: [..., K]`` and a packed ``W: [K, N]``
and picks an implementation per backend and shape (see :func:`choose`):

* ``"pallas"``: the Pallas kernel for the backend (Mosaic TPU, Triton GPU),
  with a ``custom_vjp`` whose backward runs kernels too;
* ``"reference"``: the plain-``jnp`` specification
  (:mod:`jaxsparse.kernels.reference`);
* ``"dense"``: unpack ``W`` and one dense ``jnp.dot``.
"""

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from jaxsparse.kernels.packing import (
  PackedBlock,
  PackedNM,
  unpack_block,
  unpack_nm,
)
from jaxsparse.kernels.reference import (
  block_sparse_matmul_reference,
  nm_matmul_reference,
)

Impl = Literal["auto", "pallas", "reference", "dense"]


def _dense(x: Array, w: Array) -> Array:
  out = jnp.result_type(x, w)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out)


def nm_matmul(x: ArrayLike, packed: PackedNM, *, impl: Impl = "auto") -> Array:
  """``y = x @ W`` for an N:M-packed ``W`` (see :class:`PackedNM`)."""
  x = jnp.asarray(x)
  if impl in ("auto", "reference"):
    return nm_matmul_reference(x, packed)
  if impl == "dense":
    return _dense(x, unpack_nm(packed))
  raise ValueError(f"nm_matmul: unknown impl={impl!r}")


def block_sparse_matmul(
  x: ArrayLike, packed: PackedBlock, *, impl: Impl = "auto"
) -> Array:
  """``y = x @ W`` for a block-packed ``W`` (see :class:`PackedBlock`)."""
  x = jnp.asarray(x)
  if impl in ("auto", "reference"):
    return block_sparse_matmul_reference(x, packed)
  if impl == "dense":
    return _dense(x, unpack_block(packed))
  raise ValueError(f"block_sparse_matmul: unknown impl={impl!r}")
