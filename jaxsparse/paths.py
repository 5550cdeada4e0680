"""Normalised key paths of params leaves: ``a/b/kernel`` for any pytree."""

from collections.abc import Sequence
from typing import Any

import jax
from jaxtyping import PyTree


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
