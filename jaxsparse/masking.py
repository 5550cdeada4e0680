"""Mask trees: selection (``where``), projection, and finding masks in state.

A mask tree has the params' structure; a leaf is a bool array of the param's
shape where the param is sparsified, and ``None`` where it stays dense.
*Selection* (``where``: which leaves are sparsified) is static and reads only
paths, shapes and dtypes; the *mask* (which entries are kept) is dynamic state.
"""

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, PyTree

from jaxsparse import allocation as allocation_lib
from jaxsparse import layout as layout_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import threshold
from jaxsparse.paths import leaf_paths as leaf_paths
from jaxsparse.paths import path_str as path_str
from jaxsparse.types import MaskTree, Params, Selection, Updates

EMBEDDING_NAMES = ("embedding",)
DENSE_LEAF_NAMES = ("bias", "scale")


class DefaultWhere(NamedTuple):
  """The default selection: weight matrices and conv kernels.

  Without the model (``where=None``), selects floating leaves with ``ndim
  >= 2`` except embedding and position tables (a path segment containing
  ``embedding``: ``nn.Embed``/``nnx.Embed`` tables, ``pos_embedding``,
  Hugging Face's ``wpe/embedding``), biases and norm scales (a leaf named
  ``bias`` or ``scale``, which a scanned stack makes 2-D), and the paths
  matched by any ``exclude`` regex (e.g. the first and last layer:
  ``exclude=("Dense_0", "Dense_2")``). Each regex must match some param.

  From the model, :func:`jaxsparse.find_kernels` knows instead of guessing:
  the leaves it finds consumed by a matmul or convolution.
  """

  exclude: tuple[str, ...] = ()

  def __call__(self, path: str, leaf: ArrayLike) -> bool:
    segments = path.split("/")
    if jnp.ndim(leaf) < 2 or segments[-1] in DENSE_LEAF_NAMES:
      return False
    if any(name in s.lower() for s in segments for name in EMBEDDING_NAMES):
      return False
    return not any(re.search(pattern, path) for pattern in self.exclude)


def default_where(exclude: Sequence[str] = ()) -> DefaultWhere:
  """Weight matrices and conv kernels, minus embeddings and ``exclude``.

  Args:
    exclude: regexes (``re.search`` on the ``a/b/kernel`` path) of params to
      keep dense, typically the first and last layers.
  """
  if isinstance(exclude, str):
    exclude = (exclude,)
  return DefaultWhere(tuple(exclude))


def _is_floating(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """How one selected leaf is sparsified: its pattern on its matrices.

  Attributes:
    path: the leaf's ``a/b/kernel`` path.
    pattern: the leaf's pattern, acting on each matrix ``[K, N]`` of the
      leaf's :class:`~jaxsparse.layout.Layout`.
    layout: the leaf's layout (from :func:`jaxsparse.find_kernels`, else
      :func:`jaxsparse.layout.default_layout`).
  """

  path: str
  pattern: patterns_lib.Pattern
  layout: layout_lib.Layout

  def select(self, scores: Array, sparsity: ArrayLike) -> Array:
    """The leaf's mask keeping its highest ``scores`` at ``sparsity``, with
    exact counts per matrix."""
    if isinstance(self.pattern, patterns_lib.Unstructured) and not (
      self.layout.stack
    ):  # one matrix, any entries: no need to form it (stays shard-local)
      return patterns_lib.select(self.pattern, scores, sparsity)
    return layout_lib.on_matrices(
      lambda s: patterns_lib.select(self.pattern, s, sparsity),
      self.layout,
      jnp.asarray(scores, jnp.float32),
    )

  def follows(self, mask: ArrayLike) -> bool:
    """Whether a concrete mask obeys the pattern on every matrix."""
    mask = np.asarray(mask, bool)
    matrices = np.asarray(
      layout_lib.to_matrices(jnp.asarray(mask), self.layout)
    )
    return all(patterns_lib.follows(self.pattern, m) for m in matrices)

  def allocation_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """One layer's shape (the leaf without its stack axes), for ER/ERK."""
    return self.layout.slice_shape(shape)

  def describe(self, shape: Sequence[int]) -> str:
    return f"{self.pattern!r} on {self.layout.describe(shape)}"


PatternSpec = (
  patterns_lib.Pattern
  | Mapping[str, patterns_lib.Pattern]
  | Callable[[str, Any], patterns_lib.Pattern]
)
"""One pattern for every leaf, ``{regex: pattern}`` (first ``re.search``
match), or ``(path, leaf) -> pattern``."""


def known_patterns(pattern: Any) -> list[patterns_lib.Pattern] | None:
  """The patterns a pattern spec may give (``None`` for a function)."""
  if isinstance(pattern, patterns_lib.PATTERNS):
    return [pattern]
  if isinstance(pattern, Mapping):
    return list(pattern.values())
  if callable(pattern):
    return None
  patterns_lib.check_pattern(pattern)  # raises
  return [pattern]


def check_pattern_spec(pattern: Any, method: str) -> None:
  """Raises ``ValueError`` for a bad pattern spec (before any params)."""
  if isinstance(pattern, patterns_lib.PATTERNS):
    patterns_lib.check_pattern(pattern)
  elif isinstance(pattern, Mapping):
    if not pattern:
      raise ValueError(f"{method}: pattern={{}} maps no path to a pattern.")
    for regex, value in pattern.items():
      if not isinstance(regex, str):
        raise ValueError(
          f"{method}: pattern mapping key {regex!r} is not a path regex."
        )
      patterns_lib.check_pattern(value)
  elif not isinstance(pattern, patterns_lib.PATTERNS) and not callable(pattern):
    patterns_lib.check_pattern(pattern)


def leaf_pattern(
  pattern: Any, path: str, leaf: Any, method: str
) -> patterns_lib.Pattern:
  if isinstance(pattern, patterns_lib.PATTERNS):
    return pattern
  if isinstance(pattern, Mapping):
    for regex, value in pattern.items():
      if re.search(regex, path):
        return value
    raise ValueError(
      f"{method}: {path} is sparsified but no key of the pattern mapping "
      f"{list(pattern)} matches it; add a catch-all entry such as "
      "'.*': js.Unstructured(), or keep the leaf dense with `where=`."
    )
  found = pattern(path, leaf)
  try:
    patterns_lib.check_pattern(found)
  except ValueError as e:
    raise ValueError(
      f"{method}: the pattern function gave {path}: {e}"
    ) from None
  return found


def leaf_specs(
  where: Selection,
  params: Params,
  method: str,
  pattern: PatternSpec | None = None,
) -> PyTree:
  """The static selection: a :class:`LeafSpec` per selected leaf.

  Args:
    where: ``None`` (:func:`default_where`), a
      :class:`~jaxsparse.layout.Kernels` (from :func:`jaxsparse.find_kernels`:
      its kernels, with their layouts), a regex string searched in each
      ``a/b/kernel`` path, a predicate ``(path, leaf) -> bool``, or a tree of
      bools with the params' structure (or a prefix of it), as in
      ``optax.masked``.
    params: the params (arrays, tracers or ``ShapeDtypeStruct``).
    method: the method's name, for error messages.
    pattern: a pattern, ``{regex: pattern}`` or ``(path, leaf) -> pattern``;
      each selected leaf's matrices are checked against its pattern.

  Returns:
    A params-shaped tree with a :class:`LeafSpec` where a leaf is selected
    and ``False`` elsewhere.

  Raises:
    ValueError: nothing is selected, an ``exclude`` regex or a pattern
      mapping key matches no param, a selected param is not floating point
      or its matrices do not fit its pattern, a ``Kernels`` was found on
      other params, or a bool tree does not match.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  chosen = _chosen(where, params, paths, leaves, method)
  if not any(chosen):
    raise ValueError(
      f"{method}: `where` selects no param to sparsify; the params are "
      f"{paths} (the default selects floating leaves with ndim >= 2, minus "
      "embeddings, biases and scales). Pass `where=` as a regex, a (path, "
      "leaf) predicate or js.find_kernels(apply_fn, params, x)."
    )
  pattern = patterns_lib.Unstructured() if pattern is None else pattern
  if isinstance(pattern, Mapping):
    selected = [p for p, c in zip(paths, chosen) if c]
    for regex in pattern:
      if not any(re.search(regex, p) for p in selected):
        raise ValueError(
          f"{method}: pattern key {regex!r} matches no sparsified param; "
          f"they are {selected}."
        )
  specs = []
  for path, leaf, c in zip(paths, leaves, chosen):
    if not c:
      specs.append(False)
      continue
    if not _is_floating(leaf):
      raise ValueError(
        f"{method}: {path} has dtype {jnp.result_type(leaf)}; only floating "
        "params can be sparsified. Exclude it with `where=`."
      )
    shape = tuple(jnp.shape(leaf))
    layout = layout_lib.leaf_layout(where, path, shape)
    spec = LeafSpec(path, leaf_pattern(pattern, path, leaf, method), layout)
    check_spec(spec, shape, method)
    specs.append(spec)
  return jax.tree_util.tree_unflatten(treedef, specs)


def check_spec(spec: LeafSpec, shape: Sequence[int], method: str) -> None:
  """Raises ``ValueError`` naming the leaf if its matrices do not fit."""
  layout_lib.check_layout(spec.layout, shape, f"{method}: {spec.path}")
  matrix = spec.layout.matrix_shape(shape)
  where = (
    ""
    if spec.layout.is_plain(len(shape))
    else f" (its matrices {spec.layout.describe(shape)} of shape "
    f"{tuple(shape)}, contracting axes {spec.layout.contract})"
  )
  try:
    patterns_lib.check_leaf(spec.pattern, matrix, f"{method}: {spec.path}")
  except ValueError as e:
    raise ValueError(f"{e}{where}") from None


def _chosen(where, params, paths, leaves, method) -> list[bool]:
  if where is None:
    where = default_where()
  if isinstance(where, layout_lib.Kernels):
    unknown = sorted(set(paths) - set(where))
    if unknown:
      raise ValueError(
        f"{method}: `where` is a js.Kernels found on other params: it does "
        f"not know {unknown[:5]}; call js.find_kernels on the params the "
        "optimizer sees."
      )
    selected = set(where.selected)
    return [path in selected for path in paths]
  if isinstance(where, str):
    return [re.search(where, path) is not None for path in paths]
  if callable(where):
    chosen = [bool(where(path, leaf)) for path, leaf in zip(paths, leaves)]
    if isinstance(where, DefaultWhere):
      for excluded in where.exclude:
        if not any(re.search(excluded, path) for path in paths):
          raise ValueError(
            f"{method}: exclude={excluded!r} matches no param; the params "
            f"are {paths}."
          )
    return chosen
  try:
    return jax.tree.leaves(
      jax.tree.map(
        lambda w, sub: jax.tree.map(lambda _: bool(w), sub), where, params
      )
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{method}: `where` is a tree that does not match the params' "
      f"structure ({e}); give a tree of bools shaped like the params, a "
      "regex, or a (path, leaf) predicate."
    ) from None


def resolve_where(
  where: Selection,
  params: Params,
  method: str,
  pattern: PatternSpec | None = None,
) -> PyTree:
  """The static selection as a params-shaped tree of Python bools.

  See :func:`leaf_specs` for the arguments and checks.
  """
  specs = leaf_specs(where, params, method, pattern)
  return jax.tree.map(lambda s: s is not False, specs)


def init_masks(params: Params, chosen: PyTree) -> MaskTree:
  """All-True masks on the chosen leaves (sharded like the params)."""
  return jax.tree.map(
    lambda p, c: jnp.ones_like(p, dtype=bool) if c else None, params, chosen
  )


def _is_masked_node(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def _mask_leaf(node: Any) -> bool:
  return node is None or _is_masked_node(node) or _is_nnx_variable(node)


def _by_path(masks: PyTree) -> dict[str, Any]:
  """``{path: mask or None}``; nnx Variables read, optax ``MaskedNode``s
  (the leaves ``multi_transform`` hides from a partition) are ``None``."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_mask_leaf)[0]
  out = {}
  for key, leaf in flat:
    leaf = _unwrap(leaf)
    out[path_str(key)] = None if _is_masked_node(leaf) else leaf
  return out


def treedef_leaves(params: Params, masks: MaskTree) -> list[Any]:
  """The mask leaves (``None`` included) aligned with the params' leaves.

  Leaves are matched by their normalised paths, so a linen dict, an
  ``nnx.State`` (with or without ``Variable`` wrappers) and a pure dict of
  the same params match each other.

  Raises:
    ValueError: naming the paths that only one of the trees has.
  """
  paths = leaf_paths(params)
  found = _by_path(masks)
  if set(paths) != set(found):
    missing = sorted(set(paths) - set(found))
    extra = sorted(set(found) - set(paths))
    raise ValueError(
      "the mask tree does not have the params' structure: params without a "
      f"mask entry {missing[:5]}, mask entries without a param {extra[:5]}; "
      "build it with js.masks(opt_state) or shaped like the params (None "
      "where a param stays dense)."
    )
  return [found[p] for p in paths]


def check_masks(params: Params, masks: MaskTree) -> None:
  """Raises ``ValueError`` naming the leaf where ``masks`` does not fit."""
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_masks = treedef_leaves(params, masks)
  for (path, p), m in zip(flat_params, flat_masks):
    if m is None:
      continue
    if jnp.shape(m) != jnp.shape(p):
      raise ValueError(
        f"{path_str(path)}: mask shape {jnp.shape(m)} does not fit the param's "
        f"shape {jnp.shape(p)}; the mask must have the param's shape."
      )
    if jnp.result_type(m) != jnp.bool_:
      raise ValueError(
        f"{path_str(path)}: mask dtype {jnp.result_type(m)} is not bool; "
        "convert it with `mask.astype(bool)`."
      )


def check_same_params(masks: MaskTree, params: Params, method: str) -> None:
  """Raises ``ValueError`` if ``update`` got other params than ``init``.

  ``masks`` is the method's state (built from the params ``init`` saw); a
  different tree (e.g. ``init`` on ``variables["params"]``, ``update`` on
  the whole ``variables``) is named path by path.
  """
  found = set(_by_path(masks))
  paths = set(_by_path(params))
  if found != paths:
    raise ValueError(
      f"{method}: update got params with other leaves than init: "
      f"{sorted(paths - found)[:5]} are new, {sorted(found - paths)[:5]} are "
      "gone; pass update the same tree as init (e.g. variables['params'] "
      "both times)."
    )


def map_masked(
  fn: Callable[[Any, Any], Any], params: Params, masks: MaskTree
) -> PyTree:
  """``fn(param, mask)`` on every leaf (mask ``None`` where dense), as a
  params-shaped tree; masks matched by path (see :func:`treedef_leaves`)."""
  leaves, treedef = jax.tree.flatten(params)
  aligned = treedef_leaves(params, masks)
  return jax.tree.unflatten(
    treedef, [fn(p, m) for p, m in zip(leaves, aligned)]
  )


def apply_masks(params: Params, masks: MaskTree) -> Params:
  """Zeroes the pruned entries: ``where(mask, p, 0)`` (``None`` keeps ``p``).

  ``params`` may be any pytree (a linen dict, an ``nnx.State``), and
  ``masks`` any tree with the same paths (``js.masks(opt_state)``).
  """
  check_masks(params, masks)
  return map_masked(
    lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
    params,
    masks,
  )


def mask_gradients(grads: Updates, masks: MaskTree) -> Updates:
  """Zeroes the gradients of pruned entries, as a masked forward pass would."""
  return jax.tree.map(
    lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros_like(g)),
    grads,
    masks,
  )


def project_updates(
  updates: Updates, params: Params, masks: MaskTree
) -> Updates:
  """Updates with ``params + updates == 0`` wherever a mask is False.

  Pruned entries get the update ``-params`` (exact in any float dtype), so
  ``optax.apply_updates`` alone yields masked params.
  """
  return jax.tree.map(
    lambda u, p, m: u if m is None else jnp.where(m, u, -p.astype(u.dtype)),
    updates,
    params,
    masks,
  )


def _spec_leaves(pattern: Any, scores: PyTree) -> list[Any]:
  """One :class:`LeafSpec` (or ``False``) per leaf of ``scores``."""
  flat = jax.tree_util.tree_flatten_with_path(
    scores, is_leaf=lambda x: x is None
  )[0]
  if isinstance(pattern, patterns_lib.PATTERNS):
    return [
      False
      if leaf is None
      else LeafSpec(
        path_str(key), pattern, layout_lib.default_layout(jnp.shape(leaf))
      )
      for key, leaf in flat
    ]
  specs = jax.tree.leaves(pattern, is_leaf=lambda x: x is None)
  if len(specs) != len(flat):
    raise ValueError(
      f"pattern: {len(specs)} leaf specs for {len(flat)} scores; pass the "
      "tree from js.masking.leaf_specs(where, params, ...)."
    )
  return specs


def masks_from_scores(
  scores: PyTree,
  sparsity: ArrayLike,
  *,
  pattern: patterns_lib.Pattern | PyTree,
  allocation: allocation_lib.Allocation,
) -> MaskTree:
  """New masks keeping the highest scores at the allocated sparsities.

  Args:
    scores: params-shaped tree; ``None`` where a param is not sparsified.
    sparsity: the global target (traced is fine).
    pattern: one pattern for every leaf (on its
      :func:`~jaxsparse.layout.default_layout` matrices), or the tree of
      :class:`LeafSpec` from :func:`leaf_specs` (each leaf's pattern on its
      own layout's matrices).
    allocation: how the target is split over leaves; each matrix of a
      stacked leaf is a layer (ER/ERK read one layer's shape).

  Returns:
    The mask tree, with ``None`` where ``scores`` has ``None``.
  """
  leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
  specs = _spec_leaves(pattern, scores)
  chosen = [i for i, leaf in enumerate(leaves) if leaf is not None]
  selected = [leaves[i] for i in chosen]
  if isinstance(allocation, allocation_lib.GlobalThreshold):
    total = sum(leaf.size for leaf in selected)
    new = threshold.topk_masks(selected, threshold.num_kept(total, sparsity))
  else:
    shapes = [specs[i].allocation_shape(leaves[i].shape) for i in chosen]
    sizes = [leaf.size for leaf in selected]
    per_leaf = allocation_lib.layer_sparsities(
      allocation, shapes, sparsity, sizes=sizes
    )
    new = [specs[i].select(leaves[i], s) for i, s in zip(chosen, per_leaf)]
  out: list[Array | None] = [None] * len(leaves)
  for i, mask in zip(chosen, new):
    out[i] = mask
  return jax.tree.unflatten(treedef, out)


def reselect(
  scores: PyTree,
  masks: MaskTree,
  sparsity: ArrayLike,
  *,
  pattern: patterns_lib.Pattern | PyTree,
  allocation: allocation_lib.Allocation,
) -> MaskTree:
  """:func:`masks_from_scores` on the leaves ``masks`` covers.

  ``scores`` may hold a score for every param; leaves whose mask is ``None``
  stay ``None``.
  """
  scores = jax.tree.map(lambda s, m: None if m is None else s, scores, masks)
  return masks_from_scores(
    scores, sparsity, pattern=pattern, allocation=allocation
  )


def _has_masks(node: Any) -> bool:
  return (
    isinstance(node, tuple)
    and hasattr(node, "_fields")
    and ("masks" in node._fields)
  )


def _is_nnx_variable(node: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(node, nnx.Variable)


def _unwrap(leaf: Any) -> Any:
  # flax.nnx.Optimizer wraps every state leaf (None too) in an OptVariable.
  return leaf.get_value() if _is_nnx_variable(leaf) else leaf


def masks(opt_state: PyTree) -> MaskTree:
  """The mask tree from any optimizer state holding a jaxsparse method.

  Works through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.multi_transform`` (a partition's hidden leaves are ``None``),
  ``js.sparsify``, ``nnx.Optimizer`` and any other nesting: it finds every
  state with a ``masks`` field. Several sparsity transforms on disjoint params
  are merged leaf by leaf.

  Raises:
    ValueError: no jaxsparse state in ``opt_state``.
  """
  found = [
    node
    for node in jax.tree.leaves(opt_state, is_leaf=_has_masks)
    if _has_masks(node)
  ]
  if not found:
    raise ValueError(
      "js.masks: no sparsity state (a state with a `masks` field) in "
      "opt_state; build the optimizer with js.sparsify(...) or chain a "
      "jaxsparse method."
    )
  trees = [
    jax.tree.map(
      lambda x: None if _is_masked_node(x) else _unwrap(x),
      node.masks,
      is_leaf=lambda x: _is_nnx_variable(x) or _is_masked_node(x),
    )
    for node in found
  ]
  if len(trees) == 1:
    return trees[0]

  def merge(*leaves):
    present = [leaf for leaf in leaves if leaf is not None]
    if len(present) > 1:
      raise ValueError(
        "js.masks: two sparsity transforms mask the same param; give them "
        "disjoint `where=` selections."
      )
    return present[0] if present else None

  return jax.tree.map(merge, *trees, is_leaf=lambda x: x is None)


def density(masks: MaskTree) -> float:
  """Fraction of kept entries over all masked leaves (host-side)."""
  leaves = [np.asarray(m) for m in jax.tree.leaves(masks)]
  return float(
    sum(m.sum() for m in leaves) / max(sum(m.size for m in leaves), 1)
  )
