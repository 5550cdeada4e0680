"""Following parameters through a model's traced computation (its jaxpr).

A model is a function ``apply_fn(params, *inputs)``. Tracing it with
:func:`jax.make_jaxpr` gives every operation it performs, whatever library
wrote it (linen, nnx, Hugging Face Flax, hand-written ``jnp``). This module
follows each parameter leaf from the jaxpr's inputs to the operations that
consume it, through the operations that only relabel its axes:

* layout ops: ``convert_element_type``, ``transpose``, ``reshape`` (merging
  or splitting whole axes), ``squeeze``/``broadcast_in_dim`` of size-1
  axes, sharding annotations, scaling by a scalar;
* calls: ``jit``, ``remat``, ``custom_jvp``/``custom_vjp`` calls (followed
  inside), ``scan`` (a parameter scanned over as ``xs`` loses its leading
  axis: that axis indexes *stacked layers*), ``while`` and ``cond``.

A value derived that way carries an :class:`Origin`: which leaf, and which
leaf axes each of its axes spans. Where the value is consumed, a
:class:`Use` is recorded:

* ``dot``: an operand of ``dot_general``: its contracting axes are the
  kernel's *contraction axes*, its batch axes index separate matrices
  (stacked, like the scanned axes);
* ``conv``: the kernel of ``conv_general_dilated`` (contraction: the input
  feature and spatial axes);
* ``lookup``: the table of a ``gather`` (an embedding);
* ``elementwise``: combined with activations (a bias, a norm scale, a
  position table);
* ``other``: anything else (named by its primitive).

:func:`param_uses` walks a jaxpr and returns the uses of every leaf;
:class:`Interpreter` evaluates a jaxpr while calling a hook at every
``dot_general``/``conv`` that consumes a parameter, which is how calibration
statistics are captured and packed kernels replace dense matmuls without any
knowledge of module classes.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core

# Ops whose single output is their (first) operand with another dtype or
# placement: the parameter keeps its layout.
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


def _flat(axes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
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
  parts = [(a, leaf_shape[a]) for a in _flat(origin.axes)]
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
  dropped = _flat([origin.axes[d] for d in sorted(gone)])
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
  extra = _flat([origin.axes[d] for d in batch])
  return tuple(sorted(origin.indexed + origin.dropped + extra))


def _dot_use(origin: Origin, contract: Sequence[int], batch: Sequence[int]):
  contract_axes = tuple(sorted(_flat([origin.axes[d] for d in contract])))
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
      contract = tuple(sorted(_flat([o.axes[d] for d in (in_dim, *spatial)])))
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


def _closed(jaxpr: Any) -> tuple[Any, Sequence[Any]]:
  """``(Jaxpr, consts)`` of a ``Jaxpr`` or ``ClosedJaxpr``."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def call_jaxpr(eqn: Any) -> Any | None:
  """The inner jaxpr of a call primitive, or ``None``."""
  key = _CALLS.get(eqn.primitive.name)
  return None if key is None else eqn.params.get(key)


def walk(
  jaxpr: Any,
  in_origins: Sequence[Origin | None],
  leaf_shapes: Sequence[tuple],
  uses: dict[int, list[Use]],
) -> list[Origin | None]:
  """Records the uses of tracked values in ``jaxpr``; returns out origins."""
  env: dict[Any, Origin] = {}
  for var, origin in zip(jaxpr.invars, in_origins):
    if origin is not None:
      env[var] = origin
  record = lambda leaf, use: uses.setdefault(leaf, []).append(use)
  for eqn in jaxpr.eqns:
    origins = [
      env.get(v) if isinstance(v, core.Var) else None for v in eqn.invars
    ]
    if not any(o is not None for o in origins):
      continue
    outs = walk_eqn(eqn, origins, leaf_shapes, uses, record)
    for var, origin in zip(eqn.outvars, outs):
      if origin is not None and not isinstance(var, core.DropVar):
        env[var] = origin
  return [
    env.get(v) if isinstance(v, core.Var) else None for v in jaxpr.outvars
  ]


def walk_eqn(eqn, origins, leaf_shapes, uses, record) -> list[Origin | None]:
  """:func:`walk` for one eqn with tracked inputs (recursing into calls)."""
  name = eqn.primitive.name
  inner = call_jaxpr(eqn)
  if inner is not None:
    sub, _ = _closed(inner)
    return walk(sub, origins, leaf_shapes, uses)
  if name == "scan":
    nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
    body, _ = _closed(eqn.params["jaxpr"])
    inner_origins = list(origins[:nc])
    for o in origins[nc : nc + ncarry]:
      if o is not None:
        record(o.leaf, Use("other", primitive="scan carry"))
      inner_origins.append(None)
    x_origins = [
      None if o is None else scanned_origin(o, id(eqn))
      for o in origins[nc + ncarry :]
    ]
    outs = walk(body, inner_origins + x_origins, leaf_shapes, uses)
    through = passed_through(outs[ncarry:], x_origins, origins[nc + ncarry :])
    _returned(outs[:ncarry], record, "scan")
    _returned(
      [o for o, t in zip(outs[ncarry:], through) if t is None], record, "scan"
    )
    return [None] * ncarry + through
  if name == "while":
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = origins[cn + bn :]
    for o in carry:
      if o is not None:
        record(o.leaf, Use("other", primitive="while carry"))
    cond, _ = _closed(eqn.params["cond_jaxpr"])
    body, _ = _closed(eqn.params["body_jaxpr"])
    walk(cond, list(origins[:cn]) + [None] * len(carry), leaf_shapes, uses)
    body_in = list(origins[cn : cn + bn]) + [None] * len(carry)
    _returned(walk(body, body_in, leaf_shapes, uses), record, "while")
    return [None] * len(eqn.outvars)
  if name == "cond":
    if origins[0] is not None:
      record(origins[0].leaf, Use("other", primitive="cond index"))
    for branch in eqn.params["branches"]:
      sub, _ = _closed(branch)
      _returned(walk(sub, origins[1:], leaf_shapes, uses), record, "cond")
    return [None] * len(eqn.outvars)
  if any(
    isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values()
  ):
    # An unknown higher-order primitive (shard_map, pallas_call, ...).
    for o in origins:
      if o is not None:
        record(o.leaf, Use("other", primitive=name))
    return [None] * len(eqn.outvars)
  outs, found = propagate(eqn, origins, leaf_shapes)
  for leaf, use in found:
    record(leaf, use)
  return outs


def passed_through(
  ys: Sequence[Origin | None],
  x_origins: Sequence[Origin | None],
  outer: Sequence[Origin | None],
) -> list[Origin | None]:
  """The outer origins of scan outputs that return an ``xs`` slice as it
  came in (nnx scans hand their layers' state back): stacked again, the
  output is the scanned param itself."""
  out = []
  for y in ys:
    hit = [o for x, o in zip(x_origins, outer) if y is not None and y == x]
    out.append(hit[0] if hit else None)
  return out


def _returned(origins, record, where: str) -> None:
  for o in origins:
    if o is not None:
      record(o.leaf, Use("other", primitive=f"returned by {where}"))


class Traced(NamedTuple):
  """A traced model: its jaxpr and how the params' leaves enter it.

  Attributes:
    jaxpr: the ``ClosedJaxpr`` of ``apply_fn(params, *args)``; its first
      ``len(leaf_shapes)`` inputs are the params' leaves.
    leaf_shapes: the params' leaf shapes.
    out_tree: the output's tree structure.
  """

  jaxpr: Any
  leaf_shapes: tuple[tuple[int, ...], ...]
  out_tree: Any


def trace(
  apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> Traced:
  """Traces ``apply_fn(params, *args, **kwargs)``; ``kwargs`` are static.

  ``params`` and ``args`` may be arrays, tracers or ``ShapeDtypeStruct``s.
  """
  leaves, treedef = jax.tree.flatten(params)

  def flat_fn(leaves, args):
    return apply_fn(jax.tree.unflatten(treedef, leaves), *args, **kwargs)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
    list(leaves), args
  )
  return Traced(
    closed,
    tuple(tuple(jnp.shape(leaf)) for leaf in leaves),
    jax.tree.structure(out_shape),
  )


def param_uses(traced: Traced) -> dict[int, list[Use]]:
  """Every use of every params leaf in the traced computation.

  Returns:
    ``{leaf index: [Use, ...]}``; a leaf never consumed is absent. A leaf
    returned by the model (or part of its output) gets an ``other`` use.
  """
  jaxpr = traced.jaxpr.jaxpr
  n = len(traced.leaf_shapes)
  origins = [
    origin_of_leaf(i, len(shape)) for i, shape in enumerate(traced.leaf_shapes)
  ]
  origins += [None] * (len(jaxpr.invars) - n)
  uses: dict[int, list[Use]] = {}
  outs = walk(jaxpr, origins, traced.leaf_shapes, uses)
  record = lambda leaf, use: uses.setdefault(leaf, []).append(use)
  _returned(outs, record, "the model")
  return uses


def var_order(origin: Origin, dims: Sequence[int]) -> tuple[int, ...]:
  """The leaf axes spanned by the value axes ``dims``, in value order."""
  return _flat([origin.axes[d] for d in dims])


def split_to_leaf_axes(
  x: jax.Array,
  x_dims: Sequence[int],
  origin: Origin,
  kernel_dims: Sequence[int],
  leaf_shape: Sequence[int],
) -> tuple[jax.Array, list[int]]:
  """Splits each axis ``x_dims[j]`` of ``x`` (paired with the kernel value's
  axis ``kernel_dims[j]``) into the leaf axes it spans.

  Returns:
    ``(x', axes)``: ``x'`` with the split axes moved last, in ascending leaf
    axis order, and ``axes`` those leaf axes.
  """
  moved = jnp.moveaxis(x, tuple(x_dims), tuple(range(-len(x_dims), 0)))
  lead = moved.shape[: moved.ndim - len(x_dims)]
  leaf_axes = [a for d in kernel_dims for a in origin.axes[d]]
  sizes = [leaf_shape[a] for a in leaf_axes]
  split = moved.reshape(*lead, *sizes)
  order = sorted(range(len(leaf_axes)), key=lambda i: leaf_axes[i])
  perm = tuple(range(len(lead))) + tuple(len(lead) + i for i in order)
  return split.transpose(perm), sorted(leaf_axes)


class Unsupported(ValueError):
  """A parameter is consumed in a way a hook cannot handle."""


def dot_rows(
  eqn: Any,
  values: Sequence[Any],
  origin: Origin,
  kernel_index: int,
  leaf_shape: Sequence[int],
) -> tuple[jax.Array, tuple[int, ...]]:
  """The other operand of a ``dot_general`` on a kernel, as the kernel's
  layer inputs ``[*batch, *tokens, K]``.

  ``K`` is the kernel's contracted leaf axes flattened in ascending order,
  ``batch`` the operand's batch axes (paired with the kernel's batch axes,
  ordered by their leaf axis), ``tokens`` its other axes in their order.

  Returns:
    ``(rows, batch leaf axes)``.
  """
  operands = dot_operands(eqn)
  _, k_contract, k_batch = operands[kernel_index]
  _, x_contract, x_batch = operands[1 - kernel_index]
  x = values[1 - kernel_index]
  if any(len(origin.axes[d]) != 1 for d in k_batch):
    raise Unsupported("a dot_general whose batch axis spans several axes")
  batch_axes = [origin.axes[d][0] for d in k_batch]
  order = sorted(range(len(x_batch)), key=lambda j: batch_axes[j])
  rest = [d for d in range(x.ndim) if d not in x_batch]
  x = jnp.moveaxis(x, [x_batch[j] for j in order], list(range(len(order))))
  contract = [len(order) + rest.index(d) for d in x_contract]
  rows, axes = split_to_leaf_axes(x, contract, origin, k_contract, leaf_shape)
  k = math.prod(leaf_shape[a] for a in axes)
  lead = rows.shape[: rows.ndim - len(axes)]
  return rows.reshape(*lead, k), tuple(sorted(batch_axes))


def dot_output(
  y: jax.Array,
  eqn: Any,
  origin: Origin,
  kernel_index: int,
  leaf_shape: Sequence[int],
  outputs: Sequence[int],
) -> jax.Array:
  """The ``dot_general``'s output from ``y = rows @ W``.

  ``y: [*batch, *tokens, N]`` with ``rows`` as :func:`dot_rows` builds them
  and ``N`` the kernel's ``outputs`` leaf axes flattened in ascending order.
  """
  operands = dot_operands(eqn)
  _, k_contract, k_batch = operands[kernel_index]
  nb = len(k_batch)
  batch_axes = [origin.axes[d][0] for d in k_batch]
  sorted_batch = sorted(batch_axes)
  k_free = [
    d
    for d in range(len(origin.axes))
    if d not in k_contract and d not in k_batch
  ]
  free_axes = [a for d in k_free for a in origin.axes[d]]
  lead = y.shape[:-1]
  y = y.reshape(*lead, *(leaf_shape[a] for a in sorted(outputs)))
  tokens = len(lead) - nb
  out_first = nb + tokens
  perm = [sorted_batch.index(a) for a in batch_axes]  # batch in eqn order
  perm += list(range(nb, out_first))
  perm += [out_first + sorted(outputs).index(a) for a in free_axes]
  y = y.transpose(perm)
  sizes = [math.prod(leaf_shape[a] for a in origin.axes[d]) for d in k_free]
  y = y.reshape(*y.shape[:out_first], *sizes)
  if kernel_index == 0:  # lhs: its free axes come before the other's
    y = jnp.moveaxis(
      y,
      list(range(out_first, y.ndim)),
      list(range(nb, nb + len(k_free))),
    )
  return y


def leaf_view(value: jax.Array, origin: Origin) -> jax.Array:
  """The traced value that ``origin`` describes, built from the leaf.

  ``value`` is the leaf with the ``origin.indexed`` axes already taken away
  (a scan slice). Transposes and reshapes it into the value's layout.
  """
  gone = origin.indexed
  remaining = [a for a in range(value.ndim + len(gone)) if a not in gone]
  position = {a: i for i, a in enumerate(remaining)}
  order = [position[a] for a in (*_flat(origin.axes), *origin.dropped)]
  moved = value.transpose(order) if order else value
  shape = [
    math.prod(value.shape[position[a]] for a in group) for group in origin.axes
  ]
  return moved.reshape(shape)


class Key(NamedTuple):
  """The key of a value a hook emits (e.g. one layer's input statistics).

  Attributes:
    leaf: the params leaf.
    indexed: the origin's ``indexed`` axes where it was emitted; a value
      emitted inside a scan over one of them is stacked by the scan (one
      entry per layer), others are summed over iterations.
    tag: anything static the hook needs (e.g. ``dot_general`` batch axes).
  """

  leaf: int
  indexed: tuple[int, ...]
  tag: tuple = ()


Collected = dict[Key, Any]


def add_collected(into: Collected, new: Collected) -> None:
  """Adds ``new`` into ``into`` key by key (pytrees summed leaf by leaf)."""
  for key, value in new.items():
    into[key] = (
      value if key not in into else jax.tree.map(jnp.add, into[key], value)
    )


class Hooks:
  """What an :class:`Interpreter` does where parameters are consumed.

  The default evaluates the model unchanged. Subclasses override:

  * :meth:`consume`: a ``dot_general``/``conv`` that consumes a param;
    return its outputs, or ``None`` to evaluate it as written;
  * :meth:`relabel`: a layout op on a param (values that are not arrays,
    such as packed kernels, stay symbolic through it);
  * :meth:`materialize`: an array for a value of the model's dtype.
  """

  def consume(
    self,
    eqn: Any,
    values: list[Any],
    origins: list[Origin | None],
    uses: list[tuple[int, Use]],
    collect: Collected,
  ) -> list[Any] | None:
    del eqn, values, origins, uses, collect
    return None

  def relabel(self, eqn: Any, values: list[Any], out: list[Origin | None]):
    del eqn, values, out
    return None

  def materialize(self, value: Any) -> Any:
    """An array for ``value`` where an op consumes it as written."""
    return value

  def output(self, value: Any, origin: Origin | None) -> Any:
    """An array for ``value`` returned by the model."""
    del origin
    return value

  def rescan(self, value: Any, origin: Origin) -> Any:
    """The value of one scan slice of ``value`` (already sliced)."""
    del origin
    return value

  def scan_input(self, value: Any, origin: Origin) -> Any:
    """``value`` about to be scanned over its leading axis (``origin`` is
    its origin outside the scan)."""
    del origin
    return value


def bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
  """Evaluates one eqn as written."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class Interpreter:
  """Evaluates a jaxpr, letting :class:`Hooks` act where params are consumed.

  Values derived from params carry their :class:`Origin`. Calls are
  evaluated inline; ``scan``, ``while`` and ``cond`` are rebuilt with the
  interpreted bodies, so hooks also act inside them, and values the hooks
  emit inside a scan over stacked layers come out stacked, one per layer.
  """

  def __init__(self, leaf_shapes: Sequence[tuple], hooks: Hooks):
    self.leaf_shapes = tuple(leaf_shapes)
    self.hooks = hooks

  def run(
    self,
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    origins: Sequence[Origin | None],
    collect: Collected,
  ) -> tuple[list[Any], list[Origin | None]]:
    env: dict[Any, Any] = {}
    where: dict[Any, Origin] = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = value
    for var, value, origin in zip(jaxpr.invars, args, origins):
      env[var] = value
      if origin is not None:
        where[var] = origin
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      values = [read(v) for v in eqn.invars]
      origins_in = [
        where.get(v) if isinstance(v, core.Var) else None for v in eqn.invars
      ]
      if any(o is not None for o in origins_in):
        outs, out_origins = self.eqn(eqn, values, origins_in, collect)
      else:
        outs, out_origins = bind(eqn, values), [None] * len(eqn.outvars)
      for var, value, origin in zip(eqn.outvars, outs, out_origins):
        if isinstance(var, core.DropVar):
          continue
        env[var] = value
        if origin is not None:
          where[var] = origin
    outs = [read(v) for v in jaxpr.outvars]
    out_origins = [
      where.get(v) if isinstance(v, core.Var) else None for v in jaxpr.outvars
    ]
    return outs, out_origins

  def _materialized(self, values: Sequence[Any]) -> list[Any]:
    return [self.hooks.materialize(v) for v in values]

  def eqn(self, eqn, values, origins, collect):
    inner = call_jaxpr(eqn)
    if inner is not None:
      sub, consts = _closed(inner)
      return self.run(sub, consts, values, origins, collect)
    name = eqn.primitive.name
    none = [None] * len(eqn.outvars)
    if name == "scan":
      return self.scan(eqn, values, origins, collect)
    if name == "while":
      return self.while_loop(eqn, values, origins, collect), none
    if name == "cond":
      return self.cond(eqn, values, origins, collect), none
    if any(
      isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values()
    ):
      return bind(eqn, self._materialized(values)), none
    out_origins, uses = propagate(eqn, origins, self.leaf_shapes)
    if any(use.kind in ("dot", "conv") for _, use in uses):
      outs = self.hooks.consume(eqn, values, origins, uses, collect)
      if outs is not None:
        return outs, none
    if any(o is not None for o in out_origins):
      outs = self.hooks.relabel(eqn, values, out_origins)
      if outs is not None:
        return outs, out_origins
    return bind(eqn, self._materialized(values)), out_origins

  def _abstract_collect(self, fn: Callable[[], Collected]) -> Collected:
    return jax.eval_shape(fn)

  def scan(self, eqn, values, origins, collect):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body, body_consts = _closed(p["jaxpr"])
    consts, carry, xs = (
      values[:nc],
      values[nc : nc + ncarry],
      values[nc + ncarry :],
    )
    carry = self._materialized(carry)
    x_origins = [
      None if o is None else scanned_origin(o, id(eqn))
      for o in origins[nc + ncarry :]
    ]
    xs = [
      self.hooks.materialize(x)
      if o is None
      else self.hooks.scan_input(x, origins[nc + ncarry + i])
      for i, (x, o) in enumerate(zip(xs, x_origins))
    ]
    in_origins = list(origins[:nc]) + [None] * ncarry + x_origins
    made = {(o.leaf, o.indexed) for o in x_origins if o is not None}
    per_layer = lambda key: any(
      key.leaf == leaf and key.indexed[: len(ix)] == ix for leaf, ix in made
    )

    through: list[Origin | None] = []

    def step(carry, x):
      x = [
        v if o is None else self.hooks.rescan(v, o)
        for v, o in zip(x, x_origins)
      ]
      found: Collected = {}
      outs, out_origins = self.run(
        body, body_consts, [*consts, *carry, *x], in_origins, found
      )
      through[:] = passed_through(
        out_origins[ncarry:], x_origins, origins[nc + ncarry :]
      )
      ys = [
        y if t is not None else self.hooks.materialize(y)
        for y, t in zip(outs[ncarry:], through)
      ]
      stacked = {k: v for k, v in found.items() if per_layer(k)}
      summed = {k: v for k, v in found.items() if not per_layer(k)}
      return self._materialized(outs[:ncarry]), ys, stacked, summed

    first = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs
    )
    summed_shapes = jax.eval_shape(lambda c, x: step(c, x)[3], carry, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shapes)

    def scan_body(state, x):
      carry, total = state
      new_carry, ys, stacked, summed = step(carry, x)
      total = {k: jax.tree.map(jnp.add, total[k], v) for k, v in summed.items()}
      return (new_carry, total), (ys, stacked)

    (carry_out, total), (ys, stacked) = jax.lax.scan(
      scan_body,
      (carry, zeros),
      xs,
      length=p["length"],
      reverse=p["reverse"],
      unroll=p["unroll"],
    )
    add_collected(collect, stacked)
    add_collected(collect, total)
    return [*carry_out, *ys], [None] * ncarry + list(through)

  def while_loop(self, eqn, values, origins, collect):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, cond_consts = _closed(p["cond_jaxpr"])
    body, body_consts = _closed(p["body_jaxpr"])
    cconsts, bconsts = values[:cn], values[cn : cn + bn]
    carry = self._materialized(values[cn + bn :])
    corigins = list(origins[:cn]) + [None] * len(carry)
    borigins = list(origins[cn : cn + bn]) + [None] * len(carry)

    def body_step(carry):
      found: Collected = {}
      outs, _ = self.run(body, body_consts, [*bconsts, *carry], borigins, found)
      return self._materialized(outs), found

    shapes = jax.eval_shape(lambda c: body_step(c)[1], carry)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def cond_fn(state):
      (out,), _ = self.run(
        cond, cond_consts, [*cconsts, *state[0]], corigins, {}
      )
      return out

    def body_fn(state):
      carry, total = state
      new, found = body_step(carry)
      return new, {
        k: jax.tree.map(jnp.add, total[k], v) for k, v in found.items()
      }

    carry, total = jax.lax.while_loop(cond_fn, body_fn, (carry, zeros))
    add_collected(collect, total)
    return list(carry)

  def cond(self, eqn, values, origins, collect):
    index = self.hooks.materialize(values[0])
    operands, operand_origins = values[1:], origins[1:]

    def branch_fn(branch):
      sub, consts = _closed(branch)

      def run():
        found: Collected = {}
        outs, _ = self.run(sub, consts, operands, operand_origins, found)
        return self._materialized(outs), found

      return run

    branches = [branch_fn(b) for b in eqn.params["branches"]]
    shapes: dict[Key, Any] = {}
    for fn in branches:
      shapes.update(jax.eval_shape(lambda fn=fn: fn()[1]))

    def filled(fn):
      def run():
        outs, found = fn()
        full = {
          k: found[k]
          if k in found
          else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
          for k, shape in shapes.items()
        }
        return outs, full

      return run

    outs, found = jax.lax.switch(index, [filled(fn) for fn in branches])
    add_collected(collect, found)
    return list(outs)
