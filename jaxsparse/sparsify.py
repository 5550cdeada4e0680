"""``sparsify``: compose a sparsity method with any optax optimizer."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


class StraightThrough(NamedTuple):
  """A method whose optimizer steps dense weights kept in the method's state.

  Straight-through methods (STE, SR-STE, ST-3, S-STE) run the model on sparse
  params but train dense weights with the gradient of the sparse ones. Inside
  :func:`sparsify` the optimizer therefore sees every entry's gradient (not
  masked), passed through ``optimizer_gradients`` first (SR-STE adds its
  decay term there), and its updates step the dense weights in ``update``.
  As the last link of ``optax.chain`` it behaves as a plain transformation
  whose ``grads`` argument is ``None``.

  Attributes:
    init: ``params -> state``; the state keeps the dense weights and masks.
    update: the optax update; returns updates that move the params to the
      new sparse weights.
    optimizer_gradients: ``(grads, state, params) -> grads`` for the wrapped
      optimizer.
  """

  init: optax.TransformInitFn
  update: optax.TransformUpdateExtraArgsFn
  optimizer_gradients: Callable[[Updates, Any, Params], Updates]


NO_PARAMS = (
  "{name}: `params` is required (call tx.update(grads, state, params)); "
  "sparsity methods score and project the params."
)


def reset_pruned_moments(
  optimizer: optax.GradientTransformation,
  inner_state: optax.OptState,
  masks: Any,
) -> optax.OptState:
  """Zeroes every params-shaped leaf of ``inner_state`` where a mask is False.

  Pruned entries then hold zero moments, so a weight that is regrown later
  (RigL, SET, SNFS, AC/DC's dense phases) starts from fresh optimizer
  statistics, as the papers reset them.
  """
  return optax.tree_utils.tree_map_params(
    optimizer,
    lambda v, m: (
      v
      if m is None or jnp.shape(v) != jnp.shape(m)
      else jnp.where(m, v, jnp.zeros_like(v))
    ),
    inner_state,
    masks,
    is_leaf=lambda x: x is None,
  )


def sparsify(
  optimizer: optax.GradientTransformation,
  method: optax.GradientTransformation | StraightThrough,
  *,
  reset_moments: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``optimizer`` so that its updates keep the method's sparsity.

  One step is the usual ``updates, state = tx.update(grads, state, params)``
  and ``params = optax.apply_updates(params, updates)``:

  1. gradients of pruned entries are zeroed (as with a masked forward pass),
     so the optimizer's moments never accumulate on pruned weights;
  2. the optimizer computes its updates;
  3. the method sees those updates, the params, and the raw (unmasked)
     gradients as ``grads=``; it may update its masks and returns updates
     with ``params + updates == 0`` at every pruned entry;
  4. with ``reset_moments``, when the method's state says it ``regrown``
     weights this step (dynamic sparse training, AC/DC), the optimizer's
     params-shaped state (momentum, second moments) is zeroed at every entry
     the new masks prune, so a regrown weight starts from zero moments, as
     the papers reset them. Pruning-only methods never regrow: gradients of
     pruned entries are zero, and their moments decay unused.

  A :class:`StraightThrough` method instead trains dense weights held in its
  state: step 1 passes every gradient (through its ``optimizer_gradients``),
  and step 4 is skipped, since the optimizer's state belongs to the dense
  weights.

  Args:
    optimizer: any optax transformation.
    method: a jaxsparse method (e.g. :func:`jaxsparse.magnitude_pruning`).
    reset_moments: static; zero the optimizer state of pruned entries.

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

  straight_through = isinstance(method, StraightThrough)
  optimizer_gradients = method.optimizer_gradients if straight_through else None
  optimizer = optax.with_extra_args_support(optimizer)
  method = optax.with_extra_args_support(
    optax.GradientTransformationExtraArgs(method.init, method.update)
    if straight_through
    else method
  )

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
    if straight_through:
      seen = optimizer_gradients(grads, state.method, params)
    else:
      seen = masks_lib.mask_gradients(grads, state.method.masks)
    updates, inner = optimizer.update(seen, state.inner, params, **extra_args)
    updates, method_state = method.update(
      updates, state.method, params, grads=grads, **extra_args
    )
    if reset_moments and hasattr(method_state, "regrown"):
      # A cond over the optimizer state costs a copy of it (~8% of an adam
      # step on CPU), so only methods that regrow weights take it, on the
      # steps where they did.
      inner = jax.lax.cond(
        method_state.regrown,
        lambda s: reset_pruned_moments(optimizer, s, method_state.masks),
        lambda s: s,
        inner,
      )
    return updates, SparsifyState(inner, method_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
