"""Packed sparse weights on an unchanged model (linen, nnx, any JAX model).

A sparse model keeps its dense kernels full of zeros. :func:`pack` turns each
masked kernel into a packed pytree that stores only the kept values plus
their positions, so the params and their checkpoints get smaller;
:func:`apply` runs the unchanged model on them, every matmul on a packed
kernel computed by the structured-sparse ops of :mod:`jaxsparse.kernels`:

  kernels = js.find_kernels(apply_fn, params, x)
  packed = js.nn.pack(params, masks, js.NM(2, 4), kernels=kernels)
  y = js.nn.apply(apply_fn, packed, x)  # == apply_fn(masked params, x)

:func:`pack_nnx` swaps ``nnx.Linear`` layers of an nnx model object in place
(it imports flax; the rest of this package does not).
"""

from jaxsparse.nn.apply import apply as apply
from jaxsparse.nn.packing import PackedKernel as PackedKernel
from jaxsparse.nn.packing import is_packed as is_packed
from jaxsparse.nn.packing import pack as pack
from jaxsparse.nn.packing import pack_leaf as pack_leaf
from jaxsparse.nn.packing import unpack as unpack
from jaxsparse.nn.packing import unpack_leaf as unpack_leaf


def __getattr__(name: str):
  # The nnx module swap imports flax, an optional dependency.
  if name in ("PackedLinear", "pack_nnx"):
    from jaxsparse.nn import nnx  # noqa: PLC0415

    return getattr(nnx, name)
  raise AttributeError(f"module 'jaxsparse.nn' has no attribute {name!r}")


__all__ = [
  "PackedKernel",
  "PackedLinear",
  "apply",
  "is_packed",
  "pack",
  "pack_leaf",
  "pack_nnx",
  "unpack",
  "unpack_leaf",
]
