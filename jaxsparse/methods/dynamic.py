"""Dynamic sparse training: SET, RigL, SNFS (sparse momentum) and SRigL.

Each method keeps a fixed number of active weights and periodically rewires
them. At ``begin_step`` the mask is drawn at random at the allocated
sparsity. Then, every ``update_every`` steps until ``end_step``, a layer with
``n`` active weights:

1. drops the ``floor(f_t n)`` active weights of smallest ``|w|``;
2. grows as many among the weights not kept by step 1: SET picks them
   uniformly at random, RigL picks those with the largest ``|g|`` of the
   dense (raw) gradient, SNFS those with the largest momentum ``|M|``;
3. newly grown weights start at zero (a weight dropped and regrown in the
   same update keeps its value).

RigL anneals the drop fraction with a cosine, ``f_t = α/2 (1 + cos(π t /
T_end))`` (eq. 1 of the paper); SET uses a constant fraction ζ. SNFS
(:func:`snfs`) moves the regrowth budget between layers by their mean
momentum, so per-layer counts change while the total is constant. SRigL
(:func:`srigl`) keeps a constant fan-in: every output neuron has the same
number of active weights, and may ablate whole neurons.

References:
  Evci et al, `Rigging the Lottery: Making All Tickets Winners
  <https://arxiv.org/abs/1911.11134>`_, 2020.
  Mocanu et al, `Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science
  <https://arxiv.org/abs/1707.04780>`_, 2018.
  Dettmers & Zettlemoyer, `Sparse Networks from Scratch: Faster Training
  without Losing Performance <https://arxiv.org/abs/1907.04840>`_, 2019.
  Lasby et al, `Dynamic Sparse Training with Structured Sparsity
  <https://arxiv.org/abs/2305.02299>`_, 2024.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, UInt32

from jaxsparse import allocation as allocation_lib
from jaxsparse import layout as layout_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules, threshold
from jaxsparse import scores as scores_lib
from jaxsparse.methods import pruning
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
  """State of :func:`set_sparse`, :func:`rigl` and :func:`srigl`.

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


class SNFSState(NamedTuple):
  """State of :func:`snfs`.

  Attributes:
    count: int32 scalar, steps taken.
    key: uint32[2] raw PRNG key data (initial masks).
    masks: the mask tree.
    regrown: bool scalar, whether the last step rewired the masks.
    momentum: params-shaped tree; float32 ``M`` (exponential moving average
      of the raw gradients) where a param is sparsified, else ``None``.
  """

  count: Int[Array, ""]
  key: UInt32[Array, "2"]
  masks: MaskTree
  regrown: Bool[Array, ""]
  momentum: PyTree[Float[Array, "..."] | None]


NEEDS_GRADS = (
  "{name} grows connections by the dense gradient, which only js.sparsify "
  "passes (as grads=); use js.sparsify(optimizer, {name}(...)) instead of "
  "optax.chain."
)

_NEG_INF = float("-inf")


def cosine_drop_fraction(alpha: float, end_step: int) -> Schedule:
  """RigL's eq. 1: ``f_t = α/2 (1 + cos(π min(t, T_end) / T_end))``.

  Equal to ``optax.cosine_decay_schedule(alpha, end_step)``, computed in
  float32 so it also runs under strict dtype promotion.
  """

  def schedule(count):
    t = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, float(end_step))
    return jnp.float32(alpha / 2) * (1 + jnp.cos(jnp.pi * t / end_step))

  return schedule


def _num_dropped(
  fraction: Float[ArrayLike, ""], active: Int[Array, "*batch"]
) -> Int[Array, "*batch"]:
  """``floor(f n)`` computed in float32."""
  f = jnp.asarray(fraction, jnp.float32)
  return jnp.floor(f * active.astype(jnp.float32)).astype(jnp.int32)


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
  dropped = _num_dropped(drop_fraction, active)
  neg_inf = jnp.float32(_NEG_INF)
  (kept,) = threshold.topk_masks(
    [jnp.where(mask, drop_scores.astype(jnp.float32), neg_inf)],
    active - dropped,
  )
  (grown,) = threshold.topk_masks(
    [jnp.where(kept, neg_inf, grow_scores.astype(jnp.float32))], dropped
  )
  return kept | grown


def nm_drop_and_grow(
  pattern: patterns_lib.NM,
  mask: Bool[Array, "..."],
  drop_scores: Float[Array, "..."],
  grow_scores: Float[Array, "..."],
  drop_fraction: Float[ArrayLike, ""],
) -> Bool[Array, "..."]:
  """Our N:M adaptation of RigL/SET's rewiring; every group keeps ``n``.

  RigL and SET are unstructured; SRigL's constant fan-in is their closest
  structured relative. Here the layer drops its ``floor(f n_active)``
  active entries of smallest ``drop_scores`` (across the whole layer, as
  RigL), then refills every group of ``m`` back to exactly ``n`` with its
  largest ``grow_scores`` among the entries not kept (just-dropped ones
  included). A group that lost ``d`` entries regrows ``d``, so the layer's
  count is unchanged.
  """
  active = jnp.sum(mask, dtype=jnp.int32)
  dropped = _num_dropped(drop_fraction, active)
  (kept,) = threshold.topk_masks(
    [jnp.where(mask, drop_scores.astype(jnp.float32), jnp.float32(_NEG_INF))],
    active - dropped,
  )
  # Kept entries score +inf, so each group keeps them (at most n) first and
  # fills the rest of its n with the best candidates.
  refill = jnp.where(
    kept, jnp.float32(jnp.inf), grow_scores.astype(jnp.float32)
  )
  return patterns_lib.nm_select(pattern, refill, pattern.n)


def _regrouped(pattern: patterns_lib.Pattern, ndim: int) -> tuple[int, ...]:
  """Axes a structured rewiring reshapes (as :func:`patterns.select`)."""
  if isinstance(pattern, patterns_lib.NM):
    return (pattern.axis % ndim,)
  if isinstance(pattern, patterns_lib.Block):
    return (ndim - 2, ndim - 1)
  return tuple(range(ndim))


def _gathered(
  fn: Callable[..., Array], axes: tuple[int, ...], *arrays: Array
) -> Array:
  """``fn(*arrays)``, on gathered copies if ``axes`` are sharded.

  When one of ``axes`` of ``arrays[0]`` is sharded over Explicit mesh axes,
  every array is gathered and the result is resharded like ``arrays[0]``.
  The gather is on purpose (as in :func:`jaxsparse.patterns.select`): mask
  updates are amortised over ``update_every`` steps.
  """
  sharding = patterns_lib.explicit_sharding(arrays[0])
  if sharding is None or not any(
    sharding.spec[axis] is not None
    for axis in axes
    if axis < len(sharding.spec)
  ):
    return fn(*arrays)
  replicated = jax.sharding.NamedSharding(
    sharding.mesh, jax.sharding.PartitionSpec()
  )
  out = fn(*[jax.sharding.reshard(a, replicated) for a in arrays])
  return jax.sharding.reshard(out, sharding)


def pattern_drop_and_grow(
  pattern: patterns_lib.Pattern,
  mask: Bool[Array, "..."],
  drop_scores: Float[Array, "..."],
  grow_scores: Float[Array, "..."],
  drop_fraction: Float[ArrayLike, ""],
) -> Bool[Array, "..."]:
  """RigL/SET's rewiring of one layer under a sparsity pattern.

  * :class:`Unstructured`: :func:`drop_and_grow` on entries.
  * :class:`Block` / :class:`Channel`: :func:`drop_and_grow` on the unit grid
    (a unit's scores are the sums over its entries,
    :func:`jaxsparse.patterns.unit_scores`), expanded back to entries.
  * :class:`NM`: :func:`nm_drop_and_grow`.
  """
  if isinstance(pattern, patterns_lib.Unstructured):
    return drop_and_grow(mask, drop_scores, grow_scores, drop_fraction)
  if isinstance(pattern, patterns_lib.NM):
    fn = lambda m, d, g: nm_drop_and_grow(pattern, m, d, g, drop_fraction)
  else:

    def fn(m, d, g):
      units = patterns_lib.unit_scores(pattern, m.astype(jnp.float32)) > 0
      new = drop_and_grow(
        units,
        patterns_lib.unit_scores(pattern, d.astype(jnp.float32)),
        patterns_lib.unit_scores(pattern, g.astype(jnp.float32)),
        drop_fraction,
      )
      return patterns_lib.expand_units(pattern, new, m.shape)

  return _gathered(
    fn, _regrouped(pattern, mask.ndim), mask, drop_scores, grow_scores
  )


# ---------------------------------------------------------------------------
# Shared plumbing: validation, initial state, cadence, projection.


def _check_fixed_sparsity(name: str, sparsity: object) -> None:
  if sparsity is not None and not isinstance(sparsity, numbers.Real):
    raise ValueError(
      f"{name}: sparsity must be a float (dynamic sparse training keeps it "
      f"fixed), got {sparsity!r}."
    )


def _check_unit_interval(name: str, arg: str, value: object) -> None:
  if isinstance(value, numbers.Real) and not 0 <= value <= 1:
    raise ValueError(f"{name}: {arg}={value} is not in [0, 1].")


def _no_global_threshold(name: str, allocation: object) -> None:
  allocation_lib.check_allocation(allocation)
  if isinstance(allocation, allocation_lib.GlobalThreshold):
    raise ValueError(
      f"{name}: rewiring keeps per-layer counts; use js.uniform(), js.er() or "
      "js.erk() as the allocation."
    )


def _check_leaves(
  name: str, params: Params, chosen: PyTree, check: Callable[..., None]
) -> None:
  for path, leaf, c in zip(
    masks_lib.leaf_paths(params),
    jax.tree.leaves(params),
    jax.tree.leaves(chosen),
  ):
    if c:
      check(jnp.shape(leaf), f"{name}: {path}")


def _schedule_branch(
  count: Int[Array, ""],
  update_every: Step,
  begin_step: Step,
  end_step: Step | None,
) -> Int[Array, ""]:
  """0: keep the masks; 1: draw the initial masks; 2: rewire."""
  is_first = count == jnp.asarray(begin_step, jnp.int32)
  rewire = schedules.is_update_step(count, update_every, begin_step, None)
  if end_step is not None:
    rewire = rewire & (count < jnp.asarray(end_step, jnp.int32))
  return jnp.where(is_first, 1, jnp.where(rewire, 2, 0)).astype(jnp.int32)


def _project(
  updates: Updates, params: Params, old: MaskTree, new: MaskTree
) -> Updates:
  """Updates that zero every entry not active both before and after.

  Entries active before and after keep their update; everything else
  (pruned, or grown this step and so starting from zero) becomes 0. At
  begin_step the old masks are still all-True, so this is the new mask.
  """
  moving = jax.tree.map(
    lambda n, o: None if n is None else n & o,
    new,
    old,
    is_leaf=lambda x: x is None,
  )
  return masks_lib.project_updates(updates, params, moving)


def _key_data(state: Any) -> UInt32[Array, "2"]:
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
  return jax.random.key_data(key)


def _map_masked(fn: Callable[..., Any], masks: MaskTree, *trees: Any) -> Any:
  """``fn(mask, *leaves)`` where a mask is set; ``None`` elsewhere."""
  return jax.tree.map(
    lambda m, *xs: None if m is None else fn(m, *xs),
    masks,
    *trees,
    is_leaf=lambda x: x is None,
  )


# ---------------------------------------------------------------------------
# SET and RigL.


def _dynamic(
  name: str,
  grow: str,
  sparsity: float | None,
  drop_fraction: ScalarOrSchedule,
  *,
  pattern: patterns_lib.Pattern,
  allocation: allocation_lib.Allocation | None,
  default_allocation: allocation_lib.Allocation,
  where: Selection,
  update_every: Step,
  begin_step: Step,
  end_step: Step | None,
  seed: int,
) -> optax.GradientTransformationExtraArgs:
  _check_fixed_sparsity(name, sparsity)
  masks_lib.check_pattern_spec(pattern, name)
  if allocation is None:
    has_nm = any(
      isinstance(p, patterns_lib.NM)
      for p in masks_lib.known_patterns(pattern) or []
    )
    allocation = allocation_lib.Uniform() if has_nm else default_allocation
  _no_global_threshold(name, allocation)
  schedules.check_cadence(update_every, begin_step, end_step)
  sparsity = pruning._resolve_sparsity(sparsity, pattern, allocation, (), name)
  _check_unit_interval(name, "drop_fraction", drop_fraction)

  def init_fn(params: Params) -> DynamicSparseState:
    chosen = masks_lib.resolve_where(where, params, name, pattern)
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
    masks_lib.check_same_params(state.masks, params, name)
    if grow == "gradient" and grads is None:
      raise ValueError(NEEDS_GRADS.format(name=name))
    count = state.count
    key_data = _key_data(state)
    specs = masks_lib.leaf_specs(where, params, name, pattern)

    def initial_masks():
      return masks_lib.reselect(
        scores_lib.random(params, key_data),
        state.masks,
        sparsity,
        pattern=specs,
        allocation=allocation,
      )

    def rewired_masks():
      f = schedules.value_at(drop_fraction, count - begin_step)
      if grow == "gradient":
        growth = scores_lib.magnitude(grads)
      else:
        growth = scores_lib.random(params, key_data)

      def one(m, p, g, spec):
        return layout_lib.on_matrices(
          lambda m, d, g: pattern_drop_and_grow(spec.pattern, m, d, g, f),
          spec.layout,
          m,
          jnp.abs(p),
          g,
        )

      return _map_masked(one, state.masks, params, growth, specs)

    branch = _schedule_branch(count, update_every, begin_step, end_step)
    masks = jax.lax.switch(
      branch, [lambda: state.masks, initial_masks, rewired_masks]
    )
    updates = _project(updates, params, state.masks, masks)
    return updates, state._replace(
      count=optax.safe_increment(count), masks=masks, regrown=branch > 0
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rigl(
  sparsity: float | None = None,
  *,
  drop_fraction: float = 0.3,
  end_step: Step | None = None,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation | None = None,
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

  With a pattern (see :func:`pattern_drop_and_grow`): :class:`Block` and
  :class:`Channel` rewire whole units scored by the sums of ``|w|`` and
  ``|g|`` over them; :class:`NM` drops by ``|w|`` across the layer and
  refills every group to exactly ``n`` by ``|g|`` (our N:M adaptation:
  RigL itself is unstructured; SRigL's constant fan-in, :func:`srigl`, is
  the structured relative in the literature).

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, fixed through training;
      ``None`` with :class:`NM` means its level ``1 - n/m``.
    drop_fraction: ``α``, the initial fraction of active weights rewired.
    end_step: static; last step with rewiring (``T_end``; the paper uses 75%
      of training). ``None``: rewire forever with a constant ``α``.
    pattern: static; :class:`Unstructured`, :class:`NM`, :class:`Block` or
      :class:`Channel`.
    allocation: static; per-layer sparsities. ``None``: ERK as in the paper
      (uniform for :class:`NM`, the only allocation N:M allows).
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
    pattern=pattern,
    allocation=allocation,
    default_allocation=allocation_lib.ERK(),
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
    seed=seed,
  )


def set_sparse(
  sparsity: float | None = None,
  *,
  drop_fraction: float = 0.3,
  end_step: Step | None = None,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation | None = None,
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

  With a pattern: :class:`Block` and :class:`Channel` drop whole units by
  the sum of ``|w|`` and regrow units at random; :class:`NM` drops by
  ``|w|`` across the layer and refills every group to exactly ``n`` at
  random (our N:M adaptation; SET itself is unstructured).

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, fixed through training;
      ``None`` with :class:`NM` means its level ``1 - n/m``.
    drop_fraction: ``ζ`` (0.3 in the paper).
    end_step: static; last step with rewiring; ``None``: no end.
    pattern: static; :class:`Unstructured`, :class:`NM`, :class:`Block` or
      :class:`Channel`.
    allocation: static; per-layer sparsities. ``None``: Erdős–Rényi as in
      the paper (uniform for :class:`NM`).
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
    pattern=pattern,
    allocation=allocation,
    default_allocation=allocation_lib.ER(),
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
    seed=seed,
  )


# ---------------------------------------------------------------------------
# SNFS: sparse momentum.


def regrowth_counts(
  removed: Int[Array, " layers"],
  contributions: Float[Array, " layers"],
  capacity: Int[Array, " layers"],
) -> Int[Array, " layers"]:
  """SNFS's regrowth per layer: ``round(K c_i)``, capped, total exactly ``K``.

  ``K = Σ removed``; ``c_i = contributions_i / Σ contributions`` (when every
  contribution is 0, ``c_i = removed_i / K``: each layer regrows what it
  removed). Layer ``i`` gets ``min(round(K c_i), capacity_i)``. The
  difference to ``K`` is then settled deterministically: a shortfall (from
  capped layers or rounding down) fills the layers with room in order of
  decreasing ``c_i`` (ties: earlier layer first), each up to its capacity;
  a surplus (rounding up) is taken back in order of increasing ``c_i``. As
  ``Σ capacity_i >= K``, the result sums to ``K`` exactly.

  Args:
    removed: int32 per layer, weights pruned this update.
    contributions: float32 per layer, mean ``|M|`` over its active weights.
    capacity: int32 per layer, entries that may grow (not kept).

  Returns:
    int32 per layer, the number of weights to regrow.
  """
  total = jnp.sum(removed)
  norm = jnp.sum(contributions)
  fallback = removed.astype(jnp.float32) / jnp.maximum(total, 1).astype(
    jnp.float32
  )
  share = jnp.where(
    norm > 0, contributions / jnp.where(norm > 0, norm, 1), fallback
  )
  wanted = jnp.round(total.astype(jnp.float32) * share).astype(jnp.int32)
  counts = jnp.minimum(wanted, capacity)
  deficit = total - jnp.sum(counts)
  index = jnp.arange(share.shape[0])
  # ahead[i, j]: layer j comes before layer i in priority order.
  ahead = (share[None, :] > share[:, None]) | (
    (share[None, :] == share[:, None]) & (index[None, :] < index[:, None])
  )
  behind = ~ahead & (index[None, :] != index[:, None])
  room = capacity - counts
  room_ahead = jnp.sum(jnp.where(ahead, room[None, :], 0), axis=1)
  added = jnp.clip(deficit - room_ahead, 0, room)
  counts_behind = jnp.sum(jnp.where(behind, counts[None, :], 0), axis=1)
  taken = jnp.clip(-deficit - counts_behind, 0, counts)
  return (counts + added - taken).astype(jnp.int32)


def _replicated(x: Array) -> Array:
  """``x`` gathered to every device if sharded over Explicit mesh axes.

  Reductions of the gathered array run in the same order as on one device,
  so a float sum gives the same bits on 1 or 8 devices.
  """
  sharding = patterns_lib.explicit_sharding(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(
    x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  )


def snfs_rewire(
  masks: list[Bool[Array, "..."]],
  weights: list[ArrayLike],
  momenta: list[Float[Array, "..."]],
  prune_rate: Float[ArrayLike, ""],
) -> list[Bool[Array, "..."]]:
  """One sparse-momentum update over all layers (Algorithm 1 of the paper).

  1. Layer ``i`` with ``n_i`` active weights removes its
     ``floor(p n_i)`` active weights of smallest ``|w|`` (``K`` in total).
  2. Its momentum contribution is the mean ``|M|`` over its active weights
     (before pruning), normalised over layers to ``c_i``.
  3. It regrows :func:`regrowth_counts` weights (``round(K c_i)``, capped at
     its free entries, the total exactly ``K``): the entries not kept by
     step 1 with the largest ``|M|`` (a weight pruned and regrown keeps its
     value; new ones start at zero).

  Args:
    masks: the current mask of each layer.
    weights: each layer's params.
    momenta: each layer's float32 momentum ``M``.
    prune_rate: ``p`` in ``[0, 1]``.

  Returns:
    The new masks; their total count equals the old one.
  """
  neg_inf = jnp.float32(_NEG_INF)
  kept, removed, contributions, capacity = [], [], [], []
  for mask, w, m in zip(masks, weights, momenta):
    active = jnp.sum(mask, dtype=jnp.int32)
    dropped = _num_dropped(prune_rate, active)
    (keep,) = threshold.topk_masks(
      [jnp.where(mask, jnp.abs(w).astype(jnp.float32), neg_inf)],
      active - dropped,
    )
    total = jnp.sum(_replicated(jnp.where(mask, jnp.abs(m), 0.0)))
    mean = total / jnp.maximum(active, 1).astype(jnp.float32)
    kept.append(keep)
    removed.append(dropped)
    contributions.append(mean.astype(jnp.float32))
    capacity.append(jnp.int32(mask.size) - (active - dropped))
  grow = regrowth_counts(
    jnp.stack(removed), jnp.stack(contributions), jnp.stack(capacity)
  )
  new = []
  for i, (keep, m) in enumerate(zip(kept, momenta)):
    (grown,) = threshold.topk_masks(
      [jnp.where(keep, neg_inf, jnp.abs(m))], grow[i]
    )
    new.append(keep | grown)
  return new


def _layers(i, masks, weights, momenta, layouts):
  """The layers of leaf ``i``: itself, or each matrix of a stacked leaf."""
  layout = layouts[i]
  if not layout.stack:
    return [masks[i]], [weights[i]], [momenta[i]]
  split = lambda x: list(layout_lib.to_matrices(jnp.asarray(x), layout))
  return split(masks[i]), split(weights[i]), split(momenta[i])


def _unlayers(masks, layout, shape):
  if not layout.stack:
    return masks[0]
  return layout_lib.from_matrices(jnp.stack(masks), layout, shape)


def snfs(
  sparsity: float,
  *,
  prune_rate: float = 0.5,
  momentum: float = 0.9,
  end_step: Step | None = None,
  allocation: allocation_lib.Allocation = allocation_lib.Uniform(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SNFS (sparse momentum): prune by magnitude, regrow where momentum is.

  The state keeps ``M ← β M + (1 - β) g`` of the raw (dense) gradients at
  every step. Every ``update_every`` steps before ``end_step``
  (:func:`snfs_rewire`, Algorithm 1 of the paper): each layer prunes
  ``floor(p_t n_i)`` of its ``n_i`` active weights by smallest ``|w|``;
  the ``K`` pruned weights are redistributed over layers in proportion to
  their mean ``|M|`` over active weights, ``round(K c_i)`` each (capped at a
  layer's free entries, the leftover going to the layers of highest ``c_i``
  with room, see :func:`regrowth_counts`), so the total count is exactly
  constant while per-layer counts move; each layer regrows the zero weights
  of largest ``|M|``, starting at zero. ``p_t`` is cosine-annealed from
  ``prune_rate`` to 0 at ``end_step``, as in the paper (constant without
  ``end_step``).

  The paper reads SGD's momentum buffer; an exponential moving average of the
  dense gradient is its optimizer-independent equivalent (equal up to the
  factor ``1 - β``, which cancels in ``c_i`` and the growth ranking), so
  SNFS works with any optax optimizer. Needs :func:`jaxsparse.sparsify`.

  Args:
    sparsity: overall fraction of zeros in ``[0, 1)``, fixed through
      training (per-layer sparsities move; the total count does not).
    prune_rate: ``p``, the initial fraction of each layer's active weights
      pruned per update (0.5 in the paper).
    momentum: ``β`` in ``[0, 1)`` of the moving average (0.9 in the paper).
    end_step: static; last step with rewiring, where ``p_t`` reaches 0;
      ``None``: rewire forever with a constant ``p``.
    allocation: static; per-layer sparsities of the random initial mask
      (uniform, as in the paper).
    where: static; which params are sparse.
    update_every: static; steps between updates (the paper: one epoch).
    begin_step: step of the random initial mask.
    seed: PRNG seed of the initial mask.

  Returns:
    An optax transformation with state :class:`SNFSState`.

  References:
    Dettmers & Zettlemoyer, `Sparse Networks from Scratch: Faster Training
    without Losing Performance <https://arxiv.org/abs/1907.04840>`_, 2019.
  """
  name = "snfs"
  _check_fixed_sparsity(name, sparsity)
  schedules.check_sparsity(sparsity, f"{name}: sparsity")
  allocation_lib.check_allocation(allocation)
  schedules.check_cadence(update_every, begin_step, end_step)
  _check_unit_interval(name, "prune_rate", prune_rate)
  if not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
    raise ValueError(
      f"{name}: momentum={momentum!r} must be a float in [0, 1) (the "
      "moving-average factor β; the paper uses 0.9)."
    )
  rate: ScalarOrSchedule = prune_rate
  if end_step is not None and isinstance(end_step, numbers.Integral):
    rate = cosine_drop_fraction(prune_rate, end_step - begin_step)
  beta = float(momentum)

  def init_fn(params: Params) -> SNFSState:
    chosen = masks_lib.resolve_where(where, params, name)
    return SNFSState(
      jnp.zeros([], jnp.int32),
      jax.random.key_data(jax.random.key(seed)),
      masks_lib.init_masks(params, chosen),
      jnp.zeros([], jnp.bool_),
      jax.tree.map(
        lambda p, c: jnp.zeros_like(p, dtype=jnp.float32) if c else None,
        params,
        chosen,
      ),
    )

  def update_fn(
    updates: Updates,
    state: SNFSState,
    params: Params | None = None,
    *,
    grads: Updates | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, SNFSState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name=name))
    masks_lib.check_same_params(state.masks, params, name)
    if grads is None:
      raise ValueError(NEEDS_GRADS.format(name=name))
    count = state.count
    key_data = _key_data(state)
    momenta = jax.tree.map(
      lambda m, g: (
        None
        if m is None
        else jnp.float32(beta) * m + jnp.float32(1 - beta) * g.astype(m.dtype)
      ),
      state.momentum,
      grads,
      is_leaf=lambda x: x is None,
    )

    specs = masks_lib.leaf_specs(where, params, name)

    def initial_masks():
      return masks_lib.reselect(
        scores_lib.random(params, key_data),
        state.masks,
        sparsity,
        pattern=specs,
        allocation=allocation,
      )

    def rewired_masks():
      p = schedules.value_at(rate, count - begin_step)
      leaves, treedef = jax.tree.flatten(
        state.masks, is_leaf=lambda x: x is None
      )
      weights = jax.tree.leaves(params)
      moms = jax.tree.flatten(momenta, is_leaf=lambda x: x is None)[0]
      layouts = [s.layout if s else None for s in jax.tree.leaves(specs)]
      chosen = [i for i, m in enumerate(leaves) if m is not None]
      # Each matrix of a stacked leaf is a layer of its own.
      layers = [_layers(i, leaves, weights, moms, layouts) for i in chosen]
      new = snfs_rewire(
        [m for layer in layers for m in layer[0]],
        [w for layer in layers for w in layer[1]],
        [g for layer in layers for g in layer[2]],
        p,
      )
      out = list(leaves)
      start = 0
      for i, layer in zip(chosen, layers):
        count_i = len(layer[0])
        out[i] = _unlayers(
          new[start : start + count_i], layouts[i], leaves[i].shape
        )
        start += count_i
      return jax.tree.unflatten(treedef, out)

    branch = _schedule_branch(count, update_every, begin_step, end_step)
    masks = jax.lax.switch(
      branch, [lambda: state.masks, initial_masks, rewired_masks]
    )
    updates = _project(updates, params, state.masks, masks)
    return updates, SNFSState(
      optax.safe_increment(count), state.key, masks, branch > 0, momenta
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# SRigL: constant fan-in with neuron ablation.


def _neurons(x: Array) -> Array:
  """``[..., out]`` -> ``[out, fan_in]`` (one row per output neuron)."""
  return x.reshape(-1, x.shape[-1]).T


def _unneurons(x: Array, shape: tuple[int, ...]) -> Array:
  return x.T.reshape(shape)


def _row_ranks(scores: Float[Array, "rows cols"]) -> Int[Array, "rows cols"]:
  """Rank of each entry in its row, largest first; ties to the lower index."""
  keys = threshold.ordered_keys(scores)
  order = jnp.argsort(~keys, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def _row_topk(
  scores: Float[Array, "rows cols"], k: Int[Array, " rows"]
) -> Bool[Array, "rows cols"]:
  """The ``k[r]`` largest scores of every row ``r``."""
  return _row_ranks(scores) < k[:, None]


def constant_fan_in_rewire(
  mask: Bool[Array, "..."],
  weights: ArrayLike,
  grow_scores: Float[Array, "..."],
  drop_fraction: Float[ArrayLike, ""],
  fan_in: Int[ArrayLike, ""],
  ablation_threshold: float,
) -> Bool[Array, "..."]:
  """One SRigL update of a layer whose neurons all have ``fan_in`` weights.

  Neuron ablation (when ``ablation_threshold = γ > 0``): a weight is
  *salient* if it is active after RigL's unstructured update of the layer
  (:func:`drop_and_grow`: the layer's largest ``|w|`` kept, largest ``|g|``
  grown). A neuron with fewer than ``γ k`` salient weights (``k =
  fan_in``, the fan-in with no neuron ablated) is ablated: all its weights
  are removed, and the layer's budget ``B = k · neurons`` is shared by the
  ``a`` remaining ones, ``k_a = floor(B / a)`` each. At least
  ``ceil(B / dense_fan_in)`` neurons (the most salient, ties to the lower
  index) stay active so that ``k_a`` fits. An ablated neuron that becomes
  salient again is regrown with ``k_a`` weights.

  Then every active neuron with ``c`` active weights keeps its
  ``min(c - floor(f c), k_a)`` largest ``|w|`` and grows its largest
  ``|g|`` among the rest (just-dropped included) back to ``k_a``.

  Args:
    mask: the layer's mask, one kernel matrix ``[K, N]``.
    weights: the layer's params.
    grow_scores: ``|g|`` of the dense gradient.
    drop_fraction: ``f``.
    fan_in: ``k``, the constant fan-in without ablation.
    ablation_threshold: static ``γ`` in ``[0, 1]``; 0 disables ablation.

  Returns:
    The new mask.
  """
  shape = mask.shape
  m = _neurons(mask)
  w = _neurons(jnp.abs(weights).astype(jnp.float32))
  g = _neurons(grow_scores.astype(jnp.float32))
  rows, dense_fan_in = m.shape
  k = jnp.asarray(fan_in, jnp.int32)
  counts = jnp.sum(m, axis=1, dtype=jnp.int32)
  if ablation_threshold > 0:
    salient = drop_and_grow(mask, jnp.abs(weights), grow_scores, drop_fraction)
    saliency = jnp.sum(_neurons(salient), axis=1, dtype=jnp.int32)
    budget = k * jnp.int32(rows)
    needed = (budget + jnp.int32(dense_fan_in - 1)) // jnp.int32(dense_fan_in)
    rank = _row_ranks(saliency.astype(jnp.float32)[None, :])[0]
    level = jnp.float32(ablation_threshold) * k.astype(jnp.float32)
    active = (saliency.astype(jnp.float32) >= level) | (rank < needed)
    alive = jnp.sum(active, dtype=jnp.int32)
    k = jnp.minimum(budget // jnp.maximum(alive, 1), jnp.int32(dense_fan_in))
  else:
    active = jnp.ones([rows], jnp.bool_)
  dropped = _num_dropped(drop_fraction, counts)
  keep = jnp.where(active, jnp.minimum(counts - dropped, k), 0)
  neg_inf = jnp.float32(_NEG_INF)
  kept = _row_topk(jnp.where(m, w, neg_inf), keep)
  grown = _row_topk(jnp.where(kept, neg_inf, g), jnp.where(active, k - keep, 0))
  return _unneurons(kept | grown, shape)


def _check_fan_in_leaf(shape: tuple[int, ...], path: str) -> None:
  if len(shape) < 2:
    raise ValueError(
      f"{path}: constant fan-in needs a kernel with an input and an output "
      f"axis ([..., in, out]), got shape {shape}; exclude it with `where=`."
    )


def srigl(
  sparsity: float,
  *,
  drop_fraction: float = 0.3,
  end_step: Step | None = None,
  ablation_threshold: float = 0.3,
  allocation: allocation_lib.Allocation = allocation_lib.Uniform(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SRigL: RigL with a constant fan-in per neuron, and neuron ablation.

  Every output neuron (a column of each kernel matrix ``[K, N]`` of the
  leaf's layout; its fan-in is ``K``) has the same number ``k = fan_in - round(s
  fan_in)`` of active weights, starting from a random constant fan-in mask
  at ``begin_step``. Every ``update_every`` steps before ``end_step``
  (:func:`constant_fan_in_rewire`) each neuron drops its ``floor(f_t k)``
  active weights of smallest ``|w|`` and grows as many of the largest
  ``|∂L/∂w|`` among its inactive ones, starting at zero, with RigL's cosine
  ``f_t``. With ``ablation_threshold = γ > 0``, a neuron with fewer than
  ``γ k`` salient weights (active after RigL's unstructured update of the
  layer) is ablated and its budget is shared by the remaining neurons,
  whose fan-in grows to ``floor(B / a)`` (``B = k · neurons``, ``a`` the
  neurons left): the layer's count stays ``B`` when ``a`` divides it, and
  loses the remainder ``B mod a`` otherwise, since the fan-in must stay
  constant. Needs :func:`jaxsparse.sparsify`.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, fixed through training.
    drop_fraction: ``α``, the initial fraction of each neuron's weights
      rewired (cosine-annealed to 0 at ``end_step``).
    end_step: static; last step with rewiring; ``None``: no end.
    ablation_threshold: static; ``γ_sal`` in ``[0, 1]`` (0.3 in the paper);
      0 disables neuron ablation.
    allocation: static; per-layer sparsities (uniform, ER or ERK).
    where: static; which params are sparse (kernels with ``ndim >= 2``).
    update_every: static; ``ΔT``, steps between rewirings.
    begin_step: step of the random initial mask.
    seed: PRNG seed of the initial mask.

  Returns:
    An optax transformation with state :class:`DynamicSparseState`.

  References:
    Lasby et al, `Dynamic Sparse Training with Structured Sparsity
    <https://arxiv.org/abs/2305.02299>`_, 2024.
  """
  name = "srigl"
  _check_fixed_sparsity(name, sparsity)
  schedules.check_sparsity(sparsity, f"{name}: sparsity")
  _no_global_threshold(name, allocation)
  schedules.check_cadence(update_every, begin_step, end_step)
  _check_unit_interval(name, "drop_fraction", drop_fraction)
  if not (
    isinstance(ablation_threshold, numbers.Real)
    and 0 <= ablation_threshold <= 1
  ):
    raise ValueError(
      f"{name}: ablation_threshold={ablation_threshold!r} must be a float in "
      "[0, 1] (γ_sal, the fraction of a neuron's fan-in that must be "
      "salient; 0 disables ablation)."
    )
  gamma = float(ablation_threshold)
  fraction: ScalarOrSchedule = drop_fraction
  if end_step is not None and isinstance(end_step, numbers.Integral):
    fraction = cosine_drop_fraction(drop_fraction, end_step - begin_step)

  def fan_ins(masks: MaskTree, specs: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
    spec_leaves = jax.tree.leaves(specs)
    chosen = [i for i, m in enumerate(leaves) if m is not None]
    per_leaf = allocation_lib.layer_sparsities(
      allocation,
      [spec_leaves[i].allocation_shape(leaves[i].shape) for i in chosen],
      sparsity,
      sizes=[leaves[i].size for i in chosen],
    )
    out: list[Array | None] = [None] * len(leaves)
    for i, s in zip(chosen, per_leaf):
      k, _ = spec_leaves[i].layout.matrix_shape(leaves[i].shape)
      out[i] = patterns_lib.num_kept(k, s)
    return jax.tree.unflatten(treedef, out)

  def init_fn(params: Params) -> DynamicSparseState:
    chosen = masks_lib.leaf_specs(where, params, name)
    _check_leaves(name, params, chosen, _check_fan_in_leaf)
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
    masks_lib.check_same_params(state.masks, params, name)
    if grads is None:
      raise ValueError(NEEDS_GRADS.format(name=name))
    count = state.count
    key_data = _key_data(state)
    specs = masks_lib.leaf_specs(where, params, name)
    ks = fan_ins(state.masks, specs)

    def initial_masks():
      def one(m, s, k, spec):
        def fn(scores):
          return _unneurons(
            _row_topk(_neurons(scores), jnp.full([scores.shape[-1]], k)),
            scores.shape,
          )

        on_leaf = lambda s: layout_lib.on_matrices(fn, spec.layout, s)
        return _gathered(on_leaf, tuple(range(m.ndim)), s)

      return _map_masked(
        one, state.masks, scores_lib.random(params, key_data), ks, specs
      )

    def rewired_masks():
      f = schedules.value_at(fraction, count - begin_step)

      def one(m, p, g, k, spec):
        rewire = lambda m_, p_, g_: constant_fan_in_rewire(
          m_, p_, g_, f, k, gamma
        )
        return _gathered(
          lambda *xs: layout_lib.on_matrices(rewire, spec.layout, *xs),
          tuple(range(m.ndim)),
          m,
          p,
          jnp.abs(g).astype(jnp.float32),
        )

      return _map_masked(one, state.masks, params, grads, ks, specs)

    branch = _schedule_branch(count, update_every, begin_step, end_step)
    masks = jax.lax.switch(
      branch, [lambda: state.masks, initial_masks, rewired_masks]
    )
    updates = _project(updates, params, state.masks, masks)
    return updates, state._replace(
      count=optax.safe_increment(count), masks=masks, regrown=branch > 0
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
