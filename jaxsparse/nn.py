"""Packed sparse weights on an unchanged Flax model (linen and nnx).

A sparse model keeps its dense kernels full of zeros. :func:`pack` turns each
masked Dense kernel of a params tree into a packed pytree
(:class:`~jaxsparse.kernels.PackedNM` for ``js.NM(n, m)``,
:class:`~jaxsparse.kernels.PackedBlock` for ``js.Block(rows, cols)``) that
stores only the kept values plus their positions, so the params, and their
orbax checkpoints, get smaller (2:4 in bfloat16: ``0.5625`` of the kernel
bytes). The model's code does not change:

* linen: :func:`apply` (or ``model.apply`` inside :func:`sparse_inference`)
  intercepts every ``nn.Dense`` / ``nn.DenseGeneral`` call
  (:func:`flax.linen.intercept_methods`) whose ``kernel`` is packed and
  computes it with the structured-sparse ops of :mod:`jaxsparse.kernels`;
  every other call runs as written.
* nnx: :func:`pack_nnx` swaps each masked ``nnx.Linear`` for a
  :class:`PackedLinear` holding the packed kernel and the bias.

For a kernel ``W`` with mask ``M`` and bias ``b`` the packed layer computes
the masked dense layer::

  y = x @ where(M, W, 0) + b

with ``x``, ``W`` and ``b`` promoted as the Flax layer promotes them
(``dtype``, ``param_dtype``, ``promote_dtype``). A kernel with more than two
axes (``DenseGeneral``: ``[*in, *out]``) is packed as its 2-D view
``[prod(in), prod(out)]``; the pattern holds in that view (N:M groups run
along the flattened input axis), as one-shot pruning builds its masks.

Not supported (a ``ValueError`` that says so): ``DenseGeneral`` with
``batch_dims``, a custom ``dot_general``, nnx ``preferred_element_type`` or
``out_sharding``, packed params in any other module (``Conv``, ``Embed``,
``nnx.LinearGeneral``). The layer's ``precision`` is not passed on: the ops
accumulate in float32. Layers inside ``nn.scan`` (stacked kernels) are not
handled by :func:`pack`. Flax is imported with this module (install
``jaxsparse[flax]``).

References:
  Mishra et al, `Accelerating Sparse Deep Neural Networks
  <https://arxiv.org/abs/2104.08378>`_, 2021 (2:4 storage).
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from jaxtyping import Array, ArrayLike, PyTree

from jaxsparse import masking
from jaxsparse import patterns as patterns_lib
from jaxsparse.kernels import ops, packing
from jaxsparse.kernels.packing import PackedBlock, PackedNM
from jaxsparse.types import MaskTree, Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedKernel:
  """A packed kernel with more than two axes (``DenseGeneral``).

  Attributes:
    packed: the 2-D view ``[prod(shape[:in_axes]), prod(shape[in_axes:])]``,
      packed.
    shape: the kernel's own shape (static).
    in_axes: how many leading axes of ``shape`` the layer contracts (static).
  """

  packed: PackedNM | PackedBlock
  shape: tuple[int, ...] = packing.static_field()
  in_axes: int = packing.static_field()

  @property
  def dtype(self):
    return self.packed.dtype


_PACKED = (PackedNM, PackedBlock, PackedKernel)


def is_packed(x: Any) -> bool:
  """Whether ``x`` is a packed kernel (:func:`pack`'s output leaves)."""
  return isinstance(x, _PACKED)


def _check_pattern(pattern: Any, name: str) -> None:
  if not isinstance(pattern, patterns_lib.NM | patterns_lib.Block):
    raise ValueError(
      f"{name}: pattern={pattern!r} has no packed format; pass js.NM(n, m) "
      "or js.Block(rows, cols) (for other patterns keep the masked dense "
      "params: js.apply_masks(params, masks))."
    )
  patterns_lib.check_pattern(pattern)
  if isinstance(pattern, patterns_lib.NM) and pattern.axis != -2:
    raise ValueError(
      f"{name}: {pattern!r}: packed N:M groups run along the kernel's input "
      f"axis; use js.NM({pattern.n}, {pattern.m}) (axis=-2)."
    )


def _in_axes_of(in_axes: int | Mapping[str, int], path: str) -> int:
  if isinstance(in_axes, Mapping):
    return in_axes.get(path, 1)
  return in_axes


def _block_slots(mask: np.ndarray, pattern: patterns_lib.Block) -> int:
  """Most kept blocks of one block column of a ``[K, N]`` mask (>= 1)."""
  k = mask.shape[0]
  tiles = mask.reshape(k // pattern.rows, pattern.rows, -1, pattern.cols)
  counts = tiles.any(axis=(1, 3)).sum(axis=0)
  return max(1, int(counts.max(initial=0)))


def pack_leaf(
  path: str,
  kernel: ArrayLike,
  mask: ArrayLike,
  pattern: patterns_lib.Pattern,
  in_axes: int = 1,
) -> PackedNM | PackedBlock | PackedKernel:
  """Packs one kernel ``where(mask, kernel, 0)``; errors name ``path``.

  Args:
    path: the leaf's ``a/b/kernel`` path (for error messages).
    kernel: ``[*in, *out]`` with ``in_axes`` input axes.
    mask: bool, the kernel's shape; must follow ``pattern`` in the 2-D view.
    pattern: ``js.NM(n, m)`` or ``js.Block(rows, cols)`` (static).
    in_axes: leading axes of ``kernel`` the layer contracts (static).

  Returns:
    The 2-D packed kernel, or a :class:`PackedKernel` for more than 2 axes.
  """
  _check_pattern(pattern, path)
  kernel = jnp.asarray(kernel)
  mask = jnp.asarray(mask)
  shape = tuple(kernel.shape)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(
      f"{path}: dtype {kernel.dtype} is not floating point; only float "
      "kernels are packed: set its mask to None."
    )
  if not (isinstance(in_axes, int) and 0 < in_axes < len(shape)):
    raise ValueError(
      f"{path}: in_axes={in_axes!r} must be an int in 1..{len(shape) - 1} "
      f"(the leading input axes of the kernel, shape {shape}); pass in_axes="
      f"{{{path!r}: k}} for a DenseGeneral contracting k axes."
    )
  k = math.prod(shape[:in_axes])
  w = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)).reshape(k, -1)
  mask2 = mask.reshape(k, -1)
  view = "" if len(shape) == 2 else f" (its 2-D view {w.shape})"
  reshape = "" if len(shape) == 2 else f".reshape{w.shape}"
  unshape = "" if len(shape) == 2 else f".reshape{shape}"
  seen = packing.concrete(mask2)
  try:
    if isinstance(pattern, patterns_lib.NM):
      if k % pattern.m:
        raise ValueError(
          f"input size K={k}{view} is not a multiple of m={pattern.m}; "
          "choose m dividing it or keep this kernel dense (mask None)."
        )
      if seen is not None and not patterns_lib.follows(pattern, seen):
        raise ValueError(
          f"the mask does not keep exactly {pattern.n} of every {pattern.m} "
          f"consecutive inputs of each output{view}; build it with "
          f"js.patterns.select({pattern!r}, scores{reshape}, "
          f"{1 - pattern.n / pattern.m}){unshape} (N:M groups along another "
          "kernel axis have no packed form)."
        )
      packed = packing.pack_nm(w, pattern, mask=mask2)
    else:
      if w.shape[0] % pattern.rows or w.shape[1] % pattern.cols:
        raise ValueError(
          f"shape {shape}{view} is not tiled by {pattern!r}; choose a block "
          "size dividing both sides or keep this kernel dense (mask None)."
        )
      if seen is None:
        raise ValueError(
          f"packing with {pattern!r} counts the kept blocks of the mask, "
          "which needs concrete masks; call js.nn.pack outside jax.jit."
        )
      if not patterns_lib.follows(pattern, seen):
        raise ValueError(
          f"the mask keeps part of some {pattern.rows}x{pattern.cols} "
          f"block{view}; build it with js.patterns.select({pattern!r}, "
          f"scores{reshape}, sparsity){unshape}."
        )
      packed = packing.pack_block(w, pattern, _block_slots(seen, pattern))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  if len(shape) == 2:
    return packed
  return PackedKernel(packed, shape, in_axes)


def _packable_path(path: str) -> None:
  if path.split("/")[-1] != "kernel":
    raise ValueError(
      f"{path}: has a mask but is not a Dense kernel (a leaf named "
      "'kernel'); only nn.Dense / nn.DenseGeneral / nnx.Linear kernels are "
      "packed: set its mask to None to keep it dense."
    )


def pack(
  params: Params,
  masks: MaskTree,
  pattern: patterns_lib.Pattern,
  *,
  in_axes: int | Mapping[str, int] = 1,
  for_batch: int | None = None,
  platform: str | None = None,
) -> PyTree:
  """Packs every masked Dense kernel of a params tree.

  Each leaf with a mask becomes the packed ``where(mask, w, 0)``: a
  :class:`~jaxsparse.kernels.PackedNM` or
  :class:`~jaxsparse.kernels.PackedBlock` for a 2-D kernel ``[in, out]``, a
  :class:`PackedKernel` around the packed 2-D view
  ``[prod(in), prod(out)]`` for a ``DenseGeneral`` kernel ``[*in, *out]``.
  Leaves whose mask is ``None`` stay as they are. The result goes through
  ``jax.jit``, ``js.nn.apply`` and orbax like any params. N:M packing also
  runs under ``jax.jit`` (the pattern checks need concrete masks and are
  then skipped) and ``jax.eval_shape`` (abstract targets to restore a
  packed checkpoint); Block packing sizes its arrays by the most kept
  blocks of a block column, so it needs concrete masks.

  Args:
    params: a params tree (linen ``variables["params"]``).
    masks: params-shaped tree, bool where a kernel is sparse, else ``None``
      (``js.masks(opt_state)``); each mask must follow ``pattern``.
    pattern: ``js.NM(n, m)`` (groups along the input axis) or
      ``js.Block(rows, cols)`` (static).
    in_axes: how many leading kernel axes each layer contracts: an int for
      all, or ``{path: k}`` (others 1), e.g. ``{"attn/out/kernel": 2}`` for
      ``nn.DenseGeneral(features, axis=(-2, -1))`` (static).
    for_batch: pack for speed at this many rows per call: a layer is packed
      only where :func:`jaxsparse.kernels.ops.packing_pays` (the timings
      measured on ``platform`` by ``benchmarks/kernels.py``) says a packed
      matmul beats ``jnp.dot`` on the dense weight; elsewhere the masked
      dense kernel ``where(mask, w, 0)`` stays. ``None`` packs every masked
      kernel (smallest memory).
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` for ``for_batch`` (default:
      ``jax.default_backend()``).

  Returns:
    The params tree with packed kernels.

  Raises:
    ValueError: naming the leaf and the fix, when the mask tree does not
      match the params, the pattern has no packed format, a masked leaf is
      not a kernel, a shape is not divisible, or a mask breaks the pattern.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxsparse as js
    >>> import jaxsparse.nn as jsnn
    >>> w = jax.random.normal(jax.random.key(0), (8, 4))
    >>> params = {"Dense_0": {"kernel": w, "bias": jnp.zeros(4)}}
    >>> mask = js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5)
    >>> masks = {"Dense_0": {"kernel": mask, "bias": None}}
    >>> packed = jsnn.pack(params, masks, js.NM(2, 4))
    >>> packed["Dense_0"]["kernel"].values.shape  # [n, K/m, N]
    (2, 2, 4)
  """
  name = "js.nn.pack"
  _check_pattern(pattern, name)
  try:
    masking.check_masks(params, masks)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves, packed = [], set()
  for (key, p), m in zip(flat, masking.treedef_leaves(params, masks)):
    if m is None:
      leaves.append(p)
      continue
    path = masking.path_str(key)
    _packable_path(path)
    leaf = pack_leaf(path, p, m, pattern, _in_axes_of(in_axes, path))
    packed.add(path)
    if for_batch is not None:
      inner = leaf.packed if isinstance(leaf, PackedKernel) else leaf
      x_shape = (for_batch, inner.shape[0])
      if not ops.packing_pays(inner, x_shape, platform, p.dtype):
        leaf = jnp.where(m, p, jnp.zeros((), p.dtype))
    leaves.append(leaf)
  if isinstance(in_axes, Mapping) and set(in_axes) - packed:
    raise ValueError(
      f"{name}: in_axes names {sorted(set(in_axes) - packed)}, which are not "
      f"masked kernels; the packed kernels are {sorted(packed)}."
    )
  return jax.tree_util.tree_unflatten(treedef, leaves)


def unpack_leaf(packed: Any) -> Array:
  """The dense kernel (its own shape) of a packed leaf."""
  inner = packed.packed if isinstance(packed, PackedKernel) else packed
  if isinstance(inner, PackedNM):
    dense = packing.unpack_nm(inner)
  else:
    dense = packing.unpack_block(inner)
  if isinstance(packed, PackedKernel):
    return dense.reshape(packed.shape)
  return dense


def unpack(packed_params: PyTree) -> Params:
  """Inverse of :func:`pack`: dense kernels ``where(mask, w, 0)``."""
  return jax.tree.map(
    lambda x: unpack_leaf(x) if is_packed(x) else x,
    packed_params,
    is_leaf=is_packed,
  )


def _matmul(x: Array, packed: PackedNM | PackedBlock, impl: str) -> Array:
  if isinstance(packed, PackedNM):
    return ops.nm_matmul(x, packed, impl=impl)
  return ops.block_sparse_matmul(x, packed, impl=impl)


def _cast(packed: PackedNM | PackedBlock, dtype: Any) -> Any:
  if isinstance(packed, PackedNM):
    return dataclasses.replace(packed, values=packed.values.astype(dtype))
  return dataclasses.replace(packed, blocks=packed.blocks.astype(dtype))


def _promote(
  promote_fn: Any, inputs: Any, kernel: Any, bias: Any, dtype: Any, nnx_style
) -> tuple[Array, PackedNM | PackedBlock, Array | None]:
  """The layer's own dtype promotion, with a scalar stand-in for the kernel."""
  inner = kernel.packed if isinstance(kernel, PackedKernel) else kernel
  proxy = jnp.zeros((), inner.dtype)
  if nnx_style:
    inputs, proxy, bias = promote_fn((inputs, proxy, bias), dtype=dtype)
  else:
    inputs, proxy, bias = promote_fn(inputs, proxy, bias, dtype=dtype)
  return inputs, _cast(inner, proxy.dtype), bias


def _linear(
  inputs: Array,
  packed: PackedNM | PackedBlock,
  bias: Array | None,
  axes: tuple[int, ...],
  features: tuple[int, ...],
  impl: str,
) -> Array:
  """``inputs`` contracted over ``axes`` with the 2-D packed kernel."""
  ndim = inputs.ndim
  last = tuple(range(ndim - len(axes), ndim))
  if axes != last:
    inputs = jnp.moveaxis(inputs, axes, last)
  lead = inputs.shape[: ndim - len(axes)]
  y = _matmul(inputs.reshape(*lead, -1), packed, impl)
  y = y.reshape(*lead, *features)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * len(lead) + features)
  return y


def _module_name(module: Any) -> str:
  path = "/".join(str(p) for p in getattr(module, "path", ()))
  return f"{path or '<root>'} ({type(module).__name__})"


def _check_linen(module: Any) -> None:
  if module.dot_general is not None or module.dot_general_cls is not None:
    raise ValueError(
      f"js.nn: {_module_name(module)} has a custom dot_general, which a "
      "packed kernel cannot use; keep its kernel dense (mask None)."
    )


def _linen_dense(module: Any, kernel: Any, inputs: Any, impl: str) -> Array:
  """``nn.Dense.__call__`` with a packed kernel."""
  _check_linen(module)
  inputs = jnp.asarray(inputs)
  if isinstance(kernel, PackedKernel):
    raise ValueError(
      f"js.nn: {_module_name(module)} is an nn.Dense but its kernel was "
      f"packed with shape {kernel.shape}; a Dense kernel is 2-D [in, out]."
    )
  bias = module.get_variable("params", "bias") if module.use_bias else None
  inputs, packed, bias = _promote(
    module.promote_dtype, inputs, kernel, bias, module.dtype, False
  )
  return _linear(
    inputs, packed, bias, (inputs.ndim - 1,), (module.features,), impl
  )


def _linen_dense_general(
  module: Any, kernel: Any, inputs: Any, impl: str
) -> Array:
  """``nn.DenseGeneral.__call__`` (no ``batch_dims``) with a packed kernel."""
  _check_linen(module)
  inputs = jnp.asarray(inputs)
  name = _module_name(module)
  if tuple(np.atleast_1d(module.batch_dims)):
    raise ValueError(
      f"js.nn: {name} has batch_dims={module.batch_dims}, which packed "
      "kernels do not support; keep its kernel dense (mask None)."
    )
  as_tuple = lambda v: tuple(v) if isinstance(v, Sequence) else (v,)
  features = tuple(int(f) for f in as_tuple(module.features))
  axes = tuple(int(a) % inputs.ndim for a in as_tuple(module.axis))
  expected = tuple(inputs.shape[a] for a in axes) + features
  if isinstance(kernel, PackedKernel):
    shape, in_axes = kernel.shape, kernel.in_axes
  else:
    shape, in_axes = kernel.shape, 1
  kernel_path = "/".join((*map(str, module.path), "kernel"))
  if shape != expected or in_axes != len(axes):
    raise ValueError(
      f"js.nn: {name} contracts {len(axes)} input axes with a kernel of "
      f"shape {expected}, but its packed kernel has shape {shape} with "
      f"{in_axes} input axes; pack it with in_axes={{{kernel_path!r}: "
      f"{len(axes)}}}."
    )
  bias = module.get_variable("params", "bias") if module.use_bias else None
  inputs, packed, bias = _promote(
    module.promote_dtype, inputs, kernel, bias, module.dtype, False
  )
  return _linear(inputs, packed, bias, axes, features, impl)


def _own_packed(module: Any) -> list[str]:
  """Names of the packed params directly in ``module`` (not submodules)."""
  params = module.variables.get("params", {})
  return [name for name, value in params.items() if is_packed(value)]


def _interceptor(impl: str):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    packed = _own_packed(module)
    if not packed:
      return next_fun(*args, **kwargs)
    kind = type(module)
    if packed != ["kernel"] or kind not in (linen.Dense, linen.DenseGeneral):
      raise ValueError(
        f"js.nn: {_module_name(module)} holds packed params {packed}, but "
        "only the kernel of nn.Dense / nn.DenseGeneral runs packed; keep "
        "these params dense (mask None) when packing."
      )
    if len(args) + len(kwargs) != 1:
      raise ValueError(
        f"js.nn: {_module_name(module)} was called with {len(args)} "
        f"positional and {sorted(kwargs)} keyword arguments; a packed Dense "
        "takes only `inputs`."
      )
    inputs = args[0] if args else kwargs["inputs"]
    kernel = module.get_variable("params", "kernel")
    if kind is linen.Dense:
      return _linen_dense(module, kernel, inputs, impl)
    return _linen_dense_general(module, kernel, inputs, impl)

  return interceptor


@contextlib.contextmanager
def sparse_inference(impl: str = "auto") -> Iterator[None]:
  """Context in which linen Dense layers with packed kernels run packed.

  Inside it, every ``nn.Dense`` / ``nn.DenseGeneral`` call whose ``kernel``
  is a packed leaf (see :func:`pack`) computes ``x @ W + b`` with
  :func:`jaxsparse.kernels.nm_matmul` or
  :func:`jaxsparse.kernels.block_sparse_matmul` instead of its dense
  ``dot_general``; every other call runs unchanged. Use it around
  ``model.apply`` when the variables hold more than ``params``
  (``batch_stats``); :func:`apply` is the short form. It acts while the
  model is traced: enter it inside the jitted function.

  Args:
    impl: the ops' implementation (``"auto"``, ``"pallas"``,
      ``"reference"``, ``"dense"``; static).

  Raises:
    ValueError (on call): a packed param in a module other than
      ``nn.Dense`` / ``nn.DenseGeneral`` or not its kernel, a
      ``DenseGeneral`` with ``batch_dims``, a custom ``dot_general``, or a
      kernel packed with other input axes than the layer contracts.
  """
  with linen.intercept_methods(_interceptor(impl)):
    yield


def apply(
  model: linen.Module,
  packed_params: PyTree,
  *args: Any,
  impl: str = "auto",
  **kwargs: Any,
) -> Any:
  """``model.apply({"params": packed_params}, *args, **kwargs)``, packed.

  Runs the unchanged linen ``model`` with the params from :func:`pack`
  inside :func:`sparse_inference`; the output equals the model's on the
  masked dense params ``js.apply_masks(params, masks)`` (up to the
  summation order). Jittable.

  Args:
    model: a linen module.
    packed_params: the output of :func:`pack`.
    *args: the model's inputs.
    impl: the ops' implementation (static; see :func:`sparse_inference`).
    **kwargs: passed to ``model.apply`` (``method=``, ``rngs=``, model
      keyword arguments).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxsparse as js
    >>> import jaxsparse.nn as jsnn
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> masks = {"kernel": js.patterns.select(
    ...   js.NM(2, 4), jnp.abs(params["kernel"]), 0.5), "bias": None}
    >>> packed = jsnn.pack(params, masks, js.NM(2, 4))
    >>> y = jsnn.apply(model, packed, x)
    >>> dense = model.apply({"params": js.apply_masks(params, masks)}, x)
    >>> bool(jnp.allclose(y, dense, rtol=1e-5, atol=1e-6))
    True
  """
  with sparse_inference(impl):
    return model.apply({"params": packed_params}, *args, **kwargs)


class PackedLinear(nnx.Module):
  """``nnx.Linear`` with a packed kernel: ``y = x @ W + b``.

  Holds ``kernel = nnx.Param(PackedNM | PackedBlock)`` (``[in, out]``) and
  ``bias = nnx.Param([out])`` or ``None``; promotes dtypes as the
  ``nnx.Linear`` it replaces (``dtype``, ``promote_dtype``). Built by
  :func:`pack_nnx`, or by :meth:`from_linear`.
  """

  def __init__(
    self,
    kernel: PackedNM | PackedBlock,
    bias: ArrayLike | None = None,
    *,
    dtype: Any = None,
    promote_dtype: Any = None,
    impl: str = "auto",
  ):
    if not isinstance(kernel, PackedNM | PackedBlock):
      raise ValueError(
        f"PackedLinear: kernel must be a PackedNM or PackedBlock, got "
        f"{type(kernel).__name__}; pack it with js.nn.pack_leaf."
      )
    self.in_features, self.out_features = kernel.shape
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    self.use_bias = bias is not None
    self.dtype = dtype
    self.promote_dtype = promote_dtype or nnx.nn.dtypes.promote_dtype
    self.impl = impl

  @classmethod
  def from_linear(
    cls,
    linear: nnx.Linear,
    mask: ArrayLike,
    pattern: patterns_lib.Pattern,
    *,
    impl: str = "auto",
    path: str = "kernel",
  ) -> "PackedLinear":
    """The packed ``where(mask, linear.kernel, 0)`` with ``linear``'s bias."""
    _check_pattern(pattern, "PackedLinear.from_linear")
    if type(linear) is not nnx.Linear:
      raise ValueError(
        f"{path}: {type(linear).__name__} is not an nnx.Linear; only "
        "nnx.Linear is packed: set its mask to None."
      )
    if linear.dot_general is not jax.lax.dot_general or (
      linear.preferred_element_type is not None
    ):
      raise ValueError(
        f"{path}: the nnx.Linear has a custom dot_general or "
        "preferred_element_type, which a packed kernel does not support; "
        "set its mask to None to keep it dense."
      )
    packed = pack_leaf(path, linear.kernel.get_value(), mask, pattern)
    return cls(
      packed,
      None if linear.bias is None else linear.bias.get_value(),
      dtype=linear.dtype,
      promote_dtype=linear.promote_dtype,
      impl=impl,
    )

  def __call__(self, inputs: ArrayLike, out_sharding: Any = None) -> Array:
    if out_sharding is not None:
      raise ValueError(
        "PackedLinear: out_sharding is not supported; shard the inputs instead."
      )
    bias = None if self.bias is None else self.bias.get_value()
    inputs, packed, bias = _promote(
      self.promote_dtype,
      jnp.asarray(inputs),
      self.kernel.get_value(),
      bias,
      self.dtype,
      True,
    )
    return _linear(
      inputs, packed, bias, (inputs.ndim - 1,), (self.out_features,), self.impl
    )


def _flat_paths(tree: Any) -> dict[str, Any]:
  """``a/b/kernel`` -> leaf (``None`` included, nnx Variables read)."""
  is_leaf = lambda x: x is None or isinstance(x, nnx.Variable)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {
    masking.path_str(key): (
      leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    )
    for key, leaf in flat
  }


def pack_nnx(
  model: nnx.Module,
  masks: MaskTree,
  pattern: patterns_lib.Pattern,
  *,
  impl: str = "auto",
) -> None:
  """Swaps, in place, each masked ``nnx.Linear`` for a :class:`PackedLinear`.

  The model's code is unchanged: its attributes (or ``nnx.List`` entries)
  now hold ``PackedLinear`` modules computing ``x @ where(mask, W, 0) + b``
  from the packed kernel; ``nnx.state(model)`` holds the packed arrays
  (checkpoint it as usual). Run it eagerly.

  Args:
    model: an nnx module (not itself an ``nnx.Linear``).
    masks: shaped like ``nnx.state(model, nnx.Param)`` (e.g.
      ``js.masks(optimizer.opt_state)``): bool for a sparse kernel, else
      ``None``; each mask must follow ``pattern``.
    pattern: ``js.NM(n, m)`` or ``js.Block(rows, cols)`` (static).
    impl: the ops' implementation (static; see :func:`sparse_inference`).

  Raises:
    ValueError: naming the leaf and the fix, when the masks do not match
      the model's params, a masked param is not an ``nnx.Linear`` kernel,
      or a mask does not fit ``pattern``.

  Examples:
    >>> import jax.numpy as jnp, jaxsparse as js
    >>> import jaxsparse.nn as jsnn
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden = nnx.Linear(8, 16, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.hidden(x)
    >>> model = MLP(nnx.Rngs(0))
    >>> mask = js.patterns.select(
    ...   js.NM(2, 4), jnp.abs(model.hidden.kernel[...]), 0.5)
    >>> jsnn.pack_nnx(model, {"hidden": {"kernel": mask, "bias": None}},
    ...   js.NM(2, 4))
    >>> type(model.hidden).__name__, model(jnp.ones((1, 8))).shape
    ('PackedLinear', (1, 16))
  """
  name = "js.nn.pack_nnx"
  _check_pattern(pattern, name)
  if isinstance(model, nnx.Linear):
    raise ValueError(
      f"{name}: the model is itself an nnx.Linear, which cannot be replaced "
      "in place; wrap it in a module, or build js.nn.PackedLinear."
      "from_linear(model, mask, pattern)."
    )
  params = _flat_paths(nnx.state(model, nnx.Param))
  found = _flat_paths(masks)
  if set(found) != set(params):
    missing = sorted(set(params) - set(found))
    extra = sorted(set(found) - set(params))
    raise ValueError(
      f"{name}: the mask tree does not match nnx.state(model, nnx.Param): "
      f"params without a mask entry {missing}, mask entries without a param "
      f"{extra}; build it with js.masks(optimizer.opt_state) or shaped like "
      "the model's params (None for dense ones)."
    )
  for path, m in found.items():
    if m is not None and jnp.shape(m) != jnp.shape(params[path]):
      raise ValueError(
        f"{path}: mask shape {jnp.shape(m)} does not fit the param's shape "
        f"{jnp.shape(params[path])}; the mask must have the param's shape."
      )
  swaps = []
  done = set()
  for module_path, module in nnx.iter_modules(model):
    path = "/".join(str(p) for p in (*module_path, "kernel"))
    if found.get(path) is None or not isinstance(module, nnx.Linear):
      continue
    new = PackedLinear.from_linear(
      module, found[path], pattern, impl=impl, path=path
    )
    swaps.append((module_path, new))
    done.add(path)
  for path, m in found.items():
    if m is not None and path not in done:
      raise ValueError(
        f"{path}: has a mask but is not the kernel of an nnx.Linear; only "
        "nnx.Linear kernels are packed: set its mask to None."
      )
  for module_path, new in swaps:
    parent = model
    for key in module_path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = module_path[-1]
    if isinstance(key, int):
      parent[key] = new
    else:
      setattr(parent, key, new)


__all__ = [
  "PackedKernel",
  "PackedLinear",
  "apply",
  "is_packed",
  "pack",
  "pack_leaf",
  "pack_nnx",
  "sparse_inference",
  "unpack",
  "unpack_leaf",
]
