"""Sparsity by regularisation: LOBSTER and proximal group lasso.

Neither method targets a count: a regulariser shrinks weights (LOBSTER the
weights the loss is insensitive to, group lasso whole groups), and weights
that reach a threshold (LOBSTER) or exact zero (group lasso) are pruned.
The achieved sparsity therefore follows the training dynamics; the masks
always match the zeros of the params.

References:
  Tartaglione et al, `LOss-Based SensiTivity rEgulaRization: towards deep
  sparse neural networks <https://arxiv.org/abs/2011.09905>`_, 2022.
  Yuan & Lin, `Model selection and estimation in regression with grouped
  variables <https://doi.org/10.1111/j.1467-9868.2005.00532.x>`_, 2006.
  Wen et al, `Learning Structured Sparsity in Deep Neural Networks
  <https://arxiv.org/abs/1608.03665>`_, 2016.
  Deleu & Bengio, `Structured Sparsity Inducing Adaptive Optimizers for Deep
  Learning <https://arxiv.org/abs/2102.03869>`_, 2021.
"""

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse import layout as layout_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules
from jaxsparse.sparsify import NO_PARAMS
from jaxsparse.types import (
  MaskTree,
  Params,
  ScalarOrSchedule,
  Selection,
  Step,
  Updates,
)


class LobsterState(NamedTuple):
  """State of :func:`lobster`.

  Attributes:
    count: int32 scalar, steps taken.
    masks: the mask tree; an entry once pruned stays pruned.
  """

  count: Int[Array, ""]
  masks: MaskTree


class GroupLassoState(NamedTuple):
  """State of :func:`group_lasso`.

  Attributes:
    count: int32 scalar, steps taken.
    masks: the mask tree; False on the groups that are exactly zero.
  """

  count: Int[Array, ""]
  masks: MaskTree


LOBSTER_NEEDS_GRADS = (
  "lobster shrinks the weights by their loss sensitivity |dL/dw|, which only "
  "js.sparsify passes (as grads=); use js.sparsify(optimizer, lobster(...)) "
  "instead of optax.chain."
)


def _check_nonnegative(
  value: ScalarOrSchedule, name: str, probe_steps: tuple[int, ...] = (0,)
) -> None:
  """A constant must be >= 0; a schedule is checked at ``probe_steps``."""
  if isinstance(value, numbers.Real):
    if not value >= 0:
      raise ValueError(f"{name}={value} must be >= 0.")
  elif callable(value):
    for step in probe_steps:
      probe = float(value(jnp.asarray(step, jnp.int32)))
      if not probe >= 0:
        raise ValueError(f"{name}({step})={probe} must be >= 0.")


def lobster_update(
  updates: Float[ArrayLike, "*shape"],
  params: Float[ArrayLike, "*shape"],
  grads: Float[ArrayLike, "*shape"],
  decay: Float[ArrayLike, ""],
) -> Float[Array, "*shape"]:
  """The optimizer's update plus LOBSTER's term, ``- λ w max(0, 1 - |g|)``.

  Computed in float32 and returned in the dtype of ``updates``.
  """
  updates = jnp.asarray(updates)
  w = jnp.asarray(params).astype(jnp.float32)
  g = jnp.asarray(grads).astype(jnp.float32)
  insensitivity = jnp.maximum(jnp.float32(0), jnp.float32(1) - jnp.abs(g))
  shrink = jnp.asarray(decay, jnp.float32) * w * insensitivity
  return (updates.astype(jnp.float32) - shrink).astype(updates.dtype)


def _rounded(x: Array, count: Int[Array, ""]) -> Array:
  """``x`` itself, hidden from XLA's fusion so it is rounded to its dtype.

  XLA:CPU contracts a product and a following sum into one FMA inside a
  fusion (an optimisation barrier does not stop it), so the optimizer's
  ``-η g`` fused into the regulariser's sum would round differently in a
  jitted step than in an eager one. XOR-ing the bits with a zero XLA cannot
  prove (``count >> 31`` with ``count >= 0``) forces the rounding, at the
  cost of one integer op.
  """
  uint = jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32
  zero = jax.lax.shift_right_logical(count, jnp.int32(31)).astype(uint)
  bits = jax.lax.bitcast_convert_type(x, uint) ^ zero
  return jax.lax.bitcast_convert_type(bits, x.dtype)


@jax.jit
def _lobster_leaf(
  updates: Float[Array, "*shape"],
  params: Float[Array, "*shape"],
  grads: Float[Array, "*shape"],
  decay: Float[Array, ""],
  count: Int[Array, ""],
) -> Float[Array, "*shape"]:
  """:func:`lobster_update`, compiled alone so eager steps equal jitted ones."""
  return lobster_update(_rounded(updates, count), params, grads, decay)


def lobster(
  decay: ScalarOrSchedule,
  threshold: float,
  *,
  where: Selection = None,
  prune_every: Step = 100,
  begin_step: Step = 0,
  end_step: Step | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LOBSTER: shrink loss-insensitive weights, prune those below a threshold.

  The paper's update for a weight ``w`` with gradient ``g = ∂L/∂w`` is

  ``w ← w - η g - λ w max(0, 1 - |g|)``,

  i.e. a weight decay gated by the *insensitivity* ``1 - |g|``: weights the
  loss barely depends on shrink towards zero, sensitive ones (``|g| >= 1``)
  are left to the loss. Here the wrapped optimizer supplies the loss step
  (``-η g`` for SGD; any optax optimizer's update in general) and this
  method adds ``-λ w max(0, 1 - |g|)`` with the raw gradient ``g``, so it
  must run inside :func:`jaxsparse.sparsify`, which passes the gradients.

  Every ``prune_every`` steps from ``begin_step`` (to ``end_step``) the
  selected weights with ``|w| < threshold`` are pruned: their mask turns
  False, they become exactly zero and never regrow. The paper prunes when
  the validation loss plateaus; a transformation sees no validation loss,
  so a fixed cadence stands in for the plateau. The regulariser acts on the
  selected params only (``where``).

  Args:
    decay: ``λ`` (>= 0), a float or a schedule of the step count.
    threshold: static; ``T`` (> 0), the magnitude below which a weight is
      pruned.
    where: static; which params are regularised and pruned.
    prune_every: static; steps between pruning passes.
    begin_step: first pruning pass.
    end_step: last pruning pass; ``None``: no end.

  Returns:
    An optax transformation with state :class:`LobsterState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.regularisers import lobster
    >>> params = {"w": jnp.array([[0.5, -0.05], [2.0, 0.25]])}
    >>> grads = {"w": jnp.array([[0.0, 0.0], [0.0, 3.0]])}  # |g| >= 1: kept
    >>> tx = js.sparsify(optax.sgd(0.0), lobster(0.5, 0.1, prune_every=1))
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.25, 0.0], [1.0, 0.25]]

  References:
    Tartaglione et al, `LOss-Based SensiTivity rEgulaRization: towards deep
    sparse neural networks <https://arxiv.org/abs/2011.09905>`_, 2022.
  """
  _check_nonnegative(decay, "lobster: decay")
  if not isinstance(threshold, numbers.Real) or not threshold > 0:
    raise ValueError(
      f"lobster: threshold={threshold!r} must be a float > 0 (weights with "
      "|w| below it are pruned)."
    )
  if isinstance(prune_every, numbers.Integral) and prune_every < 1:
    raise ValueError(
      f"lobster: prune_every={prune_every} must be a positive int (steps "
      "between pruning passes)."
    )
  schedules.check_cadence(1, begin_step, end_step)
  cut = float(threshold)

  def init_fn(params: Params) -> LobsterState:
    chosen = masks_lib.resolve_where(where, params, "lobster")
    return LobsterState(
      jnp.zeros([], jnp.int32), masks_lib.init_masks(params, chosen)
    )

  def update_fn(
    updates: Updates,
    state: LobsterState,
    params: Params | None = None,
    *,
    grads: Updates | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, LobsterState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name="lobster"))
    masks_lib.check_same_params(state.masks, params, "lobster")
    if grads is None:
      raise ValueError(LOBSTER_NEEDS_GRADS)
    count = state.count
    lam = schedules.value_at(decay, count)

    def prune():
      return jax.tree.map(
        lambda p, m: (
          None
          if m is None
          else m & (jnp.abs(p.astype(jnp.float32)) >= jnp.float32(cut))
        ),
        params,
        state.masks,
      )

    masks = jax.lax.cond(
      schedules.is_update_step(count, prune_every, begin_step, end_step),
      prune,
      lambda: state.masks,
    )
    updates = jax.tree.map(
      lambda u, p, g, m: u if m is None else _lobster_leaf(u, p, g, lam, count),
      updates,
      params,
      grads,
      state.masks,
    )
    updates = masks_lib.project_updates(updates, params, masks)
    return updates, LobsterState(optax.safe_increment(count), masks)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _expand(
  pattern: patterns_lib.Block | patterns_lib.Channel,
  units: Float[Array, "..."],
  shape: tuple[int, ...],
) -> Float[Array, "..."]:
  """Per-unit values back to per-entry values (float version of expand)."""
  if isinstance(pattern, patterns_lib.Block):
    units = jnp.repeat(units, pattern.rows, axis=-2)
    return jnp.repeat(units, pattern.cols, axis=-1)
  axis = pattern.axis % len(shape)
  view = [1] * len(shape)
  view[axis] = shape[axis]
  return jnp.broadcast_to(units.reshape(view), shape)


def _needs_gather(
  pattern: patterns_lib.Block | patterns_lib.Channel,
  sharding: jax.sharding.NamedSharding | None,
  ndim: int,
) -> bool:
  """Whether the group norms would reduce or regroup a sharded axis."""
  if sharding is None:
    return False
  if isinstance(pattern, patterns_lib.Block):
    grouped = (ndim - 2, ndim - 1)
  else:
    grouped = tuple(a for a in range(ndim) if a != pattern.axis % ndim)
  spec = tuple(sharding.spec) + (None,) * ndim
  return any(spec[a] is not None for a in grouped)


def group_prox(
  weights: Float[ArrayLike, "..."],
  tau: Float[ArrayLike, ""],
  pattern: patterns_lib.Block | patterns_lib.Channel,
) -> tuple[Float[Array, "..."], Bool[Array, "..."]]:
  """The proximal operator of ``tau Σ_g ||w_g||_2`` over the pattern's groups.

  ``w_g ← w_g max(0, 1 - tau / ||w_g||_2)`` (block soft thresholding): a
  group whose norm is at most ``tau`` becomes exactly zero, the others
  shrink towards zero by ``tau`` in norm.

  Args:
    weights: one leaf, any float dtype (computed in float32).
    tau: the threshold ``η λ``.
    pattern: :class:`Block` or :class:`Channel`; its units are the groups.

  Returns:
    ``(new_weights, kept)``: float32 weights after the prox, and the bool
    mask of the groups that are nonzero.
  """
  w = jnp.asarray(weights).astype(jnp.float32)
  tau = jnp.asarray(tau, jnp.float32)
  sharding = patterns_lib.explicit_sharding(w)
  local = w
  if _needs_gather(pattern, sharding, w.ndim):
    local = jax.sharding.reshard(
      w,
      jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()),
    )
  norms = jnp.sqrt(patterns_lib.unit_scores(pattern, jnp.square(local)))
  keep = norms > tau
  factor = jnp.where(
    keep, jnp.float32(1) - tau / jnp.where(keep, norms, 1.0), jnp.float32(0)
  )
  factor = _expand(pattern, factor, w.shape)
  kept = patterns_lib.expand_units(pattern, keep, w.shape)
  if sharding is not None and local is not w:
    factor = jax.sharding.reshard(factor, sharding)
    kept = jax.sharding.reshard(kept, sharding)
  return w * factor, kept


@functools.partial(jax.jit, static_argnames=("pattern", "layout"))
def _prox_step(
  params: Float[Array, "*shape"],
  updates: Float[Array, "*shape"],
  tau: Float[Array, ""],
  count: Int[Array, ""],
  pattern: patterns_lib.Block | patterns_lib.Channel,
  layout: layout_lib.Layout,
) -> tuple[Float[Array, "*shape"], Bool[Array, "*shape"]]:
  """The update taking ``params`` to ``prox(params + updates)``, and the mask.

  Compiled alone, with ``updates`` rounded first (see :func:`_rounded`), so
  the group norms (reductions whose order XLA picks per fusion) and the
  products round the same way in eager and jitted steps.
  """
  base = params.astype(jnp.float32)
  stepped = base + _rounded(updates, count).astype(jnp.float32)
  shrunk, kept = layout_lib.on_matrices(
    lambda w: group_prox(w, tau, pattern), layout, stepped
  )
  return (shrunk - base).astype(updates.dtype), kept


def group_lasso(
  strength: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  pattern: patterns_lib.Pattern = patterns_lib.Channel(),
  *,
  where: Selection = None,
) -> optax.GradientTransformationExtraArgs:
  """Proximal group lasso: block soft thresholding after each step.

  Group lasso (Yuan & Lin 2006) adds ``λ Σ_g ||w_g||_2`` to the loss; Wen et
  al (2016) use it on channels and blocks of deep networks. A proximal
  gradient step handles the non-smooth penalty exactly (as in Deleu &
  Bengio 2021): after the optimizer's update ``w' = w + u``, each group
  ``g`` of the pattern becomes

  ``w_g ← w'_g max(0, 1 - η λ / ||w'_g||_2)``,

  with ``η = learning_rate`` (the optimizer's step size, a float or the same
  schedule of the step count) and ``λ = strength``. Groups whose norm is at
  most ``η λ`` become exactly zero; the masks are the groups that are
  currently nonzero. A zero group is not frozen: as the last link of
  ``optax.chain(opt, group_lasso(...))`` the optimizer sees its dense
  gradient and the group regrows once a step moves it by more than ``η λ``
  in norm (proximal SGD exactly). Inside :func:`jaxsparse.sparsify` the
  gradients of masked entries are zeroed, so a zero group can only be
  revived by optimizer state (momentum).

  With SGD this is proximal SGD. With an adaptive optimizer it is the
  unweighted prox applied after the adaptive step (Deleu & Bengio derive a
  prox weighted by the preconditioner instead).

  Args:
    strength: ``λ`` (>= 0), a float or a schedule of the step count.
    learning_rate: ``η`` (>= 0), a float or a schedule of the step count.
    pattern: static; :class:`Channel` (whole slices along an axis, e.g.
      output channels) or :class:`Block` (``rows x cols`` tiles).
    where: static; which params are regularised.

  Returns:
    An optax transformation with state :class:`GroupLassoState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.regularisers import group_lasso
    >>> params = {"w": jnp.array([[3.0, 0.5], [4.0, 0.5]])}  # norms 5, 0.71
    >>> tx = optax.chain(optax.sgd(0.5), group_lasso(5.0, 0.5, js.Channel()))
    >>> grads = {"w": jnp.zeros((2, 2))}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()  # η λ = 2.5
    [[1.5, 0.0], [2.0, 0.0]]

  References:
    Yuan & Lin, `Model selection and estimation in regression with grouped
    variables <https://doi.org/10.1111/j.1467-9868.2005.00532.x>`_, 2006.
    Wen et al, `Learning Structured Sparsity in Deep Neural Networks
    <https://arxiv.org/abs/1608.03665>`_, 2016.
    Deleu & Bengio, `Structured Sparsity Inducing Adaptive Optimizers for
    Deep Learning <https://arxiv.org/abs/2102.03869>`_, 2021.
  """
  patterns_lib.check_pattern(pattern)
  if not isinstance(pattern, (patterns_lib.Block, patterns_lib.Channel)):
    raise ValueError(
      f"group_lasso: pattern={pattern!r} has no groups to shrink together; "
      "group lasso needs js.Channel(axis) or js.Block(rows, cols) (for "
      "single weights use an unstructured method such as "
      "js.magnitude_pruning)."
    )
  _check_nonnegative(strength, "group_lasso: strength")
  _check_nonnegative(learning_rate, "group_lasso: learning_rate")

  def init_fn(params: Params) -> GroupLassoState:
    chosen = masks_lib.resolve_where(where, params, "group_lasso", pattern)
    return GroupLassoState(
      jnp.zeros([], jnp.int32), masks_lib.init_masks(params, chosen)
    )

  def update_fn(
    updates: Updates,
    state: GroupLassoState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, GroupLassoState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name="group_lasso"))
    masks_lib.check_same_params(state.masks, params, "group_lasso")
    count = state.count
    tau = schedules.value_at(learning_rate, count) * schedules.value_at(
      strength, count
    )
    flat_params, treedef = jax.tree.flatten(params)
    flat_updates = treedef.flatten_up_to(updates)
    flat_masks = masks_lib.treedef_leaves(params, state.masks)
    specs = jax.tree.leaves(
      masks_lib.leaf_specs(where, params, "group_lasso", pattern)
    )
    new_updates, new_masks = [], []
    for p, u, m, spec in zip(flat_params, flat_updates, flat_masks, specs):
      if m is None:
        new_updates.append(u)
        new_masks.append(None)
        continue
      update, kept = _prox_step(p, u, tau, count, pattern, spec.layout)
      new_updates.append(update)
      new_masks.append(kept)
    masks = jax.tree.unflatten(treedef, new_masks)
    updates = masks_lib.project_updates(
      jax.tree.unflatten(treedef, new_updates), params, masks
    )
    return updates, GroupLassoState(optax.safe_increment(count), masks)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
