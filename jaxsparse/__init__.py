"""jaxsparse: sparse neural networks in JAX, as optax transformations.

A sparsity method is a pure optax gradient transformation whose state holds a
mask tree; it composes with any optax optimizer and any Flax model::

  pruning = js.magnitude_pruning(js.gmp(0.9, 0, 1000))
  tx = js.sparsify(optax.adamw(1e-3), pruning)
  tx = optax.chain(optax.adamw(1e-3), js.magnitude_pruning(0.9))
"""

from jaxsparse import kernels as kernels
from jaxsparse import oneshot as oneshot
from jaxsparse import sharding as sharding
from jaxsparse.allocation import ER as ER
from jaxsparse.allocation import ERK as ERK
from jaxsparse.allocation import GlobalThreshold as GlobalThreshold
from jaxsparse.allocation import Uniform as Uniform
from jaxsparse.allocation import er as er
from jaxsparse.allocation import erk as erk
from jaxsparse.allocation import global_threshold as global_threshold
from jaxsparse.allocation import layer_sparsities as layer_sparsities
from jaxsparse.allocation import uniform as uniform
from jaxsparse.layout import Kernels as Kernels
from jaxsparse.layout import Layout as Layout
from jaxsparse.layout import find_kernels as find_kernels
from jaxsparse.masking import apply_masks as apply_masks
from jaxsparse.masking import default_where as default_where
from jaxsparse.masking import masks as masks
from jaxsparse.masking import masks_from_scores as masks_from_scores
from jaxsparse.masking import resolve_where as resolve_where
from jaxsparse.methods.acdc import ACDCSchedule as ACDCSchedule
from jaxsparse.methods.acdc import ACDCState as ACDCState
from jaxsparse.methods.acdc import acdc as acdc
from jaxsparse.methods.acdc import acdc_schedule as acdc_schedule
from jaxsparse.methods.dynamic import DynamicSparseState as DynamicSparseState
from jaxsparse.methods.dynamic import SNFSState as SNFSState
from jaxsparse.methods.dynamic import rigl as rigl
from jaxsparse.methods.dynamic import set_sparse as set_sparse
from jaxsparse.methods.dynamic import snfs as snfs
from jaxsparse.methods.dynamic import srigl as srigl
from jaxsparse.methods.init_pruning import InitPruningState as InitPruningState
from jaxsparse.methods.init_pruning import grasp as grasp
from jaxsparse.methods.init_pruning import grasp_scores as grasp_scores
from jaxsparse.methods.init_pruning import snip as snip
from jaxsparse.methods.init_pruning import snip_scores as snip_scores
from jaxsparse.methods.init_pruning import synflow as synflow
from jaxsparse.methods.init_pruning import synflow_scores as synflow_scores
from jaxsparse.methods.pruning import (
  MagnitudePruningState as MagnitudePruningState,
)
from jaxsparse.methods.pruning import RandomPruningState as RandomPruningState
from jaxsparse.methods.pruning import fixed_masks as fixed_masks
from jaxsparse.methods.pruning import (
  global_magnitude_pruning as global_magnitude_pruning,
)
from jaxsparse.methods.pruning import lamp_pruning as lamp_pruning
from jaxsparse.methods.pruning import magnitude_pruning as magnitude_pruning
from jaxsparse.methods.pruning import random_pruning as random_pruning
from jaxsparse.methods.regularisers import GroupLassoState as GroupLassoState
from jaxsparse.methods.regularisers import LobsterState as LobsterState
from jaxsparse.methods.regularisers import group_lasso as group_lasso
from jaxsparse.methods.regularisers import lobster as lobster
from jaxsparse.methods.straight_through import SSTEState as SSTEState
from jaxsparse.methods.straight_through import (
  StraightThroughState as StraightThroughState,
)
from jaxsparse.methods.straight_through import s_ste as s_ste
from jaxsparse.methods.straight_through import sr_ste as sr_ste
from jaxsparse.methods.straight_through import st3 as st3
from jaxsparse.methods.straight_through import ste as ste
from jaxsparse.patterns import NM as NM
from jaxsparse.patterns import Block as Block
from jaxsparse.patterns import Channel as Channel
from jaxsparse.patterns import Pattern as Pattern
from jaxsparse.patterns import Unstructured as Unstructured
from jaxsparse.report import LayerRecord as LayerRecord
from jaxsparse.report import Summary as Summary
from jaxsparse.report import summary as summary
from jaxsparse.schedules import gmp as gmp
from jaxsparse.sparsify import SparsifyState as SparsifyState
from jaxsparse.sparsify import StraightThrough as StraightThrough
from jaxsparse.sparsify import sparsify as sparsify
from jaxsparse.threshold import topk_masks as topk_masks

__version__ = "0.1.0"


def __getattr__(name: str):
  # js.nn imports flax, an optional dependency: load it on first use.
  if name == "nn":
    import importlib

    return importlib.import_module("jaxsparse.nn")
  raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")


__all__ = [
  "ACDCSchedule",
  "ACDCState",
  "Block",
  "Channel",
  "DynamicSparseState",
  "ER",
  "ERK",
  "GlobalThreshold",
  "GroupLassoState",
  "InitPruningState",
  "Kernels",
  "Layout",
  "LayerRecord",
  "LobsterState",
  "MagnitudePruningState",
  "NM",
  "Pattern",
  "RandomPruningState",
  "SNFSState",
  "SSTEState",
  "SparsifyState",
  "StraightThrough",
  "StraightThroughState",
  "Summary",
  "Uniform",
  "Unstructured",
  "acdc",
  "acdc_schedule",
  "apply_masks",
  "default_where",
  "er",
  "erk",
  "find_kernels",
  "fixed_masks",
  "global_magnitude_pruning",
  "global_threshold",
  "gmp",
  "grasp",
  "grasp_scores",
  "group_lasso",
  "kernels",
  "lamp_pruning",
  "layer_sparsities",
  "lobster",
  "magnitude_pruning",
  "masks",
  "masks_from_scores",
  "nn",
  "oneshot",
  "random_pruning",
  "resolve_where",
  "rigl",
  "s_ste",
  "set_sparse",
  "sharding",
  "snfs",
  "snip",
  "snip_scores",
  "sparsify",
  "sr_ste",
  "srigl",
  "st3",
  "ste",
  "summary",
  "synflow",
  "synflow_scores",
  "topk_masks",
  "uniform",
]
