"""Score-and-select one-shot rules: layer-wise magnitude and Wanda.

Kernels are ``[in, out]`` (Flax layout), so output neuron ``j`` is column
``j`` and input feature ``i`` is row ``i``.

* Magnitude: score ``|W_ij|``; the ``in*out - round(s*in*out)`` largest of
  the layer are kept.
* Wanda: score ``S_ij = |W_ij| · ‖X_i‖₂`` with ``‖X_i‖₂ = sqrt(Σ_t X[t,i]²)``
  over the calibration tokens; scores are compared per output neuron: each
  column keeps exactly its ``in - round(s*in)`` largest.

With :class:`~jaxsparse.patterns.NM` both keep the ``n`` largest scores of
every group of ``m`` consecutive inputs (axis ``-2``) in each column. Counts
are exact: ties are broken by lower index.

References:
  Sun et al, `A Simple and Effective Pruning Approach for Large Language
  Models <https://arxiv.org/abs/2306.11695>`_, 2024.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxsparse import patterns as patterns_lib
from jaxsparse import threshold
from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.patterns import NM, Pattern, Unstructured


def magnitude_scores(kernel: Float[Array, "in out"]) -> Float[Array, "in out"]:
  """``|W|`` as float32."""
  return jnp.abs(kernel).astype(jnp.float32)


def wanda_scores(
  kernel: Float[Array, "in out"], stats: LayerStatistics
) -> Float[Array, "in out"]:
  """Wanda's ``|W_ij| · ‖X_i‖₂`` with ``‖X_i‖₂ = sqrt(sq_sum_i)``."""
  norm = jnp.sqrt(stats.sq_sum.astype(jnp.float32))
  return magnitude_scores(kernel) * norm[:, None]


def column_select(
  scores: Float[Array, "in out"], sparsity: float
) -> Bool[Array, "in out"]:
  """Keeps the ``in - round(s * in)`` largest scores of every column.

  Each column is an exact top-k (:func:`jaxsparse.threshold.topk_masks`):
  ties go to the lower row.
  """
  k = patterns_lib.num_kept(scores.shape[0], sparsity)
  column = lambda c: threshold.topk_masks([c], k)[0]
  return jax.vmap(column, in_axes=1, out_axes=1)(scores)


def _check_pattern(pattern: Pattern, name: str) -> None:
  if not isinstance(pattern, (Unstructured, NM)):
    raise ValueError(
      f"oneshot.{name}: pattern={pattern!r} is not supported; use "
      "js.Unstructured() or js.NM(n, m)."
    )
  if isinstance(pattern, NM) and pattern.axis not in (-2, 0):
    raise ValueError(
      f"oneshot.{name}: {pattern!r} must group along the reduction axis of "
      "the [in, out] kernel; use axis=-2."
    )


def _nm(pattern: NM) -> NM:
  return NM(pattern.n, pattern.m, -2)


def _keep_highest(
  kernel: Float[Array, "in out"],
  scores: Float[Array, "in out"],
  pattern: Pattern,
  select_unstructured: Callable[[Array], Array],
) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
  """Keeps the highest scores (``n`` of each N:M group, else as selected);
  kept weights unchanged, the rest zero."""
  if isinstance(pattern, NM):
    mask = patterns_lib.nm_select(_nm(pattern), scores, pattern.n)
  else:
    mask = select_unstructured(scores)
  return jnp.where(mask, kernel, jnp.zeros_like(kernel)), mask


def magnitude() -> OneShotMethod:
  """Layer-wise magnitude pruning: keep the largest ``|W|`` of each layer.

  Unstructured: ``round(s * in * out)`` entries of the lowest ``|W_ij|`` in
  the whole layer are zeroed. N:M: the ``n`` largest ``|W_ij|`` of every
  group of ``m`` inputs are kept. No calibration statistic is used.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsparse as js
    >>> from jaxsparse import oneshot
    >>> w = jnp.array([[1.0, -4.0], [-3.0, 2.0]])
    >>> stats = oneshot.LayerStatistics(
    ...   jnp.float32(1), jnp.zeros(2), jnp.ones(2), None)
    >>> new, mask = oneshot.magnitude().prune_layer(
    ...   w, stats, 0.5, js.Unstructured())
    >>> mask.tolist()
    [[False, True], [True, False]]
  """

  def prune_layer(
    kernel: Float[Array, "in out"],
    stats: LayerStatistics,
    sparsity: float,
    pattern: Pattern,
  ) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
    del stats
    _check_pattern(pattern, "magnitude")
    return _keep_highest(
      kernel,
      magnitude_scores(kernel),
      pattern,
      lambda scores: patterns_lib.select(Unstructured(), scores, sparsity),
    )

  return OneShotMethod("magnitude", False, prune_layer)


def wanda() -> OneShotMethod:
  """Wanda: prune by ``|W_ij| · ‖X_i‖₂`` per output neuron, no update.

  Unstructured: each column ``j`` of the ``[in, out]`` kernel keeps its
  ``in - round(s * in)`` largest scores ``S_ij = |W_ij| · ‖X_i‖₂``. N:M: each
  group of ``m`` inputs in each column keeps its ``n`` largest scores. Kept
  weights are unchanged.

  References:
    Sun et al, `A Simple and Effective Pruning Approach for Large Language
    Models <https://arxiv.org/abs/2306.11695>`_, 2024.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxsparse as js
    >>> from jaxsparse import oneshot
    >>> w = jnp.array([[1.0, 4.0], [3.0, 2.0]])
    >>> stats = oneshot.LayerStatistics(  # ‖X_0‖ = 10, ‖X_1‖ = 1
    ...   jnp.float32(1), jnp.zeros(2), jnp.array([100.0, 1.0]), None)
    >>> new, mask = oneshot.wanda().prune_layer(
    ...   w, stats, 0.5, js.Unstructured())
    >>> mask.tolist()
    [[True, True], [False, False]]
  """

  def prune_layer(
    kernel: Float[Array, "in out"],
    stats: LayerStatistics,
    sparsity: float,
    pattern: Pattern,
  ) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
    _check_pattern(pattern, "wanda")
    return _keep_highest(
      kernel,
      wanda_scores(kernel, stats),
      pattern,
      lambda scores: column_select(scores, sparsity),
    )

  return OneShotMethod("wanda", False, prune_layer)
