"""Pallas kernels for block-sparse ``y = x @ W`` (Mosaic TPU and Triton GPU).

``W: [K, N]`` is a :class:`~jaxsparse.kernels.packing.PackedBlock` (BCSR of
``Wᵀ``: output block column ``c`` stores ``counts[c]`` blocks of shape
``(br, bc)`` with block rows ``indices[c, :counts[c]]``). Only stored blocks
are read or computed, as in the block-sparse kernels of Gray et al. (2017):

* forward, one output tile per (batch tile, block column ``c``)::

    y[:, c] = sum_{j < counts[c]} x[:, indices[c, j]] @ blocks[c, j]

* ``dx`` through the transposed sparsity (same kernel shape, one output tile
  per block row ``r``; the transposed index is built with ``jnp``)::

    dx[:, r] = sum_{(c, j): indices[c, j] = r, j < counts[c]}
               dy[:, c] @ blocks[c, j]ᵀ

* ``dblocks`` as a sampled dense-dense product (only stored slots)::

    dblocks[c, j] = x[:, indices[c, j]]ᵀ @ dy[:, c]  if j < counts[c] else 0

where ``x[:, r]`` is the ``r``-th ``br``-wide column block of ``x`` and
``y[:, c]`` the ``c``-th ``bc``-wide one. Products accumulate in float32.

TPU kernels prefetch the block metadata into SMEM
(``pltpu.PrefetchScalarGridSpec``) so BlockSpec index maps gather the ``x``
blocks; the reduction over slots is the last grid axis, and padding slots
repeat the last block index, so they cost no new DMA and are skipped with
``pl.when``. GPU kernels (Triton) loop over the stored slots of a column with
``lax.fori_loop`` and load ``x``/``blocks`` tiles at dynamic offsets.

References:
  Gray, Radford & Kingma, `GPU Kernels for Block-Sparse Weights
  <https://cdn.openai.com/blocksparse/blocksparsepaper.pdf>`_, 2017.
"""

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike

from jaxsparse.kernels.packing import PackedBlock

Platform = Literal["tpu", "gpu"]

_TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_GPU_DTYPES = _TPU_DTYPES + (jnp.dtype(jnp.float16),)
_TPU_LANES = 128
_TPU_DEFAULT_B = 256
_GPU_DEFAULT_B = 64
_GPU_MIN_DIM = 16  # Triton dots need every dimension >= 16.


class _Config(NamedTuple):
  """Static configuration of one call (hashable: a ``nondiff_argnum``)."""

  platform: str
  interpret: bool | pltpu.InterpretParams
  block_b: int
  rows: int
  cols: int
  shape: tuple[int, int]


def _is_pow2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def _round_up(a: int, m: int) -> int:
  return -(-a // m) * m


def _sublanes(dtype) -> int:
  """TPU second-minor tile: 8 rows of 32 bits (16 for bfloat16)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def block_pallas_unsupported(
  packed: PackedBlock,
  x_shape: Sequence[int],
  platform: str,
  *,
  x_dtype: DTypeLike | None = None,
) -> str | None:
  """Why the compiled kernel cannot run these shapes, or ``None`` if it can.

  TPU (Mosaic) tiles are ``(8k, 128k)``: each of ``rows`` and
  ``cols_per_block`` must be a multiple of 128 or the whole dimension (``K``
  resp. ``N``), computing in float32 or bfloat16. GPU (Triton) needs
  power-of-two block sides of at least 16 (its dots need every dimension
  >= 16), computing in float32, bfloat16 or float16. The batch needs nothing:
  it is padded to the batch tile. ``interpret=True`` runs any shape.

  Args:
    packed: the block-packed weight (only shapes and dtype are read).
    x_shape: shape of ``x``, ``[..., K]``.
    platform: ``"tpu"`` or ``"gpu"``.
    x_dtype: dtype of ``x``; when given, the compute dtype is
      ``result_type(x_dtype, packed.dtype)``, else ``packed.dtype``.

  Returns:
    ``None`` when :func:`block_sparse_matmul_pallas` handles the call, else
    a one-line reason (the dispatcher then falls back to another impl).
  """
  k, n = packed.shape
  br, bc = packed.rows, packed.cols_per_block
  if platform not in ("tpu", "gpu"):
    return f"platform={platform!r} is not 'tpu' or 'gpu'"
  if len(x_shape) < 1 or x_shape[-1] != k:
    return f"x has shape {tuple(x_shape)} but W has shape {(k, n)}"
  if k % br or n % bc:
    return f"W shape {(k, n)} is not tiled by blocks {(br, bc)}"
  dtype = jnp.dtype(packed.dtype)
  if x_dtype is not None:
    dtype = jnp.dtype(jnp.result_type(x_dtype, packed.dtype))
  if platform == "tpu":
    if br % _TPU_LANES and br != k:
      return (
        f"TPU needs block rows a multiple of {_TPU_LANES} or K={k}; got {br}"
      )
    if bc % _TPU_LANES and bc != n:
      return (
        f"TPU needs block cols a multiple of {_TPU_LANES} or N={n}; got {bc}"
      )
    if dtype not in _TPU_DTYPES:
      return f"TPU kernel supports float32/bfloat16, not {dtype}"
  else:
    if not (_is_pow2(br) and _is_pow2(bc)) or min(br, bc) < _GPU_MIN_DIM:
      return (
        f"Triton needs power-of-two block sides >= {_GPU_MIN_DIM}; got "
        f"{(br, bc)}"
      )
    if dtype not in _GPU_DTYPES:
      return f"GPU kernel supports float32/bfloat16/float16, not {dtype}"
  return None


def _batch_tile(batch: int, platform: str, dtype, block_b: int | None) -> int:
  """Batch rows per tile: TPU a multiple of the sublane tile, GPU a power of
  two >= 16; never more than the padded batch needs."""
  if platform == "tpu":
    quantum = _sublanes(dtype)
    if block_b is not None and (block_b <= 0 or block_b % quantum):
      raise ValueError(
        f"block_sparse_matmul_pallas: block_b={block_b} must be a positive "
        f"multiple of {quantum} for {jnp.dtype(dtype).name} on TPU."
      )
    return min(block_b or _TPU_DEFAULT_B, _round_up(batch, quantum))
  if block_b is not None and (not _is_pow2(block_b) or block_b < 16):
    raise ValueError(
      f"block_sparse_matmul_pallas: block_b={block_b} must be a power of two "
      ">= 16 on GPU (Triton)."
    )
  return min(block_b or _GPU_DEFAULT_B, _next_pow2(max(batch, _GPU_MIN_DIM)))


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """2-D ``dot_general`` contracting ``a``'s axis ``contract[0]`` with
  ``b``'s axis ``contract[1]``, accumulated in float32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transposed_index(
  indices: Array, counts: Array, nrows: int
) -> tuple[Array, Array, Array]:
  """The sparsity of ``W`` by block row: ``(col, slot, count)``.

  For block row ``r``: ``count[r]`` stored blocks, at ``(col[r, t],
  slot[r, t])`` for ``t < count[r]`` in ascending column order; entries
  ``t >= count[r]`` repeat the last one (``(0, 0)`` if none). Shapes are
  static: ``[K/br, N/bc]`` (a row meets each block column at most once).
  """
  ncols, slots = indices.shape
  j = jnp.arange(slots, dtype=jnp.int32)
  valid = j[None, :] < counts[:, None]
  rows = jnp.where(valid, indices, nrows)  # padding scatters out of range
  c = jnp.arange(ncols, dtype=jnp.int32)
  slot = jnp.full((nrows, ncols), -1, jnp.int32)
  slot = slot.at[rows, c[:, None]].set(
    jnp.broadcast_to(j[None, :], indices.shape), mode="drop"
  )
  hit = slot >= 0
  count = hit.sum(axis=1, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(hit, c[None, :], ncols + c[None, :]), axis=1)
  t = jnp.arange(ncols, dtype=jnp.int32)
  clamped = jnp.minimum(t[None, :], jnp.maximum(count - 1, 0)[:, None])
  col = jnp.take_along_axis(order.astype(jnp.int32), clamped, axis=1)
  slot = jnp.maximum(jnp.take_along_axis(slot, col, axis=1), 0)
  return col, slot, count


# --------------------------------------------------------------------------
# TPU (Mosaic) kernels.


def _tpu_accumulate(live, out_ref, acc_ref, step, last, contrib):
  """Shared TPU reduction body: zero at step 0, add ``contrib()`` on stored
  slots, write the float32 accumulator at the last step."""

  @pl.when(step == 0)
  def _zero():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  @pl.when(live)
  def _add():
    acc_ref[...] += contrib()

  @pl.when(step == last)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _forward_tpu(x, blocks, indices, counts, cfg: _Config, out_dtype):
  """``y[:, c] = sum_{j < counts[c]} x[:, indices[c, j]] @ blocks[c, j]``."""
  bpad = x.shape[0]
  ncols, slots = indices.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b

  def kernel(idx_ref, cnt_ref, x_ref, w_ref, y_ref, acc_ref):
    c, j = pl.program_id(1), pl.program_id(2)
    _tpu_accumulate(
      j < cnt_ref[c],
      y_ref,
      acc_ref,
      j,
      slots - 1,
      lambda: _dot(x_ref[...], w_ref[...], (1, 0)),
    )

  def x_map(i, c, j, idx, cnt):
    return i, idx[c * slots + j]

  def w_map(i, c, j, idx, cnt):
    return c, jnp.minimum(j, jnp.maximum(cnt[c] - 1, 0)), 0, 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(bpad // tb, ncols, slots),
    in_specs=[
      pl.BlockSpec((tb, br), x_map),
      pl.BlockSpec((None, None, br, bc), w_map),
    ],
    out_specs=pl.BlockSpec((tb, bc), lambda i, c, j, idx, cnt: (i, c)),
    scratch_shapes=[pltpu.VMEM((tb, bc), jnp.float32)],
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((bpad, ncols * bc), out_dtype),
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")
    ),
    interpret=cfg.interpret,
    name="block_sparse_matmul_fwd",
  )(indices.reshape(-1), counts, x, blocks)


def _dx_tpu(dy, blocks, col, slot, count, cfg: _Config, out_dtype):
  """``dx[:, r] = sum_{t < count[r]} dy[:, col[r, t]] @ blocks[col, slot]ᵀ``."""
  bpad = dy.shape[0]
  nrows, steps = col.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b

  def kernel(col_ref, slot_ref, cnt_ref, dy_ref, w_ref, dx_ref, acc_ref):
    r, t = pl.program_id(1), pl.program_id(2)
    _tpu_accumulate(
      t < cnt_ref[r],
      dx_ref,
      acc_ref,
      t,
      steps - 1,
      lambda: _dot(dy_ref[...], w_ref[...], (1, 1)),
    )

  def dy_map(i, r, t, col, slot, cnt):
    return i, col[r * steps + t]

  def w_map(i, r, t, col, slot, cnt):
    return col[r * steps + t], slot[r * steps + t], 0, 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=3,
    grid=(bpad // tb, nrows, steps),
    in_specs=[
      pl.BlockSpec((tb, bc), dy_map),
      pl.BlockSpec((None, None, br, bc), w_map),
    ],
    out_specs=pl.BlockSpec((tb, br), lambda i, r, t, *_: (i, r)),
    scratch_shapes=[pltpu.VMEM((tb, br), jnp.float32)],
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((bpad, nrows * br), out_dtype),
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")
    ),
    interpret=cfg.interpret,
    name="block_sparse_matmul_dx",
  )(col.reshape(-1), slot.reshape(-1), count, dy, blocks)


def _dblocks_tpu(x, dy, indices, counts, cfg: _Config, out_dtype):
  """``dblocks[c, j] = x[:, indices[c, j]]ᵀ @ dy[:, c]`` on stored slots."""
  bpad = x.shape[0]
  ncols, slots = indices.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b
  nb = bpad // tb

  def kernel(idx_ref, cnt_ref, x_ref, dy_ref, dw_ref, acc_ref):
    c, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    _tpu_accumulate(
      j < cnt_ref[c],
      dw_ref,
      acc_ref,
      b,
      nb - 1,
      lambda: _dot(x_ref[...], dy_ref[...], (0, 0)),
    )

  # Padding slots pin the batch tile to 0: after one fetch they re-use it.
  def live(c, j, b, cnt):
    return b * (j < cnt[c]).astype(jnp.int32)

  def x_map(c, j, b, idx, cnt):
    return live(c, j, b, cnt), idx[c * slots + j]

  def dy_map(c, j, b, idx, cnt):
    return live(c, j, b, cnt), c

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(ncols, slots, nb),
    in_specs=[pl.BlockSpec((tb, br), x_map), pl.BlockSpec((tb, bc), dy_map)],
    out_specs=pl.BlockSpec(
      (None, None, br, bc), lambda c, j, b, *_: (c, j, 0, 0)
    ),
    scratch_shapes=[pltpu.VMEM((br, bc), jnp.float32)],
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((ncols, slots, br, bc), out_dtype),
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")
    ),
    interpret=cfg.interpret,
    name="block_sparse_matmul_dblocks",
  )(indices.reshape(-1), counts, x, dy)


# --------------------------------------------------------------------------
# GPU (Triton) kernels.

_TRITON_PARAMS = dict(num_warps=4, num_stages=2)


def _whole(a: Array) -> pl.BlockSpec:
  """A BlockSpec mapping the whole array to every program."""
  zeros = (0,) * a.ndim
  return pl.BlockSpec(a.shape, lambda *_: zeros)


def _forward_gpu(x, blocks, indices, counts, cfg: _Config, out_dtype):
  """Triton forward: one program per (batch tile, block column)."""
  bpad = x.shape[0]
  ncols, slots = indices.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b

  def kernel(idx_ref, cnt_ref, x_ref, w_ref, y_ref):
    i, c = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(i * tb, tb), tb)

    def body(j, acc):
      r = idx_ref[c * slots + j]
      a = x_ref[rows, pl.ds(pl.multiple_of(r * br, br), br)]
      return acc + _dot(a, w_ref[c, j, :, :], (1, 0))

    acc = jax.lax.fori_loop(
      0, cnt_ref[c], body, jnp.zeros((tb, bc), jnp.float32)
    )
    y_ref[...] = acc.astype(y_ref.dtype)

  flat = indices.reshape(-1)
  args = (flat, counts, x, blocks)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((bpad, ncols * bc), out_dtype),
    grid=(bpad // tb, ncols),
    in_specs=[_whole(a) for a in args],
    out_specs=pl.BlockSpec((tb, bc), lambda i, c: (i, c)),
    compiler_params=pltriton.CompilerParams(**_TRITON_PARAMS),
    interpret=cfg.interpret,
    name="block_sparse_matmul_fwd",
  )(*args)


def _dx_gpu(dy, blocks, col, slot, count, cfg: _Config, out_dtype):
  """Triton ``dx``: one program per (batch tile, block row)."""
  bpad = dy.shape[0]
  nrows, steps = col.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b

  def kernel(col_ref, slot_ref, cnt_ref, dy_ref, w_ref, dx_ref):
    i, r = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(i * tb, tb), tb)

    def body(t, acc):
      c = col_ref[r * steps + t]
      j = slot_ref[r * steps + t]
      g = dy_ref[rows, pl.ds(pl.multiple_of(c * bc, bc), bc)]
      return acc + _dot(g, w_ref[c, j, :, :], (1, 1))

    acc = jax.lax.fori_loop(
      0, cnt_ref[r], body, jnp.zeros((tb, br), jnp.float32)
    )
    dx_ref[...] = acc.astype(dx_ref.dtype)

  args = (col.reshape(-1), slot.reshape(-1), count, dy, blocks)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((bpad, nrows * br), out_dtype),
    grid=(bpad // tb, nrows),
    in_specs=[_whole(a) for a in args],
    out_specs=pl.BlockSpec((tb, br), lambda i, r: (i, r)),
    compiler_params=pltriton.CompilerParams(**_TRITON_PARAMS),
    interpret=cfg.interpret,
    name="block_sparse_matmul_dx",
  )(*args)


def _dblocks_gpu(x, dy, indices, counts, cfg: _Config, out_dtype):
  """Triton ``dblocks``: one program per slot, looping over batch tiles
  (none for padding slots, which are written as zeros)."""
  bpad = x.shape[0]
  ncols, slots = indices.shape
  br, bc, tb = cfg.rows, cfg.cols, cfg.block_b
  nb = bpad // tb

  def kernel(idx_ref, cnt_ref, x_ref, dy_ref, dw_ref):
    c, j = pl.program_id(0), pl.program_id(1)
    r = idx_ref[c * slots + j]
    # Typed (not weak) scalars: Pallas Triton lowers a weak-typed literal
    # branch of select_n with the predicate's type, so jnp.where(pred, nb, 0)
    # gives an i1 trip count (nb mod 2), which fails Triton's verifier.
    trips = jnp.where(j < cnt_ref[c], jnp.int32(nb), jnp.int32(0))

    def body(b, acc):
      rows = pl.ds(pl.multiple_of(b * tb, tb), tb)
      a = x_ref[rows, pl.ds(pl.multiple_of(r * br, br), br)]
      g = dy_ref[rows, pl.ds(pl.multiple_of(c * bc, bc), bc)]
      return acc + _dot(a, g, (0, 0))

    acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((br, bc), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)

  args = (indices.reshape(-1), counts, x, dy)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((ncols, slots, br, bc), out_dtype),
    grid=(ncols, slots),
    in_specs=[_whole(a) for a in args],
    out_specs=pl.BlockSpec((None, None, br, bc), lambda c, j: (c, j, 0, 0)),
    compiler_params=pltriton.CompilerParams(**_TRITON_PARAMS),
    interpret=cfg.interpret,
    name="block_sparse_matmul_dblocks",
  )(*args)


_KERNELS = {
  "tpu": (_forward_tpu, _dx_tpu, _dblocks_tpu),
  "gpu": (_forward_gpu, _dx_gpu, _dblocks_gpu),
}


# --------------------------------------------------------------------------
# The differentiable op on a padded 2-D batch.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul(x, blocks, indices, counts, cfg: _Config):
  out = jnp.result_type(x, blocks)
  forward = _KERNELS[cfg.platform][0]
  return forward(x.astype(out), blocks.astype(out), indices, counts, cfg, out)


def _matmul_fwd(x, blocks, indices, counts, cfg: _Config):
  y = _matmul(x, blocks, indices, counts, cfg)
  return y, (x, blocks, indices, counts)


def _matmul_bwd(cfg: _Config, res, dy):
  x, blocks, indices, counts = res
  _, dx_kernel, dblocks_kernel = _KERNELS[cfg.platform]
  out = jnp.result_type(x, blocks)
  dy = dy.astype(out)
  nrows = cfg.shape[0] // cfg.rows
  col, slot, count = _transposed_index(indices, counts, nrows)
  dx = dx_kernel(dy, blocks.astype(out), col, slot, count, cfg, x.dtype)
  dblocks = dblocks_kernel(
    x.astype(out), dy, indices, counts, cfg, blocks.dtype
  )
  # Integer metadata gets no cotangent (None = symbolic zero, float0).
  return dx, dblocks, None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def block_sparse_matmul_pallas(
  x: ArrayLike,
  packed: PackedBlock,
  *,
  platform: Platform,
  interpret: bool | pltpu.InterpretParams = False,
  block_b: int | None = None,
) -> Array:
  """Block-sparse ``y = x @ W`` with Pallas kernels, forward and backward.

  ``y[..., c-th bc block] = sum_{j < counts[c]} x[..., indices[c, j]-th br
  block] @ blocks[c, j]`` (the rule of
  :func:`~jaxsparse.kernels.reference.block_sparse_matmul_reference`),
  accumulated in float32. Differentiable (``jax.custom_vjp``) w.r.t. ``x``
  and ``packed.blocks``: ``dx = dy @ Wᵀ`` runs through the transposed
  sparsity and ``dblocks`` is computed only on stored slots (zeros in
  padding slots); ``indices``/``counts`` get no cotangent.

  Args:
    x: ``[..., K]`` activations (any leading dims; flattened and the batch
      zero-padded to a multiple of the batch tile).
    packed: the block-packed ``W: [K, N]``.
    platform: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton); static.
    interpret: ``True`` runs the kernels in the Pallas interpreter (any
      backend, any block shape); a ``pltpu.InterpretParams()`` (with
      ``platform="tpu"``) runs the TPU-faithful interpreter that simulates
      SMEM/VMEM and DMAs; static.
    block_b: batch rows per tile (static); default 256 on TPU (a multiple
      of 8 for float32, 16 for bfloat16), 64 on GPU (a power of two >= 16),
      capped by the padded batch.

  Returns:
    ``[..., N]`` in ``jnp.result_type(x, packed.blocks)``.

  Raises:
    ValueError: ``x``'s last axis is not ``K``, or (compiled only) the block
      shape or dtype does not suit the platform (see
      :func:`block_pallas_unsupported`), or a bad ``block_b``.

  Examples:
    >>> import numpy as np
    >>> import jaxsparse as js
    >>> from jaxsparse.kernels import block_pallas, pack_block
    >>> w = np.zeros((32, 32), np.float32); w[16:, :16] = 1.0
    >>> packed = pack_block(w, js.Block(16, 16))
    >>> y = block_pallas.block_sparse_matmul_pallas(
    ...     np.ones((2, 32), np.float32), packed, platform="gpu",
    ...     interpret=True)
    >>> y[0, :2].tolist(), y[0, 16:18].tolist()
    ([16.0, 16.0], [0.0, 0.0])

  References:
    Gray, Radford & Kingma, `GPU Kernels for Block-Sparse Weights
    <https://cdn.openai.com/blocksparse/blocksparsepaper.pdf>`_, 2017.
  """
  x = jnp.asarray(x)
  k, n = packed.shape
  if platform not in ("tpu", "gpu"):
    raise ValueError(
      f"block_sparse_matmul_pallas: platform={platform!r}; pass 'tpu' or 'gpu'."
    )
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(
      f"block_sparse_matmul_pallas: x has shape {x.shape} but W has shape "
      f"{(k, n)}; the last axis of x must be K={k}."
    )
  if not interpret:
    reason = block_pallas_unsupported(
      packed, x.shape, platform, x_dtype=x.dtype
    )
    if reason is not None:
      raise ValueError(
        f"block_sparse_matmul_pallas: {reason}; use interpret=True, another "
        "block shape, or js.kernels.block_sparse_matmul(impl='reference')."
      )
  out = jnp.result_type(x, packed.blocks)
  lead = x.shape[:-1]
  batch = math.prod(lead)
  if batch == 0:
    return jnp.zeros((*lead, n), out)
  tb = _batch_tile(batch, platform, out, block_b)
  bpad = _round_up(batch, tb)
  x2 = x.reshape(batch, k)
  if bpad != batch:
    x2 = jnp.pad(x2, ((0, bpad - batch), (0, 0)))
  cfg = _Config(
    platform=platform,
    interpret=interpret,
    block_b=tb,
    rows=packed.rows,
    cols=packed.cols_per_block,
    shape=tuple(packed.shape),
  )
  indices = jnp.asarray(packed.indices, jnp.int32)
  counts = jnp.asarray(packed.counts, jnp.int32)
  y = _matmul(x2, packed.blocks, indices, counts, cfg)
  return y[:batch].reshape(*lead, n)


__all__ = [
  "block_pallas_unsupported",
  "block_sparse_matmul_pallas",
]
