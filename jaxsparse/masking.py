"""Mask trees: selection (``where``), projection, and finding masks in state.

A mask tree has the params' structure; a leaf is a bool array of the param's
shape where the param is sparsified, and ``None`` where it stays dense.
*Selection* (``where``: which leaves are sparsified) is static and reads only
paths, shapes and dtypes; the *mask* (which entries are kept) is dynamic state.
"""

import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from jaxsparse import allocation as allocation_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import threshold
from jaxsparse.types import MaskTree, Params, Selection, Updates


def path_str(path: Sequence[Any]) -> str:
  """Normalises a JAX key path to ``a/b/kernel``.

  Dict keys, attribute names and sequence indices become path segments; the
  trailing ``value`` of ``nnx.Variable`` leaves is dropped, so linen dicts and
  ``nnx.State`` give the same paths.
  """
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      parts.append(str(entry.key))
    else:
      parts.append(str(entry))
  if len(parts) > 1 and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """Normalised paths of the array leaves of ``tree``."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class DefaultWhere(NamedTuple):
  """The default selection: weight matrices and conv kernels.

  Selects floating leaves with ``ndim >= 2`` except embedding tables (a path
  segment named ``embedding``, as in ``nn.Embed``/``nnx.Embed``) and the paths
  matched by any ``exclude`` regex (e.g. the first and last layer:
  ``exclude=("Dense_0", "Dense_2")``). Each regex must match some param.
  """

  exclude: tuple[str, ...] = ()

  def __call__(self, path: str, leaf: ArrayLike) -> bool:
    if jnp.ndim(leaf) < 2 or "embedding" in path.split("/"):
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


def resolve_where(
  where: Selection,
  params: Params,
  method: str,
  pattern: patterns_lib.Pattern | None = None,
) -> PyTree:
  """The static selection as a params-shaped tree of Python bools.

  Args:
    where: ``None`` (:func:`default_where`), a regex string searched in each
      ``a/b/kernel`` path, a predicate ``(path, leaf) -> bool``, or a tree of
      bools with the params' structure (or a prefix of it), as in
      ``optax.masked``.
    params: the params (arrays, tracers or ``ShapeDtypeStruct``).
    method: the method's name, for error messages.
    pattern: if given, each selected leaf is checked against it
      (:func:`jaxsparse.patterns.check_leaf`).

  Raises:
    ValueError: nothing is selected, an ``exclude`` regex matches no param, a
      selected param is not floating point or does not fit ``pattern``, or a
      bool tree does not match.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  if where is None:
    where = default_where()
  if isinstance(where, str):
    regex = where
    chosen = [re.search(regex, path) is not None for path in paths]
  elif callable(where):
    chosen = [bool(where(path, leaf)) for path, leaf in zip(paths, leaves)]
  else:
    try:
      chosen = jax.tree.leaves(
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
  if isinstance(where, DefaultWhere):
    for excluded in where.exclude:
      if not any(re.search(excluded, path) for path in paths):
        raise ValueError(
          f"{method}: exclude={excluded!r} matches no param; the params are "
          f"{paths}."
        )
  if not any(chosen):
    raise ValueError(
      f"{method}: `where` selects no param to sparsify; the params are "
      f"{paths} (the default selects floating leaves with ndim >= 2, minus "
      "embeddings). Pass `where=` as a regex or a (path, leaf) predicate."
    )
  for path, leaf, c in zip(paths, leaves, chosen):
    if c and not _is_floating(leaf):
      raise ValueError(
        f"{method}: {path} has dtype {jnp.result_type(leaf)}; only floating "
        "params can be sparsified. Exclude it with `where=`."
      )
    if c and pattern is not None:
      patterns_lib.check_leaf(pattern, jnp.shape(leaf), f"{method}: {path}")
  return jax.tree_util.tree_unflatten(treedef, chosen)


def init_masks(params: Params, chosen: PyTree) -> MaskTree:
  """All-True masks on the chosen leaves (sharded like the params)."""
  return jax.tree.map(
    lambda p, c: jnp.ones_like(p, dtype=bool) if c else None, params, chosen
  )


def check_masks(params: Params, masks: MaskTree) -> None:
  """Raises ``ValueError`` naming the leaf where ``masks`` does not fit."""
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  try:
    flat_masks = treedef_leaves(params, masks)
  except ValueError as e:
    raise ValueError(
      f"the mask tree does not have the params' structure ({e}); build it "
      "with js.masks(opt_state) or with the same tree as the params."
    ) from None
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


def treedef_leaves(params: Params, masks: MaskTree) -> list[Any]:
  """The mask leaves (``None`` included) aligned with the params' leaves."""
  leaves = []
  jax.tree.map(lambda _, m: leaves.append(m), params, masks)
  return leaves


def apply_masks(params: Params, masks: MaskTree) -> Params:
  """Zeroes the pruned entries: ``where(mask, p, 0)`` (``None`` keeps ``p``)."""
  check_masks(params, masks)
  return jax.tree.map(
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


def masks_from_scores(
  scores: PyTree,
  sparsity: ArrayLike,
  *,
  pattern: patterns_lib.Pattern,
  allocation: allocation_lib.Allocation,
) -> MaskTree:
  """New masks keeping the highest scores at the allocated sparsities.

  Args:
    scores: params-shaped tree; ``None`` where a param is not sparsified.
    sparsity: the global target (traced is fine).
    pattern: how entries are grouped (see :mod:`jaxsparse.patterns`).
    allocation: how the target is split over leaves.

  Returns:
    The mask tree, with ``None`` where ``scores`` has ``None``.
  """
  leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
  chosen = [i for i, leaf in enumerate(leaves) if leaf is not None]
  selected = [leaves[i] for i in chosen]
  if isinstance(allocation, allocation_lib.GlobalThreshold):
    total = sum(leaf.size for leaf in selected)
    new = threshold.topk_masks(selected, threshold.num_kept(total, sparsity))
  else:
    shapes = [leaf.shape for leaf in selected]
    per_leaf = allocation_lib.layer_sparsities(allocation, shapes, sparsity)
    new = [
      patterns_lib.select(pattern, leaf, s)
      for leaf, s in zip(selected, per_leaf)
    ]
  out: list[Array | None] = [None] * len(leaves)
  for i, mask in zip(chosen, new):
    out[i] = mask
  return jax.tree.unflatten(treedef, out)


def reselect(
  scores: PyTree,
  masks: MaskTree,
  sparsity: ArrayLike,
  *,
  pattern: patterns_lib.Pattern,
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
    jax.tree.map(_unwrap, node.masks, is_leaf=_is_nnx_variable)
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
