"""``sparsify``: compose a sparsity method with any optax optimizer."""

from typing import Any, NamedTuple

import optax

from jaxsparse import masking as masks_lib
from jaxsparse.types import Params, Updates


class SparsifyState(NamedTuple):
  """State of :func:`sparsify`.

  Attributes:
    inner: the wrapped optimizer's state.
    method: the sparsity method's state (holds ``masks``).
  """

  inner: optax.OptState
  method: optax.OptState


NO_PARAMS = (
  "{name}: `params` is required (call tx.update(grads, state, params)); "
  "sparsity methods score and project the params."
)


def sparsify(
  optimizer: optax.GradientTransformation,
  method: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` so that its updates keep the method's sparsity.

  One step is the usual ``updates, state = tx.update(grads, state, params)``
  and ``params = optax.apply_updates(params, updates)``:

  1. gradients of pruned entries are zeroed (as with a masked forward pass),
     so the optimizer's moments never accumulate on pruned weights;
  2. the optimizer computes its updates;
  3. the method sees those updates, the params, and the raw (unmasked)
     gradients as ``grads=``; it may update its masks and returns updates
     with ``params + updates == 0`` at every pruned entry.

  Args:
    optimizer: any optax transformation.
    method: a jaxsparse method (e.g. :func:`jaxsparse.magnitude_pruning`).

  Returns:
    An optax transformation whose state is a :class:`SparsifyState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2)}
    >>> tx = js.sparsify(optax.sgd(0.0), js.magnitude_pruning(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
  """

  optimizer = optax.with_extra_args_support(optimizer)
  method = optax.with_extra_args_support(method)

  def init_fn(params: Params) -> SparsifyState:
    return SparsifyState(optimizer.init(params), method.init(params))

  def update_fn(
    grads: Updates,
    state: SparsifyState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, SparsifyState]:
    if params is None:
      raise ValueError(NO_PARAMS.format(name="js.sparsify"))
    masked = masks_lib.mask_gradients(grads, state.method.masks)
    updates, inner = optimizer.update(masked, state.inner, params, **extra_args)
    updates, method_state = method.update(
      updates, state.method, params, grads=grads, **extra_args
    )
    return updates, SparsifyState(inner, method_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
