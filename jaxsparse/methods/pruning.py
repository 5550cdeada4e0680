"""Pruning by score: magnitude (one-shot or gradual), global, LAMP, random.

Each method keeps a mask per selected param and, at every update step,
re-selects the highest-scoring entries of the current params at the
(scheduled) sparsity; the step's update is then applied to the kept entries,
and every pruned entry becomes exactly zero in ``apply_updates``. With
``js.gmp(...)`` as the sparsity this is Zhu & Gupta's gradual magnitude
pruning.

References:
  Zhu & Gupta, `To prune, or not to prune: exploring the efficacy of pruning
  for model compression <https://arxiv.org/abs/1710.01878>`_, 2017.
  Han et al, `Learning both Weights and Connections for Efficient Neural
  Networks <https://arxiv.org/abs/1506.02626>`_, 2015.
  Lee et al, `Layer-adaptive sparsity for the Magnitude-based Pruning
  <https://arxiv.org/abs/2010.07611>`_, 2021.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, UInt32

from jaxsparse import allocation as allocation_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules
from jaxsparse import scores as scores_lib
from jaxsparse.sparsify import NO_PARAMS
from jaxsparse.types import (
  MaskTree,
  Params,
  ScalarOrSchedule,
  Selection,
  Step,
  Updates,
)


class MagnitudePruningState(NamedTuple):
  """State of :func:`magnitude_pruning` and :func:`global_magnitude_pruning`.

  Attributes:
    count: int32 scalar, steps taken.
    masks: the mask tree (bool arrays shaped like the selected params).
  """

  count: Int[Array, ""]
  masks: MaskTree


class RandomPruningState(NamedTuple):
  """State of :func:`random_pruning`.

  Attributes:
    count: int32 scalar, steps taken.
    key: uint32[2] raw PRNG key data; the random scores derive from it.
    masks: the mask tree.
  """

  count: Int[Array, ""]
  key: UInt32[Array, "2"]
  masks: MaskTree


def _resolve_sparsity(
  sparsity: ScalarOrSchedule | None,
  pattern: masks_lib.PatternSpec,
  allocation: allocation_lib.Allocation,
  probe_steps: tuple[int, ...],
  name: str,
) -> ScalarOrSchedule:
  """Checks the static configuration; returns the sparsity to use.

  ``pattern`` may give leaves different patterns (a mapping or a function,
  see :func:`jaxsparse.masking.leaf_specs`). N:M leaves keep exactly ``n``
  of ``m`` once the sparsity reaches their level ``1 - n/m``: with N:M
  leaves only, the sparsity is that level (``None`` means it); mixed with
  other patterns, the sparsity must end at or above every N:M level.
  """
  masks_lib.check_pattern_spec(pattern, name)
  allocation_lib.check_allocation(allocation)
  known = masks_lib.known_patterns(pattern)
  nm = [p for p in known or [] if isinstance(p, patterns_lib.NM)]
  only_nm = known is not None and len(nm) == len(known)
  if nm and not isinstance(allocation, allocation_lib.Uniform):
    raise ValueError(
      f"{name}: {nm[0]!r} fixes its layers' sparsity at "
      f"{1 - nm[0].n / nm[0].m:g}; allocation={allocation!r} cannot "
      "redistribute it. Use allocation=js.uniform()."
    )
  levels = sorted({1 - p.n / p.m for p in nm})
  if only_nm and len(levels) == 1:
    (first, *_) = nm
    level = levels[0]
    if sparsity is None:
      return level
    if isinstance(sparsity, numbers.Real) and round(sparsity * first.m) != (
      first.m - first.n
    ):
      raise ValueError(
        f"{name}: sparsity={sparsity} does not match {first!r}, whose "
        f"sparsity is {level:g}. Pass sparsity=None (or {level:g}), or a "
        "schedule that ramps up to it."
      )
    if callable(sparsity):
      for step in probe_steps:
        value = float(sparsity(jnp.asarray(step, jnp.int32)))
        if round(value * first.m) > first.m - first.n:
          raise ValueError(
            f"{name}: the sparsity schedule reaches {value:g} at step {step}, "
            f"beyond the {level:g} that {first!r} allows; end the schedule "
            f"at {level:g}."
          )
  elif sparsity is None:
    raise ValueError(
      f"{name}: pass a sparsity (a float in [0, 1) or a schedule)."
    )
  elif nm:
    final = (
      float(sparsity(jnp.asarray(max(probe_steps), jnp.int32)))
      if callable(sparsity)
      else float(sparsity)
    )
    for p in nm:
      if round(final * p.m) < p.m - p.n:
        raise ValueError(
          f"{name}: the sparsity ends at {final:g}, below the level "
          f"{1 - p.n / p.m:g} of {p!r}, whose leaves would keep more than "
          f"{p.n} of every {p.m}; raise the sparsity or give those leaves "
          "another pattern."
        )
  if isinstance(allocation, allocation_lib.GlobalThreshold) and not (
    known is not None
    and all(isinstance(p, patterns_lib.Unstructured) for p in known)
  ):
    raise ValueError(
      f"{name}: global_threshold() ranks single entries across layers, so it "
      f"needs pattern=js.Unstructured(), got {pattern!r}."
    )
  schedules.check_scalar_or_schedule(sparsity, probe_steps, f"{name}: sparsity")
  return sparsity


def _score_pruning(
  name: str,
  score_fn: Callable[[Params, Any], Any],
  sparsity: ScalarOrSchedule | None,
  *,
  pattern: masks_lib.PatternSpec,
  allocation: allocation_lib.Allocation,
  where: Selection,
  update_every: Step,
  begin_step: Step,
  end_step: Step | None,
  seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Shared body of the pruning methods: re-select masks from scores."""
  schedules.check_cadence(update_every, begin_step, end_step)
  # Schedules are checked at these steps; 2**30 stands for "after training".
  probes = tuple(
    s
    for s in (0, begin_step, end_step, 2**30)
    if isinstance(s, numbers.Integral)
  )
  sparsity = _resolve_sparsity(sparsity, pattern, allocation, probes, name)

  def init_fn(params: Params) -> MagnitudePruningState | RandomPruningState:
    chosen = masks_lib.resolve_where(where, params, name, pattern)
    masks = masks_lib.init_masks(params, chosen)
    count = jnp.zeros([], jnp.int32)
    if seed is None:
      return MagnitudePruningState(count, masks)
    key = jax.random.key_data(jax.random.key(seed))
    return RandomPruningState(count, key, masks)

  def update_fn(
    updates: Updates,
    state: MagnitudePruningState | RandomPruningState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, MagnitudePruningState | RandomPruningState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name=name))
    masks_lib.check_same_params(state.masks, params, name)
    target = schedules.value_at(sparsity, state.count)

    # Scores read the current params only: closing over `updates` would make
    # them an operand of the cond, which XLA must materialise on every step
    # (benchmarks/results/step_overhead.md measured 1.35x a dense step).
    specs = masks_lib.leaf_specs(where, params, name, pattern)

    def refresh():
      return masks_lib.reselect(
        score_fn(params, state),
        state.masks,
        target,
        pattern=specs,
        allocation=allocation,
      )

    masks = jax.lax.cond(
      schedules.is_update_step(state.count, update_every, begin_step, end_step),
      refresh,
      lambda: state.masks,
    )
    updates = masks_lib.project_updates(updates, params, masks)
    return updates, state._replace(
      count=optax.safe_increment(state.count), masks=masks
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def magnitude_pruning(
  sparsity: ScalarOrSchedule | None = None,
  *,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.Uniform(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  end_step: Step | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Magnitude pruning: keep the largest ``|w|`` at the (scheduled) sparsity.

  At every update step the masks become ``top_k(|params|)`` per pattern unit
  (the weights the model ran with at this step), with ``k`` from the
  allocation; the step's update then moves only the kept entries. Between
  updates the masks are fixed. With ``sparsity=js.gmp(...)`` this is gradual
  magnitude pruning (Zhu & Gupta 2017); with a constant it is one-shot
  magnitude pruning (Han et al 2015) held through training.

  Works as the last link of a chain, ``optax.chain(opt, magnitude_pruning(s))``,
  or inside :func:`jaxsparse.sparsify`.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, or an optax schedule of the
      step count (e.g. :func:`jaxsparse.gmp`). ``None`` with :class:`NM` means
      the N:M level ``1 - n/m``.
    pattern: static; :class:`Unstructured`, :class:`NM`, :class:`Block` or
      :class:`Channel`.
    allocation: static; :func:`uniform`, :func:`er`, :func:`erk` or
      :func:`global_threshold`.
    where: static; which params are sparsified (see
      :func:`jaxsparse.resolve_where`). Default: weight matrices and conv
      kernels, not embeddings.
    update_every: static; steps between mask updates.
    begin_step: first mask update (masks are all-True before it).
    end_step: last mask update (always performed); ``None``: no end.

  Returns:
    An optax transformation with state :class:`MagnitudePruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> tx = optax.chain(optax.sgd(0.0), js.magnitude_pruning(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, -4.0], [3.0, 0.0]]
  """
  return _score_pruning(
    "magnitude_pruning",
    lambda params, state: scores_lib.magnitude(params),
    sparsity,
    pattern=pattern,
    allocation=allocation,
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
  )


def global_magnitude_pruning(
  sparsity: ScalarOrSchedule,
  *,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  end_step: Step | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Global magnitude pruning: one ``|w|`` threshold across all layers.

  :func:`magnitude_pruning` with ``allocation=js.global_threshold()``: keeps
  exactly ``N - round(s N)`` entries over the ``N`` selected weights, the
  largest by magnitude wherever they are. The threshold is found by an exact
  bisection on counts, never by sorting a concatenation of every param.

  Args:
    sparsity: fraction of zeros in ``[0, 1)`` or a schedule.
    pattern: static; must be :class:`Unstructured`.
    where: static; which params are sparsified.
    update_every: static; steps between mask updates.
    begin_step: first mask update.
    end_step: last mask update; ``None``: no end.

  Returns:
    An optax transformation with state :class:`MagnitudePruningState`.
  """
  return _score_pruning(
    "global_magnitude_pruning",
    lambda params, state: scores_lib.magnitude(params),
    sparsity,
    pattern=pattern,
    allocation=allocation_lib.GlobalThreshold(),
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
  )


def lamp_pruning(
  sparsity: ScalarOrSchedule,
  *,
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  end_step: Step | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LAMP: global pruning by layer-adaptive magnitude scores.

  Each selected leaf scores its entries with LAMP (Lee et al 2021, eq. 2):
  with the leaf's entries indexed by ascending ``|w|``,

  ``score(u) = w_u^2 / sum_{v >= u} w_v^2``,

  and the masks keep the global top ``N - round(s N)`` scores over the ``N``
  selected weights (:func:`jaxsparse.global_threshold`, exact counts). The
  scores are normalised per layer, so this one global threshold yields
  layer-adaptive sparsities, and the largest weight of every layer (score 1)
  survives whenever at least one weight per layer is kept. Ties in ``|w|``
  are ordered by flat index (see :func:`jaxsparse.scores.lamp`). As in the
  paper, the scores are recomputed from the current weights at each pruning
  step (``update_every``), so a schedule gives iterative LAMP pruning.

  Args:
    sparsity: fraction of zeros in ``[0, 1)`` or a schedule.
    where: static; which params are sparsified.
    update_every: static; steps between mask updates.
    begin_step: first mask update.
    end_step: last mask update; ``None``: no end.

  Returns:
    An optax transformation with state :class:`MagnitudePruningState`.

  Examples:
    LAMP scores do not change when a layer is rescaled, so a layer of small
    weights keeps as many as a layer of large ones here:

    >>> import jax.numpy as jnp, optax
    >>> from jaxsparse.methods import pruning
    >>> params = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
    ...           "b": jnp.array([[0.1, 0.2], [0.3, 0.4]])}
    >>> tx = optax.chain(optax.sgd(0.0), pruning.lamp_pruning(0.5))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> (new["a"] != 0).tolist(), (new["b"] != 0).tolist()
    ([[False, False], [True, True]], [[False, False], [True, True]])

  References:
    Lee et al, `Layer-adaptive sparsity for the Magnitude-based Pruning
    <https://arxiv.org/abs/2010.07611>`_, 2021.
  """
  return _score_pruning(
    "lamp_pruning",
    lambda params, state: scores_lib.lamp(params),
    sparsity,
    pattern=patterns_lib.Unstructured(),
    allocation=allocation_lib.GlobalThreshold(),
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
  )


def random_pruning(
  sparsity: ScalarOrSchedule | None = None,
  *,
  seed: int = 0,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.Uniform(),
  where: Selection = None,
  update_every: Step = 100,
  begin_step: Step = 0,
  end_step: Step | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Random pruning: a static random mask at the (allocated) sparsity.

  Each selected entry gets a uniform random score drawn once from the key in
  the state (``seed``); masks keep the top scores. The scores never change,
  so a constant sparsity gives one static mask, and a schedule prunes a
  nested sequence of random masks. With ``allocation=js.erk()`` this is the
  static random-ERK baseline of RigL.

  Args:
    sparsity: fraction of zeros in ``[0, 1)`` or a schedule.
    seed: the PRNG seed, stored as a key in the state.
    pattern: static; how entries are grouped.
    allocation: static; how the target splits over leaves.
    where: static; which params are sparsified.
    update_every: static; steps between mask updates.
    begin_step: first mask update.
    end_step: last mask update; ``None``: no end.

  Returns:
    An optax transformation with state :class:`RandomPruningState`.
  """
  return _score_pruning(
    "random_pruning",
    lambda params, state: scores_lib.random(params, state.key),
    sparsity,
    pattern=pattern,
    allocation=allocation,
    where=where,
    update_every=update_every,
    begin_step=begin_step,
    end_step=end_step,
    seed=seed,
  )


def fixed_masks(masks: MaskTree) -> optax.GradientTransformationExtraArgs:
  """Trains with given masks held fixed (e.g. fine-tuning after one-shot).

  The masks (from :func:`jaxsparse.oneshot.prune`, a checkpoint, or
  ``js.masks`` of another run) never change; every step is projected so that
  ``params + updates == 0`` wherever ``masks`` is ``False``:
  ``u' = where(m, u, -p)``. Under :func:`jaxsparse.sparsify` the gradients of
  pruned entries are also zeroed before the optimizer.

  Args:
    masks: a params-shaped tree of bool arrays (``None`` where a param stays
      dense); checked against the params in ``init``.

  Returns:
    An optax transformation whose state is a :class:`MagnitudePruningState`
    (``js.masks`` finds the masks).

  Raises:
    ValueError: in ``init``, where a mask does not fit its param (naming the
      leaf), or ``update`` without ``params``.
  """

  def init_fn(params: Params) -> MagnitudePruningState:
    masks_lib.check_masks(params, masks)
    placed = masks_lib.map_masked(  # on the params' devices and sharding
      lambda p, m: None if m is None else jnp.ones_like(p, dtype=bool) & m,
      params,
      masks,
    )
    return MagnitudePruningState(jnp.zeros([], jnp.int32), placed)

  def update_fn(
    updates: Updates,
    state: MagnitudePruningState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, MagnitudePruningState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name="fixed_masks"))
    masks_lib.check_same_params(state.masks, params, "fixed_masks")
    updates = masks_lib.project_updates(updates, params, state.masks)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
