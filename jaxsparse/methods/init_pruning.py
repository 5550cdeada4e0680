"""Pruning at initialisation: SNIP, GraSP and SynFlow.

Each method scores the weights once, in ``init``, from the initial params
(and, for SNIP and GraSP, one batch given to the factory), keeps the
highest-scoring entries at the requested sparsity, and then holds that mask
fixed for the whole of training: every update is projected so that pruned
entries are exactly ``0`` after the first ``optax.apply_updates``. To run the
very first forward pass sparse as well, start from
``js.apply_masks(params, js.masks(state))``.

* SNIP keeps the largest connection sensitivities ``|g ⊙ w|``.
* GraSP removes the weights whose removal reduces the gradient norm least:
  its paper score ``S(-w) = -w ⊙ Hg`` is removed from the top.
* SynFlow is data-free: it iteratively keeps the largest synaptic flow
  ``|w ⊙ ∂R/∂w|`` of the linearised network, shrinking the density
  exponentially so that no layer collapses.

The random-ERK baseline of the same literature is
``js.random_pruning(s, allocation=js.erk())``.

References:
  Lee et al, `SNIP: Single-shot Network Pruning based on Connection
  Sensitivity <https://arxiv.org/abs/1810.02340>`_, 2019.
  Wang et al, `Picking Winning Tickets Before Training by Preserving Gradient
  Flow <https://arxiv.org/abs/2002.07376>`_, 2020.
  Tanaka et al, `Pruning neural networks without any data by iteratively
  conserving synaptic flow <https://arxiv.org/abs/2006.05467>`_, 2020.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PyTree

from jaxsparse import allocation as allocation_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import scores as scores_lib
from jaxsparse.methods.pruning import _resolve_sparsity
from jaxsparse.sparsify import NO_PARAMS
from jaxsparse.types import MaskTree, Params, Selection, Updates

LossFn = Callable[[Params, Any], Float[Array, ""]]
"""``loss_fn(params, batch) -> scalar``."""

ApplyFn = Callable[[Params, Array], PyTree[Array]]
"""``apply_fn(params, x) -> outputs`` (any tree of float arrays)."""


class InitPruningState(NamedTuple):
  """State of :func:`snip`, :func:`grasp` and :func:`synflow`.

  Attributes:
    count: int32 scalar, steps taken.
    masks: the mask tree computed at init (bool arrays shaped like the
      selected params, ``None`` elsewhere); fixed afterwards.
  """

  count: Int[Array, ""]
  masks: MaskTree


def _check_callable(fn: object, arg: str, name: str, signature: str) -> None:
  if not callable(fn):
    raise ValueError(
      f"{name}: {arg} must be a function {signature}, got {fn!r} (check "
      "the order of the positional arguments)."
    )


def _check_sparsity(
  sparsity: float | None,
  pattern: masks_lib.PatternSpec,
  allocation: allocation_lib.Allocation,
  name: str,
) -> float:
  """Checks the static configuration; returns the sparsity to use."""
  if isinstance(sparsity, bool) or not (
    sparsity is None or isinstance(sparsity, numbers.Real)
  ):
    raise ValueError(
      f"{name}: sparsity must be a float in [0, 1) (the mask is computed "
      f"once, at init), got {sparsity!r}."
    )
  return float(_resolve_sparsity(sparsity, pattern, allocation, (0,), name))


def _check_loss(loss_fn: LossFn, params: Params, batch: Any, name: str) -> None:
  out = jax.eval_shape(loss_fn, params, batch)
  if not (
    isinstance(out, jax.ShapeDtypeStruct)
    and out.shape == ()
    and jnp.issubdtype(out.dtype, jnp.floating)
  ):
    raise ValueError(
      f"{name}: loss_fn(params, batch) must return a float scalar, got "
      f"{out}. Reduce the per-example losses, e.g. with .mean()."
    )


def _on_params_shardings(masks: MaskTree, params: Params) -> MaskTree:
  """Places concrete masks like their (concrete) params."""

  def place(m, p):
    if (
      m is None or isinstance(p, jax.core.Tracer) or not hasattr(p, "sharding")
    ):
      return m
    return m if m.sharding == p.sharding else jax.device_put(m, p.sharding)

  return jax.tree.map(place, masks, params, is_leaf=lambda x: x is None)


def _fixed_mask_transform(
  name: str, compute_masks: Callable[[Params], MaskTree]
) -> optax.GradientTransformationExtraArgs:
  """A transform whose masks come from ``compute_masks`` at init, then fixed.

  ``compute_masks`` is jitted: scoring runs the user's model, which under
  Explicit mesh axes may only run inside ``jit``, and a jitted ``init`` (or
  ``jax.eval_shape``) simply inlines it.
  """
  compute_masks = jax.jit(compute_masks)

  def init_fn(params: Params) -> InitPruningState:
    masks = _on_params_shardings(compute_masks(params), params)
    return InitPruningState(jnp.zeros([], jnp.int32), masks)

  def update_fn(
    updates: Updates,
    state: InitPruningState,
    params: Params | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, InitPruningState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name=name))
    masks_lib.check_same_params(state.masks, params, name)
    updates = masks_lib.project_updates(updates, params, state.masks)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def snip_scores(loss_fn: LossFn, params: Params, batch: Any) -> Params:
  """SNIP's connection sensitivity ``|g ⊙ w|`` of every param, as float32.

  ``g = ∂L/∂w`` at the given params: the derivative of the loss with respect
  to a multiplicative mask ``c`` at ``c = 1`` is ``g ⊙ w`` (eq. 6 of Lee et
  al 2019 normalises its magnitude by the sum over all weights, which does
  not change any ranking).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the params to score.
    batch: the batch passed to ``loss_fn``.

  Returns:
    Params-shaped float32 scores; higher is kept.
  """
  _check_callable(loss_fn, "loss_fn", "snip_scores", "(params, batch)")
  _check_loss(loss_fn, params, batch, "snip_scores")
  grads = jax.grad(loss_fn)(params, batch)
  return scores_lib.saliency(params, grads)


def grasp_scores(
  loss_fn: LossFn, params: Params, batch: Any, *, where: Selection = None
) -> Params:
  """GraSP's keep-score ``w ⊙ Hg``: the negated paper score, as float32.

  With ``g = ∂L/∂w`` (held constant) and ``H`` the Hessian of the loss,
  ``Hg = ∂(gᵀ ∇L(w))/∂w`` is a Hessian-vector product (forward-over-reverse,
  never forming ``H``). The paper's score (eq. 8 of Wang et al 2020) is
  ``S(-w) = -w ⊙ Hg``, the change of the gradient norm when ``w`` is
  removed, and GraSP removes the *largest* ``S``; this returns ``-S(-w)``
  so that, like every jaxsparse score, higher is kept.

  As in the reference code, ``g`` and ``H`` cover the weights being pruned
  only (``Hg = H_ww g_w``): the tangent of the unselected params is zero.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``. The reference code
      divides the logits by a temperature ``T = 200`` before the
      cross-entropy; put that in ``loss_fn`` to follow it.
    params: the params to score.
    batch: the batch passed to ``loss_fn``.
    where: static; the params pruned (see :func:`jaxsparse.resolve_where`).

  Returns:
    Params-shaped float32 scores ``w ⊙ Hg``; higher is kept.
  """
  _check_callable(loss_fn, "loss_fn", "grasp_scores", "(params, batch)")
  _check_loss(loss_fn, params, batch, "grasp_scores")
  chosen = masks_lib.resolve_where(where, params, "grasp_scores")

  def grad_fn(p):
    return jax.grad(loss_fn)(p, batch)

  g = jax.lax.stop_gradient(grad_fn(params))
  g = jax.tree.map(lambda x, c: x if c else jnp.zeros_like(x), g, chosen)
  _, hg = jax.jvp(grad_fn, (params,), (g,))
  return jax.tree.map(
    lambda p, h: p.astype(jnp.float32) * h.astype(jnp.float32), params, hg
  )


def synflow_scores(
  apply_fn: ApplyFn,
  params: Params,
  masks: MaskTree | None,
  input_shape: Sequence[int],
  *,
  dtype: DTypeLike = jnp.float32,
) -> Params:
  """SynFlow's synaptic flow ``|θ ⊙ ∂R/∂θ|`` of the linearised network.

  Every param is replaced by ``θ = |w| ⊙ m`` (its absolute value, times its
  mask where it has one) and ``R = 1ᵀ f(1; θ)`` is the sum of the outputs on
  an all-ones input (line 4 of Algorithm 1 of Tanaka et al 2020). Pruned
  entries score 0.

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs``.
    params: the params to score.
    masks: the current mask tree (``None`` leaves, or ``None``: dense).
    input_shape: static; the shape of ``x``, batch axis first (the paper
      uses a batch of one: ``(1, *example_shape)``).
    dtype: static; the float dtype of ``θ``, ``x`` and the sum ``R`` (the
      reference code uses float64; enable ``jax_enable_x64`` for it).

  Returns:
    Params-shaped scores in ``dtype``; higher is kept.
  """
  _check_callable(apply_fn, "apply_fn", "synflow_scores", "(params, x)")
  if masks is None:
    masks = jax.tree.map(lambda _: None, params)
  masks_lib.check_masks(params, masks)

  def linearise(p, m):
    p = jnp.abs(p).astype(dtype)
    return p if m is None else jnp.where(m, p, jnp.zeros_like(p))

  theta = jax.tree.map(linearise, params, masks)
  x = jnp.ones(tuple(input_shape), dtype)

  def flow(t):
    out = jax.tree.leaves(apply_fn(t, x))
    return sum(jnp.sum(o, dtype=dtype) for o in out)

  grads = jax.grad(flow)(theta)
  return jax.tree.map(lambda t, g: jnp.abs(t * g), theta, grads)


def snip(
  sparsity: float | None,
  loss_fn: LossFn,
  batch: Any,
  *,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.GlobalThreshold(),
  where: Selection = None,
) -> optax.GradientTransformationExtraArgs:
  """SNIP: prune at init the weights of smallest connection sensitivity.

  In ``init`` the masks keep the entries with the largest ``|g ⊙ w|`` (see
  :func:`snip_scores`; ``g = ∂L/∂w`` on ``batch`` at the initial params),
  one threshold over all selected weights by default, as in the paper. The
  masks are then fixed; updates are projected so pruned entries are exactly
  ``0`` after the first ``apply_updates``. Start from
  ``js.apply_masks(params, js.masks(state))`` to run the first forward pass
  sparse too.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``; ``None`` with :class:`NM`
      means ``1 - n/m``.
    loss_fn: ``loss_fn(params, batch) -> scalar``; traced once, in ``init``.
    batch: one batch (a tree of arrays) for ``loss_fn``; the paper uses one
      mini-batch.
    pattern: static; how entries are grouped (a non-global allocation is
      needed for structured patterns).
    allocation: static; :func:`global_threshold` (the paper) or a per-layer
      allocation.
    where: static; which params are pruned (default: kernels).

  Returns:
    An optax transformation with state :class:`InitPruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.init_pruning import snip
    >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
    >>> batch = jnp.array([[1.0, 1.0]])
    >>> loss_fn = lambda p, x: jnp.sum(x @ p["w"])
    >>> tx = optax.chain(optax.sgd(0.1), snip(0.5, loss_fn, batch))
    >>> state = tx.init(params)
    >>> js.masks(state)["w"].tolist()  # |g * w| = |w| here (g = 1)
    [[False, True], [True, False]]

  References:
    Lee et al, `SNIP: Single-shot Network Pruning based on Connection
    Sensitivity <https://arxiv.org/abs/1810.02340>`_, 2019.
  """
  name = "snip"
  target = _check_sparsity(sparsity, pattern, allocation, name)
  _check_callable(loss_fn, "loss_fn", name, "(params, batch) -> scalar")

  def compute_masks(params):
    chosen = masks_lib.leaf_specs(where, params, name, pattern)
    return masks_lib.reselect(
      snip_scores(loss_fn, params, batch),
      masks_lib.init_masks(params, chosen),
      target,
      pattern=chosen,
      allocation=allocation,
    )

  return _fixed_mask_transform(name, compute_masks)


def grasp(
  sparsity: float | None,
  loss_fn: LossFn,
  batch: Any,
  *,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.GlobalThreshold(),
  where: Selection = None,
) -> optax.GradientTransformationExtraArgs:
  """GraSP: prune at init the weights that preserve the gradient flow.

  In ``init`` GraSP computes ``S(-w) = -w ⊙ Hg`` (eq. 8 of the paper; ``g``
  the gradient on ``batch``, ``H`` the Hessian) and removes the weights with
  the largest ``S``, i.e. keeps the lowest ``S`` = the largest ``w ⊙ Hg``
  (:func:`grasp_scores`), one threshold over all selected weights by
  default. The masks are then fixed; updates are projected so pruned entries
  are exactly ``0`` after the first ``apply_updates``. Start from
  ``js.apply_masks(params, js.masks(state))`` to run the first forward pass
  sparse too.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``; ``None`` with :class:`NM`
      means ``1 - n/m``.
    loss_fn: ``loss_fn(params, batch) -> scalar``; traced once, in ``init``
      (the reference code divides the logits by ``T = 200``).
    batch: one batch (a tree of arrays) for ``loss_fn``.
    pattern: static; how entries are grouped (a non-global allocation is
      needed for structured patterns).
    allocation: static; :func:`global_threshold` (the paper) or a per-layer
      allocation.
    where: static; which params are pruned (default: kernels).

  Returns:
    An optax transformation with state :class:`InitPruningState`.

  References:
    Wang et al, `Picking Winning Tickets Before Training by Preserving
    Gradient Flow <https://arxiv.org/abs/2002.07376>`_, 2020.
  """
  name = "grasp"
  target = _check_sparsity(sparsity, pattern, allocation, name)
  _check_callable(loss_fn, "loss_fn", name, "(params, batch) -> scalar")

  def compute_masks(params):
    chosen = masks_lib.leaf_specs(where, params, name, pattern)
    return masks_lib.reselect(
      grasp_scores(loss_fn, params, batch, where=jax.tree.map(bool, chosen)),
      masks_lib.init_masks(params, chosen),
      target,
      pattern=chosen,
      allocation=allocation,
    )

  return _fixed_mask_transform(name, compute_masks)


def synflow(
  sparsity: float | None,
  apply_fn: ApplyFn,
  input_shape: Sequence[int],
  *,
  iterations: int = 100,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.GlobalThreshold(),
  where: Selection = None,
  dtype: DTypeLike = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """SynFlow: data-free iterative pruning that conserves synaptic flow.

  Algorithm 1 of the paper, in ``init``: starting from all-True masks ``m``,
  for ``k = 1..n`` (``n = iterations``) score ``|θ ⊙ ∂R/∂θ|`` with
  ``θ = |w| ⊙ m`` and ``R = 1ᵀ f(1; θ)`` (:func:`synflow_scores`), then keep
  the top scores at density ``d^(k/n)`` (``d = 1 - sparsity``: the
  exponential schedule), one threshold over all selected weights by
  default. Masks only shrink (pruned entries are never re-chosen). The
  masks are then fixed; updates are projected so pruned entries are exactly
  ``0`` after the first ``apply_updates``. Start from
  ``js.apply_masks(params, js.masks(state))`` to run the first forward pass
  sparse too. The iterations run in one ``lax.fori_loop``, so compile time
  does not grow with ``iterations``.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``; ``None`` with :class:`NM`
      means ``1 - n/m``.
    apply_fn: ``apply_fn(params, x) -> outputs``; traced once, in ``init``.
      Use the model in inference mode (batch norm with running statistics).
    input_shape: static; the shape of the all-ones input, batch axis first,
      e.g. ``(1, 28, 28, 1)``.
    iterations: static; ``n``, the number of pruning rounds (100 in the
      paper); 1 is one-shot SynFlow.
    pattern: static; how entries are grouped (a non-global allocation is
      needed for structured patterns).
    allocation: static; :func:`global_threshold` (the paper) or a per-layer
      allocation.
    where: static; which params are pruned (default: kernels).
    dtype: static; float dtype of the linearised network (the reference
      uses float64; float32 suffices for shallow networks).

  Returns:
    An optax transformation with state :class:`InitPruningState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.init_pruning import synflow
    >>> params = {"w1": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
    ...           "w2": jnp.array([[1.0], [-5.0]])}
    >>> apply_fn = lambda p, x: x @ p["w1"] @ p["w2"]
    >>> tx = synflow(0.5, apply_fn, (1, 2), iterations=1)
    >>> masks = tx.init(params).masks
    >>> masks["w1"].tolist(), masks["w2"].tolist()
    ([[False, True], [False, True]], [[False], [True]])

  References:
    Tanaka et al, `Pruning neural networks without any data by iteratively
    conserving synaptic flow <https://arxiv.org/abs/2006.05467>`_, 2020.
  """
  name = "synflow"
  target = _check_sparsity(sparsity, pattern, allocation, name)
  _check_callable(apply_fn, "apply_fn", name, "(params, x) -> outputs")
  if isinstance(iterations, bool) or not (
    isinstance(iterations, numbers.Integral) and iterations >= 1
  ):
    raise ValueError(
      f"{name}: iterations={iterations!r} must be an int >= 1 (100 in the "
      "paper; 1 is one-shot)."
    )
  try:
    input_shape = tuple(int(d) for d in input_shape)
  except TypeError:
    input_shape = ()
  if not input_shape or min(input_shape) < 1:
    raise ValueError(
      f"{name}: input_shape must be a tuple of positive ints, batch axis "
      f"first (e.g. (1, 28, 28, 1)); got {input_shape!r}."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"{name}: dtype={dtype!r} must be a float dtype (jnp.float32 or, with "
      "jax_enable_x64, jnp.float64)."
    )
  density = 1.0 - target

  def compute_masks(params):
    chosen = masks_lib.leaf_specs(where, params, name, pattern)

    def prune_round(k, masks):
      scores = synflow_scores(apply_fn, params, masks, input_shape, dtype=dtype)
      # Pruned entries (score 0) rank below every kept one, so masks nest.
      scores = jax.tree.map(
        lambda s, m: (
          None if m is None else jnp.where(m, s.astype(jnp.float32), -1.0)
        ),
        scores,
        masks,
      )
      exponent = (k + 1).astype(jnp.float32) / jnp.float32(iterations)
      level = 1 - jnp.float32(density) ** exponent
      level = jnp.where(k == iterations - 1, jnp.float32(target), level)
      return masks_lib.masks_from_scores(
        scores, level, pattern=chosen, allocation=allocation
      )

    return jax.lax.fori_loop(
      0, iterations, prune_round, masks_lib.init_masks(params, chosen)
    )

  return _fixed_mask_transform(name, compute_masks)
