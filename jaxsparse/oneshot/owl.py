"""OWL: outlier-weighted layer-wise sparsity for one-shot pruning.

For each group ``l`` of layers (a transformer block: the paper's "layer"),
the outlier ratio is the fraction of Wanda scores ``A = |W| · ‖x‖₂`` of all
the group's kernels (taken together) above ``M`` times their mean::

  D_l = #{A > M · mean(A)} / #A.

Groups with more outliers are pruned less. The ratios are mapped linearly
onto a band of width ``2λ`` and centred so that the unweighted mean sparsity
over groups is the target ``S``::

  D'_l = 2λ (D_l - min D) / (max D - min D),
  S_l  = S - (D'_l - mean(D')),

so ``S_l ∈ [S - 2λ, S + 2λ]`` with ``max S_l - min S_l = 2λ`` (the paper's
``[S - λ, S + λ]`` when the ratios are spread evenly). Equal ratios give
``S_l = S``. The mean is unweighted, as in the authors' code (their blocks
have equal sizes); the ratios come from the dense model's statistics.

References:
  Yin et al, `Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
  Sauce for Pruning LLMs to High Sparsity
  <https://arxiv.org/abs/2310.05175>`_, 2024.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float


class OWL(NamedTuple):
  """OWL allocation (see :func:`owl`).

  Attributes:
    threshold_m: ``M``: a score is an outlier above ``M`` times the mean.
    lam: ``λ``: half-width of the sparsity band.
  """

  threshold_m: float = 5.0
  lam: float = 0.08


def owl(threshold_m: float = 5.0, lam: float = 0.08) -> OWL:
  """Outlier-weighted layer-wise sparsity, for ``oneshot.prune(allocation=)``.

  Args:
    threshold_m: ``M``, the outlier threshold as a multiple of the mean Wanda
      score of a group (the paper's default 5).
    lam: ``λ``, sparsities span ``2λ`` around the target (default 0.08).

  Returns:
    The allocation. Unstructured patterns only.

  References:
    Yin et al, `Outlier Weighed Layerwise Sparsity (OWL)
    <https://arxiv.org/abs/2310.05175>`_, 2024.
  """
  if not threshold_m > 0:
    raise ValueError(f"oneshot.owl: threshold_m={threshold_m} must be > 0.")
  if not 0 <= lam < 0.5:
    raise ValueError(f"oneshot.owl: lam={lam} must be in [0, 0.5).")
  return OWL(float(threshold_m), float(lam))


def outlier_ratio(
  scores: Sequence[Float[ArrayLike, "..."]], threshold_m: float
) -> float:
  """``D = #{A > M · mean(A)} / #A`` over all the arrays of ``scores``.

  The arrays are treated as one concatenation, without building it.
  """
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  size = sum(int(np.prod(jnp.shape(s))) for s in scores)
  mean = sum(jnp.sum(s, dtype=jnp.float32) for s in scores) / size
  bound = jnp.float32(threshold_m) * mean
  count = sum(jnp.sum(s > bound, dtype=jnp.int32) for s in scores)
  return float(count) / size


def owl_sparsities(
  ratios: Float[ArrayLike, " groups"] | Sequence[float],
  sparsity: float,
  lam: float,
) -> np.ndarray:
  """OWL's per-group sparsities ``S_l = S - (D'_l - mean(D'))``.

  Args:
    ratios: the outlier ratios ``D_l`` of the groups.
    sparsity: the target ``S`` (the unweighted mean of the result).
    lam: ``λ``; ``D`` is rescaled onto ``[0, 2λ]``.

  Returns:
    float64 sparsities, one per group.

  Raises:
    ValueError: a sparsity falls outside ``[0, 1)``; lower ``lam``.
  """
  d = np.asarray(ratios, np.float64)
  spread = d.max() - d.min()
  if spread == 0:
    return np.full(d.shape, float(sparsity))
  scaled = (d - d.min()) / spread * 2 * lam
  out = sparsity - (scaled - scaled.mean())
  if out.min() < 0 or out.max() >= 1:
    raise ValueError(
      f"oneshot.owl: the layer sparsities {out.round(4).tolist()} leave "
      f"[0, 1) at sparsity={sparsity} with lam={lam}; use a smaller lam."
    )
  return out
