"""Type aliases shared across jaxsparse."""

from collections.abc import Callable
from typing import TypeAlias

import optax
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree

Params: TypeAlias = PyTree[ArrayLike]
"""A pytree of parameter arrays (linen dict, ``nnx.State``, Equinox...)."""

Updates: TypeAlias = PyTree[ArrayLike]
"""A params-shaped pytree of updates or gradients."""

MaskTree: TypeAlias = PyTree[Bool[Array, "..."] | None]
"""Params-shaped tree: a bool array where a param is sparsified, else None."""

Schedule: TypeAlias = optax.Schedule
"""A function from the step count to a scalar (any optax schedule)."""

ScalarOrSchedule: TypeAlias = float | ArrayLike | Schedule
"""A constant, or a schedule evaluated at the transform's step count."""

PathPredicate: TypeAlias = Callable[[str, ArrayLike], bool]
"""``(path, leaf) -> bool``; ``path`` is the normalised ``a/b/kernel``."""

Selection: TypeAlias = None | str | PathPredicate | PyTree[bool]
"""Which params a method sparsifies (see :func:`jaxsparse.resolve_where`)."""

Step: TypeAlias = int | Int[ArrayLike, ""]
"""A step count; traced when ``optax.inject_hyperparams`` injects it."""
