"""Flax linen models for the experiments."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """A multilayer perceptron: ``Dense`` layers with ReLU between them.

  Attributes:
    features: output sizes of the ``Dense`` layers; the last gives the logits
      (no activation after it).
  """

  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.reshape(x, (x.shape[0], -1))
    for i, size in enumerate(self.features):
      x = nn.Dense(size)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def lenet_300_100(num_classes: int = 10) -> MLP:
  """LeNet-300-100 (LeCun et al 1998): 784-300-100-10 with ReLU."""
  return MLP((300, 100, num_classes))
