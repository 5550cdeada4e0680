"""Partition rules: params -> ``NamedSharding``s -> masks and optimizer state.

A *rule set* is a sequence of ``(regex, spec)`` pairs. Each param's key path
is normalised to ``a/b/kernel`` (:func:`jaxsparse.masking.path_str`); the
first rule whose regex ``re.search``-matches the path gives its spec, and an
unmatched param is replicated (or an error with ``strict=True``). A spec is a
``PartitionSpec`` (checked: every sharded dimension must divide by its mesh
axes' size) or a callable ``(shape, mesh) -> PartitionSpec`` that picks one
per shape (:class:`ShardLargest`, :class:`ShardDim`).

Optimizer state gets its shardings from the params': every state leaf whose
key path ends with a param's key path and whose shape is that param's (masks,
Adam moments, the dense weights that straight-through methods keep) takes
that param's sharding; everything else (counts, PRNG keys, scalars) is
replicated. The rule, for a state leaf ``s`` at path ``q``::

  sharding(s) = sharding(p)  if q ends with path(p) and shape(s) == shape(p)
                replicated   otherwise

Presets: :func:`data_parallel` (all replicated; the batch is split),
:func:`fsdp` (ZeRO-3 style: each param's largest divisible dimension is
split over the data axis; Rajbhandari et al, `ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models
<https://arxiv.org/abs/1910.02054>`_, 2020) and :func:`tensor_parallel`
(kernels and biases split on their output axis over ``model``; Shoeybi et
al, `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019).
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse.masking import path_str

SpecFn = Callable[[tuple[int, ...], Mesh], P]
Rules = Sequence[tuple[str, P | SpecFn]]


def _mesh_axis_size(mesh: Mesh, axis: str, rule: str) -> int:
  if axis not in mesh.shape:
    raise ValueError(
      f"{rule} shards over mesh axis {axis!r}, but the mesh has axes "
      f"{tuple(mesh.axis_names)}; add the axis to the mesh (e.g. "
      f"jax.make_mesh((2, 4), ('data', {axis!r}))) or pass axis= one of them."
    )
  return mesh.shape[axis]


class ShardLargest(NamedTuple):
  """Splits the largest dimension that divides by ``axis``'s size.

  Ties go to the earlier dimension; a param with no such dimension (or
  fewer than ``min_size`` elements) is replicated.

  Attributes:
    axis: mesh axis name.
    min_size: params smaller than this stay replicated.
  """

  axis: str = "data"
  min_size: int = 0

  def __call__(self, shape: tuple[int, ...], mesh: Mesh) -> P:
    size = _mesh_axis_size(mesh, self.axis, repr(self))
    if math.prod(shape) < self.min_size:
      return P()
    fits = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not fits:
      return P()
    best = max(fits, key=lambda i: (shape[i], -i))
    return P(*[self.axis if i == best else None for i in range(len(shape))])


class ShardDim(NamedTuple):
  """Splits dimension ``dim`` over ``axis`` where it divides, else replicates.

  Attributes:
    dim: the dimension (negative counts from the end).
    axis: mesh axis name.
  """

  dim: int = -1
  axis: str = "model"

  def __call__(self, shape: tuple[int, ...], mesh: Mesh) -> P:
    size = _mesh_axis_size(mesh, self.axis, repr(self))
    if not shape or shape[self.dim] % size:
      return P()
    dim = self.dim % len(shape)
    return P(*[self.axis if i == dim else None for i in range(len(shape))])


def data_parallel() -> tuple[tuple[str, P], ...]:
  """Every param replicated (the batch is split over the data axis)."""
  return ((r".*", P()),)


def fsdp(axis: str = "data", min_size: int = 0) -> tuple:
  """Every param split on its largest dimension divisible by ``axis``.

  Args:
    axis: mesh axis the params (and the batch) are split over.
    min_size: params with fewer elements stay replicated.
  """
  return ((r".*", ShardLargest(axis, min_size)),)


def tensor_parallel(axis: str = "model") -> tuple:
  """Kernels and biases split on their last (output) axis over ``axis``.

  A Flax ``Dense`` kernel is ``[in, out]`` and a ``Conv`` kernel
  ``[..., in, out]``: both are split on ``out``, as is the bias ``[out]``,
  wherever ``out`` divides by the axis size (others are replicated). Other
  params (norm scales, embeddings) are replicated.

  Args:
    axis: mesh axis of the model split; a data axis may sit beside it.
  """
  return (
    (r"(^|/)(kernel|bias)$", ShardDim(-1, axis)),
    (r".*", P()),
  )


PRESETS = {
  "data_parallel": data_parallel,
  "fsdp": fsdp,
  "tensor_parallel": tensor_parallel,
}


def _axis_size(mesh: Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def check_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``spec`` fits ``shape``."""
  if len(spec) > len(shape):
    raise ValueError(
      f"{name}: spec {spec} has {len(spec)} entries but the param has shape "
      f"{shape}; give at most {len(shape)} entries (None = not split)."
    )
  for dim, entry in zip(shape, spec):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    for n in names:
      if n not in mesh.shape:
        raise ValueError(
          f"{name}: spec {spec} names mesh axis {n!r}, but the mesh has axes "
          f"{tuple(mesh.axis_names)}; fix the rule or the mesh axes."
        )
    if dim % _axis_size(mesh, entry):
      raise ValueError(
        f"{name}: dimension {dim} of shape {shape} does not divide by the "
        f"size {_axis_size(mesh, entry)} of mesh axis {entry!r} in spec "
        f"{spec}; replicate that dimension (None), pick a mesh size that "
        "divides it, or use a rule that checks divisibility (fsdp, "
        "tensor_parallel)."
      )


def param_specs(
  params: Any, mesh: Mesh, rules: Rules, strict: bool = False
) -> Any:
  """The ``PartitionSpec`` of each param (a tree like ``params``).

  Args:
    params: arrays or ``jax.ShapeDtypeStruct``s (only shapes are read).
    mesh: the mesh the specs refer to.
    rules: ``(regex, spec)`` pairs, first match wins; a spec is a
      ``PartitionSpec`` or a ``(shape, mesh) -> PartitionSpec`` callable.
    strict: an unmatched param is an error instead of replicated.

  Returns:
    A tree of ``PartitionSpec`` with the params' structure.

  Raises:
    ValueError: a spec does not divide its param's shape, names an axis the
      mesh lacks, or (``strict``) no rule matches a param.
  """
  compiled = [(re.compile(regex), spec) for regex, spec in rules]

  def spec_of(path, leaf):
    name = path_str(path)
    shape = tuple(leaf.shape)
    for regex, spec in compiled:
      if regex.search(name):
        chosen = spec(shape, mesh) if callable(spec) else spec
        check_spec(chosen, shape, mesh, name)
        return chosen
    if strict:
      raise ValueError(
        f"{name}: no partition rule matches this param (shape {shape}); add "
        "a rule for it, e.g. (r'.*', PartitionSpec()) to replicate the rest."
      )
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, params)


def param_shardings(
  params: Any, mesh: Mesh, rules: Rules, strict: bool = False
) -> Any:
  """A ``NamedSharding`` per param, from :func:`param_specs`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ("data",))
    >>> params = {"w": jnp.zeros((3, 2 * n)), "b": jnp.zeros(3)}
    >>> rules = [(r"w$", P(None, "data")), (r".*", P())]
    >>> s = param_shardings(params, mesh, rules)
    >>> s["w"].spec, s["b"].spec
    (P(None, 'data'), P())
  """
  specs = param_specs(params, mesh, rules, strict)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )


def state_shardings(tx: Any, params: Any, shardings: Any) -> Any:
  """Shardings of ``tx``'s state that match the params' shardings.

  ``jax.eval_shape(tx.init, params)`` gives the state's shapes; a state
  leaf takes the sharding of the param whose key path ends its own and whose
  shape it has (masks, moments, kept dense weights), any other leaf is
  replicated on the params' mesh.

  Args:
    tx: an optax transformation (anything with ``init``).
    params: arrays or ``jax.ShapeDtypeStruct``s.
    shardings: a ``NamedSharding`` per param (:func:`param_shardings`).

  Returns:
    A tree of ``NamedSharding`` with the state's structure.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )
  if len(flat) != len(flat_shardings):
    raise ValueError(
      f"state_shardings: {len(flat)} params but {len(flat_shardings)} "
      "shardings; pass param_shardings(params, ...) for the same params."
    )
  if not flat_shardings:
    raise ValueError("state_shardings: params has no array leaves.")
  mesh = flat_shardings[0].mesh
  replicated = NamedSharding(mesh, P())
  by_path = [
    (tuple(path), tuple(leaf.shape), s)
    for (path, leaf), s in zip(flat, flat_shardings)
  ]
  # Longest paths first, so ``a/b/kernel`` wins over a shorter suffix.
  by_path.sort(key=lambda item: -len(item[0]))
  state_shapes = jax.eval_shape(tx.init, params)

  def sharding_of(path, leaf):
    path = tuple(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for param_path, param_shape, s in by_path:
      n = len(param_path)
      if (
        shape == param_shape
        and len(path) >= n
        and path_str(path[len(path) - n :]) == path_str(param_path)
      ):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, state_shapes)


def spec_table(shardings: Any) -> str:
  """``path: spec`` lines, one per leaf (for logs and docs)."""
  flat = jax.tree_util.tree_flatten_with_path(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )[0]
  return "\n".join(f"{path_str(p)}: {s.spec}" for p, s in flat)
