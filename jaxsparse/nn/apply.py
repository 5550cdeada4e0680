"""Running an unchanged model on packed kernels: :func:`apply`.

The model ``apply_fn(params, *args)`` is traced with the dense shapes of the
packed kernels, and its computation is evaluated by a
:class:`jaxsparse.tracing.Interpreter`: a packed kernel stays packed through
the layout ops that only relabel it (casts, transposes, reshapes, scans over
its stack of layers), and the ``dot_general`` that consumes it runs as a
structured-sparse matmul (:func:`jaxsparse.kernels.sparse_matmul`) on the
kernel's matrices ``[K, N]``. Everything else runs as written. No module
class is intercepted, so linen, nnx, Hugging Face Flax, ``Einsum`` and
scanned models run alike, with whatever collections or outputs their
``apply_fn`` has (``batch_stats``, a decoding ``cache``, ``mutable=``).

For a kernel ``W`` with mask ``M`` the packed model computes the masked
dense model, ``x @ where(M, W, 0)``, in the dtypes the model's own casts
give; the ops accumulate in float32 and the layer's ``precision`` is not
passed on.

Not supported (a ``ValueError`` naming the kernel and the primitive): a
packed kernel consumed by anything but a ``dot_general`` (a convolution,
elementwise arithmetic on the weights, a ``gather``), multiplied with
another contraction than it was packed for, or carried through a loop as
state.
"""

import dataclasses
import sys
from typing import Any

import jax

from jaxsparse import layout as layout_lib
from jaxsparse import tracing
from jaxsparse.kernels import ops, packing
from jaxsparse.nn.packing import PackedKernel, is_packed, unpack_matrices
from jaxsparse.paths import leaf_paths

# Ops that relabel a packed kernel without computing on its values.
_PURE = frozenset(
  {
    "convert_element_type",
    "copy",
    "copy_p",
    "transpose",
    "reshape",
    "squeeze",
    "broadcast_in_dim",
    "sharding_constraint",
    "reshard",
    "mesh_cast",
    "device_put",
    "stop_gradient",
    "optimization_barrier",
  }
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Deferred:
  """A packed kernel (or one slice of a stacked one) inside the computation.

  Attributes:
    packed: the packed matrices; leading axes: the stack axes not yet
      taken by a scan.
    dtype: the dtype the computation has cast the kernel to (static).
    path: the kernel's params path (static).
    shape: the kernel's own shape (static).
    layout: its layout (static).
  """

  packed: Any
  dtype: Any = packing.static_field()
  path: str = packing.static_field()
  shape: tuple[int, ...] = packing.static_field()
  layout: layout_lib.Layout = packing.static_field()


def _deferred(path: str, leaf: Any) -> Deferred:
  if isinstance(leaf, PackedKernel):
    return Deferred(leaf.packed, leaf.dtype, path, leaf.shape, leaf.layout)
  k, n = leaf.shape
  return Deferred(leaf, leaf.dtype, path, (k, n), layout_lib.Layout((0,)))


def _cast(packed: Any, dtype: Any) -> Any:
  if packed.dtype == dtype:
    return packed
  if isinstance(packed, packing.PackedNM):
    return dataclasses.replace(packed, values=packed.values.astype(dtype))
  return dataclasses.replace(packed, blocks=packed.blocks.astype(dtype))


class PackedHooks(tracing.Hooks):
  """Interpreter hooks running packed kernels as structured-sparse matmuls."""

  def __init__(self, impl: str):
    self.impl = impl

  def _refuse(self, value: Deferred, what: str) -> None:
    raise ValueError(
      f"js.nn.apply: {value.path} is packed but the model consumes it by "
      f"{what}, which packed kernels do not run; set its mask to None when "
      "packing (keep it masked dense)."
    )

  def consume(self, eqn, values, origins, uses, collect):
    del collect
    packed = [i for i, v in enumerate(values) if isinstance(v, Deferred)]
    if not packed:
      return None
    (index, *more) = packed
    value, origin = values[index], origins[index]
    name = eqn.primitive.name
    if name != "dot_general" or more or origins[1 - index] is not None:
      self._refuse(
        value,
        name if name != "dot_general" else "a product with another parameter",
      )
    (leaf_use,) = [u for leaf, u in uses if leaf == origin.leaf]
    expected = value.layout
    if leaf_use.contract != expected.contract or leaf_use.stack != tuple(
      sorted(expected.stack)
    ):
      raise ValueError(
        f"js.nn.apply: {value.path} was packed with contraction axes "
        f"{expected.contract} (stack {expected.stack}) but the model "
        f"contracts {leaf_use.contract} (stack {leaf_use.stack}); pack it "
        "with kernels=js.find_kernels(apply_fn, params, x)."
      )
    rows, batch = tracing.dot_rows(eqn, values, origin, index, value.shape)
    matrices = _cast(value.packed, value.dtype)
    matmul = lambda x, p: ops.sparse_matmul(x, p, impl=self.impl)
    for _ in batch:
      matmul = jax.vmap(matmul)
    x = rows.astype(value.dtype) if rows.dtype != value.dtype else rows
    y = matmul(x, matrices)
    out = tracing.dot_output(
      y, eqn, origin, index, value.shape, expected.outputs(len(value.shape))
    )
    return [out.astype(eqn.outvars[0].aval.dtype)]

  def relabel(self, eqn, values, out):
    if not any(isinstance(v, Deferred) for v in values):
      return None
    if eqn.primitive.name not in _PURE:
      return None  # materialize() refuses it with the primitive's name
    result = []
    for var, value in zip(eqn.outvars, values):
      if isinstance(value, Deferred):
        value = dataclasses.replace(value, dtype=var.aval.dtype)
      result.append(value)
    return result

  def materialize(self, value: Any) -> Any:
    if isinstance(value, Deferred):
      self._refuse(value, "an operation that is not a matmul")
    return value

  def output(self, value: Any, origin: tracing.Origin | None) -> Any:
    """A packed kernel the model returns (e.g. nnx state) comes back dense."""
    if not isinstance(value, Deferred):
      return value
    dense = unpack_matrices(value.packed)
    flat = dense.reshape(-1, *dense.shape[-2:])
    full = layout_lib.from_matrices(flat, value.layout, value.shape)
    return tracing.leaf_view(full, origin).astype(value.dtype)

  def scan_input(self, value: Any, origin: tracing.Origin) -> Any:
    if isinstance(value, Deferred):
      remaining = [a for a in value.layout.stack if a not in origin.indexed]
      if not remaining or origin.axes[0] != (remaining[0],):
        self._refuse(value, "a scan over an axis that is not its stack axis")
    return value


def _is_linen_module(x: Any) -> bool:
  linen = sys.modules.get("flax.linen")
  return linen is not None and isinstance(x, linen.Module)


def apply(
  model: Any,
  packed_params: Any,
  *args: Any,
  impl: str = "auto",
  variables: dict[str, Any] | None = None,
  **kwargs: Any,
) -> Any:
  """Runs the unchanged ``model`` with packed kernels.

  Args:
    model: ``apply_fn(params, *args, **kwargs)`` (any JAX function of the
      params: ``lambda p, x: nnx.merge(graphdef, p)(x)``, ``lambda p, x:
      hf_model(x, params=p).logits``, ...), or a linen module, run as
      ``model.apply({"params": params, **variables}, *args, **kwargs)``.
    packed_params: the output of :func:`jaxsparse.nn.pack`.
    *args: the model's inputs.
    impl: the ops' implementation (``"auto"``, ``"pallas"``,
      ``"reference"``, ``"dense"``; static).
    variables: a linen model's other collections (``batch_stats``,
      ``cache``).
    **kwargs: passed to the model as they are (static), e.g. ``train=False``
      or ``mutable=["cache"]``.

  Returns:
    The model's output, equal to its output on the masked dense params
    ``js.apply_masks(params, masks)`` up to the summation order. Jittable.

  Raises:
    ValueError: naming the kernel, where the model consumes a packed
      kernel other than by a matmul along the contraction it was packed
      for.

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
  if _is_linen_module(model):
    module, others = model, dict(variables or {})

    def apply_fn(params, *args, **kwargs):
      return module.apply({"params": params, **others}, *args, **kwargs)

  elif variables is not None:
    raise ValueError(
      "js.nn.apply: variables= is for linen modules; close over the other "
      "collections in apply_fn instead."
    )
  else:
    apply_fn = model
  leaves, treedef = jax.tree.flatten(packed_params, is_leaf=is_packed)
  dense_shapes = [
    jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_packed(leaf) else leaf
    for leaf in leaves
  ]
  traced = tracing.trace(
    apply_fn, jax.tree.unflatten(treedef, dense_shapes), *args, **kwargs
  )
  paths = leaf_paths(jax.tree.unflatten(treedef, dense_shapes))
  values = [
    _deferred(path, leaf) if is_packed(leaf) else leaf
    for path, leaf in zip(paths, leaves)
  ]
  origins = [
    tracing.origin_of_leaf(i, len(s)) if is_packed(leaves[i]) else None
    for i, s in enumerate(traced.leaf_shapes)
  ]
  inputs = jax.tree.leaves(args)
  interpreter = tracing.Interpreter(traced.leaf_shapes, PackedHooks(impl))
  outs, out_origins = interpreter.run(
    traced.jaxpr.jaxpr,
    traced.jaxpr.consts,
    [*values, *inputs],
    [*origins, *[None] * len(inputs)],
    {},
  )
  outs = [
    interpreter.hooks.output(out, origin)
    for out, origin in zip(outs, out_origins)
  ]
  return jax.tree.unflatten(traced.out_tree, outs)
