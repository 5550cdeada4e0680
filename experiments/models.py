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


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al 1998) for 28x28 images, with ReLU and max pooling.

  conv 5x5 (SAME) -> pool 2 -> conv 5x5 (VALID) -> pool 2 -> 120 -> 84 ->
  classes. The first conv has 8 filters instead of the original 6, so every
  kernel's reduction axis (conv input channels 8, dense inputs 400, 120, 84)
  divides by 4 and N:M patterns along axis -2 fit every layer but the first
  conv (1 input channel), which studies keep dense.

  Attributes:
    num_classes: size of the logits.
    filters: output channels of the two convolutions.
  """

  num_classes: int = 10
  filters: Sequence[int] = (8, 16)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 2:  # flattened images
      side = int(round(x.shape[1] ** 0.5))
      x = jnp.reshape(x, (x.shape[0], side, side, 1))
    elif x.ndim == 3:
      x = x[..., None]
    x = nn.relu(nn.Conv(self.filters[0], (5, 5), padding="SAME")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(self.filters[1], (5, 5), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)
