"""nnx module swap: :func:`pack_nnx` replaces masked ``nnx.Linear`` layers.

A convenience for nnx models held as objects: each masked ``nnx.Linear``
becomes a :class:`PackedLinear` holding the packed kernel and the bias, so
``model(x)`` runs packed and ``nnx.state(model)`` checkpoints the packed
arrays. For any other model (or nnx through ``nnx.split``/``nnx.merge``),
:func:`jaxsparse.nn.apply` runs the unchanged model on packed params.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike

from jaxsparse import masking
from jaxsparse import patterns as patterns_lib
from jaxsparse.kernels import ops
from jaxsparse.kernels.packing import PackedBlock, PackedNM
from jaxsparse.nn.packing import check_pattern, pack_leaf
from jaxsparse.types import MaskTree


def _matmul(x: Array, packed: PackedNM | PackedBlock, impl: str) -> Array:
  return ops.sparse_matmul(x, packed, impl=impl)


def _cast(packed: PackedNM | PackedBlock, dtype: Any) -> Any:
  if isinstance(packed, PackedNM):
    return dataclasses.replace(packed, values=packed.values.astype(dtype))
  return dataclasses.replace(packed, blocks=packed.blocks.astype(dtype))


def _promote(
  promote_fn: Any, inputs: Any, kernel: Any, bias: Any, dtype: Any
) -> tuple[Array, PackedNM | PackedBlock, Array | None]:
  """The layer's own dtype promotion, with a scalar stand-in for the kernel."""
  proxy = jnp.zeros((), kernel.dtype)
  inputs, proxy, bias = promote_fn((inputs, proxy, bias), dtype=dtype)
  return inputs, _cast(kernel, proxy.dtype), bias


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
    check_pattern(pattern, "PackedLinear.from_linear")
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
  check_pattern(pattern, name)
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
