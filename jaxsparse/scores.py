"""Scores: how important each entry is (higher is kept).

References:
  Lee et al, `Layer-adaptive sparsity for the Magnitude-based Pruning
  <https://arxiv.org/abs/2010.07611>`_, 2021.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, UInt32

from jaxsparse.patterns import explicit_sharding
from jaxsparse.types import Params, Updates


def magnitude(params: Params) -> Params:
  """``|w|`` as float32."""
  return jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)


def saliency(params: Params, grads: Updates) -> Params:
  """``|w * g|`` (SNIP's connection sensitivity) as float32."""
  return jax.tree.map(
    lambda p, g: jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32)),
    params,
    grads,
  )


def random(params: Params, key: UInt32[Array, "2"]) -> Params:
  """Uniform ``[0, 1)`` scores, one independent stream per leaf.

  ``key`` is raw key data; leaf ``i`` uses ``fold_in(key, i)``, so the scores
  depend on the key and the tree, never on sharding. Under Explicit mesh
  axes the scores are sharded like the leaf.
  """
  base = jax.random.wrap_key_data(key)
  leaves, treedef = jax.tree.flatten(params)
  scores = [
    jax.random.uniform(
      jax.random.fold_in(base, i),
      jnp.shape(leaf),
      jnp.float32,
      out_sharding=explicit_sharding(leaf),
    )
    for i, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, scores)


def _lamp_leaf(leaf: ArrayLike) -> Float[Array, "..."]:
  """LAMP scores of one leaf (see :func:`lamp`)."""
  leaf = jnp.asarray(leaf)
  sharding = explicit_sharding(leaf)
  if sharding is not None:
    # The sort runs over the whole leaf: gather it on purpose (LAMP re-scores
    # only at mask updates), then shard the scores like the leaf.
    leaf = jax.sharding.reshard(
      leaf,
      jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()),
    )
  squares = jnp.square(leaf.astype(jnp.float32)).reshape(-1)
  # Ascending |w|; a stable sort orders equal magnitudes by flat index.
  order = jnp.argsort(squares, stable=True)
  ascending = squares[order]
  suffix = jnp.cumsum(ascending[::-1])[::-1]  # sum over v >= u of w_v^2
  positive = suffix > 0
  ratio = jnp.where(
    positive, ascending / jnp.where(positive, suffix, 1.0), jnp.float32(0)
  )
  scores = jnp.zeros_like(squares).at[order].set(ratio).reshape(leaf.shape)
  if sharding is not None:
    scores = jax.sharding.reshard(scores, sharding)
  return scores


def lamp(params: Params) -> Params:
  """LAMP scores (Lee et al 2021, eq. 2), per leaf, as float32.

  Within a leaf, index the entries ``u`` by ascending ``|w|``; then

  ``score(u) = w_u^2 / sum_{v >= u} w_v^2``.

  The largest weight of every leaf scores 1 and every score lies in
  ``[0, 1]``, so one global threshold on LAMP scores keeps at least the
  largest weight of each layer. Ties in ``|w|`` are ordered by flat
  (row-major) index, the lower index counting as the smaller weight, as a
  stable sort gives: of equal weights, the one with the higher index scores
  higher. Entries whose suffix sum is zero (an all-zero leaf) score 0.

  The suffix sums are one ``cumsum`` over the sorted squares (one sort per
  leaf, done only when masks are updated). A leaf sharded over Explicit mesh
  axes is gathered for the sort and its scores are sharded like it.

  Args:
    params: any pytree of floating arrays.

  Returns:
    A params-shaped tree of float32 scores.

  Examples:
    >>> import jax.numpy as jnp, jaxsparse.scores as scores
    >>> w = jnp.array([1.0, -3.0, 2.0])
    >>> [round(float(x), 4) for x in scores.lamp(w)]
    [0.0714, 1.0, 0.3077]
  """
  return jax.tree.map(_lamp_leaf, params)
