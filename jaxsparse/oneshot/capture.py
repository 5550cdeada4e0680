"""Calibration capture: streaming statistics of the inputs of Dense layers.

The inputs of every ``flax.linen`` ``nn.Dense`` / ``nn.DenseGeneral`` call
are seen with :func:`flax.linen.intercept_methods` while ``apply_fn(params,
x)`` runs under ``jax.jit``; each layer is named by the path of its kernel in
the params tree (``Block_0/Dense_0/kernel``), and only float32 sums are
returned (:class:`~jaxsparse.oneshot.base.LayerStatistics`), one jitted call
per calibration batch, added across batches: no activation is kept.

With ``X: [tokens, in]`` the inputs of one layer over the calibration set
(all leading axes flattened into tokens; for ``DenseGeneral`` the contracting
``axis`` flattened into ``in`` in the kernel's order)::

  count = tokens,  sum = Σ_t X[t],  sq_sum = Σ_t X[t]²,  gram = XᵀX.

A layer called several times per forward pass (shared weights) accumulates
all its calls. Calibration batches may be sharded over a data axis
(``NamedSharding(mesh, P("data"))``): the sums are reductions over that axis,
which XLA all-reduces, so every device gets the same statistics.

Supported: ``flax.linen`` models, ``nn.Dense`` and ``nn.DenseGeneral`` (any
contracting ``axis``) called directly or from submodules, shared layers.
Not supported, each a ``ValueError`` that says so: ``DenseGeneral`` with
``batch_dims``, and Dense layers inside lifted transforms that trace their
body apart (``nn.remat``, ``nn.scan``, ``nn.vmap``): calibrate with the same
params in a model built without them. ``flax.nnx`` models are not captured
here (linen only); their layers can still be pruned by calling a method's
``prune_layer`` with statistics gathered by hand.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsparse.masking import leaf_paths
from jaxsparse.oneshot.base import LayerStatistics
from jaxsparse.patterns import explicit_sharding
from jaxsparse.types import Params

ApplyFn = Callable[[Params, Any], Any]
"""``apply_fn(params, x)``, e.g. ``lambda p, x: model.apply({"params": p},
x)``."""


class DenseLayer(NamedTuple):
  """A Dense layer found in the forward pass.

  Attributes:
    path: the params path of its kernel (``Block_0/Dense_0/kernel``).
    module_path: the linen module path (``("Block_0", "Dense_0")``).
    in_axes: how many leading kernel axes are contracted (1 for ``Dense``).
    shape: the kernel flattened to ``[in, out]``.
    calls: how many times one forward pass calls it.
  """

  path: str
  module_path: tuple[str, ...]
  in_axes: int
  shape: tuple[int, int]
  calls: int


def _linen() -> Any:
  """``flax.linen``, imported on use (flax is an optional dependency)."""
  try:
    import flax.linen  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover
    raise ImportError(
      "jaxsparse.oneshot captures flax.linen models; install flax "
      "(`pip install jaxsparse[flax]`)."
    ) from e
  return flax.linen


def _contracting_axes(module: Any, ndim: int) -> tuple[int, ...]:
  """The input axes a Dense layer contracts, in the kernel's order."""
  if isinstance(module, _linen().Dense):
    return (ndim - 1,)
  if module.batch_dims not in ((), None):
    raise ValueError(
      f"oneshot: {'/'.join(module.path)} is a DenseGeneral with batch_dims="
      f"{module.batch_dims}, which one-shot pruning does not support; "
      "exclude its kernel with `where=`."
    )
  axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
  return tuple(int(a) % ndim for a in axis)


def flatten_inputs(module: Any, x: jax.Array) -> jax.Array:
  """The inputs of a Dense call as ``[..., in]`` float32 (leading = tokens).

  Only the contracting axes are moved and merged (the leading, possibly
  sharded, batch axes are never reshaped).
  """
  x = jnp.asarray(x)
  axes = _contracting_axes(module, x.ndim)
  if axes != tuple(range(x.ndim - len(axes), x.ndim)):
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  lead = x.shape[: x.ndim - len(axes)]
  return x.reshape(*lead, -1).astype(jnp.float32)


def statistics_of(rows: jax.Array, gram: bool) -> LayerStatistics:
  """The sums of one call's inputs ``rows: [..., in]`` (float32)."""
  lead = tuple(range(rows.ndim - 1))
  return LayerStatistics(
    count=jnp.float32(np.prod(rows.shape[:-1], dtype=np.int64)),
    sum=jnp.sum(rows, axis=lead),
    sq_sum=jnp.sum(rows * rows, axis=lead),
    gram=_gram(rows) if gram else None,
  )


def _gram(rows: jax.Array) -> jax.Array:
  """``XᵀX`` over the leading axes, replicated under Explicit mesh axes."""
  sharding = explicit_sharding(rows)
  out = (
    {}
    if sharding is None
    else {"out_sharding": NamedSharding(sharding.mesh, PartitionSpec())}
  )
  return jnp.einsum(
    "...i,...j->ij", rows, rows, precision=jax.lax.Precision.HIGHEST, **out
  )


def add_statistics(a: LayerStatistics, b: LayerStatistics) -> LayerStatistics:
  """Sum of two statistics of the same layer."""
  return jax.tree.map(jnp.add, a, b)


def _is_dense_call(context: Any) -> bool:
  nn = _linen()
  return context.method_name == "__call__" and isinstance(
    context.module, (nn.Dense, nn.DenseGeneral)
  )


def _kernel_paths(params: Params) -> set[str]:
  return {p for p in leaf_paths(params) if p.split("/")[-1] == "kernel"}


def _param_path(module_path: tuple[str, ...], kernels: set[str]) -> str | None:
  """The params path of the kernel of the module at ``module_path``.

  Exact match first; else a unique kernel whose path ends with it (params
  given as ``{"params": ...}`` variables).
  """
  name = "/".join((*module_path, "kernel"))
  if name in kernels:
    return name
  found = [k for k in kernels if k.endswith("/" + name)]
  return found[0] if len(found) == 1 else None


def dense_layers(
  apply_fn: ApplyFn, params: Params, batch: Any
) -> list[DenseLayer]:
  """The Dense layers ``apply_fn`` calls, in the order of their first call.

  Runs ``apply_fn`` under :func:`jax.eval_shape` (no computation). Layers
  whose kernel is not a leaf of ``params`` are skipped.
  """
  kernels = _kernel_paths(params)
  shapes = dict(
    zip(leaf_paths(params), (jnp.shape(p) for p in jax.tree.leaves(params)))
  )
  found: dict[str, list] = {}

  def interceptor(next_fun, args, kwargs, context):
    if _is_dense_call(context):
      module = context.module
      path = _param_path(tuple(module.path), kernels)
      if path is not None:
        x = args[0] if args else kwargs["inputs"]
        k = len(_contracting_axes(module, jnp.ndim(x)))
        if path in found:
          found[path][-1] += 1
        else:
          shape = shapes[path]
          flat = (
            int(np.prod(shape[:k], dtype=np.int64)),
            int(np.prod(shape[k:], dtype=np.int64)),
          )
          found[path] = [tuple(module.path), k, flat, 1]
    return next_fun(*args, **kwargs)

  def run(p, x):
    with _linen().intercept_methods(interceptor):
      return apply_fn(p, x)

  jax.eval_shape(run, params, batch)
  return [DenseLayer(path, *info) for path, info in found.items()]


def statistics_fn(
  apply_fn: ApplyFn, params: Params, paths: Iterable[str], *, gram: bool
) -> Callable[[Params, Any], dict[str, LayerStatistics]]:
  """A jitted ``(params, batch) -> {path: LayerStatistics}`` for one batch.

  Args:
    apply_fn: ``apply_fn(params, x)`` of a linen model.
    params: the params (only their paths are read).
    paths: the kernel paths to gather statistics for.
    gram: whether to accumulate ``XᵀX`` (``[in, in]`` per layer).

  Returns:
    The function; a path never called in a batch is absent from its dict.
  """
  kernels = _kernel_paths(params)
  wanted = frozenset(paths)

  def step(p, x):
    acc: dict[str, LayerStatistics] = {}

    def interceptor(next_fun, args, kwargs, context):
      if _is_dense_call(context):
        path = _param_path(tuple(context.module.path), kernels)
        if path in wanted:
          inputs = args[0] if args else kwargs["inputs"]
          stats = statistics_of(flatten_inputs(context.module, inputs), gram)
          acc[path] = (
            stats if path not in acc else add_statistics(acc[path], stats)
          )
      return next_fun(*args, **kwargs)

    with _linen().intercept_methods(interceptor):
      apply_fn(p, x)
    return acc

  return jax.jit(step)


def layer_statistics(
  apply_fn: ApplyFn,
  params: Params,
  calibration: Iterable[Any],
  paths: Iterable[str],
  *,
  gram: bool = False,
) -> dict[str, LayerStatistics]:
  """Statistics of the inputs of the given Dense kernels over calibration data.

  Args:
    apply_fn: ``apply_fn(params, x)`` of a linen model.
    params: the params the forward pass runs with.
    calibration: an iterable of input batches (each is passed as ``x``).
    paths: kernel paths (``Block_0/Dense_0/kernel``) to gather for.
    gram: whether to accumulate ``XᵀX`` too.

  Returns:
    ``{path: LayerStatistics}``, float32 sums over every batch and call.

  Raises:
    ValueError: ``calibration`` is empty, or a path is never called by
      ``apply_fn`` as the kernel of an ``nn.Dense``/``nn.DenseGeneral``.

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
  step = statistics_fn(apply_fn, params, paths, gram=gram)
  total: dict[str, LayerStatistics] = {}
  seen = False
  for batch in calibration:
    seen = True
    try:
      batch_stats = step(params, batch)
    except jax.errors.UnexpectedTracerError as e:
      raise ValueError(
        "oneshot: a Dense layer runs inside a lifted transform that traces "
        "its body apart (nn.remat, nn.scan, nn.vmap, nn.jit), so its inputs "
        "cannot be captured; for calibration, apply the same params with a "
        "model built without that transform."
      ) from e
    for path, stats in batch_stats.items():
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
      f"oneshot: {missing} are never called as the kernel of an nn.Dense or "
      "nn.DenseGeneral by apply_fn; exclude them with `where=`."
    )
  return {p: total[p] for p in paths}
