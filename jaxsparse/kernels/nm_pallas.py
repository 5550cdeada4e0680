"""Pallas kernels for N:M-sparse ``y = x @ W`` (Mosaic TPU and Triton GPU).

``W: [K, N]`` is a :class:`~jaxsparse.kernels.packing.PackedNM` (NVIDIA's 2:4
generalised to N:M, Mishra et al. 2021): ``values[j, g, c]`` is the ``j``-th
kept value of group ``g`` (rows ``g*m .. g*m+m-1``) of column ``c`` and its
position ``idx[j, g, c]`` sits in field ``f`` (bits ``f*b .. f*b+b-1``) of
word ``indices[j, u, c]`` with ``g = f*G_w + u``.

The kernels decode ``W`` tile by tile with 2-D loads, shifts, selects and
dots only (no in-kernel reshape or gather). Outside the kernel, ``values``
reshapes for free to ``V[j, f, u, c] = values[j, f*G_w + u, c]`` and ``x``
is permuted to ``X[q, f, b, u] = x[b, m*(f*G_w + u) + q]``. Then

  y = sum_{q<m} sum_{f<per} X[q, f] @ Wd[q, f],
  Wd[q, f][u, c] = sum_{j<n} where(I[j, f][u, c] == q, V[j, f][u, c], 0),
  I[j, f] = (indices[j] >> (f*b)) & (2^b - 1),

accumulated in float32. The backward pass (``jax.custom_vjp``) uses the same
decode: ``dX[q, f] = dy @ Wd[q, f]ᵀ`` and, for the kept values only,
``dV[j, f][u, c] = sum_q where(I[j, f][u, c] == q, (X[q, f]ᵀ @ dy)[u, c], 0)``.
The integer ``indices`` get no cotangent.

On TPU the reduction is the last grid axis, accumulated in a float32 VMEM
scratch; on GPU (Triton, whose grid axes all run in parallel) each program
loops over the reduction inside the kernel.

References:
  Mishra et al, `Accelerating Sparse Deep Neural Networks
  <https://arxiv.org/abs/2104.08378>`_, 2021.
"""

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, ArrayLike

from jaxsparse.kernels.packing import PackedNM, index_layout

Platform = Literal["tpu", "gpu"]

_F32 = jnp.float32
_TPU_VMEM_BUDGET = 12 << 20  # of the 16 MiB default scoped VMEM (v5e)
_TPU_DTYPES = ("float32", "bfloat16")
_GPU_DTYPES = ("float32", "bfloat16", "float16")


class _Config(NamedTuple):
  """Static shape and tiling of one kernel call (hashable)."""

  n: int
  m: int
  per: int  # index fields per word
  bits: int
  groups_w: int  # G_w = G / per
  cols: int  # N
  rows: int  # padded batch B_p
  tb: int
  tn: int
  tu: int
  platform: str
  interpret: bool | pltpu.InterpretParams


# --------------------------------------------------------------------------
# Tile helpers shared by every kernel body (plain jnp on loaded 2-D arrays).


def _fields(words: Array, f: int | Array, bits: int) -> Array:
  """int32 positions in field ``f`` (static or a program id) of ``words``."""
  return (words >> (f * bits)) & ((1 << bits) - 1)


def _decode(fields: list[Array], vals: list[Array], q: int) -> Array:
  """``Wd[q, f] = sum_j where(I[j, f] == q, V[j, f], 0)`` (positions of one
  group are distinct, so a chain of selects is the sum)."""
  w = jnp.zeros_like(vals[0])
  for fj, vj in zip(fields, vals, strict=True):
    w = jnp.where(fj == q, vj, w)
  return w


def _dot_nn(a: Array, b: Array) -> Array:  # a @ b
  return jnp.dot(a, b, preferred_element_type=_F32)


def _dot_nt(a: Array, b: Array) -> Array:  # a @ bᵀ
  return jax.lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32
  )


def _dot_tn(a: Array, b: Array) -> Array:  # aᵀ @ b
  return jax.lax.dot_general(
    a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32
  )


def _fwd_step(idx_ref, val_ref, x_ref, us, cfg: _Config, ct) -> Array:
  """float32 ``[tb, tn]``: the contribution of one ``u`` tile to ``y``."""
  words = [idx_ref[j, us, :].astype(jnp.int32) for j in range(cfg.n)]
  acc = None
  for f in range(cfg.per):
    fields = [_fields(w, f, cfg.bits) for w in words]
    vals = [val_ref[j, f, us, :] for j in range(cfg.n)]
    for q in range(cfg.m):
      wd = _decode(fields, vals, q).astype(ct)
      d = _dot_nn(x_ref[q, f, :, us].astype(ct), wd)
      acc = d if acc is None else acc + d
  return acc


def _dx_step(idx_ref, val_ref, dy, ns, f, cfg: _Config, ct) -> list[Array]:
  """float32 ``[tb, tu]`` per ``q``: ``dy @ Wd[q, f]ᵀ`` over one N tile."""
  fields = [
    _fields(idx_ref[j, :, ns].astype(jnp.int32), f, cfg.bits)
    for j in range(cfg.n)
  ]
  vals = [val_ref[j, :, ns] for j in range(cfg.n)]
  dy = dy.astype(ct)
  return [
    _dot_nt(dy, _decode(fields, vals, q).astype(ct)) for q in range(cfg.m)
  ]


def _dv_step(fields, x_ref, dy, bs, accs, cfg: _Config, ct) -> list[Array]:
  """``accs[j] + kept entries of X[q, f]ᵀ @ dy`` (float32 ``[tu, tn]``).

  One product is live at a time (``where(I == q, acc + P_q, acc)`` for each
  ``q`` in turn, the same sums as selecting first): holding all ``m``
  products at once spills registers in Triton."""
  dy = dy.astype(ct)
  accs = list(accs)
  for q in range(cfg.m):
    p = _dot_tn(x_ref[q, bs, :].astype(ct), dy)
    accs = [jnp.where(fj == q, a + p, a) for fj, a in zip(fields, accs)]
  return accs


# --------------------------------------------------------------------------
# Kernel bodies. TPU: reduction over the last grid axis into VMEM scratch.
# GPU (Triton): a fori_loop over the reduction inside each program.


def _fwd_tpu(idx_ref, val_ref, x_ref, o_ref, acc_ref, *, cfg, ct):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  acc_ref[...] += _fwd_step(idx_ref, val_ref, x_ref, slice(None), cfg, ct)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _fwd_gpu(idx_ref, val_ref, x_ref, o_ref, *, cfg, ct):
  def body(s, acc):
    us = pl.ds(pl.multiple_of(s * cfg.tu, cfg.tu), cfg.tu)
    return acc + _fwd_step(idx_ref, val_ref, x_ref, us, cfg, ct)

  acc = jnp.zeros((cfg.tb, cfg.tn), _F32)
  acc = jax.lax.fori_loop(0, cfg.groups_w // cfg.tu, body, acc)
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_tpu(idx_ref, val_ref, dy_ref, o_ref, acc_ref, *, cfg, ct):
  k = pl.program_id(3)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  f = pl.program_id(1)  # the field: grid axis 1 of the backward kernels
  parts = _dx_step(idx_ref, val_ref, dy_ref[...], slice(None), f, cfg, ct)
  for q, p in enumerate(parts):
    acc_ref[q] += p

  @pl.when(k == pl.num_programs(3) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_gpu(idx_ref, val_ref, dy_ref, o_ref, *, cfg, ct):
  f = pl.program_id(1)  # the field: grid axis 1 of the backward kernels

  def body(s, accs):
    ns = pl.ds(pl.multiple_of(s * cfg.tn, cfg.tn), cfg.tn)
    parts = _dx_step(idx_ref, val_ref, dy_ref[:, ns], ns, f, cfg, ct)
    return tuple(a + p for a, p in zip(accs, parts, strict=True))

  accs = tuple(jnp.zeros((cfg.tb, cfg.tu), _F32) for _ in range(cfg.m))
  accs = jax.lax.fori_loop(0, cfg.cols // cfg.tn, body, accs)
  for q, a in enumerate(accs):
    o_ref[q] = a.astype(o_ref.dtype)


def _dv_tpu(idx_ref, x_ref, dy_ref, o_ref, acc_ref, *, cfg, ct):
  k = pl.program_id(3)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  f = pl.program_id(1)  # the field: grid axis 1 of the backward kernels
  fields = [
    _fields(idx_ref[j].astype(jnp.int32), f, cfg.bits) for j in range(cfg.n)
  ]
  accs = [acc_ref[j] for j in range(cfg.n)]
  accs = _dv_step(fields, x_ref, dy_ref[...], slice(None), accs, cfg, ct)
  for j, a in enumerate(accs):
    acc_ref[j] = a

  @pl.when(k == pl.num_programs(3) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dv_gpu(idx_ref, x_ref, dy_ref, o_ref, *, cfg, ct):
  f = pl.program_id(1)  # the field: grid axis 1 of the backward kernels

  def body(s, accs):
    bs = pl.ds(pl.multiple_of(s * cfg.tb, cfg.tb), cfg.tb)
    # Decoded per step (a cached uint8 load and two int ops) rather than
    # kept live across the loop: fewer registers held per program.
    fields = [
      _fields(idx_ref[j].astype(jnp.int32), f, cfg.bits) for j in range(cfg.n)
    ]
    return tuple(_dv_step(fields, x_ref, dy_ref[bs, :], bs, accs, cfg, ct))

  accs = tuple(jnp.zeros((cfg.tu, cfg.tn), _F32) for _ in range(cfg.n))
  accs = jax.lax.fori_loop(0, cfg.rows // cfg.tb, body, accs)
  for j, a in enumerate(accs):
    o_ref[j] = a.astype(o_ref.dtype)


# --------------------------------------------------------------------------
# pallas_call wrappers on the permuted operands.


def _params(cfg: _Config, semantics: tuple[str, ...]):
  if cfg.platform == "tpu":
    return pltpu.CompilerParams(dimension_semantics=semantics)
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _call(body, cfg, out_shape, grid, in_specs, out_spec, scratch, sem):
  tpu = cfg.platform == "tpu"
  return pl.pallas_call(
    body,
    out_shape=out_shape,
    grid=grid if tpu else grid[:-1],
    in_specs=in_specs,
    out_specs=out_spec,
    scratch_shapes=[pltpu.VMEM(scratch, _F32)] if tpu else (),
    compiler_params=_params(cfg, sem),
    interpret=cfg.interpret,
  )


def _forward(cfg: _Config, xp: Array, vals: Array, idx: Array) -> Array:
  """``[rows, N]`` from ``X [m, per, rows, G_w]``, ``V``, ``indices``."""
  ct = jnp.result_type(xp, vals)
  n, m, per = cfg.n, cfg.m, cfg.per
  tb, tn, tu = cfg.tb, cfg.tn, cfg.tu
  grid = (cfg.rows // tb, cfg.cols // tn, cfg.groups_w // tu)
  if cfg.platform == "tpu":
    body = functools.partial(_fwd_tpu, cfg=cfg, ct=ct)
    specs = [
      pl.BlockSpec((n, tu, tn), lambda b, c, u: (0, u, c)),
      pl.BlockSpec((n, per, tu, tn), lambda b, c, u: (0, 0, u, c)),
      pl.BlockSpec((m, per, tb, tu), lambda b, c, u: (0, 0, b, u)),
    ]
  else:
    body = functools.partial(_fwd_gpu, cfg=cfg, ct=ct)
    gw = cfg.groups_w
    specs = [
      pl.BlockSpec((n, gw, tn), lambda b, c: (0, 0, c)),
      pl.BlockSpec((n, per, gw, tn), lambda b, c: (0, 0, 0, c)),
      pl.BlockSpec((m, per, tb, gw), lambda b, c: (0, 0, b, 0)),
    ]
  out_spec = pl.BlockSpec((tb, tn), lambda b, c, *_: (b, c))
  out_shape = jax.ShapeDtypeStruct((cfg.rows, cfg.cols), ct)
  sem = ("parallel", "parallel", "arbitrary")
  return _call(body, cfg, out_shape, grid, specs, out_spec, (tb, tn), sem)(
    idx, vals, xp
  )


def _backward_x(cfg: _Config, dy: Array, vals: Array, idx: Array, dtype):
  """``dX [m, per, rows, G_w]``: ``dX[q, f] = dy @ Wd[q, f]ᵀ``."""
  ct = jnp.result_type(dy, vals)
  n, m, per = cfg.n, cfg.m, cfg.per
  tb, tn, tu = cfg.tb, cfg.tn, cfg.tu
  grid = (cfg.rows // tb, per, cfg.groups_w // tu, cfg.cols // tn)
  if cfg.platform == "tpu":
    body = functools.partial(_dx_tpu, cfg=cfg, ct=ct)
    specs = [
      pl.BlockSpec((n, tu, tn), lambda b, f, u, c: (0, u, c)),
      pl.BlockSpec((n, None, tu, tn), lambda b, f, u, c: (0, f, u, c)),
      pl.BlockSpec((tb, tn), lambda b, f, u, c: (b, c)),
    ]
  else:
    body = functools.partial(_dx_gpu, cfg=cfg, ct=ct)
    nc = cfg.cols
    specs = [
      pl.BlockSpec((n, tu, nc), lambda b, f, u: (0, u, 0)),
      pl.BlockSpec((n, None, tu, nc), lambda b, f, u: (0, f, u, 0)),
      pl.BlockSpec((tb, nc), lambda b, f, u: (b, 0)),
    ]
  out_spec = pl.BlockSpec((m, None, tb, tu), lambda b, f, u, *_: (0, f, b, u))
  out_shape = jax.ShapeDtypeStruct((m, per, cfg.rows, cfg.groups_w), dtype)
  sem = ("parallel", "parallel", "parallel", "arbitrary")
  return _call(body, cfg, out_shape, grid, specs, out_spec, (m, tb, tu), sem)(
    idx, vals, dy
  )


def _backward_values(cfg: _Config, dy: Array, xp: Array, idx: Array, dtype):
  """``dV [n, per, G_w, N]``: gradient of the kept values only."""
  ct = jnp.result_type(dy, xp)
  n, m, per = cfg.n, cfg.m, cfg.per
  tb, tn, tu = cfg.tb, cfg.tn, cfg.tu
  grid = (cfg.groups_w // tu, per, cfg.cols // tn, cfg.rows // tb)
  if cfg.platform == "tpu":
    body = functools.partial(_dv_tpu, cfg=cfg, ct=ct)
    specs = [
      pl.BlockSpec((n, tu, tn), lambda u, f, c, b: (0, u, c)),
      pl.BlockSpec((m, None, tb, tu), lambda u, f, c, b: (0, f, b, u)),
      pl.BlockSpec((tb, tn), lambda u, f, c, b: (b, c)),
    ]
  else:
    body = functools.partial(_dv_gpu, cfg=cfg, ct=ct)
    rows = cfg.rows
    specs = [
      pl.BlockSpec((n, tu, tn), lambda u, f, c: (0, u, c)),
      pl.BlockSpec((m, None, rows, tu), lambda u, f, c: (0, f, 0, u)),
      pl.BlockSpec((rows, tn), lambda u, f, c: (0, c)),
    ]
  out_spec = pl.BlockSpec((n, None, tu, tn), lambda u, f, c, *_: (0, f, u, c))
  out_shape = jax.ShapeDtypeStruct((n, per, cfg.groups_w, cfg.cols), dtype)
  sem = ("parallel", "parallel", "parallel", "arbitrary")
  return _call(body, cfg, out_shape, grid, specs, out_spec, (n, tu, tn), sem)(
    idx, xp, dy
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, xp: Array, vals: Array, idx: Array) -> Array:
  return _forward(cfg, xp, vals, idx)


def _core_fwd(cfg, xp, vals, idx):
  return _forward(cfg, xp, vals, idx), (xp, vals, idx)


def _core_bwd(cfg, res, dy):
  xp, vals, idx = res
  dx = _backward_x(cfg, dy, vals, idx, xp.dtype)
  dv = _backward_values(cfg, dy, xp, idx, vals.dtype)
  return dx, dv, None


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------
# Tiling and the public op.


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _pow2_at_least(a: int) -> int:
  return 1 << max(0, (a - 1).bit_length())


def _largest_divisor(total: int, choices: tuple[int, ...]) -> int | None:
  return next((t for t in choices if total % t == 0), None)


def _tiles(
  platform: str,
  rows: int,
  packed: PackedNM,
  x_dtype,
  block_b: int | None,
  block_n: int | None,
  block_u: int | None,
) -> tuple[int, int, int] | str:
  """``(tb, tn, tu)`` for a ``[rows, K]`` input, or the reason none fits."""
  k, cols = packed.shape
  n, m = packed.n, packed.m
  _, per, word = index_layout(m)
  groups_w = k // m // per
  x_size = np.dtype(x_dtype).itemsize
  v_size = np.dtype(packed.values.dtype).itemsize

  def vmem_bytes(tb, tn, tu):  # TPU forward: double-buffered blocks + acc
    blocks = n * tu * tn * word.itemsize + n * per * tu * tn * v_size
    blocks += m * per * tb * tu * x_size + tb * tn * 4
    return 2 * blocks + tb * tn * 4

  if platform == "tpu":
    sub = max(8, 32 // np.dtype(x_dtype).itemsize)
    tb = block_b or min(128, _round_up(rows, sub))
    tn = block_n or _largest_divisor(cols, (256, 128))
    if tn is None and cols <= 1024:
      tn = cols
    tu = block_u
    if tu is None:
      tu = groups_w
      if groups_w > 256:
        tu = _largest_divisor(groups_w, (256, 128)) or groups_w
    if tb % sub:
      return f"block_b={tb} is not a multiple of {sub} (TPU sublanes)"
    if tn is None or cols % tn or not (tn % 128 == 0 or tn == cols):
      return (
        f"N={cols} has no TPU column tile (a multiple of 128 dividing N, or "
        "N <= 1024); pad N"
      )
    if groups_w % tu or not (tu % 128 == 0 or tu == groups_w):
      return (
        f"block_u={tu} must divide G_w={groups_w} and be a multiple of 128 "
        "or G_w itself (TPU lanes)"
      )
    if vmem_bytes(tb, tn, tu) > _TPU_VMEM_BUDGET:
      return (
        f"tiles (block_b, block_n, block_u)=({tb}, {tn}, {tu}) need about "
        f"{vmem_bytes(tb, tn, tu) >> 20} MiB of VMEM; pass smaller tiles"
      )
    return tb, tn, tu
  tb = block_b or min(64, max(16, _pow2_at_least(rows)))
  tn = block_n or _largest_divisor(cols, (128, 64, 32, 16))
  tu = block_u or _largest_divisor(groups_w, (64, 32, 16))
  for name, t, total in (("N", tn, cols), ("G_w", tu, groups_w)):
    if t is None or total % t or t < 16 or t & (t - 1):
      return (
        f"{name}={total} has no Triton tile (a power of 2 >= 16 dividing it); "
        "pad the weight"
      )
  if tb < 16 or tb & (tb - 1):
    return f"block_b={tb} must be a power of 2 >= 16 (Triton tl.dot)"
  return tb, tn, tu


def nm_pallas_unsupported(
  packed: PackedNM,
  x_shape: tuple[int, ...],
  platform: str,
  x_dtype=None,
  *,
  block_b: int | None = None,
  block_n: int | None = None,
  block_u: int | None = None,
) -> str | None:
  """Why :func:`nm_matmul_pallas` cannot run these shapes, or ``None``.

  Args:
    packed: the N:M weight (only shapes and dtypes are read).
    x_shape: the shape of ``x`` (``[..., K]``).
    platform: ``"tpu"`` or ``"gpu"``.
    x_dtype: ``x``'s dtype (default: ``packed.values``' dtype).
    block_b, block_n, block_u: tiles that would be passed (static).

  Returns:
    ``None`` if the kernel handles the call, else a one-line reason.
  """
  if platform not in ("tpu", "gpu"):
    return f"platform={platform!r} is not 'tpu' or 'gpu'"
  k, cols = packed.shape
  if len(x_shape) < 1 or x_shape[-1] != k:
    return f"x shape {tuple(x_shape)} does not end in K={k}"
  bits, per, _ = index_layout(packed.m)
  groups = k // packed.m
  if groups % per:
    return (
      f"K/m={groups} groups is not a multiple of {per} index fields per word "
      f"(needs K % {per * packed.m} == 0)"
    )
  dtypes = _TPU_DTYPES if platform == "tpu" else _GPU_DTYPES
  x_dtype = np.dtype(packed.values.dtype if x_dtype is None else x_dtype)
  for name, dt in (("values", np.dtype(packed.values.dtype)), ("x", x_dtype)):
    if dt.name not in dtypes:
      return f"{name} dtype {dt.name} is not one of {dtypes} on {platform}"
  rows = max(1, math.prod(x_shape[:-1]))
  tiles = _tiles(platform, rows, packed, x_dtype, block_b, block_n, block_u)
  return tiles if isinstance(tiles, str) else None


def nm_matmul_pallas(
  x: ArrayLike,
  packed: PackedNM,
  *,
  platform: Platform,
  interpret: bool | pltpu.InterpretParams = False,
  block_b: int | None = None,
  block_n: int | None = None,
  block_u: int | None = None,
) -> Array:
  """``y = x @ W`` for an N:M-packed ``W: [K, N]`` with a Pallas kernel.

  Computes ``y[..., c] = sum_{j,g} x[..., g*m + idx[j, g, c]] values[j, g,
  c]`` as ``sum_{q,f} X[q, f] @ Wd[q, f]`` on tiles decoded in the kernel
  (see the module docstring), accumulating in float32. Differentiable
  w.r.t. ``x`` and ``packed.values`` (``jax.custom_vjp``, backward kernels
  decode ``W`` the same way); ``packed.indices`` gets no cotangent.

  Args:
    x: ``[..., K]`` inputs; leading dims are flattened into a batch padded
      to a multiple of the batch tile.
    packed: the weight, from :func:`~jaxsparse.kernels.pack_nm`.
    platform: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton) (static).
    interpret: run the kernels in the Pallas interpreter (CPU); a
      ``pltpu.InterpretParams()`` (with ``platform="tpu"``) runs the
      TPU-faithful interpreter (simulated VMEM, DMAs, cores) (static).
    block_b, block_n, block_u: batch, column and word-row (``G_w``) tiles
      (static; ``None`` picks defaults, see :func:`nm_pallas_unsupported`).

  Returns:
    ``[..., N]`` of dtype ``result_type(x, packed.values)``.

  Raises:
    ValueError: if the kernel does not support the shapes or dtypes (the
      reason from :func:`nm_pallas_unsupported`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsparse as js
    >>> from jaxsparse.kernels import pack_nm
    >>> w = jnp.zeros((64, 16)).at[::2].set(1.0)  # rows 0, 2 of each 4
    >>> packed = pack_nm(w, js.NM(2, 4))
    >>> y = nm_matmul_pallas(
    ...   jnp.ones((3, 64)), packed, platform="tpu", interpret=True
    ... )
    >>> y.shape, float(y[0, 0])
    ((3, 16), 32.0)

  References:
    Mishra et al, `Accelerating Sparse Deep Neural Networks
    <https://arxiv.org/abs/2104.08378>`_, 2021.
  """
  x = jnp.asarray(x)
  reason = nm_pallas_unsupported(
    packed,
    x.shape,
    platform,
    x.dtype,
    block_b=block_b,
    block_n=block_n,
    block_u=block_u,
  )
  if reason is not None:
    raise ValueError(
      f"nm_matmul_pallas: {reason}; use js.kernels.nm_matmul (falls back to "
      "the reference) for these shapes."
    )
  k, cols = packed.shape
  n, m = packed.n, packed.m
  bits, per, _ = index_layout(m)
  groups_w = k // m // per
  lead = x.shape[:-1]
  out = jnp.result_type(x, packed.values)
  if math.prod(lead) == 0:
    return jnp.zeros((*lead, cols), out)
  rows = math.prod(lead)
  tb, tn, tu = _tiles(
    platform, rows, packed, x.dtype, block_b, block_n, block_u
  )
  padded = _round_up(rows, tb)
  cfg = _Config(
    n, m, per, bits, groups_w, cols, padded, tb, tn, tu, platform, interpret
  )
  x2 = x.reshape(rows, k)
  if padded != rows:
    x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
  xp = x2.reshape(padded, per, groups_w, m).transpose(3, 1, 0, 2)
  vals = packed.values.reshape(n, per, groups_w, cols)
  y = _core(cfg, xp, vals, packed.indices)
  return y[:rows].reshape(*lead, cols)


__all__ = ["nm_matmul_pallas", "nm_pallas_unsupported"]
