"""Plain-``jnp`` sparse matmuls: the specification of the Pallas kernels.

Both compute ``y = x @ W`` for ``x: [..., K]`` and a packed ``W: [K, N]``,
accumulating in float32 (``preferred_element_type``) and returning
``result_type(x, W)``. Both are differentiable w.r.t. ``x`` and the packed
float leaves (``values`` / ``blocks``); integer metadata gets no float
cotangent.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from jaxsparse.kernels.packing import (
  PackedBlock,
  PackedNM,
  block_valid,
  unpack_nm,
)


def _check_x(x: Array, shape: tuple[int, int], name: str) -> None:
  if x.ndim < 1 or x.shape[-1] != shape[0]:
    raise ValueError(
      f"{name}: x has shape {x.shape} but W has shape {shape}; the last axis "
      f"of x must be K={shape[0]}."
    )


def nm_matmul_reference(x: ArrayLike, packed: PackedNM) -> Array:
  """``y[..., c] = sum_{j,g} x[..., g*m + idx[j, g, c]] values[j, g, c]``.

  Decodes ``W`` from the kept values and bit-packed positions (a scatter),
  then one dense ``jnp.dot`` with float32 accumulation.
  """
  x = jnp.asarray(x)
  _check_x(x, packed.shape, "nm_matmul_reference")
  out = jnp.result_type(x, packed.values)
  w = unpack_nm(packed)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out)


def block_sparse_matmul_reference(x: ArrayLike, packed: PackedBlock) -> Array:
  """``y[..., c-th column block] = sum_{j < counts[c]} x[..., indices[c,j]-th
  row block] @ blocks[c, j]``.

  Read straight from the BCSR arrays: a gather of ``x`` row blocks, then
  batched block products over the stored slots (padding slots masked to
  zero), in float32.
  """
  x = jnp.asarray(x)
  _check_x(x, packed.shape, "block_sparse_matmul_reference")
  out = jnp.result_type(x, packed.blocks)
  k, n = packed.shape
  br = packed.rows
  lead = x.shape[:-1]
  xr = x.reshape(*lead, k // br, br)
  valid = block_valid(packed)[:, :, None, None]
  blocks = jnp.where(valid, packed.blocks, jnp.zeros((), packed.blocks.dtype))
  gathered = jnp.take(xr, packed.indices, axis=-2)  # [..., N/bc, slots, br]
  y = jnp.einsum(
    "...csk,csko->...co", gathered, blocks, preferred_element_type=jnp.float32
  )
  return y.reshape(*lead, n).astype(out)


__all__ = [
  "block_sparse_matmul_reference",
  "nm_matmul_reference",
]
