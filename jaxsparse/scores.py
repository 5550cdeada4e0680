"""Scores: how important each entry is (higher is kept)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, UInt32

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
