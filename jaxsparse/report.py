"""Per-layer sparsity report."""

import warnings
from typing import NamedTuple

import jax
import numpy as np

from jaxsparse import layout as layout_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse.types import MaskTree, Params


class LayerRecord(NamedTuple):
  """One row of :func:`summary`.

  Attributes:
    path: normalised ``a/b/kernel`` path.
    shape: the param's shape.
    pattern: the pattern checked (``"dense"`` for unmasked params).
    density: kept fraction of the mask (1.0 for unmasked params).
    nnz: nonzero entries of the param.
    size: entries of the param.
    pattern_ok: the mask obeys the pattern on each matrix of the leaf's
      layout, and the param is 0 where pruned.
    matrices: the leaf's matrices (``"[K=8, N=16]"``, ``"3 x [...]"`` for a
      stack), ``""`` for unmasked params.
  """

  path: str
  shape: tuple[int, ...]
  pattern: str
  density: float
  nnz: int
  size: int
  pattern_ok: bool
  matrices: str = ""


class Summary(NamedTuple):
  """Result of :func:`summary`: ``records`` and a printable ``text`` table."""

  records: list[LayerRecord]
  text: str

  def __str__(self) -> str:
    return self.text


def _table(records: list[LayerRecord]) -> str:
  header = (
    "path",
    "shape",
    "pattern",
    "matrices",
    "density",
    "nnz",
    "size",
    "check",
  )
  rows = [
    (
      r.path,
      "x".join(map(str, r.shape)) or "()",
      r.pattern,
      r.matrices,
      f"{r.density:.4f}",
      str(r.nnz),
      str(r.size),
      "ok" if r.pattern_ok else "FAIL",
    )
    for r in records
  ]
  masked = [r for r in records if r.pattern != "dense"]
  kept = sum(round(r.density * r.size) for r in masked)
  total = sum(r.size for r in masked)
  rows.append(
    (
      "total (masked)",
      "",
      "",
      "",
      f"{kept / max(total, 1):.4f}",
      str(sum(r.nnz for r in masked)),
      str(total),
      "ok" if all(r.pattern_ok for r in records) else "FAIL",
    )
  )
  widths = [
    max(len(row[i]) for row in [header, *rows]) for i in range(len(header))
  ]
  line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
  rule = "  ".join("-" * w for w in widths)
  return "\n".join(
    [line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])]
  )


def summary(
  params: Params,
  masks: MaskTree,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  *,
  kernels: layout_lib.Kernels | None = None,
) -> Summary:
  """A per-layer table of shapes, densities, nonzeros and pattern checks.

  Args:
    params: the (sparse) params: any pytree (linen dict, ``nnx.State``).
    masks: their mask tree (e.g. ``js.masks(opt_state)``), matched to the
      params by path.
    pattern: the pattern each mask should obey (one for all, ``{regex:
      pattern}`` or ``(path, leaf) -> pattern``), checked on each matrix of
      the leaf's layout.
    kernels: the model's kernels (:func:`jaxsparse.find_kernels`), for
      their layouts; default ``[..., in, out]``.

  Returns:
    A :class:`Summary`; ``print`` it for the table, or read ``.records``.

  Warns:
    UserWarning: a masked layer (or one matrix of a stack) keeps nothing,
      so its output no longer depends on its input.

  Examples:
    >>> import jax.numpy as jnp, jaxsparse as js
    >>> params = {"w": jnp.array([[0.0, 2.0], [3.0, 0.0]]), "b": jnp.ones(2)}
    >>> masks = {"w": params["w"] != 0, "b": None}
    >>> [(r.path, r.density, r.nnz) for r in js.summary(params, masks).records]
    [('b', 1.0, 2), ('w', 0.5, 2)]
  """
  masks_lib.check_masks(params, masks)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mask_leaves = masks_lib.treedef_leaves(params, masks)
  records, empty = [], []
  for (key, p), m in zip(flat, mask_leaves):
    path = masks_lib.path_str(key)
    p = np.asarray(jax.device_get(p))
    nnz = int(np.count_nonzero(p))
    if m is None:
      records.append(
        LayerRecord(path, p.shape, "dense", 1.0, nnz, p.size, True)
      )
      continue
    m = np.asarray(jax.device_get(m), bool)
    leaf_pattern = masks_lib.leaf_pattern(pattern, path, p, "js.summary")
    layout = layout_lib.leaf_layout(kernels, path, p.shape)
    spec = masks_lib.LeafSpec(path, leaf_pattern, layout)
    ok = spec.follows(m) and not np.any(p[~m])
    matrices = np.asarray(layout_lib.to_matrices(m, layout))
    if m.size and not matrices.reshape(matrices.shape[0], -1).any(1).all():
      empty.append(path)
    records.append(
      LayerRecord(
        path,
        p.shape,
        repr(leaf_pattern),
        float(m.mean()) if m.size else 1.0,
        nnz,
        p.size,
        ok,
        layout.describe(p.shape),
      )
    )
  if empty:
    warnings.warn(
      f"js.summary: {empty} keep no weight (in a whole layer or in one "
      "matrix of a stack): their outputs no longer depend on their inputs. "
      "Lower the sparsity, or give those layers a floor (e.g. exclude them "
      "from a global threshold with `where=`).",
      stacklevel=2,
    )
  return Summary(records, _table(records))
