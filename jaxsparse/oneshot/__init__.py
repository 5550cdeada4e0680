"""One-shot (post-training) pruning of trained Flax models.

Prune a trained model (linen, nnx, Hugging Face Flax, any JAX function of its
params) layer by layer from calibration batches, with no training::

  result = oneshot.prune(
    lambda p, x: model.apply({"params": p}, x), params, batches,
    oneshot.wanda(), sparsity=0.5)
  result.params, result.masks, result.layers

Methods: :func:`magnitude`, :func:`wanda`, :func:`sparsegpt`, :func:`dsnot`;
layer-wise sparsity: :func:`owl`. The inputs of every kernel are captured from
the model's traced computation, wherever a parameter enters a matmul or a
convolution (:mod:`.capture`).
"""

from jaxsparse.oneshot.base import LayerStatistics as LayerStatistics
from jaxsparse.oneshot.base import OneShotMethod as OneShotMethod
from jaxsparse.oneshot.capture import Layer as Layer
from jaxsparse.oneshot.capture import layer_statistics as layer_statistics
from jaxsparse.oneshot.capture import layers as layers
from jaxsparse.oneshot.dsnot import dsnot as dsnot
from jaxsparse.oneshot.owl import OWL as OWL
from jaxsparse.oneshot.owl import owl as owl
from jaxsparse.oneshot.prune import LayerResult as LayerResult
from jaxsparse.oneshot.prune import OneShotResult as OneShotResult
from jaxsparse.oneshot.prune import block_of as block_of
from jaxsparse.oneshot.prune import prune as prune
from jaxsparse.oneshot.rules import magnitude as magnitude
from jaxsparse.oneshot.rules import wanda as wanda
from jaxsparse.oneshot.sparsegpt import sparsegpt as sparsegpt

__all__ = [
  "Layer",
  "LayerResult",
  "LayerStatistics",
  "OWL",
  "OneShotMethod",
  "OneShotResult",
  "block_of",
  "dsnot",
  "layer_statistics",
  "layers",
  "magnitude",
  "owl",
  "prune",
  "sparsegpt",
  "wanda",
]
