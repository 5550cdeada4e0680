"""One-shot (post-training) pruning of trained Flax models.

Prune a trained linen model layer by layer from calibration batches, with no
training::

  result = oneshot.prune(
    lambda p, x: model.apply({"params": p}, x), params, batches,
    oneshot.wanda(), sparsity=0.5)
  result.params, result.masks, result.layers

Methods: :func:`magnitude`, :func:`wanda`, :func:`sparsegpt`, :func:`dsnot`;
layer-wise sparsity: :func:`owl`. Inputs of ``nn.Dense``/``nn.DenseGeneral``
are captured with ``flax.linen.intercept_methods`` (:mod:`.capture`).
"""

from jaxsparse.oneshot.base import LayerStatistics as LayerStatistics
from jaxsparse.oneshot.base import OneShotMethod as OneShotMethod
from jaxsparse.oneshot.capture import DenseLayer as DenseLayer
from jaxsparse.oneshot.capture import dense_layers as dense_layers
from jaxsparse.oneshot.capture import layer_statistics as layer_statistics
from jaxsparse.oneshot.dsnot import dsnot as dsnot
from jaxsparse.oneshot.owl import OWL as OWL
from jaxsparse.oneshot.owl import owl as owl
from jaxsparse.oneshot.prune import LayerResult as LayerResult
from jaxsparse.oneshot.prune import OneShotResult as OneShotResult
from jaxsparse.oneshot.prune import prune as prune
from jaxsparse.oneshot.rules import magnitude as magnitude
from jaxsparse.oneshot.rules import wanda as wanda
from jaxsparse.oneshot.sparsegpt import sparsegpt as sparsegpt

__all__ = [
  "DenseLayer",
  "LayerResult",
  "LayerStatistics",
  "OWL",
  "OneShotMethod",
  "OneShotResult",
  "dense_layers",
  "dsnot",
  "layer_statistics",
  "magnitude",
  "owl",
  "prune",
  "sparsegpt",
  "wanda",
]
