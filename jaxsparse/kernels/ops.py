"""Public structured-sparse matmuls and the dispatcher that picks a kernel.

``nm_matmul(x, packed)`` and ``block_sparse_matmul(x, packed)`` compute
``y = x @ W`` for ``x: [..., K]`` and a packed ``W: [K, N]``, accumulating in
float32 and returning ``result_type(x, W)``. Three implementations:

* ``"pallas"``: the Pallas kernel for the backend (Mosaic TPU, Triton GPU),
  a ``jax.custom_vjp`` whose backward passes are kernels too;
* ``"reference"``: the plain-``jnp`` specification
  (:mod:`jaxsparse.kernels.reference`);
* ``"dense"``: unpack ``W`` and one dense ``jnp.dot`` (XLA's own matmul).

``impl="auto"`` asks :func:`choose`, which reads a table of timings measured
by ``python -m benchmarks.kernels --write_table`` on the current platform
(``jaxsparse/kernels/tuned.json``): the nearest measured case (same op and
pattern, nearest size, batch and block density) names the fastest
implementation there. A platform with no measured table runs no unmeasured
kernel: ``"dense"`` on GPU/TPU and ``"reference"`` on CPU. Pallas never runs
in interpret mode unless a caller asks for it (tests). Where even the best
packed implementation loses to ``jnp.dot`` on the dense weight
(:func:`packing_pays`), ``js.nn.pack(..., for_batch=B)`` keeps the layer
dense.
"""

import dataclasses
import functools
import importlib.resources
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike

from jaxsparse.kernels import block_pallas, nm_pallas
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

_IMPLS = ("auto", "pallas", "reference", "dense")
_TABLE = "tuned.json"


def _dense(x: Array, w: Array) -> Array:
  out = jnp.result_type(x, w)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out)


def _platform(platform: str | None) -> str:
  name = platform or jax.default_backend()
  name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
  if name not in ("cpu", "gpu", "tpu"):
    raise ValueError(
      f"platform={platform!r}: expected 'cpu', 'gpu' or 'tpu' (or None for "
      "jax.default_backend())."
    )
  return name


def pattern_key(packed: PackedNM | PackedBlock) -> str:
  """``"n:m"`` or ``"RxC"``: the table key of a packed weight's pattern."""
  if isinstance(packed, PackedNM):
    return f"{packed.n}:{packed.m}"
  return f"{packed.rows}x{packed.cols_per_block}"


def static_density(packed: PackedNM | PackedBlock) -> float:
  """Stored fraction known at trace time: ``n/m``, or slots per block column
  over block rows (``max_blocks / (K/rows)``) for blocks."""
  if isinstance(packed, PackedNM):
    return packed.n / packed.m
  return packed.max_blocks / (packed.shape[0] // packed.rows)


@functools.cache
def _tables() -> dict[str, Any]:
  text = importlib.resources.files(__package__).joinpath(_TABLE).read_text()
  return json.loads(text)


def measured(platform: str) -> list[dict[str, Any]]:
  """The measured cases for ``platform`` (empty when none were measured)."""
  return list(_tables().get(platform, {}).get("entries", []))


def _distance(entry: dict[str, Any], case: dict[str, Any]) -> float:
  """Log-distance between two cases: size, batch and density."""
  return (
    abs(math.log2(entry["k"] * entry["n"]) - math.log2(case["k"] * case["n"]))
    + abs(math.log2(entry["batch"]) - math.log2(case["batch"]))
    + 4 * abs(math.log2(entry["density"]) - math.log2(case["density"]))
  )


def _unsupported(
  packed: PackedNM | PackedBlock,
  x_shape: tuple[int, ...],
  platform: str,
  x_dtype: Any = None,
) -> str | None:
  """Why the Pallas kernel cannot run this case on ``platform`` (or None)."""
  if platform not in ("gpu", "tpu"):
    return f"no Pallas backend for {platform!r} (kernels target gpu and tpu)"
  if isinstance(packed, PackedNM):
    return nm_pallas.nm_pallas_unsupported(packed, x_shape, platform, x_dtype)
  return block_pallas.block_pallas_unsupported(
    packed, x_shape, platform, x_dtype=x_dtype
  )


def _nearest(
  packed: PackedNM | PackedBlock, x_shape: tuple[int, ...], platform: str
) -> dict[str, Any] | None:
  """The measured case nearest to this one (same op and pattern), or None."""
  case = dict(
    op="nm" if isinstance(packed, PackedNM) else "block",
    pattern=pattern_key(packed),
    k=packed.shape[0],
    n=packed.shape[1],
    batch=max(1, math.prod(x_shape[:-1])),
    density=static_density(packed),
  )
  entries = [
    e
    for e in measured(platform)
    if e["op"] == case["op"] and e["pattern"] == case["pattern"]
  ]
  if not entries:
    return None
  return min(entries, key=lambda e: _distance(e, case))


def _packed_seconds(
  entry: dict[str, Any],
  packed: PackedNM | PackedBlock,
  x_shape: tuple[int, ...],
  platform: str,
  x_dtype: Any,
) -> dict[str, float]:
  """A measured case's times of the implementations that can run here."""
  seconds = {
    k: v
    for k, v in entry["seconds"].items()
    if k in ("pallas", "reference", "dense")
  }
  if "pallas" in seconds and _unsupported(packed, x_shape, platform, x_dtype):
    del seconds["pallas"]
  return seconds


def choose(
  packed: PackedNM | PackedBlock,
  x_shape: tuple[int, ...],
  platform: str | None = None,
  x_dtype: Any = None,
) -> str:
  """The implementation ``impl="auto"`` runs: ``pallas``, ``reference`` or
  ``dense``.

  Rule: among the cases measured on ``platform`` for the same op and
  pattern, take the nearest one in ``log2(K N)``, ``log2(batch)`` and
  ``log2(density)`` (weighted 4x); the implementation that was fastest
  there wins, among those that can run this case (``pallas`` only where the
  kernel supports the shape). Without measurements: ``dense`` on GPU/TPU,
  ``reference`` on CPU.
  """
  name = _platform(platform)
  entry = _nearest(packed, x_shape, name)
  if entry is None:
    return "reference" if name == "cpu" else "dense"
  seconds = _packed_seconds(entry, packed, x_shape, name, x_dtype)
  return min(seconds, key=seconds.get)


def packing_pays(
  packed: PackedNM | PackedBlock,
  x_shape: tuple[int, ...],
  platform: str | None = None,
  x_dtype: Any = None,
) -> bool:
  """Whether a packed matmul beats ``jnp.dot`` on the dense weight.

  Read from the nearest measured case (as in :func:`choose`): true when the
  implementation :func:`choose` picks took less time there than
  ``jnp.dot`` with the weight stored dense. False without measurements.
  ``js.nn.pack(..., for_batch=B)`` keeps a layer dense (masked) where this
  is false, so a packed model is not slower than dense on the measured
  cases.
  """
  name = _platform(platform)
  entry = _nearest(packed, x_shape, name)
  if entry is None:
    return False
  seconds = _packed_seconds(entry, packed, x_shape, name, x_dtype)
  return min(seconds.values()) < entry["seconds"]["jnp.dot"]


def _check_impl(impl: str, op: str) -> None:
  if impl not in _IMPLS:
    raise ValueError(
      f"{op}: impl={impl!r} is not one of {_IMPLS}; 'auto' lets the measured "
      "table decide."
    )


def _run(
  op: str,
  x: Array,
  packed: PackedNM | PackedBlock,
  impl: str,
  platform: str | None,
  interpret: bool,
  reference: Callable[[Array, Any], Array],
  unpack: Callable[[Any], Array],
  pallas: Callable[..., Array],
) -> Array:
  _check_impl(impl, op)
  if impl == "auto":
    impl = choose(packed, x.shape, platform, x.dtype)
  if impl == "reference":
    return reference(x, packed)
  if impl == "dense":
    return _dense(x, unpack(packed))
  name = _platform(platform)
  if name == "cpu" and interpret:
    raise ValueError(
      f"{op}: interpret mode runs a kernel written for a platform; pass "
      "platform='gpu' or platform='tpu' with interpret=True (tests only)."
    )
  if name == "cpu":
    raise ValueError(
      f"{op}: impl='pallas' has no CPU kernel; use impl='auto' (the faster "
      "of reference and dense as measured on CPU), or platform='gpu'/'tpu' "
      "with interpret=True in tests."
    )
  reason = _unsupported(packed, x.shape, name, x.dtype)
  if reason is not None:
    raise ValueError(
      f"{op}: the {name} Pallas kernel cannot run this case: {reason}; use "
      "impl='auto' to fall back to dense."
    )
  return pallas(x, packed, platform=name, interpret=interpret)


def nm_matmul(
  x: ArrayLike,
  packed: PackedNM | PackedBlock,  # a PackedBlock is refused with a hint
  *,
  impl: str = "auto",
  platform: str | None = None,
  interpret: bool = False,
) -> Array:
  """``y = x @ W`` for an N:M-packed ``W`` (see :class:`PackedNM`).

  ``y[..., c] = sum_{j,g} x[..., g m + idx[j,g,c]] values[j,g,c]`` (Mishra
  et al. 2021, 2:4 generalised to N:M); differentiable in ``x`` and
  ``packed.values``. ``impl``: see :func:`choose`; ``platform`` overrides
  ``jax.default_backend()``; ``interpret=True`` (tests) runs the Pallas
  kernel in interpret mode.
  """
  if not isinstance(packed, PackedNM):
    raise ValueError(
      f"nm_matmul: packed must be a kernels.PackedNM (from kernels.pack_nm), "
      f"got {type(packed).__name__}; use block_sparse_matmul for PackedBlock."
    )

  return _run(
    "nm_matmul",
    jnp.asarray(x),
    packed,
    impl,
    platform,
    interpret,
    nm_matmul_reference,
    unpack_nm,
    nm_pallas.nm_matmul_pallas,
  )


def block_sparse_matmul(
  x: ArrayLike,
  packed: PackedBlock | PackedNM,  # a PackedNM is refused with a hint
  *,
  impl: str = "auto",
  platform: str | None = None,
  interpret: bool = False,
) -> Array:
  """``y = x @ W`` for a block-packed ``W`` (see :class:`PackedBlock`).

  ``y[..., c-th column block] = sum_{j < counts[c]} x[..., indices[c, j]-th
  row block] @ blocks[c, j]`` (Gray, Radford & Kingma 2017); differentiable
  in ``x`` and ``packed.blocks``. ``impl``, ``platform``, ``interpret``: as
  in :func:`nm_matmul`.
  """
  if not isinstance(packed, PackedBlock):
    raise ValueError(
      "block_sparse_matmul: packed must be a kernels.PackedBlock (from "
      f"kernels.pack_block), got {type(packed).__name__}; use nm_matmul for "
      "PackedNM."
    )

  return _run(
    "block_sparse_matmul",
    jnp.asarray(x),
    packed,
    impl,
    platform,
    interpret,
    block_sparse_matmul_reference,
    unpack_block,
    block_pallas.block_sparse_matmul_pallas,
  )


def sparse_matmul(
  x: ArrayLike, packed: PackedNM | PackedBlock, **kwargs: Any
) -> Array:
  """:func:`nm_matmul` or :func:`block_sparse_matmul`, by the packed type."""
  if isinstance(packed, PackedNM):
    return nm_matmul(x, packed, **kwargs)
  return block_sparse_matmul(x, packed, **kwargs)


def _column_specs(
  packed: PackedNM | PackedBlock, axis: str | None
) -> PackedNM | PackedBlock:
  """PartitionSpecs that split a packed weight's output columns over
  ``axis`` (every leaf keeps whole N:M groups / whole blocks per shard)."""
  if isinstance(packed, PackedNM):
    spec = PartitionSpec(None, None, axis)
    return dataclasses.replace(packed, values=spec, indices=spec)
  return dataclasses.replace(
    packed,
    blocks=PartitionSpec(axis, None, None, None),
    indices=PartitionSpec(axis, None),
    counts=PartitionSpec(axis),
  )


def _check_sharded(
  x: Array,
  packed: PackedNM | PackedBlock,
  mesh: Mesh,
  batch_axis: str | None,
  column_axis: str | None,
) -> None:
  for name, axis in (("batch_axis", batch_axis), ("column_axis", column_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(
        f"sharded_matmul: {name}={axis!r} is not an axis of the mesh "
        f"{mesh.axis_names}; pass one of them or None."
      )
  if batch_axis is not None:
    size = mesh.shape[batch_axis]
    if x.ndim < 2 or x.shape[0] % size:
      raise ValueError(
        f"sharded_matmul: x has shape {x.shape}; its leading (batch) axis "
        f"must divide into {size} shards of mesh axis {batch_axis!r}."
      )
  if column_axis is not None:
    size = mesh.shape[column_axis]
    unit = 1 if isinstance(packed, PackedNM) else packed.cols_per_block
    columns = packed.shape[1] // unit
    if columns % size:
      raise ValueError(
        f"sharded_matmul: W has {columns} output "
        f"{'columns' if unit == 1 else 'block columns'}, not divisible into "
        f"{size} shards of mesh axis {column_axis!r}; pick a mesh axis "
        "dividing them or pad N."
      )


def sharded_matmul(
  x: ArrayLike,
  packed: PackedNM | PackedBlock,
  mesh: Mesh,
  *,
  batch_axis: str | None = None,
  column_axis: str | None = None,
  **kwargs: Any,
) -> Array:
  """``x @ W`` with the kernel run per shard inside ``jax.shard_map``.

  Pallas kernels are not partitioned by XLA, so sharded inputs go through
  ``shard_map``: ``x``'s leading axis is split over ``batch_axis`` (data
  parallel), ``W``'s output columns over ``column_axis`` (tensor/column
  parallel). Each shard is a whole packed weight (N:M groups run along
  ``K``; blocks are whole), so every device runs the unchanged kernel on
  its slice and no collective is needed: ``y`` comes out sharded
  ``P(batch_axis, ..., column_axis)``. ``kwargs`` go to :func:`nm_matmul` /
  :func:`block_sparse_matmul` (``impl``, ``platform``, ``interpret``).
  """
  x = jnp.asarray(x)
  _check_sharded(x, packed, mesh, batch_axis, column_axis)
  middle = (None,) * (x.ndim - 2)
  x_spec = PartitionSpec(batch_axis, *middle, None)
  y_spec = PartitionSpec(batch_axis, *middle, column_axis)
  shards = 1 if column_axis is None else mesh.shape[column_axis]
  k, n = packed.shape

  def local(x, packed):
    packed = dataclasses.replace(packed, shape=(k, n // shards))
    return sparse_matmul(x, packed, **kwargs)

  w_specs = _column_specs(packed, column_axis)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # On an Explicit mesh shard_map wants inputs already placed as the specs
    # say (a no-op when they are); on an Auto mesh it reshards them itself.
    def place(a, spec):
      return jax.reshard(a, NamedSharding(mesh, spec))

    x = place(x, x_spec)
    packed = jax.tree.map(place, packed, w_specs)
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(x_spec, w_specs),
    out_specs=y_spec,
    check_vma=False,
  )(x, packed)
