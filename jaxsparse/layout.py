"""Kernel layouts: which axes of a parameter the model contracts.

A weight the model multiplies by is, per layer, a matrix ``W: [K, N]``: ``K``
inputs (the axes the matmul or convolution sums over, its *contraction
axes*) by ``N`` outputs. Its leaf may hold it in another shape: a
``DenseGeneral`` query kernel ``[embed, heads, head_dim]`` contracts
``embed``; an attention output kernel ``[heads, head_dim, embed]`` contracts
``heads`` and ``head_dim``; Hugging Face's ``Conv1D`` stores ``[out, in]``; a
convolution ``[*window, in, out]`` contracts the window and ``in``; a
scanned stack of layers ``[layers, in, out]`` holds one matrix per layer,
and an ``Einsum`` with a batch axis (experts) one per batch entry.

A :class:`Layout` says which leaf axes are contracted and which index
separate matrices (*stack* axes); the rest are outputs. Every sparsity
pattern acts on the matrices of this view: N:M groups run along ``K``,
blocks tile ``[K, N]``, channels are columns, counts are exact per matrix,
and allocations treat each matrix as a layer. Training, one-shot pruning,
:func:`jaxsparse.summary` and packing all use the same view, so their masks
agree.

Layouts come from the model, by tracing it (:func:`find_kernels`, which
follows each parameter to the ``dot_general``/``conv`` consuming it, see
:mod:`jaxsparse.tracing`), or, without a model, from Flax's convention
``[..., in, out]`` (:func:`default_layout`): every axis but the last is
contracted, which is right for ``Dense`` and ``Conv`` kernels.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import ArrayLike

from jaxsparse import tracing
from jaxsparse.paths import path_str
from jaxsparse.patterns import explicit_sharding


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the model multiplies by a kernel leaf.

  Attributes:
    contract: leaf axes the matmul/convolution sums over (ascending): the
      rows ``K`` of each matrix, flattened in leaf order.
    stack: leaf axes that index separate matrices (ascending): a scanned
      stack's layer axis, an ``Einsum``'s batch axis.
    kind: ``"dot"`` or ``"conv"``.

  The remaining axes are the outputs ``N`` (flattened in leaf order).
  """

  contract: tuple[int, ...]
  stack: tuple[int, ...] = ()
  kind: str = "dot"

  def outputs(self, ndim: int) -> tuple[int, ...]:
    """The output axes of a leaf with ``ndim`` axes."""
    used = set(self.contract) | set(self.stack)
    return tuple(a for a in range(ndim) if a not in used)

  def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
    """``(K, N)`` of each matrix of a leaf of this ``shape``."""
    k = math.prod(shape[a] for a in self.contract)
    n = math.prod(shape[a] for a in self.outputs(len(shape)))
    return k, n

  def num_matrices(self, shape: Sequence[int]) -> int:
    return math.prod(shape[a] for a in self.stack)

  def slice_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The leaf's shape without its stack axes (one layer's kernel)."""
    return tuple(s for a, s in enumerate(shape) if a not in self.stack)

  def describe(self, shape: Sequence[int]) -> str:
    k, n = self.matrix_shape(shape)
    stack = f"{self.num_matrices(shape)} x " if self.stack else ""
    return f"{stack}[K={k}, N={n}]"

  def is_plain(self, ndim: int) -> bool:
    """Whether the leaf is already its one matrix ``[K, N]``."""
    return ndim == 2 and self.contract == (0,) and not self.stack


def default_layout(shape: Sequence[int]) -> Layout:
  """Flax's ``[..., in, out]``: every axis but the last is contracted.

  Right for ``Dense`` ``[in, out]`` and ``Conv`` ``[*window, in, out]``
  kernels; a kernel used otherwise (``DenseGeneral``, ``Einsum``, scanned
  stacks, transposed storage) needs its layout from the model
  (:func:`find_kernels`).
  """
  return Layout(tuple(range(max(len(shape) - 1, 0))))


def check_layout(layout: Layout, shape: Sequence[int], path: str) -> None:
  """Raises ``ValueError`` naming ``path`` if ``layout`` does not fit."""
  axes = (*layout.contract, *layout.stack)
  ndim = len(shape)
  if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
    raise ValueError(
      f"{path}: {layout} does not fit a leaf of shape {tuple(shape)} (axes "
      "must be distinct and within the leaf's axes)."
    )


def _order(layout: Layout, ndim: int) -> tuple[int, ...]:
  return (*layout.stack, *layout.contract, *layout.outputs(ndim))


def to_matrices(x: ArrayLike, layout: Layout) -> ArrayLike:
  """The leaf as its matrices ``[S, K, N]`` (``S`` = number of matrices);
  a NumPy array stays one."""
  order = _order(layout, x.ndim)
  k, n = layout.matrix_shape(x.shape)
  moved = x if order == tuple(range(x.ndim)) else x.transpose(order)
  return moved.reshape(layout.num_matrices(x.shape), k, n)


def from_matrices(
  m: ArrayLike, layout: Layout, shape: Sequence[int]
) -> ArrayLike:
  """Inverse of :func:`to_matrices` for a leaf of ``shape``."""
  order = _order(layout, len(shape))
  moved = m.reshape([shape[a] for a in order])
  inverse = [0] * len(order)
  for i, a in enumerate(order):
    inverse[a] = i
  if tuple(inverse) == tuple(range(len(shape))):
    return moved
  return moved.transpose(inverse)


def on_matrices(fn: Callable[..., Any], layout: Layout, *leaves: jax.Array):
  """``fn`` applied to each matrix ``[K, N]`` of the leaves, as leaves.

  ``fn(*matrices)`` returns one ``[K, N]`` array or a tuple of them; with
  stack axes it is vmapped over them, so counts are exact per layer. A leaf
  that already is its matrix is passed as it is (no reshape, sharding
  untouched).
  """
  shape = leaves[0].shape
  if layout.is_plain(len(shape)):
    return fn(*leaves)
  # Reshaping merges axes, which Explicit mesh axes do not allow in general:
  # the (amortised) mask update gathers the leaf, as structured selection
  # does, and the result is resharded like the leaf.
  sharding = explicit_sharding(leaves[0])
  if sharding is not None:
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    leaves = tuple(
      jax.sharding.reshard(x, replicated) if explicit_sharding(x) else x
      for x in leaves
    )
  views = [to_matrices(x, layout) for x in leaves]
  if layout.stack:
    out = jax.vmap(fn)(*views)
  else:
    out = jax.tree.map(lambda o: o[None], fn(*[v[0] for v in views]))
  out = jax.tree.map(lambda o: from_matrices(o, layout, shape), out)
  if sharding is not None:
    out = jax.tree.map(lambda o: jax.sharding.reshard(o, sharding), out)
  return out


class Kernel(NamedTuple):
  """What :func:`find_kernels` found out about one params leaf.

  Attributes:
    path: the leaf's ``a/b/kernel`` path.
    shape: its shape.
    role: ``"kernel"`` (a matmul or convolution operand), ``"embedding"``
      (a lookup table, tied or not), ``"dense"`` (combined with activations
      elementwise: biases, norm scales, position tables), ``"unused"``, or
      ``"other"`` (see ``reason``).
    layout: the :class:`Layout` of a kernel, else ``None``.
    uses: every :class:`jaxsparse.tracing.Use` of the leaf.
    reason: why a leaf that reaches a matmul is not a kernel.
  """

  path: str
  shape: tuple[int, ...]
  role: str
  layout: Layout | None
  uses: tuple[tracing.Use, ...]
  reason: str = ""


def classify(
  path: str, shape: tuple[int, ...], uses: Sequence[tracing.Use]
) -> Kernel:
  """The role and layout of one leaf from its uses."""
  uses = tuple(uses)
  kinds = {u.kind for u in uses}
  if not uses:
    return Kernel(path, shape, "unused", None, uses)
  if "lookup" in kinds:
    return Kernel(path, shape, "embedding", None, uses)
  products = [u for u in uses if u.kind in ("dot", "conv")]
  if not products:
    role = "other" if "other" in kinds else "dense"
    others = sorted({u.primitive for u in uses if u.kind == "other"})
    reason = f"consumed by {', '.join(others)}" if others else ""
    return Kernel(path, shape, role, None, uses, reason)
  layouts = {Layout(u.contract, u.stack, u.kind) for u in products}
  if len(layouts) > 1:
    reason = "multiplied with different contraction axes: " + "; ".join(
      f"contract {lay.contract}, stack {lay.stack}"
      for lay in sorted(layouts, key=lambda lay: (lay.contract, lay.stack))
    )
    return Kernel(path, shape, "other", None, uses, reason)
  (found,) = layouts
  if not found.contract:
    reason = "multiplied without contracting any of its axes"
    return Kernel(path, shape, "other", None, uses, reason)
  if len(found.contract) + len(found.stack) == len(shape):
    reason = "contracted over every axis (it produces no output axis)"
    return Kernel(path, shape, "other", None, uses, reason)
  return Kernel(path, shape, "kernel", found, uses)


class Kernels(Mapping):
  """The params' leaves, by path, as :func:`find_kernels` found them.

  A ``Kernels`` is a valid ``where=`` for every method: it selects the
  leaves whose role is ``"kernel"`` (minus :meth:`exclude`'d ones) and gives
  each its :class:`Layout`. ``print(kernels)`` shows the table.
  """

  def __init__(
    self, records: Mapping[str, Kernel], excluded: frozenset[str] = frozenset()
  ):
    self._records = dict(records)
    self.excluded = frozenset(excluded)

  def __getitem__(self, path: str) -> Kernel:
    return self._records[path]

  def __iter__(self) -> Iterator[str]:
    return iter(self._records)

  def __len__(self) -> int:
    return len(self._records)

  def __hash__(self) -> int:
    return hash((tuple(self._records.items()), self.excluded))

  def __eq__(self, other: object) -> bool:
    return (
      isinstance(other, Kernels)
      and self._records == other._records
      and self.excluded == other.excluded
    )

  @property
  def selected(self) -> tuple[str, ...]:
    """Paths of the kernels a method sparsifies."""
    return tuple(
      p
      for p, r in self._records.items()
      if r.role == "kernel" and p not in self.excluded
    )

  def layout(self, path: str) -> Layout | None:
    """The layout of ``path`` (``None`` where it is not a kernel)."""
    record = self._records.get(path)
    return None if record is None else record.layout

  def exclude(self, *regexes: str) -> "Kernels":
    """The same kernels, those matching any regex (``re.search`` on the
    path) kept dense. Each regex must match a kernel."""
    chosen = set(self.excluded)
    kernels = [p for p, r in self._records.items() if r.role == "kernel"]
    for regex in regexes:
      hits = [p for p in kernels if re.search(regex, p)]
      if not hits:
        raise ValueError(
          f"Kernels.exclude: {regex!r} matches no kernel; the kernels are "
          f"{kernels}."
        )
      chosen.update(hits)
    return Kernels(self._records, frozenset(chosen))

  def with_layouts(self, layouts: Mapping[str, Layout]) -> "Kernels":
    """The same kernels, with the given leaves made kernels of the given
    layouts (a layout stated by hand, where tracing cannot see it)."""
    records = dict(self._records)
    for path, lay in layouts.items():
      if path not in records:
        raise ValueError(
          f"Kernels.with_layouts: {path!r} is not a params path; the paths "
          f"are {list(records)[:10]}..."
        )
      record = records[path]
      check_layout(lay, record.shape, path)
      records[path] = record._replace(role="kernel", layout=lay, reason="")
    return Kernels(records, self.excluded)

  @classmethod
  def guess(cls, params: Any) -> "Kernels":
    """Kernels from names and shapes alone (no model): the leaves
    :func:`jaxsparse.default_where` selects, each ``[..., in, out]``
    (:func:`default_layout`). Correct layouts by hand with
    :meth:`with_layouts`; prefer :func:`find_kernels` when the model can be
    traced."""
    from jaxsparse.masking import default_where  # noqa: PLC0415

    rule = default_where()
    records = {}
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      path, shape = path_str(key), tuple(leaf.shape)
      chosen = rule(path, leaf)
      records[path] = Kernel(
        path,
        shape,
        "kernel" if chosen else "dense",
        default_layout(shape) if chosen else None,
        (),
      )
    return cls(records)

  def __call__(self, path: str, leaf: Any) -> bool:
    """As a ``where`` predicate: whether ``path`` is a selected kernel."""
    del leaf
    return path in self.selected

  def __repr__(self) -> str:
    header = ("path", "shape", "role", "contract", "stack", "matrices")
    rows = []
    for p, r in self._records.items():
      lay = r.layout
      role = r.role + (" (excluded)" if p in self.excluded else "")
      rows.append(
        (
          p,
          "x".join(map(str, r.shape)) or "()",
          role,
          "" if lay is None else str(lay.contract),
          "" if lay is None or not lay.stack else str(lay.stack),
          r.reason if lay is None else lay.describe(r.shape),
        )
      )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(6)]
    line = lambda row: "  ".join(
      c.ljust(w) for c, w in zip(row, widths)
    ).rstrip()
    return "\n".join([line(header), *map(line, rows)])


def find_kernels(
  apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> Kernels:
  """Finds the model's kernels and their layouts by tracing it.

  Traces ``apply_fn(params, *args, **kwargs)`` (abstractly: nothing is
  computed; ``kwargs`` are passed as they are) and follows every params
  leaf to where it is consumed (:mod:`jaxsparse.tracing`). A leaf consumed
  by ``dot_general`` or ``conv_general_dilated`` with the same contraction
  axes everywhere is a kernel; a leaf read by a ``gather`` anywhere (an
  embedding, also when tied to an output projection) is not; nor are
  biases, norm scales and position tables, which are combined with
  activations elementwise.

  Args:
    apply_fn: the model as a function of the params, e.g. ``lambda p, x:
      model.apply({"params": p}, x)`` (linen), ``lambda s, x:
      nnx.merge(graphdef, s)(x)`` (nnx), ``lambda p, x: hf_model(x,
      params=p).logits`` (Hugging Face Flax).
    params: the params tree the optimizer sees (arrays or
      ``ShapeDtypeStruct``s).
    *args: example inputs (arrays or ``ShapeDtypeStruct``s; only shapes and
      dtypes are read).
    **kwargs: static keyword arguments for ``apply_fn``.

  Returns:
    :class:`Kernels`, usable as ``where=``.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxsparse as js
    >>> model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    >>> x = jnp.ones((1, 3, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> kernels = js.find_kernels(
    ...   lambda p, x: model.apply({"params": p}, x), params, x)
    >>> kernels["query/kernel"].layout.contract  # [embed, heads, head_dim]
    (0,)
    >>> kernels["out/kernel"].layout.contract  # [heads, head_dim, embed]
    (0, 1)
  """
  traced = tracing.trace(apply_fn, params, *args, **kwargs)
  uses = tracing.param_uses(traced)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  records = {}
  for i, (key, _) in enumerate(flat):
    path = path_str(key)
    records[path] = classify(path, traced.leaf_shapes[i], uses.get(i, ()))
  return Kernels(records)


def leaf_layout(where: Any, path: str, shape: Sequence[int]) -> Layout:
  """The layout of a selected leaf: from ``where`` if it is a
  :class:`Kernels` that knows it, else :func:`default_layout`."""
  if isinstance(where, Kernels):
    found = where.layout(path)
    if found is not None:
      return found
  return default_layout(shape)
