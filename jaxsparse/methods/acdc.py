"""AC/DC: alternating compressed / decompressed training.

Training alternates *dense* (decompressed) phases, in which every weight is
trained, with *sparse* (compressed) phases, in which the support is fixed to
the top-k weights by magnitude chosen at the start of the phase (one step of
iterative hard thresholding, then training on that support). Weights pruned
at the start of a sparse phase are exactly zero through it and restart from
zero when the next dense phase restores them. Training ends with a long
sparse phase that fine-tunes the final sparse model.

References:
  Peste et al, `AC/DC: Alternating Compressed/DeCompressed Training of Deep
  Neural Networks <https://arxiv.org/abs/2106.12379>`_, 2021.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Int

from jaxsparse import allocation as allocation_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules
from jaxsparse import scores as scores_lib
from jaxsparse.methods.pruning import _resolve_sparsity
from jaxsparse.sparsify import NO_PARAMS
from jaxsparse.types import (
  MaskTree,
  Params,
  ScalarOrSchedule,
  Selection,
  Step,
  Updates,
)

# The paper's ImageNet schedule as fractions of training (100 epochs): 10
# dense warm-up epochs, 5-epoch sparse/dense phases, a 10-epoch last dense
# phase and a 15-epoch final sparse phase (IST-DASLab/ACDC, configs/neurips).
PAPER_FRACTIONS = {
  "warmup_steps": 0.10,
  "phase_steps": 0.05,
  "final_dense_steps": 0.10,
  "final_sparse_steps": 0.15,
}


class ACDCSchedule(NamedTuple):
  """When AC/DC is sparse; all fields are static step counts.

  With ``F = total_steps - final_sparse_steps`` (start of the final sparse
  phase) and ``D = F - final_dense_steps`` (start of the last dense phase),
  step ``t`` is sparse iff

  ``t >= F  or  (warmup_steps <= t < D  and  (t - warmup_steps) //
  phase_steps is even)``:

  dense warm-up on ``[0, warmup_steps)``; from ``warmup_steps`` on, sparse
  and dense phases of ``phase_steps`` each, sparse first, cut at ``D``; dense
  on ``[D, F)``; sparse from ``F`` on (beyond ``total_steps`` too).

  Attributes:
    total_steps: length of training.
    warmup_steps: dense warm-up.
    phase_steps: length of each alternating sparse and dense phase.
    final_dense_steps: the dense phase before the final sparse one.
    final_sparse_steps: the final sparse (fine-tuning) phase.
  """

  total_steps: int
  warmup_steps: int
  phase_steps: int
  final_dense_steps: int
  final_sparse_steps: int

  def is_sparse(self, count: Step) -> Bool[Array, ""]:
    """Whether step ``count`` belongs to a sparse (compressed) phase."""
    count = jnp.asarray(count, jnp.int32)
    final_sparse = jnp.int32(self.total_steps - self.final_sparse_steps)
    final_dense = final_sparse - jnp.int32(self.final_dense_steps)
    warmup = jnp.int32(self.warmup_steps)
    alternating = (count >= warmup) & (count < final_dense)
    cycle = (count - warmup) // jnp.int32(self.phase_steps)
    return (alternating & (cycle % 2 == 0)) | (count >= final_sparse)


class ACDCState(NamedTuple):
  """State of :func:`acdc`.

  Attributes:
    count: int32 scalar, steps taken.
    masks: the mask tree; all-True during dense phases.
    regrown: bool scalar, whether the last step switched phase (then
      :func:`jaxsparse.sparsify` zeroes the optimizer moments of the weights
      the new masks prune).
  """

  count: Int[Array, ""]
  masks: MaskTree
  regrown: Bool[Array, ""]


def acdc_schedule(
  total_steps: int,
  *,
  warmup_steps: int | None = None,
  phase_steps: int | None = None,
  final_dense_steps: int | None = None,
  final_sparse_steps: int | None = None,
) -> ACDCSchedule:
  """The phase schedule of :func:`acdc`, checked, with the paper's defaults.

  A length left ``None`` is its fraction of ``total_steps`` in the paper's
  ImageNet schedule (``PAPER_FRACTIONS``), rounded (at least 1 step for
  ``phase_steps`` and ``final_sparse_steps``).

  Args:
    total_steps: length of training.
    warmup_steps: dense warm-up (default 10% of training).
    phase_steps: each alternating phase (default 5%).
    final_dense_steps: the dense phase before the final sparse one (default
      10%).
    final_sparse_steps: the final sparse phase (default 15%).

  Returns:
    The :class:`ACDCSchedule`.

  Raises:
    ValueError: a length is not a non-negative int (``phase_steps`` and
      ``final_sparse_steps`` positive), or the fixed phases do not fit in
      ``total_steps``.

  Examples:
    >>> from jaxsparse.methods.acdc import acdc_schedule
    >>> schedule = acdc_schedule(100)
    >>> "".join(
    ...   "S" if schedule.is_sparse(t) else "D" for t in range(0, 100, 5)
    ... )
    'DDSDSDSDSDSDSDSDDSSS'
  """
  if not isinstance(total_steps, numbers.Integral) or total_steps < 1:
    raise ValueError(
      f"acdc: total_steps={total_steps!r} must be a positive int (the length "
      "of training; the final sparse phase ends there)."
    )
  given = {
    "warmup_steps": warmup_steps,
    "phase_steps": phase_steps,
    "final_dense_steps": final_dense_steps,
    "final_sparse_steps": final_sparse_steps,
  }
  steps = {}
  for name, value in given.items():
    least = 1 if name in ("phase_steps", "final_sparse_steps") else 0
    if value is None:
      value = max(round(PAPER_FRACTIONS[name] * total_steps), least)
    if not isinstance(value, numbers.Integral) or value < least:
      raise ValueError(f"acdc: {name}={value!r} must be an int >= {least}.")
    steps[name] = int(value)
  fixed = (
    steps["warmup_steps"]
    + steps["final_dense_steps"]
    + steps["final_sparse_steps"]
  )
  if fixed > total_steps:
    raise ValueError(
      f"acdc: warmup_steps + final_dense_steps + final_sparse_steps = {fixed} "
      f"exceeds total_steps={total_steps}; shorten the phases or train longer."
    )
  return ACDCSchedule(total_steps=int(total_steps), **steps)


def acdc(
  sparsity: ScalarOrSchedule | None,
  *,
  total_steps: int,
  warmup_steps: int | None = None,
  phase_steps: int | None = None,
  final_dense_steps: int | None = None,
  final_sparse_steps: int | None = None,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.GlobalThreshold(),
  where: Selection = None,
) -> optax.GradientTransformationExtraArgs:
  """AC/DC: alternate dense training with fixed-support sparse training.

  The phases follow :func:`acdc_schedule`. At the first step of each sparse
  phase the masks become the top-k ``|w|`` of the current weights at the
  sparsity (a hard-thresholding step, ``θ ← T_k(θ)``); they stay fixed
  through the phase, so only the kept weights train. At the first step of a
  dense phase the masks become all-True: the pruned weights, which are
  exactly zero, are trained again starting from zero. The last phase is
  sparse, and its masks are the final model's.

  Inside :func:`jaxsparse.sparsify` the optimizer moments of the weights
  pruned at the start of a sparse phase are zeroed there (the state flags
  ``regrown`` at every phase switch); their gradients are masked while they
  are pruned, so those moments stay zero and the weights restart from zero
  moments when a dense phase restores them. As the last link of
  ``optax.chain`` the optimizer sees every gradient and nothing is reset.

  The defaults reproduce the paper's ImageNet schedule as fractions of
  ``total_steps``: 10% dense warm-up, sparse/dense phases of 5% each, a 10%
  dense phase before a 15% final sparse phase (100 epochs: dense 0-10,
  sparse 10-15, dense 15-20, ..., sparse 70-75, dense 75-85, sparse 85-100),
  with global magnitude pruning as in the authors' code.

  Args:
    sparsity: fraction of zeros in ``[0, 1)`` during sparse phases, or a
      schedule (read at the start of each sparse phase). ``None`` with
      :class:`NM` means ``1 - n/m``.
    total_steps: static; length of training; the final sparse phase is its
      last ``final_sparse_steps`` steps and lasts beyond it.
    warmup_steps: static; dense warm-up (default ``round(0.1 T)``).
    phase_steps: static; length of each alternating phase (default
      ``round(0.05 T)``).
    final_dense_steps: static; the dense phase just before the final sparse
      one (default ``round(0.1 T)``); 0 lets the alternation run into it.
    final_sparse_steps: static; the final sparse phase (default
      ``round(0.15 T)``).
    pattern: static; how entries are pruned together.
    allocation: static; how the sparsity splits over leaves (global
      magnitude by default, as in the paper's code; :func:`uniform` for
      per-layer).
    where: static; which params are sparsified.

  Returns:
    An optax transformation with state :class:`ACDCState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxsparse.methods.acdc import acdc
    >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> tx = optax.chain(
    ...   optax.sgd(0.0),
    ...   acdc(0.5, total_steps=4, warmup_steps=1, phase_steps=1,
    ...        final_dense_steps=0, final_sparse_steps=1),
    ... )
    >>> state = tx.init(params)
    >>> for _ in range(4):  # dense, sparse, dense, sparse
    ...   updates, state = tx.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(state[1].masks["w"].tolist(), params["w"].tolist())
    [[True, True], [True, True]] [[1.0, -4.0], [3.0, 2.0]]
    [[False, True], [True, False]] [[0.0, -4.0], [3.0, 0.0]]
    [[True, True], [True, True]] [[0.0, -4.0], [3.0, 0.0]]
    [[False, True], [True, False]] [[0.0, -4.0], [3.0, 0.0]]

  References:
    Peste et al, `AC/DC: Alternating Compressed/DeCompressed Training of Deep
    Neural Networks <https://arxiv.org/abs/2106.12379>`_, 2021.
  """
  schedule = acdc_schedule(
    total_steps,
    warmup_steps=warmup_steps,
    phase_steps=phase_steps,
    final_dense_steps=final_dense_steps,
    final_sparse_steps=final_sparse_steps,
  )
  probes = (0, schedule.warmup_steps, total_steps, 2**30)
  sparsity = _resolve_sparsity(sparsity, pattern, allocation, probes, "acdc")

  def init_fn(params: Params) -> ACDCState:
    chosen = masks_lib.resolve_where(where, params, "acdc", pattern)
    return ACDCState(
      jnp.zeros([], jnp.int32),
      masks_lib.init_masks(params, chosen),
      jnp.zeros([], jnp.bool_),
    )

  def update_fn(
    updates: Updates,
    state: ACDCState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, ACDCState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name="acdc"))
    masks_lib.check_same_params(state.masks, params, "acdc")
    count = state.count
    sparse = schedule.is_sparse(count)
    was_sparse = schedule.is_sparse(count - 1)
    compress = sparse & ~was_sparse

    specs = masks_lib.leaf_specs(where, params, "acdc", pattern)

    def threshold():
      return masks_lib.reselect(
        scores_lib.magnitude(params),
        state.masks,
        schedules.value_at(sparsity, count),
        pattern=specs,
        allocation=allocation,
      )

    masks = jax.lax.cond(compress, threshold, lambda: state.masks)
    # Dense phases keep every weight; the step that starts one restores the
    # pruned weights (zero now) for training.
    masks = jax.tree.map(lambda m: m | ~sparse, masks)
    updates = masks_lib.project_updates(updates, params, masks)
    return updates, ACDCState(
      optax.safe_increment(count), masks, sparse != was_sparse
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
