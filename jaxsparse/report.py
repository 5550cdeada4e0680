"""Per-layer sparsity report."""

from typing import NamedTuple

import jax
import numpy as np

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
    pattern_ok: the mask obeys the pattern and the param is 0 where pruned.
  """

  path: str
  shape: tuple[int, ...]
  pattern: str
  density: float
  nnz: int
  size: int
  pattern_ok: bool


class Summary(NamedTuple):
  """Result of :func:`summary`: ``records`` and a printable ``text`` table."""

  records: list[LayerRecord]
  text: str

  def __str__(self) -> str:
    return self.text


def _table(records: list[LayerRecord]) -> str:
  header = ("path", "shape", "pattern", "density", "nnz", "size", "check")
  rows = [
    (
      r.path,
      "x".join(map(str, r.shape)) or "()",
      r.pattern,
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
  pattern: patterns_lib.Pattern = patterns_lib.Unstructured(),
) -> Summary:
  """A per-layer table of shapes, densities, nonzeros and pattern checks.

  Args:
    params: the (sparse) params.
    masks: their mask tree (e.g. ``js.masks(opt_state)``).
    pattern: the pattern each mask should obey.

  Returns:
    A :class:`Summary`; ``print`` it for the table, or read ``.records``.

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
  records = []
  for (path, p), m in zip(flat, mask_leaves):
    p = np.asarray(jax.device_get(p))
    nnz = int(np.count_nonzero(p))
    if m is None:
      records.append(
        LayerRecord(
          masks_lib.path_str(path), p.shape, "dense", 1.0, nnz, p.size, True
        )
      )
      continue
    m = np.asarray(jax.device_get(m), bool)
    ok = patterns_lib.follows(pattern, m) and not np.any(p[~m])
    records.append(
      LayerRecord(
        masks_lib.path_str(path),
        p.shape,
        repr(pattern),
        float(m.mean()) if m.size else 1.0,
        nnz,
        p.size,
        ok,
      )
    )
  return Summary(records, _table(records))
