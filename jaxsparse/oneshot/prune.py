"""The one-shot (post-training) pruning driver.

:func:`prune` prunes the kernels of a trained model block by block, as
SparseGPT and Wanda do for transformer blocks: the calibration statistics of
block ``g`` are gathered with every earlier block already pruned, so block
``i`` is pruned for the inputs the pruned blocks ``< i`` give it. The model
is any JAX function of its params (linen, nnx, Hugging Face Flax, ...): its
kernels and their inputs are found in its traced computation
(:func:`jaxsparse.find_kernels`, :mod:`jaxsparse.oneshot.capture`). Each
matrix of a kernel's :class:`~jaxsparse.layout.Layout` is pruned as one
layer ``W: [K, N]``.

Blocks are found from the params paths (:func:`block_of`): the path up to
its first numbered segment (``Block_0``, ``decoder/layers_3``,
``transformer/h/0``, ``model/layers/11``), and, for a scanned stack of
layers, one block per scan iteration (``layers[3]``).

References:
  Frantar and Alistarh, `SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot <https://arxiv.org/abs/2301.00774>`_, 2023.

  Sun et al, `A Simple and Effective Pruning Approach for Large Language
  Models <https://arxiv.org/abs/2306.11695>`_, 2024.
"""

import numbers
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxsparse import layout as layout_lib
from jaxsparse import masking
from jaxsparse.allocation import Uniform
from jaxsparse.oneshot import capture, rules
from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.oneshot.owl import OWL, outlier_ratio, owl_sparsities
from jaxsparse.paths import leaf_paths
from jaxsparse.patterns import NM, Pattern, Unstructured
from jaxsparse.types import MaskTree, Params, Selection


class LayerResult(NamedTuple):
  """What :func:`prune` did to one kernel matrix.

  Attributes:
    group: the block the matrix was pruned with (``"Block_0"``).
    target: the sparsity asked of this matrix (after allocation).
    sparsity: the fraction of zeros in its mask.
    error: ``‖XW - XW'‖²_F / ‖XW‖²_F`` on the calibration inputs it was pruned
      from (``= tr(ΔᵀGΔ) / tr(WᵀGW)``, ``G = XᵀX``); ``nan`` when the
      layer's output is zero on the calibration data.
  """

  group: str
  target: float
  sparsity: float
  error: float


class OneShotResult(NamedTuple):
  """The output of :func:`prune`.

  Attributes:
    params: the pruned params: same tree and dtypes, kernels zero where the
      mask is ``False``.
    masks: params-shaped mask tree: a bool array of the kernel's shape for
      each pruned kernel, ``None`` elsewhere (as ``js.masks`` returns).
    layers: ``{kernel path: LayerResult}`` in pruning order; the matrices
      of a stacked kernel are ``path[i]`` (``i`` its flat matrix index).
  """

  params: Params
  masks: MaskTree
  layers: dict[str, LayerResult]


def _check_sparsity(sparsity: Any, patterns: list[Pattern]) -> float | None:
  nm = [p for p in patterns if isinstance(p, NM)]
  if sparsity is None:
    if len(nm) != len(patterns):
      raise ValueError(
        "oneshot.prune: pass sparsity= (a fraction of zeros in [0, 1)) or an "
        "N:M pattern=js.NM(n, m)."
      )
    return None
  if isinstance(sparsity, (np.ndarray, jax.Array)) and np.ndim(sparsity) == 0:
    sparsity = sparsity.item()
  if not (
    isinstance(sparsity, numbers.Real)
    and not isinstance(sparsity, bool)
    and 0 <= sparsity < 1
  ):
    raise ValueError(
      f"oneshot.prune: sparsity={sparsity!r} must be a float in [0, 1) "
      "(the fraction of zeros)."
    )
  if len(nm) == len(patterns):
    for p in nm:
      level = 1 - p.n / p.m
      if not np.isclose(sparsity, level):
        raise ValueError(
          f"oneshot.prune: sparsity={sparsity} conflicts with {p!r} (whose "
          f"sparsity is {level}); pass sparsity=None."
        )
  return float(sparsity)


def _check_allocation(allocation: Any, patterns: list[Pattern]) -> OWL | None:
  if allocation is None or allocation == "uniform":
    return None
  if isinstance(allocation, Uniform):
    return None
  if isinstance(allocation, OWL):
    if not all(isinstance(p, Unstructured) for p in patterns):
      raise ValueError(
        "oneshot.prune: OWL allocates unstructured sparsity; an N:M pattern "
        "fixes its layers' sparsity. Drop allocation= or the pattern."
      )
    return allocation
  raise ValueError(
    f"oneshot.prune: allocation={allocation!r} is not supported; use None, "
    "'uniform' or oneshot.owl()."
  )


def _check_patterns(pattern: Any) -> list[Pattern]:
  masking.check_pattern_spec(pattern, "oneshot.prune")
  known = masking.known_patterns(pattern) or []
  for p in known:
    if not isinstance(p, (Unstructured, NM)):
      raise ValueError(
        f"oneshot.prune: pattern={p!r} is not supported; use "
        "js.Unstructured() or js.NM(n, m)."
      )
    if isinstance(p, NM) and p.axis % 2 != 0:
      raise ValueError(
        f"oneshot.prune: {p!r} must group along the contraction (the rows K "
        f"of each kernel matrix); use js.NM({p.n}, {p.m})."
      )
  return known


def _first_batch(calibration: Iterable[Any]) -> Any:
  if hasattr(calibration, "shape") and hasattr(calibration, "dtype"):
    raise ValueError(
      "oneshot.prune: `calibration` is one array of shape "
      f"{tuple(calibration.shape)}; pass a list of input batches, e.g. [x] "
      "or list(batches) (each element is one call of apply_fn)."
    )
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


_NUMBERED = re.compile(r"^(\d+|.*_\d+)$")


def block_of(path: str) -> str:
  """The block a kernel belongs to: its path up to the first numbered
  segment (``Block_0/Dense_1/kernel`` -> ``Block_0``, ``transformer/h/3/
  attn/c_attn/kernel`` -> ``transformer/h/3``), else its module path."""
  segments = path.split("/")
  for i, segment in enumerate(segments[:-1]):
    if _NUMBERED.match(segment):
      return "/".join(segments[: i + 1])
  return "/".join(segments[:-1]) or path


class _Unit(NamedTuple):
  """One kernel matrix to prune."""

  layer: capture.Layer
  index: tuple[int, ...]  # its coordinates along the stack axes
  flat: int  # its flat matrix index


def _units(layer: capture.Layer, leaf_shape) -> list[_Unit]:
  sizes = [leaf_shape[a] for a in layer.layout.stack]
  coords = list(np.ndindex(*sizes)) if sizes else [()]
  return [_Unit(layer, tuple(c), i) for i, c in enumerate(coords)]


def _group_key(unit: _Unit, group: Callable[[str], Any] | None, prefixes):
  """``(block name, scans, step)`` of a matrix: ``scans`` identifies the
  scans over its stack (empty for a plain kernel), ``step`` its iteration."""
  layer = unit.layer
  if not layer.scanned:
    base = block_of(layer.path) if group is None else group(layer.path)
    return str(base), (), ()
  where = [layer.layout.stack.index(a) for a in layer.scanned]
  step = tuple(int(unit.index[w]) for w in where)
  if group is None:
    base, scans = prefixes[layer.scans], layer.scans
  else:
    base = group(layer.path)
    scans = (str(base),)
  return f"{base}[{','.join(map(str, step))}]", scans, step


def _common_prefix(paths: list[str]) -> str:
  split = [p.split("/")[:-1] for p in paths]
  common = []
  for parts in zip(*split):
    if len(set(parts)) > 1:
      break
    common.append(parts[0])
  return "/".join(common) or paths[0]


def _groups(
  layers: list[capture.Layer], shapes: dict[str, tuple], group
) -> dict[str, list[_Unit]]:
  """Matrices by block; blocks in the order the forward pass reaches them
  (a scan's iterations one after the other, named by the common path of
  the kernels it slices)."""
  by_scan: dict[Any, list[str]] = {}
  for layer in layers:
    if layer.scanned:
      by_scan.setdefault(layer.scans, []).append(layer.path)
  prefixes = {s: _common_prefix(paths) for s, paths in by_scan.items()}
  out: dict[str, list[_Unit]] = {}
  order: dict[str, tuple] = {}
  first_use: dict[Any, int] = {}
  for position, layer in enumerate(layers):
    for unit in _units(layer, shapes[layer.path]):
      name, scans, step = _group_key(unit, group, prefixes)
      start = first_use.setdefault(scans, position) if scans else position
      order.setdefault(name, (start, step))
      out.setdefault(name, []).append(unit)
  return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def _selection(
  kernels: layout_lib.Kernels, params: Params, where: Selection
) -> layout_lib.Kernels:
  """The kernels ``where`` selects, each checked to be a kernel."""
  if where is None:
    return kernels
  if isinstance(where, layout_lib.Kernels):
    where = where.selected
    chosen = set(where)
  else:
    flags = jax.tree.leaves(
      masking.resolve_where(where, params, "oneshot.prune")
    )
    chosen = {p for p, c in zip(leaf_paths(params), flags) if c}
  for path in sorted(chosen):
    record = kernels[path]
    if record.role != "kernel":
      why = f" ({record.reason})" if record.reason else ""
      raise ValueError(
        f"oneshot.prune: {path} is selected by `where` but the model does "
        f"not multiply by it as a kernel: its role is {record.role}{why} "
        "(see js.find_kernels(apply_fn, params, x)); exclude it with "
        "`where=`."
      )
  others = [p for p in kernels.selected if p not in chosen]
  return layout_lib.Kernels(
    {p: kernels[p] for p in kernels}, frozenset(others) | kernels.excluded
  )


def _owl_targets(
  owl: OWL,
  groups: dict[str, list[_Unit]],
  matrices: dict[tuple[str, int], Any],
  dense: dict[str, LayerStatistics],
  sparsity: float,
) -> dict[str, float]:
  """OWL's sparsity per group from the dense model's Wanda scores."""
  ratios = [
    outlier_ratio(
      [
        rules.wanda_scores(
          matrices[u.layer.path, u.flat],
          capture.stack_index(dense[u.layer.path], u.index),
        )
        for u in members
      ],
      owl.threshold_m,
    )
    for members in groups.values()
  ]
  per_group = owl_sparsities(ratios, sparsity, owl.lam)
  return dict(zip(groups, (float(s) for s in per_group)))


def _error(w: jax.Array, new: jax.Array, stats: LayerStatistics) -> float:
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


def _matrices(kernel: Any, layout: layout_lib.Layout) -> jax.Array:
  """The kernel's matrices ``[S, K, N]`` as float32 (on an Auto mesh)."""
  w = _on_auto_mesh(jnp.asarray(kernel)).astype(jnp.float32)
  if layout.is_plain(w.ndim):
    return w[None]
  return layout_lib.to_matrices(w, layout)


def _from_matrices(m, layout, kernel):
  if layout.is_plain(kernel.ndim):
    return m[0]
  return layout_lib.from_matrices(m, layout, kernel.shape)


def prune(
  apply_fn: capture.ApplyFn,
  params: Params,
  calibration: Iterable[Any],
  method: OneShotMethod,
  *,
  sparsity: float | None = None,
  pattern: masking.PatternSpec | None = None,
  where: Selection = None,
  allocation: Any = None,
  sequential: bool = True,
  group: Callable[[str], Any] | None = None,
) -> OneShotResult:
  """Prunes a trained model layer by layer from calibration data.

  For each block of kernel matrices, in the order the forward pass reaches
  them: gather the matrices' input statistics on ``calibration`` (with
  every earlier block already pruned when ``sequential``), then prune each
  matrix ``W: [K, N]`` with ``method.prune_layer(W, stats, s_l, pattern)``.

  Args:
    apply_fn: the model as ``apply_fn(params, x)``, e.g. ``lambda p, x:
      model.apply({"params": p}, x)`` (linen), ``lambda s, x: nnx.merge(
      graphdef, s)(x)`` (nnx) or ``lambda p, x: hf_model(x, params=p).logits``
      (Hugging Face Flax); its kernels are found in its traced computation.
    params: the trained params.
    calibration: a re-iterable collection of input batches (a list, or
      batches sharded over a data axis); iterated once per block.
    method: :func:`~jaxsparse.oneshot.wanda`, ``magnitude()``,
      ``sparsegpt()``, ...
    sparsity: the target fraction of zeros in ``[0, 1)`` (static); ``None``
      with N:M patterns only.
    pattern: ``js.Unstructured()`` (default), ``js.NM(n, m)`` (groups of
      ``m`` along each matrix's contraction), or per leaf: ``{regex:
      pattern}`` or ``(path, leaf) -> pattern``.
    where: which kernels to prune (see :func:`jaxsparse.masking.leaf_specs`);
      each must be a kernel of the model. Default: every kernel
      :func:`jaxsparse.find_kernels` finds (embeddings, biases, norms and
      position tables are left alone).
    allocation: ``None``/``"uniform"`` (every matrix at ``sparsity``) or
      :func:`~jaxsparse.oneshot.owl` (per-block sparsities from the dense
      model's outlier ratios; unstructured only).
    sequential: gather each block's statistics from the partly pruned model
      (default, as the papers do); ``False`` gathers them once from the
      dense model.
    group: ``path -> key`` grouping kernels pruned from one statistics pass;
      default :func:`block_of`. A scanned stack adds its iteration (one
      block per layer of the stack).

  Returns:
    :class:`OneShotResult` ``(params, masks, layers)``.

  Raises:
    ValueError: bad ``sparsity``/``pattern``/``allocation``, an empty or
      single-array ``calibration``, ``where`` selecting nothing, or a
      selected param that the model does not multiply by as a kernel.

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
  known = _check_patterns(pattern)
  target = _check_sparsity(sparsity, known)
  owl = _check_allocation(allocation, known)
  first = _first_batch(calibration)

  kernels = layout_lib.find_kernels(apply_fn, params, first)
  selection = _selection(kernels, params, where)
  specs = masking.leaf_specs(selection, params, "oneshot.prune", pattern)
  flat_specs = jax.tree.leaves(specs)
  paths = leaf_paths(params)
  spec_of = {p: s for p, s in zip(paths, flat_specs) if s is not False}
  for path, spec in spec_of.items():
    if target is None and not isinstance(spec.pattern, NM):
      raise ValueError(
        f"oneshot.prune: {path} has pattern {spec.pattern!r}; pass "
        "sparsity= for it."
      )
  flat, treedef = jax.tree_util.tree_flatten(params)
  shapes = {p: tuple(jnp.shape(x)) for p, x in zip(paths, flat)}
  layers = [
    layer
    for layer in capture.layers(apply_fn, params, first)
    if layer.path in spec_of
  ]
  groups = _groups(layers, shapes, group)

  current = list(flat)
  index = {p: i for i, p in enumerate(paths)}
  stats_paths = [layer.path for layer in layers]
  dense = None
  if owl is not None or not sequential:
    dense = capture.layer_statistics(
      apply_fn, params, calibration, stats_paths, gram=True
    )

  def level(unit: _Unit) -> float:
    p = spec_of[unit.layer.path].pattern
    return 1 - p.n / p.m if isinstance(p, NM) else target

  targets = {name: target for name in groups}
  if owl is not None:
    matrices = {
      (layer.path, i): m
      for layer in layers
      for i, m in enumerate(_matrices(current[index[layer.path]], layer.layout))
    }
    targets = _owl_targets(owl, groups, matrices, dense, target)

  prune_layer = jax.jit(method.prune_layer, static_argnums=(2, 3))
  masks: list[Any] = [None] * len(flat)
  results: dict[str, LayerResult] = {}
  for position, (name, members) in enumerate(groups.items()):
    if not sequential or (position == 0 and dense is not None):
      stats = dense
    else:
      stats = capture.layer_statistics(
        apply_fn,
        jax.tree_util.tree_unflatten(treedef, current),
        calibration,
        sorted({u.layer.path for u in members}),
        gram=True,
      )
    by_leaf: dict[str, list[_Unit]] = {}
    for unit in members:
      by_leaf.setdefault(unit.layer.path, []).append(unit)
    for path, units in by_leaf.items():
      i = index[path]
      kernel, layout = current[i], units[0].layer.layout
      mats = _matrices(kernel, layout)
      keep = (
        _matrices(masks[i], layout).astype(bool)
        if masks[i] is not None
        else jnp.ones(mats.shape, bool)
      )
      spec = spec_of[path]
      for unit in units:
        w = mats[unit.flat]
        layer_stats = jax.tree.map(
          _on_auto_mesh, capture.stack_index(stats[path], unit.index)
        )
        goal = level(unit) if targets[name] is None else targets[name]
        if isinstance(spec.pattern, NM):
          goal = level(unit)
        new, mask = prune_layer(w, layer_stats, goal, spec.pattern)
        new = jnp.where(mask, new, jnp.zeros_like(new))
        mats = mats.at[unit.flat].set(new)
        keep = keep.at[unit.flat].set(mask)
        label = (
          path
          if len(units) == 1 and not layout.stack
          else (f"{path}[{unit.flat}]")
        )
        results[label] = LayerResult(
          group=name,
          target=float(goal),
          sparsity=1.0 - float(np.asarray(mask).mean()),
          error=_error(w, new, layer_stats),
        )
      place = (kernel, stats[path].sum)
      new_kernel = _from_matrices(mats, layout, kernel).astype(kernel.dtype)
      current[i] = _placed(new_kernel, *place)
      masks[i] = _placed(_from_matrices(keep, layout, kernel), *place)
  return OneShotResult(
    params=jax.tree_util.tree_unflatten(treedef, current),
    masks=jax.tree_util.tree_unflatten(treedef, masks),
    layers=results,
  )
