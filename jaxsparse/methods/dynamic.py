"""Dynamic sparse training: SET and RigL.

Both keep a fixed number of active weights per layer and periodically rewire
them. At ``begin_step`` the mask is drawn at random at the allocated
sparsity (RigL's ERK by default). Then, every ``update_every`` steps until
``end_step``, each layer with ``n`` active weights:

1. drops the ``floor(f_t n)`` active weights of smallest ``|w|``;
2. grows as many among the weights not kept by step 1: SET picks them
   uniformly at random, RigL picks those with the largest ``|g|`` of the
   dense (raw) gradient;
3. newly grown weights start at zero (a weight dropped and regrown in the
   same update keeps its value).

RigL anneals the drop fraction with a cosine, ``f_t = α/2 (1 + cos(π t /
T_end))`` (eq. 1 of the paper); SET uses a constant fraction ζ.

References:
  Evci et al, `Rigging the Lottery: Making All Tickets Winners
  <https://arxiv.org/abs/1911.11134>`_, 2020.
  Mocanu et al, `Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science
  <https://arxiv.org/abs/1707.04780>`_, 2018.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, UInt32

from jaxsparse import allocation as allocation_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules, threshold
from jaxsparse import scores as scores_lib
from jaxsparse.sparsify import NO_PARAMS
from jaxsparse.types import (
  MaskTree,
  Params,
  ScalarOrSchedule,
  Schedule,
  Selection,
  Step,
  Updates,
)


class DynamicSparseState(NamedTuple):
  """State of :func:`set_sparse` and :func:`rigl`.

  Attributes:
    count: int32 scalar, steps taken.
    key: uint32[2] raw PRNG key data (initial masks, SET's random growth).
    masks: the mask tree.
    regrown: bool scalar, whether the last step rewired the masks (then
      :func:`jaxsparse.sparsify` resets the optimizer moments of the
      weights not active).
  """

  count: Int[Array, ""]
  key: UInt32[Array, "2"]
  masks: MaskTree
  regrown: Bool[Array, ""]


NEEDS_GRADS = (
  "{name} grows connections by the dense gradient, which only js.sparsify "
  "passes (as grads=); use js.sparsify(optimizer, {name}(...)) instead of "
  "optax.chain."
)


def cosine_drop_fraction(alpha: float, end_step: int) -> Schedule:
  """RigL's eq. 1: ``f_t = α/2 (1 + cos(π min(t, T_end) / T_end))``.

  Equal to ``optax.cosine_decay_schedule(alpha, end_step)``, computed in
  float32 so it also runs under strict dtype promotion.
  """

  def schedule(count):
    t = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, float(end_step))
    return jnp.float32(alpha / 2) * (1 + jnp.cos(jnp.pi * t / end_step))

  return schedule


def drop_and_grow(
  mask: Bool[Array, "..."],
  drop_scores: Float[Array, "..."],
  grow_scores: Float[Array, "..."],
  drop_fraction: Float[ArrayLike, ""],
) -> Bool[Array, "..."]:
  """One rewiring of a layer; the number of active entries is unchanged.

  Keeps the ``n - floor(f n)`` active entries with the largest
  ``drop_scores``, then activates the ``floor(f n)`` entries with the largest
  ``grow_scores`` among those not kept (just-dropped ones included).
  """
  active = jnp.sum(mask, dtype=jnp.int32)
  dropped = jnp.floor(
    jnp.asarray(drop_fraction, jnp.float32) * active.astype(jnp.float32)
  ).astype(jnp.int32)
  neg_inf = jnp.float32(-jnp.inf)
  (kept,) = threshold.topk_masks(
    [jnp.where(mask, drop_scores.astype(jnp.float32), neg_inf)],
    active - dropped,
  )
  (grown,) = threshold.topk_masks(
    [jnp.where(kept, neg_inf, grow_scores.astype(jnp.float32))], dropped
  )
  return kept | grown


def _dynamic(
  name: str,
  grow: str,
  sparsity: float,
  drop_fraction: ScalarOrSchedule,
  *,
  allocation: allocation_lib.Allocation,
  where: Selection,
  update_every: Step,
  begin_step: Step,
  end_step: Step | None,
  seed: int,
) -> optax.GradientTransformationExtraArgs:
  if not isinstance(sparsity, numbers.Real):
    raise ValueError(
      f"{name}: sparsity must be a float (dynamic sparse training keeps it "
      f"fixed), got {sparsity!r}."
    )
  schedules.check_sparsity(sparsity, f"{name}: sparsity")
  schedules.check_cadence(update_every, begin_step, end_step)
  allocation_lib.check_allocation(allocation)
  if isinstance(allocation, allocation_lib.GlobalThreshold):
    raise ValueError(
      f"{name}: rewiring keeps per-layer counts; use js.uniform(), js.er() or "
      "js.erk() as the allocation."
    )
  if isinstance(drop_fraction, numbers.Real) and not 0 <= drop_fraction <= 1:
    raise ValueError(f"{name}: drop_fraction={drop_fraction} is not in [0, 1].")

  def init_fn(params: Params) -> DynamicSparseState:
    chosen = masks_lib.resolve_where(where, params, name)
    return DynamicSparseState(
      jnp.zeros([], jnp.int32),
      jax.random.key_data(jax.random.key(seed)),
      masks_lib.init_masks(params, chosen),
      jnp.zeros([], jnp.bool_),
    )

  def update_fn(
    updates: Updates,
    state: DynamicSparseState,
    params: Params | None = None,
    *,
    grads: Updates | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, DynamicSparseState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name=name))
    if grow == "gradient" and grads is None:
      raise ValueError(NEEDS_GRADS.format(name=name))
    count = state.count
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
    key_data = jax.random.key_data(key)

    def initial_masks():
      return masks_lib.reselect(
        scores_lib.random(params, key_data),
        state.masks,
        sparsity,
        pattern=patterns_lib.Unstructured(),
        allocation=allocation,
      )

    def rewired_masks():
      f = schedules.value_at(drop_fraction, count - begin_step)
      if grow == "gradient":
        growth = scores_lib.magnitude(grads)
      else:
        growth = scores_lib.random(params, key_data)
      return jax.tree.map(
        lambda m, p, g: (
          None if m is None else drop_and_grow(m, jnp.abs(p), g, f)
        ),
        state.masks,
        params,
        growth,
        is_leaf=lambda x: x is None,
      )

    is_first = count == jnp.asarray(begin_step, jnp.int32)
    rewire = schedules.is_update_step(count, update_every, begin_step, None)
    if end_step is not None:
      rewire = rewire & (count < jnp.asarray(end_step, jnp.int32))
    branch = jnp.where(is_first, 1, jnp.where(rewire, 2, 0))
    masks = jax.lax.switch(
      branch, [lambda: state.masks, initial_masks, rewired_masks]
    )
    # Entries active before and after keep their update; everything else
    # (pruned, or grown this step and so starting from zero) becomes 0. At
    # begin_step the old masks are still all-True, so this is the new mask.
    moving = jax.tree.map(
      lambda new, old: None if new is None else new & old,
      masks,
      state.masks,
      is_leaf=lambda x: x is None,
    )
    updates = masks_lib.project_updates(updates, params, moving)
    return updates, state._replace(
      count=optax.safe_increment(count), masks=masks, regrown=branch > 0
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rigl(
  sparsity: float,
  *,
  drop_fraction: float = 0.3,
  end_step: Step | None = None,
  allocation: allocation_lib.Allocation = allocation_lib.ERK(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """RigL: drop the smallest weights, grow the largest dense gradients.

  Every ``update_every`` steps before ``end_step`` each layer drops
  ``floor(f_t n)`` of its ``n`` active weights by smallest ``|w|`` and grows
  as many of the largest ``|∂L/∂w|`` among the rest, the new weights starting
  at zero. ``f_t = α/2 (1 + cos(π t / end_step))`` when ``end_step`` is set
  (``α = drop_fraction``), else ``α``. Needs :func:`jaxsparse.sparsify`,
  which passes the raw gradients.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, fixed through training.
    drop_fraction: ``α``, the initial fraction of active weights rewired.
    end_step: static; last step with rewiring (``T_end``; the paper uses 75%
      of training). ``None``: rewire forever with a constant ``α``.
    allocation: static; per-layer sparsities (ERK as in the paper).
    where: static; which params are sparse.
    update_every: static; ``ΔT``, steps between rewirings.
    begin_step: step of the random initial mask.
    seed: PRNG seed of the initial mask.

  Returns:
    An optax transformation with state :class:`DynamicSparseState`.

  References:
    Evci et al, `Rigging the Lottery: Making All Tickets Winners
    <https://arxiv.org/abs/1911.11134>`_, 2020.
  """
  fraction: ScalarOrSchedule = drop_fraction
  if end_step is not None and isinstance(end_step, numbers.Integral):
    fraction = cosine_drop_fraction(drop_fraction, end_step - begin_step)
  return _dynamic(
    "rigl",
    "gradient",
    sparsity,
    fraction,
    allocation=allocation,
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
    seed=seed,
  )


def set_sparse(
  sparsity: float,
  *,
  drop_fraction: float = 0.3,
  end_step: Step | None = None,
  allocation: allocation_lib.Allocation = allocation_lib.ER(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SET: drop the smallest weights, regrow as many at random.

  Every ``update_every`` steps (the paper rewires after each epoch) each layer
  drops the fraction ``ζ = drop_fraction`` of its active weights with the
  smallest ``|w|`` and grows as many new ones uniformly at random, starting
  at zero. Works inside :func:`jaxsparse.sparsify` or as the last link of a
  chain.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, fixed through training.
    drop_fraction: ``ζ`` (0.3 in the paper).
    end_step: static; last step with rewiring; ``None``: no end.
    allocation: static; per-layer sparsities (Erdős–Rényi as in the paper).
    where: static; which params are sparse.
    update_every: static; steps between rewirings.
    begin_step: step of the random initial mask.
    seed: PRNG seed of the initial mask and of the growth.

  Returns:
    An optax transformation with state :class:`DynamicSparseState`.

  References:
    Mocanu et al, `Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science
    <https://arxiv.org/abs/1707.04780>`_, 2018.
  """
  return _dynamic(
    "set_sparse",
    "random",
    sparsity,
    drop_fraction,
    allocation=allocation,
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
    seed=seed,
  )
