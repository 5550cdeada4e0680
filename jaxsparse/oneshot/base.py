"""Shared types of one-shot (post-training) pruning.

A one-shot method prunes one linear layer at a time from statistics of the
layer's inputs gathered on calibration data. Kernels are handled in Flax's
layout, ``[in, out]`` (a ``DenseGeneral`` kernel is flattened to
``[prod(in dims), prod(out dims)]`` by the driver), so an output neuron is a
column and N:M groups run along the reduction axis ``-2``.
"""

from collections.abc import Callable
from typing import NamedTuple

from jaxtyping import Array, Bool, Float

from jaxsparse.patterns import Pattern


class LayerStatistics(NamedTuple):
  """Streaming statistics of one layer's inputs ``x`` (rows = tokens).

  With the calibration inputs of the layer flattened to ``X: [tokens, in]``:

  * ``count``: the number of rows, ``tokens``;
  * ``sum``: ``Σ_t X[t]``, shape ``[in]``;
  * ``sq_sum``: ``Σ_t X[t]²``, shape ``[in]`` (Wanda's ``‖x_j‖² ``);
  * ``gram``: ``XᵀX``, shape ``[in, in]`` (SparseGPT's Hessian up to the
    factor ``2 / count``), or ``None`` where the method does not need it.

  All are float32 sums, accumulated batch by batch, so no activation is kept.
  """

  count: Float[Array, ""]
  sum: Float[Array, " in"]
  sq_sum: Float[Array, " in"]
  gram: Float[Array, "in in"] | None


class OneShotMethod(NamedTuple):
  """A one-shot pruning rule for one layer.

  Attributes:
    name: a short name for reports (``"wanda"``).
    needs_gram: whether :attr:`LayerStatistics.gram` must be accumulated.
    prune_layer: ``(kernel [in, out], stats, sparsity, pattern) -> (new
      kernel, mask)``. ``sparsity`` is the fraction of zeros wanted in this
      layer (ignored by ``NM``, whose density is ``n / m``). The new kernel
      is zero wherever the mask is ``False``; methods that reconstruct
      (SparseGPT) also change kept weights.
  """

  name: str
  needs_gram: bool
  prune_layer: Callable[
    [Float[Array, "in out"], LayerStatistics, float, Pattern],
    tuple[Float[Array, "in out"], Bool[Array, "in out"]],
  ]
