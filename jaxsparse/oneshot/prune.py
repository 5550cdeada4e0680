"""The one-shot (post-training) pruning driver.

:func:`prune` prunes the Dense kernels of a trained linen model group by
group (a group is a top-level module such as ``Block_0``), as SparseGPT and
Wanda do for transformer blocks: the calibration statistics of group ``g``
are gathered with every earlier group already pruned, so block ``i`` is
pruned for the inputs the pruned blocks ``< i`` give it.

References:
  Frantar and Alistarh, `SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot <https://arxiv.org/abs/2301.00774>`_, 2023.

  Sun et al, `A Simple and Effective Pruning Approach for Large Language
  Models <https://arxiv.org/abs/2306.11695>`_, 2024.
"""

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxsparse import patterns as patterns_lib
from jaxsparse.allocation import Uniform
from jaxsparse.masking import default_where, leaf_paths, resolve_where
from jaxsparse.oneshot import capture, rules
from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.oneshot.owl import OWL, outlier_ratio, owl_sparsities
from jaxsparse.patterns import NM, Pattern, Unstructured
from jaxsparse.types import MaskTree, Params, Selection


class LayerResult(NamedTuple):
  """What :func:`prune` did to one kernel.

  Attributes:
    group: the group the kernel was pruned with (``"Block_0"``).
    target: the sparsity asked of this layer (after allocation).
    sparsity: the fraction of zeros in its mask.
    error: ``‖XW - XW'‖²_F / ‖XW‖²_F`` on the calibration inputs it was pruned
      from (``= tr(ΔᵀGΔ) / tr(WᵀGW)``, ``G = XᵀX``), or ``None`` when the
      method gathers no gram.
  """

  group: str
  target: float
  sparsity: float
  error: float | None


class OneShotResult(NamedTuple):
  """The output of :func:`prune`.

  Attributes:
    params: the pruned params: same tree and dtypes, kernels zero where the
      mask is ``False``.
    masks: params-shaped mask tree: a bool array of the kernel's shape for
      each pruned kernel, ``None`` elsewhere (as ``js.masks`` returns).
    layers: ``{kernel path: LayerResult}`` in pruning order.
  """

  params: Params
  masks: MaskTree
  layers: dict[str, LayerResult]


def _check_sparsity(sparsity: float | None, pattern: Pattern) -> float:
  if isinstance(pattern, NM):
    level = 1 - pattern.n / pattern.m
    if sparsity is not None and not np.isclose(sparsity, level):
      raise ValueError(
        f"oneshot.prune: sparsity={sparsity} conflicts with {pattern!r} "
        f"(whose sparsity is {level}); pass sparsity=None."
      )
    return level
  if sparsity is None:
    raise ValueError(
      "oneshot.prune: pass sparsity= (a fraction of zeros in [0, 1)) or an "
      "N:M pattern=js.NM(n, m)."
    )
  if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
    raise ValueError(
      f"oneshot.prune: sparsity={sparsity!r} must be a float in [0, 1) "
      "(the fraction of zeros)."
    )
  return float(sparsity)


def _check_allocation(allocation: Any, pattern: Pattern) -> OWL | None:
  if allocation is None or allocation == "uniform":
    return None
  if isinstance(allocation, Uniform):
    return None
  if isinstance(allocation, OWL):
    if not isinstance(pattern, Unstructured):
      raise ValueError(
        f"oneshot.prune: OWL allocates unstructured sparsity; {pattern!r} "
        "fixes every layer's sparsity. Drop allocation= or the pattern."
      )
    return allocation
  raise ValueError(
    f"oneshot.prune: allocation={allocation!r} is not supported; use None, "
    "'uniform' or oneshot.owl()."
  )


def _first_batch(calibration: Iterable[Any]) -> Any:
  if iter(calibration) is calibration:
    raise ValueError(
      "oneshot.prune: `calibration` is an iterator, which the per-group "
      "passes would exhaust; pass a re-iterable collection such as "
      "list(batches)."
    )
  for batch in calibration:
    return batch
  raise ValueError(
    "oneshot.prune: `calibration` is empty; pass a non-empty sequence of "
    "input batches (it is iterated once per group)."
  )


def _groups(
  layers: list[capture.DenseLayer], group: Callable[[str], Any] | None
) -> dict[Any, list[capture.DenseLayer]]:
  """Layers by group key, groups in the order of their first call."""
  out: dict[Any, list[capture.DenseLayer]] = {}
  for layer in layers:
    if group is not None:
      key = group(layer.path)
    else:  # the top-level module; "" for a model that is one Dense layer
      key = layer.module_path[0] if layer.module_path else ""
    out.setdefault(key, []).append(layer)
  return out


def _selected_layers(
  apply_fn: capture.ApplyFn,
  params: Params,
  batch: Any,
  where: Selection,
  pattern: Pattern,
) -> list[capture.DenseLayer]:
  """The Dense layers to prune, in call order; checks ``where``/pattern."""
  found = capture.dense_layers(apply_fn, params, batch)
  called = {layer.path for layer in found}
  if where is None:  # the Dense kernels the default selection accepts
    default = default_where()
    where = lambda path, leaf: path in called and default(path, leaf)
  chosen = jax.tree.leaves(resolve_where(where, params, "oneshot.prune"))
  selected = {p for p, c in zip(leaf_paths(params), chosen) if c}
  missing = sorted(selected - called)
  if missing:
    raise ValueError(
      f"oneshot.prune: {missing} are selected by `where` but are not the "
      "kernel of an nn.Dense/nn.DenseGeneral that apply_fn calls; exclude "
      "them with `where=` (e.g. a regex or a (path, leaf) predicate)."
    )
  layers = [layer for layer in found if layer.path in selected]
  for layer in layers:
    patterns_lib.check_leaf(
      pattern, layer.shape, f"oneshot.prune: {layer.path}"
    )
  return layers


def _owl_targets(
  owl: OWL,
  groups: dict[Any, list[capture.DenseLayer]],
  kernels: dict[str, Any],
  dense: dict[str, LayerStatistics],
  sparsity: float,
) -> dict[Any, float]:
  """OWL's sparsity per group from the dense model's Wanda scores."""
  ratios = [
    outlier_ratio(
      [
        rules.wanda_scores(
          kernels[layer.path].reshape(layer.shape), dense[layer.path]
        )
        for layer in members
      ],
      owl.threshold_m,
    )
    for members in groups.values()
  ]
  per_group = owl_sparsities(ratios, sparsity, owl.lam)
  return dict(zip(groups, (float(s) for s in per_group)))


def _error(
  w: jax.Array, new: jax.Array, stats: LayerStatistics
) -> float | None:
  if stats.gram is None:
    return None
  hi = jax.lax.Precision.HIGHEST
  delta = w - new
  num = jnp.sum(delta * jnp.matmul(stats.gram, delta, precision=hi))
  den = jnp.sum(w * jnp.matmul(stats.gram, w, precision=hi))
  return float(num / den) if float(den) > 0 else float("nan")


def _on_auto_mesh(x: Any) -> Any:
  """``x`` with the same layout on an Auto-typed copy of its mesh.

  A layer's rule is written for XLA's sharding propagation: under Explicit
  axes every intermediate would need a stated sharding. The data do not
  move; an output-sharded kernel (tensor parallel) stays split by output
  neurons, whose sweeps are independent, so the rule runs with no gather.
  """
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return x
  mesh = sharding.mesh
  if all(t != AxisType.Explicit for t in mesh.axis_types):
    return x
  auto = Mesh(
    mesh.devices,
    mesh.axis_names,
    axis_types=(AxisType.Auto,) * len(mesh.axis_names),
  )
  return jax.device_put(x, NamedSharding(auto, sharding.spec))


def _placed(x: jax.Array, *references: Any) -> jax.Array:
  """``x`` on the first reference's ``NamedSharding`` (mesh, axis types).

  The kernel's own if it has one, else the statistics' (where the sharded
  calibration batches put them); undoes :func:`_on_auto_mesh`.
  """
  for reference in references:
    sharding = getattr(reference, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return jax.device_put(x, sharding)
  return x


def prune(
  apply_fn: capture.ApplyFn,
  params: Params,
  calibration: Iterable[Any],
  method: OneShotMethod,
  *,
  sparsity: float | None = None,
  pattern: Pattern | None = None,
  where: Selection = None,
  allocation: Any = None,
  sequential: bool = True,
  group: Callable[[str], Any] | None = None,
) -> OneShotResult:
  """Prunes a trained linen model layer by layer from calibration data.

  For each group of Dense layers, in the order the forward pass first calls
  them: gather the layers' input statistics on ``calibration`` (with every
  earlier group already pruned when ``sequential``), then prune each kernel
  ``W: [in, out]`` with ``method.prune_layer(W, stats, s_l, pattern)``.

  Args:
    apply_fn: ``apply_fn(params, x)``, e.g. ``lambda p, x: model.apply(
      {"params": p}, x)``; its ``nn.Dense``/``nn.DenseGeneral`` calls are
      captured (see :mod:`jaxsparse.oneshot.capture`).
    params: the trained params.
    calibration: a re-iterable collection of input batches (a list, or
      batches sharded over a data axis); iterated once per group.
    method: :func:`~jaxsparse.oneshot.wanda`, ``magnitude()``,
      ``sparsegpt()``, ...
    sparsity: the target fraction of zeros in ``[0, 1)`` (static); ``None``
      with an N:M ``pattern``.
    pattern: ``js.Unstructured()`` (default) or ``js.NM(n, m)`` (groups of
      ``m`` inputs, axis -2).
    where: which kernels to prune (see :func:`jaxsparse.resolve_where`);
      each must be the kernel of a Dense layer ``apply_fn`` calls. Default:
      the kernels of every ``nn.Dense``/``nn.DenseGeneral`` that
      ``apply_fn`` calls, minus embeddings (params such as a learned
      position table are left alone).
    allocation: ``None``/``"uniform"`` (every layer at ``sparsity``) or
      :func:`~jaxsparse.oneshot.owl` (per-group sparsities from the dense
      model's outlier ratios; unstructured only).
    sequential: gather each group's statistics from the partly pruned model
      (default, as the papers do); ``False`` gathers them once from the
      dense model.
    group: ``path -> key`` grouping kernels pruned from one statistics pass
      (``path`` is ``Block_0/Dense_0/kernel``); default: the top-level
      module of the layer (``Block_0``).

  Returns:
    :class:`OneShotResult` ``(params, masks, layers)``.

  Raises:
    ValueError: bad ``sparsity``/``pattern``/``allocation``, empty
      ``calibration``, ``where`` selecting nothing, or a selected param that
      is not a kernel ``apply_fn`` calls through a Dense layer.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from jaxsparse import oneshot
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 8))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> result = oneshot.prune(
    ...   lambda p, x: model.apply({"params": p}, x), params, [x],
    ...   oneshot.wanda(), sparsity=0.5)
    >>> [r.sparsity for r in result.layers.values()]
    [0.5, 0.5]
  """
  pattern = Unstructured() if pattern is None else pattern
  patterns_lib.check_pattern(pattern)
  if not isinstance(pattern, (Unstructured, NM)):
    raise ValueError(
      f"oneshot.prune: pattern={pattern!r} is not supported; use "
      "js.Unstructured() or js.NM(n, m)."
    )
  if isinstance(pattern, NM) and pattern.axis != -2:
    raise ValueError(
      f"oneshot.prune: {pattern!r} must group along the reduction axis; use "
      f"js.NM({pattern.n}, {pattern.m}) (axis=-2)."
    )
  target = _check_sparsity(sparsity, pattern)
  owl = _check_allocation(allocation, pattern)
  first = _first_batch(calibration)

  flat, treedef = jax.tree_util.tree_flatten(params)
  paths = leaf_paths(params)
  layers = _selected_layers(apply_fn, params, first, where, pattern)
  groups = _groups(layers, group)
  gram = method.needs_gram

  dense = None
  if owl is not None or not sequential:
    dense = capture.layer_statistics(
      apply_fn,
      params,
      calibration,
      [layer.path for layer in layers],
      gram=gram and not sequential,
    )
  targets = {key: target for key in groups}
  if owl is not None:
    kernels = {p: k for p, k in zip(paths, flat)}
    targets = _owl_targets(owl, groups, kernels, dense, target)

  prune_layer = jax.jit(method.prune_layer, static_argnums=(2, 3))
  current = list(flat)
  masks: list[Any] = [None] * len(flat)
  results: dict[str, LayerResult] = {}
  for index, (key, members) in enumerate(groups.items()):
    if not sequential:
      stats = dense
    elif index == 0 and dense is not None and not gram:
      stats = dense  # the dense pass already saw the unpruned model
    else:
      stats = capture.layer_statistics(
        apply_fn,
        jax.tree_util.tree_unflatten(treedef, current),
        calibration,
        [layer.path for layer in members],
        gram=gram,
      )
    for layer in members:
      i = paths.index(layer.path)
      kernel = current[i]
      w = _on_auto_mesh(jnp.asarray(kernel))
      w = w.reshape(layer.shape).astype(jnp.float32)
      layer_stats = jax.tree.map(_on_auto_mesh, stats[layer.path])
      new, mask = prune_layer(w, layer_stats, targets[key], pattern)
      new = jnp.where(mask, new, jnp.zeros_like(new))
      place = (kernel, stats[layer.path].sum)
      new = new.astype(kernel.dtype).reshape(kernel.shape)
      current[i] = _placed(new, *place)
      masks[i] = _placed(mask.reshape(kernel.shape), *place)
      results[layer.path] = LayerResult(
        group=str(key),
        target=targets[key],
        sparsity=1.0 - float(np.asarray(mask).mean()),
        error=_error(w, new, layer_stats),
      )
  return OneShotResult(
    params=jax.tree_util.tree_unflatten(treedef, current),
    masks=jax.tree_util.tree_unflatten(treedef, masks),
    layers=results,
  )
