"""Origins and uses: how one eqn relabels or consumes a params leaf."""

from collections.abc import Sequence
from typing import Any, NamedTuple

from jax.extend import core

_RELABEL = frozenset(
  {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "reshard",
    "mesh_cast",
    "device_put",
    "stop_gradient",
  }
)
# Elementwise ops that keep a parameter's layout when every other operand is
# a scalar (``kernel * scale``).
_SCALAR_ARITHMETIC = frozenset({"mul", "div", "neg"})
# Elementwise ops that combine a parameter with activations.
_ELEMENTWISE = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "pow",
    "select_n",
    "neg",
    "exp",
    "log",
    "tanh",
    "logistic",
    "sqrt",
    "rsqrt",
    "abs",
    "sign",
    "square",
    "integer_pow",
    "clamp",
    "erf",
    "sin",
    "cos",
  }
)
# Call primitives whose inner jaxpr takes the eqn's inputs one to one.
_CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "remat2": "jaxpr",
  "checkpoint": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
}


class Origin(NamedTuple):
  """Where a traced value comes from: a view of one parameter leaf.

  Attributes:
    leaf: the index of the leaf among the params' leaves.
    axes: for each axis of the value, the leaf axes it spans, outer first
      (several when a reshape merged them; ``()`` for an inserted size-1
      axis).
    indexed: leaf axes a ``scan`` runs over (each iteration sees one slice:
      a stack of layers), outermost first.
    dropped: size-1 leaf axes squeezed away.
    scans: an id of each scan in ``indexed`` (kernels sliced by the same
      scan belong to the same layers).
  """

  leaf: int
  axes: tuple[tuple[int, ...], ...]
  indexed: tuple[int, ...] = ()
  dropped: tuple[int, ...] = ()
  scans: tuple[int, ...] = ()


class Use(NamedTuple):
  """How a parameter leaf is consumed at one place of the computation.

  Attributes:
    kind: ``"dot"``, ``"conv"``, ``"lookup"``, ``"elementwise"`` or
      ``"other"``.
    contract: leaf axes summed over (``dot``/``conv``), ascending.
    stack: leaf axes indexing separate matrices (scanned axes and
      ``dot_general`` batch axes), ascending.
    primitive: the consuming primitive's name.
    groups: ``feature_group_count`` of a grouped convolution (1 otherwise).
    scanned: the stack axes a ``scan`` runs over (a subset of ``stack``),
      outermost first.
    scans: an id of the scan running over each ``scanned`` axis.
  """

  kind: str
  contract: tuple[int, ...] = ()
  stack: tuple[int, ...] = ()
  primitive: str = ""
  groups: int = 1
  scanned: tuple[int, ...] = ()
  scans: tuple[int, ...] = ()


def origin_of_leaf(leaf: int, ndim: int) -> Origin:
  """The origin of a parameter leaf itself: each axis spans itself."""
  return Origin(leaf, tuple((a,) for a in range(ndim)))


def flat_axes(axes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
  return tuple(a for group in axes for a in group)


def transpose_origin(origin: Origin, permutation: Sequence[int]) -> Origin:
  return origin._replace(axes=tuple(origin.axes[p] for p in permutation))


def reshape_origin(
  origin: Origin,
  old: Sequence[int],
  new: Sequence[int],
  leaf_shape: Sequence[int],
) -> Origin | None:
  """The origin after ``reshape(old -> new)``, or ``None`` if a new axis
  would hold part of a leaf axis."""
  parts = [(a, leaf_shape[a]) for a in flat_axes(origin.axes)]
  axes: list[tuple[int, ...]] = []
  i = 0
  for size in new:
    group: list[int] = []
    product = 1
    while product < size and i < len(parts):
      product *= parts[i][1]
      group.append(parts[i][0])
      i += 1
    if product != size:
      return None
    axes.append(tuple(group))
  rest = parts[i:]
  if any(size != 1 for _, size in rest):
    return None
  if rest:  # trailing size-1 leaf axes join the last axis
    if not axes:
      dropped = tuple(a for a, _ in rest)
      return origin._replace(axes=(), dropped=origin.dropped + dropped)
    axes[-1] = axes[-1] + tuple(a for a, _ in rest)
  del old
  return origin._replace(axes=tuple(axes))


def squeeze_origin(origin: Origin, dimensions: Sequence[int]) -> Origin:
  gone = {d % len(origin.axes) for d in dimensions}
  dropped = flat_axes([origin.axes[d] for d in sorted(gone)])
  return origin._replace(
    axes=tuple(a for d, a in enumerate(origin.axes) if d not in gone),
    dropped=origin.dropped + dropped,
  )


def broadcast_origin(
  origin: Origin,
  operand_shape: Sequence[int],
  shape: Sequence[int],
  dimensions: Sequence[int],
) -> Origin | None:
  """``broadcast_in_dim`` that only inserts size-1 axes keeps the layout."""
  if any(operand_shape[i] != shape[d] for i, d in enumerate(dimensions)):
    return None
  if any(shape[d] != 1 for d in range(len(shape)) if d not in dimensions):
    return None
  axes: list[tuple[int, ...]] = [() for _ in shape]
  for i, d in enumerate(dimensions):
    axes[d] = origin.axes[i]
  return origin._replace(axes=tuple(axes))


def scanned_origin(origin: Origin, scan: int = 0) -> Origin:
  """The origin of one ``xs`` slice inside the body of scan ``scan``."""
  return origin._replace(
    axes=origin.axes[1:],
    indexed=origin.indexed + origin.axes[0],
    scans=origin.scans + (scan,) * len(origin.axes[0]),
  )


def _is_scalar(var: Any) -> bool:
  return len(getattr(var.aval, "shape", (None,))) == 0


def _stack(origin: Origin, batch: Sequence[int] = ()) -> tuple[int, ...]:
  extra = flat_axes([origin.axes[d] for d in batch])
  return tuple(sorted(origin.indexed + origin.dropped + extra))


def _dot_use(origin: Origin, contract: Sequence[int], batch: Sequence[int]):
  contract_axes = tuple(sorted(flat_axes([origin.axes[d] for d in contract])))
  return Use(
    "dot",
    contract_axes,
    _stack(origin, batch),
    "dot_general",
    scanned=origin.indexed,
    scans=origin.scans,
  )


def dot_operands(eqn: Any) -> list[tuple[int, tuple, tuple]]:
  """``(operand index, contracting dims, batch dims)`` of a ``dot_general``."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return [(0, tuple(lc), tuple(lb)), (1, tuple(rc), tuple(rb))]


def conv_kernel_dims(eqn: Any) -> tuple[int, int, tuple[int, ...]]:
  """``(out feature dim, in feature dim, spatial dims)`` of the conv kernel."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec
  return rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])


def propagate(
  eqn: Any, origins: Sequence[Origin | None], leaf_shapes: Sequence[tuple]
) -> tuple[list[Origin | None], list[tuple[int, Use]]]:
  """One first-order eqn: the origins of its outputs and the uses it makes.

  Call and control-flow primitives are handled by the callers (they
  recurse into the inner jaxprs).

  Returns:
    ``(out_origins, [(leaf, use), ...])``.
  """
  name = eqn.primitive.name
  tracked = [(i, o) for i, o in enumerate(origins) if o is not None]
  nouts = len(eqn.outvars)
  none = [None] * nouts
  if name in _RELABEL and len(origins) == 1:
    return [origins[0]], []
  if name == "optimization_barrier":
    return list(origins), []
  if name == "transpose":
    return [transpose_origin(origins[0], eqn.params["permutation"])], []
  if name == "reshape" and tracked[0][0] == 0:
    o = origins[0]
    new = reshape_origin(
      o,
      eqn.invars[0].aval.shape,
      eqn.outvars[0].aval.shape,
      leaf_shapes[o.leaf],
    )
    if new is not None:
      return [new], []
    return none, [(o.leaf, Use("other", primitive="reshape"))]
  if name == "squeeze":
    return [squeeze_origin(origins[0], eqn.params["dimensions"])], []
  if name == "broadcast_in_dim" and tracked[0][0] == 0:
    new = broadcast_origin(
      origins[0],
      eqn.invars[0].aval.shape,
      eqn.params["shape"],
      eqn.params["broadcast_dimensions"],
    )
    if new is not None:
      return [new], []
    return none, [(origins[0].leaf, Use("elementwise", primitive=name))]
  if (
    name in _SCALAR_ARITHMETIC
    and len(tracked) == 1
    and all(
      _is_scalar(v) for i, v in enumerate(eqn.invars) if i != tracked[0][0]
    )
    and (name != "div" or tracked[0][0] == 0)
  ):
    return [tracked[0][1]], []
  if name == "dot_general":
    if len(tracked) == 2:
      use = Use("other", primitive="dot_general (two params)")
      return none, [(o.leaf, use) for _, o in tracked]
    i, o = tracked[0]
    _, contract, batch = dot_operands(eqn)[i]
    return none, [(o.leaf, _dot_use(o, contract, batch))]
  if name == "conv_general_dilated":
    uses = []
    for i, o in tracked:
      if i != 1:
        uses.append((o.leaf, Use("other", primitive=name)))
        continue
      _, in_dim, spatial = conv_kernel_dims(eqn)
      axes = flat_axes([o.axes[d] for d in (in_dim, *spatial)])
      contract = tuple(sorted(axes))
      groups = eqn.params["feature_group_count"] * max(
        1, eqn.params.get("batch_group_count", 1)
      )
      use = Use("conv", contract, _stack(o), name, groups, o.indexed, o.scans)
      uses.append((o.leaf, use))
    return none, uses
  if name == "gather":
    uses = []
    for i, o in tracked:
      kind = "lookup" if i == 0 else "other"
      uses.append((o.leaf, Use(kind, primitive=name)))
    return none, uses
  kind = "elementwise" if name in _ELEMENTWISE else "other"
  return none, [(o.leaf, Use(kind, primitive=name)) for _, o in tracked]


def closed_jaxpr(jaxpr: Any) -> tuple[Any, Sequence[Any]]:
  """``(Jaxpr, consts)`` of a ``Jaxpr`` or ``ClosedJaxpr``."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def call_jaxpr(eqn: Any) -> Any | None:
  """The inner jaxpr of a call primitive, or ``None``."""
  key = _CALLS.get(eqn.primitive.name)
  return None if key is None else eqn.params.get(key)
