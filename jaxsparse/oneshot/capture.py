"""Calibration capture: streaming statistics of the inputs of every kernel.

The model ``apply_fn(params, x)`` is traced to a jaxpr and evaluated by a
:class:`jaxsparse.tracing.Interpreter`: wherever a params leaf (or a
transposed, reshaped, cast view of it) enters a ``dot_general`` or a
``conv_general_dilated``, the *other* operand is that layer's input. No
module class is looked at, so linen, nnx, Hugging Face Flax, ``Einsum``,
scanned and rematerialised layers and hand-written ``jnp`` are captured
alike. Each layer is named by its kernel's params path, and only float32
sums are returned (:class:`~jaxsparse.oneshot.base.LayerStatistics`): one
jitted call per calibration batch, added across batches, no activation
kept.

With ``X: [tokens, K]`` the inputs of one kernel matrix over the calibration
set (its :class:`~jaxsparse.layout.Layout`: the contracted axes flattened
into ``K`` in the kernel's axis order, every other input axis a token; for a
convolution, the input patches)::

  count = tokens,  sum = Σ_t X[t],  sq_sum = Σ_t X[t]²,  gram = XᵀX.

A kernel used several times per forward pass (shared weights) accumulates
all its uses. A stacked kernel (a scanned stack, an ``Einsum`` with a batch
axis) gets statistics per matrix: every field has the stack axes first, in
the kernel's axis order. Calibration batches may be sharded over a data axis
(``NamedSharding(mesh, P("data"))``): the sums are reductions over that axis,
which XLA all-reduces, so every device gets the same statistics.

Not supported, each a ``ValueError`` naming the kernel: grouped
convolutions (``feature_group_count > 1``), a kernel multiplied by another
parameter, and kernels consumed inside ``shard_map`` or a custom kernel
(``pallas_call``).
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsparse import layout as layout_lib
from jaxsparse import tracing
from jaxsparse.oneshot.base import LayerStatistics
from jaxsparse.paths import leaf_paths
from jaxsparse.patterns import explicit_sharding
from jaxsparse.types import Params

ApplyFn = Callable[[Params, Any], Any]
"""``apply_fn(params, x)``, e.g. ``lambda p, x: model.apply({"params": p},
x)``."""


class Layer(NamedTuple):
  """A kernel the forward pass multiplies by.

  Attributes:
    path: the kernel's params path (``Block_0/Dense_0/kernel``).
    layout: its :class:`~jaxsparse.layout.Layout`.
    shape: one matrix ``(K, N)``.
    matrices: the number of stacked matrices (1 for a plain kernel).
    scanned: the stack axes a ``scan`` runs over (sequential layers),
      outermost first.
    scans: an id of the scan over each ``scanned`` axis (kernels of the
      same scan hold the same layers).
    calls: how many places of the computation consume it (a use inside a
      scan counts once).
  """

  path: str
  layout: layout_lib.Layout
  shape: tuple[int, int]
  matrices: int
  scanned: tuple[int, ...]
  scans: tuple[int, ...]
  calls: int


def layers(apply_fn: ApplyFn, params: Params, batch: Any) -> list[Layer]:
  """The kernels ``apply_fn`` multiplies by, in the order of first use.

  Traces ``apply_fn`` abstractly (no computation), see
  :func:`jaxsparse.find_kernels`.
  """
  traced = tracing.trace(apply_fn, params, batch)
  uses = tracing.param_uses(traced)
  paths = leaf_paths(params)
  found = []
  for leaf, leaf_uses in uses.items():  # in first-use order
    record = layout_lib.classify(
      paths[leaf], traced.leaf_shapes[leaf], leaf_uses
    )
    if record.role != "kernel":
      continue
    lay, shape = record.layout, record.shape
    products = [u for u in leaf_uses if u.kind in ("dot", "conv")]
    found.append(
      Layer(
        record.path,
        lay,
        lay.matrix_shape(shape),
        lay.num_matrices(shape),
        products[0].scanned,
        products[0].scans,
        len(products),
      )
    )
  return found


def statistics_of(rows: jax.Array, lead: int, gram: bool) -> LayerStatistics:
  """The sums of one use's inputs ``rows: [*stack, *tokens, K]`` (float32),
  with ``lead`` stack axes."""
  rows = rows.astype(jnp.float32)
  tokens = tuple(range(lead, rows.ndim - 1))
  count = np.prod([rows.shape[a] for a in tokens], dtype=np.int64)
  return LayerStatistics(
    count=jnp.full(rows.shape[:lead], count, jnp.float32),
    sum=jnp.sum(rows, axis=tokens),
    sq_sum=jnp.sum(rows * rows, axis=tokens),
    gram=_gram(rows, lead) if gram else None,
  )


def _gram(rows: jax.Array, lead: int) -> jax.Array:
  """``XᵀX`` over the token axes, replicated under Explicit mesh axes."""
  sharding = explicit_sharding(rows)
  out = (
    {}
    if sharding is None
    else {"out_sharding": NamedSharding(sharding.mesh, PartitionSpec())}
  )
  letters = "abcdefghijklmnopqrstuvw"
  stack = letters[:lead]
  tokens = letters[lead : rows.ndim - 1]
  spec = f"{stack}{tokens}y,{stack}{tokens}z->{stack}yz"
  return jnp.einsum(
    spec, rows, rows, precision=jax.lax.Precision.HIGHEST, **out
  )


def add_statistics(a: LayerStatistics, b: LayerStatistics) -> LayerStatistics:
  """Sum of two statistics of the same layer."""
  return jax.tree.map(jnp.add, a, b)


def _conv_rows(eqn, values, origin, leaf_shape):
  """The input patches of a convolution as ``[*tokens, K]``."""
  p = eqn.params
  if p["feature_group_count"] != 1 or p.get("batch_group_count", 1) != 1:
    raise tracing.Unsupported("a grouped convolution (feature_group_count > 1)")
  dims = p["dimension_numbers"]
  out_dim, in_dim, spatial = tracing.conv_kernel_dims(eqn)
  del out_dim
  window = [eqn.invars[1].aval.shape[d] for d in spatial]
  patches = jax.lax.conv_general_dilated_patches(
    values[0],
    filter_shape=window,
    window_strides=p["window_strides"],
    padding=p["padding"],
    lhs_dilation=p["lhs_dilation"],
    rhs_dilation=p["rhs_dilation"],
    dimension_numbers=dims,
    precision=jax.lax.Precision.HIGHEST,
  )
  feature = dims.out_spec[1]
  moved = jnp.moveaxis(patches, feature, -1)
  c_in = eqn.invars[1].aval.shape[in_dim]
  split = moved.reshape(*moved.shape[:-1], c_in, *window)
  lead = split.ndim - 1 - len(window)
  kernel_dims = (in_dim, *spatial)
  rows, axes = tracing.split_to_leaf_axes(
    split,
    list(range(lead, split.ndim)),
    origin,
    kernel_dims,
    leaf_shape,
  )
  k = int(np.prod([leaf_shape[a] for a in axes]))
  return rows.reshape(*rows.shape[:lead], k)


class StatisticsHooks(tracing.Hooks):
  """Interpreter hooks that emit each wanted kernel's input statistics."""

  def __init__(self, wanted: dict[int, str], leaf_shapes, gram: bool):
    self.wanted = wanted
    self.leaf_shapes = leaf_shapes
    self.gram = gram

  def consume(self, eqn, values, origins, uses, collect):
    for index, origin in enumerate(origins):
      if origin is None or origin.leaf not in self.wanted:
        continue
      if sum(o is not None for o in origins) > 1 and (
        eqn.primitive.name == "dot_general"
      ):
        continue  # a product of two params: not a layer (see find_kernels)
      path = self.wanted[origin.leaf]
      shape = self.leaf_shapes[origin.leaf]
      try:
        if eqn.primitive.name == "dot_general":
          rows, batch = tracing.dot_rows(eqn, values, origin, index, shape)
        elif index == 1:
          rows, batch = _conv_rows(eqn, values, origin, shape), ()
        else:
          continue
      except tracing.Unsupported as e:
        raise ValueError(
          f"oneshot: {path} is consumed by {e}, which one-shot capture does "
          "not support; exclude it with `where=`."
        ) from None
      stats = statistics_of(rows, len(batch), self.gram)
      key = tracing.Key(origin.leaf, origin.indexed, batch)
      tracing.add_collected(collect, {key: stats})
    return None


def _arranged(
  stats: LayerStatistics, axes: tuple[int, ...], stack: tuple[int, ...]
) -> LayerStatistics:
  """Statistics whose leading dims are the leaf axes ``axes`` rearranged to
  the layout's ``stack`` (squeezed size-1 stack axes put back)."""
  squeezed = [a for a in stack if a not in axes]
  lead = len(axes)
  order = [*axes, *squeezed]
  perm = [order.index(a) for a in stack]

  def one(x):
    x = x.reshape(*x.shape[:lead], *(1,) * len(squeezed), *x.shape[lead:])
    return x.transpose(*perm, *range(len(perm), x.ndim))

  return jax.tree.map(one, stats)


def _per_leaf(
  collected: tracing.Collected, layouts: dict[int, layout_lib.Layout]
) -> dict[int, LayerStatistics]:
  """Collected statistics by leaf, stack axes in ascending leaf order."""
  out: dict[int, LayerStatistics] = {}
  for key, stats in collected.items():
    axes = (*key.indexed, *key.tag)
    stats = _arranged(stats, axes, layouts[key.leaf].stack)
    out[key.leaf] = (
      stats if key.leaf not in out else add_statistics(out[key.leaf], stats)
    )
  return out


def statistics_fn(
  apply_fn: ApplyFn, params: Params, paths: Iterable[str], *, gram: bool
) -> Callable[[Params, Any], dict[str, LayerStatistics]]:
  """A jitted ``(params, batch) -> {path: LayerStatistics}`` for one batch.

  Args:
    apply_fn: ``apply_fn(params, x)``.
    params: the params (only their paths and shapes are read).
    paths: the kernel paths to gather statistics for.
    gram: whether to accumulate ``XᵀX`` (``[K, K]`` per matrix).

  Returns:
    The function; a path never consumed in a batch is absent from its dict.
  """
  all_paths = leaf_paths(params)
  index = {p: i for i, p in enumerate(all_paths)}
  wanted = {index[p]: p for p in paths if p in index}

  def step(params, batch):
    traced = tracing.trace(apply_fn, params, batch)
    uses = tracing.param_uses(traced)
    layouts = {}
    for leaf in wanted:
      record = layout_lib.classify(
        all_paths[leaf], traced.leaf_shapes[leaf], uses.get(leaf, ())
      )
      if record.layout is not None:
        layouts[leaf] = record.layout
    hooks = StatisticsHooks(
      {i: p for i, p in wanted.items() if i in layouts},
      traced.leaf_shapes,
      gram,
    )
    interpreter = tracing.Interpreter(traced.leaf_shapes, hooks)
    leaves = jax.tree.leaves(params)
    args = [*leaves, *jax.tree.leaves((batch,))]
    origins = [
      tracing.origin_of_leaf(i, len(s))
      for i, s in enumerate(traced.leaf_shapes)
    ]
    origins += [None] * (len(args) - len(leaves))
    collected: tracing.Collected = {}
    interpreter.run(
      traced.jaxpr.jaxpr, traced.jaxpr.consts, args, origins, collected
    )
    per_leaf = _per_leaf(collected, layouts)
    return {wanted[i]: s for i, s in per_leaf.items()}

  return jax.jit(step)


def layer_statistics(
  apply_fn: ApplyFn,
  params: Params,
  calibration: Iterable[Any],
  paths: Iterable[str],
  *,
  gram: bool = False,
) -> dict[str, LayerStatistics]:
  """Statistics of the inputs of the given kernels over calibration data.

  Args:
    apply_fn: ``apply_fn(params, x)`` of any JAX model (linen, nnx via
      ``nnx.merge``, Hugging Face Flax, ...).
    params: the params the forward pass runs with.
    calibration: an iterable of input batches (each is passed as ``x``; a
      pytree such as a dict of arrays is fine).
    paths: kernel paths (``Block_0/Dense_0/kernel``) to gather for.
    gram: whether to accumulate ``XᵀX`` too.

  Returns:
    ``{path: LayerStatistics}``, float32 sums over every batch and use; a
    stacked kernel's fields have its stack axes first.

  Raises:
    ValueError: ``calibration`` is empty, a batch holds a non-finite value,
      or a path is never consumed by ``apply_fn`` as a kernel.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from jaxsparse import oneshot
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> stats = oneshot.layer_statistics(
    ...   lambda p, x: model.apply({"params": p}, x), params, [x, 2 * x],
    ...   ["kernel"])
    >>> stats["kernel"].count, stats["kernel"].sq_sum
    (Array(8., dtype=float32), Array([20., 20.], dtype=float32))
  """
  paths = list(paths)
  known = set(leaf_paths(params))
  unknown = [p for p in paths if p not in known]
  if unknown:
    raise ValueError(
      f"oneshot: {unknown} are not params paths; the params are "
      f"{sorted(known)[:10]}..."
    )
  step = statistics_fn(apply_fn, params, paths, gram=gram)
  total: dict[str, LayerStatistics] = {}
  seen = False
  for batch in calibration:
    seen = True
    for path, stats in step(params, batch).items():
      total[path] = (
        stats if path not in total else add_statistics(total[path], stats)
      )
  if not seen:
    raise ValueError(
      "oneshot: `calibration` yielded no batch; pass a non-empty sequence of "
      "input batches (it is iterated once per statistics pass)."
    )
  missing = [p for p in paths if p not in total]
  if missing:
    raise ValueError(
      f"oneshot: {missing} are never consumed by apply_fn as the kernel of "
      "a matmul or convolution (see js.find_kernels); exclude them with "
      "`where=`."
    )
  return {p: total[p] for p in paths}


def stack_index(
  stats: LayerStatistics, index: Sequence[int]
) -> LayerStatistics:
  """The statistics of one matrix of a stacked kernel."""
  index = tuple(index)
  if not index:
    return stats
  return jax.tree.map(lambda x: None if x is None else x[index], stats)
