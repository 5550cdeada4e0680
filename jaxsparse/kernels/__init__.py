"""Structured-sparse matmul: packed formats and their reference ops.

``pack_nm`` / ``pack_block`` turn a sparse Flax kernel ``W: [K, N]`` into a
pytree of packed arrays; ``nm_matmul_reference`` and
``block_sparse_matmul_reference`` compute ``x @ W`` from them in plain
``jnp`` and are the specification of the Pallas kernels.
"""

from jaxsparse.kernels.block_pallas import (
  block_pallas_unsupported as block_pallas_unsupported,
)
from jaxsparse.kernels.block_pallas import (
  block_sparse_matmul_pallas as block_sparse_matmul_pallas,
)
from jaxsparse.kernels.nm_pallas import nm_matmul_pallas as nm_matmul_pallas
from jaxsparse.kernels.nm_pallas import (
  nm_pallas_unsupported as nm_pallas_unsupported,
)
from jaxsparse.kernels.ops import block_sparse_matmul as block_sparse_matmul
from jaxsparse.kernels.ops import nm_matmul as nm_matmul
from jaxsparse.kernels.ops import sharded_matmul as sharded_matmul
from jaxsparse.kernels.ops import sparse_matmul as sparse_matmul
from jaxsparse.kernels.packing import PackedBlock as PackedBlock
from jaxsparse.kernels.packing import PackedNM as PackedNM
from jaxsparse.kernels.packing import index_layout as index_layout
from jaxsparse.kernels.packing import pack_block as pack_block
from jaxsparse.kernels.packing import pack_nm as pack_nm
from jaxsparse.kernels.packing import packed_nbytes as packed_nbytes
from jaxsparse.kernels.packing import unpack_block as unpack_block
from jaxsparse.kernels.packing import unpack_nm as unpack_nm
from jaxsparse.kernels.reference import (
  block_sparse_matmul_reference as block_sparse_matmul_reference,
)
from jaxsparse.kernels.reference import (
  nm_matmul_reference as nm_matmul_reference,
)

__all__ = [
  "PackedBlock",
  "PackedNM",
  "block_pallas_unsupported",
  "block_sparse_matmul",
  "block_sparse_matmul_pallas",
  "block_sparse_matmul_reference",
  "index_layout",
  "nm_matmul",
  "nm_matmul_pallas",
  "nm_matmul_reference",
  "nm_pallas_unsupported",
  "pack_block",
  "pack_nm",
  "packed_nbytes",
  "sharded_matmul",
  "sparse_matmul",
  "unpack_block",
  "unpack_nm",
]
