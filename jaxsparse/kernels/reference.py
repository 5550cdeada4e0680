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
  """``y[..., c] = sum_{g,j} x[..., g*m + idx[g*n+j, c]] values[g*n+j, c]``.

  Decodes ``W`` from the kept values and bit-packed positions (a scatter),
  then one dense ``jnp.dot`` with float32 accumulation.
  """
  x = jnp.asarray(x)
  _check_x(x, packed.shape, "nm_matmul_reference")
  out = jnp.result_type(x, packed.values)
  w = unpack_nm(packed)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out)


def block_sparse_matmul_reference(x: ArrayLike, packed: PackedBlock) -> Array:
  """``y[..., cols[r,j]] += x[..., r-th row block] @ blocks[r, j]``.

  Sums over block rows ``r`` and stored slots ``j < counts[r]`` only, read
  straight from the BCSR arrays (gather of ``x`` row blocks, batched block
  products, scatter-add into output column blocks), in float32.
  """
  x = jnp.asarray(x)
  _check_x(x, packed.shape, "block_sparse_matmul_reference")
  out = jnp.result_type(x, packed.blocks)
  k, n = packed.shape
  br, bc = packed.rows, packed.cols_per_block
  nrows, ncols = k // br, n // bc
  lead = x.shape[:-1]
  xr = x.reshape(*lead, nrows, br)
  valid = block_valid(packed)[:, :, None, None]
  blocks = jnp.where(valid, packed.blocks, jnp.zeros((), packed.blocks.dtype))
  partial = jnp.einsum(
    "...rk,rjkc->...rjc", xr, blocks, preferred_element_type=jnp.float32
  )
  # Padding slots hold zero blocks; send them out of bounds as well.
  target = jnp.where(block_valid(packed), packed.cols, ncols).reshape(-1)
  partial = partial.reshape(*lead, nrows * packed.max_blocks, bc)
  y = jnp.zeros((*lead, ncols, bc), jnp.float32)
  y = y.at[..., target, :].add(partial, mode="drop")
  return y.reshape(*lead, n).astype(out)


__all__ = [
  "block_sparse_matmul_reference",
  "nm_matmul_reference",
]
