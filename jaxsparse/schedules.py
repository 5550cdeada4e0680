"""Sparsity schedules and the mask-update cadence.

Any optax schedule can drive a sparsity. Zhu & Gupta's gradual magnitude
pruning schedule *is* ``optax.polynomial_schedule`` (eq. 1 of the paper)::

  s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n Δt))^3   for t_0 <= t <= t_0 + nΔt

References:
  Zhu & Gupta, `To prune, or not to prune: exploring the efficacy of pruning
  for model compression <https://arxiv.org/abs/1710.01878>`_, 2017.
"""

import numbers

import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse.types import ScalarOrSchedule, Schedule, Step


def check_sparsity(value: float, name: str = "sparsity") -> None:
  """Raises ``ValueError`` unless ``0 <= value < 1``."""
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(
      f"{name}={value} is outside [0, 1): sparsity is the fraction of zeros, "
      "and a sparsity of 1 would prune every weight. Pass a value like 0.9."
    )


def gmp(
  final_sparsity: float,
  begin_step: int,
  end_step: int,
  initial_sparsity: float = 0.0,
  power: float = 3,
) -> Schedule:
  """Zhu & Gupta's gradual pruning schedule (a polynomial schedule).

  ``s_t = s_f + (s_i - s_f) (1 - (t - begin) / (end - begin)) ** power``,
  constant ``s_i`` before ``begin_step`` and ``s_f`` after ``end_step``.

  Args:
    final_sparsity: ``s_f`` in ``[0, 1)``.
    begin_step: ``t_0``, the first pruning step.
    end_step: ``t_0 + n Δt``, when ``s_f`` is reached.
    initial_sparsity: ``s_i`` in ``[0, 1)``.
    power: the exponent (3 in the paper).

  Returns:
    An optax schedule.

  Examples:
    >>> import jaxsparse as js
    >>> schedule = js.gmp(0.9, begin_step=0, end_step=100)
    >>> [round(float(schedule(t)), 4) for t in (0, 50, 100, 200)]
    [0.0, 0.7875, 0.9, 0.9]
  """
  check_sparsity(final_sparsity, "final_sparsity")
  check_sparsity(initial_sparsity, "initial_sparsity")
  if not 0 <= begin_step < end_step:
    raise ValueError(
      f"gmp: need 0 <= begin_step < end_step, got begin_step={begin_step}, "
      f"end_step={end_step}."
    )
  return optax.polynomial_schedule(
    init_value=initial_sparsity,
    end_value=final_sparsity,
    power=power,
    transition_steps=end_step - begin_step,
    transition_begin=begin_step,
  )


def check_scalar_or_schedule(
  value: ScalarOrSchedule, probe_steps: tuple[int, ...], name: str
) -> None:
  """Validates a constant sparsity, or a schedule at ``probe_steps``.

  Traced values (from ``optax.inject_hyperparams``) are not checked.
  """
  if isinstance(value, numbers.Real):
    check_sparsity(value, name)
  elif callable(value):
    for step in probe_steps:
      check_sparsity(
        float(value(jnp.asarray(step, jnp.int32))), f"{name}({step})"
      )


def value_at(
  value: ScalarOrSchedule, count: Int[ArrayLike, ""]
) -> Float[Array, ""]:
  """A constant or a schedule's value at ``count``, as float32."""
  if callable(value):
    value = value(count)
  return jnp.asarray(value, jnp.float32)


def is_update_step(
  count: Step,
  update_every: Step,
  begin_step: Step,
  end_step: Step | None,
) -> Bool[Array, ""]:
  """Whether masks are recomputed at step ``count``.

  Every ``update_every`` steps from ``begin_step`` on, up to and including
  ``end_step`` (always an update step, so a schedule's final value is
  reached).
  """
  count = jnp.asarray(count, jnp.int32)
  offset = count - jnp.asarray(begin_step, jnp.int32)
  update = (offset >= 0) & (offset % jnp.asarray(update_every, jnp.int32) == 0)
  if end_step is None:
    return update
  end = jnp.asarray(end_step, jnp.int32)
  return (update & (count <= end)) | (count == end)


def check_cadence(
  update_every: Step, begin_step: Step, end_step: Step | None
) -> None:
  """Raises ``ValueError`` for a cadence that never or wrongly updates."""
  if isinstance(update_every, numbers.Integral) and update_every < 1:
    raise ValueError(f"update_every={update_every} must be a positive int.")
  if isinstance(begin_step, numbers.Integral) and begin_step < 0:
    raise ValueError(f"begin_step={begin_step} must be >= 0.")
  if (
    end_step is not None
    and isinstance(end_step, numbers.Integral)
    and isinstance(begin_step, numbers.Integral)
    and end_step < begin_step
  ):
    raise ValueError(
      f"end_step={end_step} is before begin_step={begin_step}; masks would "
      "never be updated."
    )
