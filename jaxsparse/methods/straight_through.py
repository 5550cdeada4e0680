"""Straight-through sparse training: STE, SR-STE, ST-3(σ) and S-STE.

These methods train *dense* weights ``W̃`` kept in the optimizer state while
the model always runs on sparse weights ``W = f(W̃)`` (the params). The
gradient of the loss with respect to the sparse weights is applied to the
dense ones unchanged (the straight-through estimator), so a pruned weight
keeps learning and re-enters the mask when its dense value grows back.

Each factory returns a :class:`jaxsparse.StraightThrough`. Inside
``js.sparsify(optimizer, method)`` the optimizer sees every gradient (SR-STE
adds its decay term first) and its updates step ``W̃``; as the last link of
``optax.chain(optimizer, method)`` the optimizer before it already saw the
raw gradients, which is enough for STE, ST-3 and S-STE. One step is:

1. ``W̃' = W̃ + u`` (``u``: the optimizer's updates, added as
   ``optax.apply_updates`` does);
2. new masks from ``|W̃'|`` with the method's pattern;
3. the returned updates move the params to ``f(W̃')``, with every pruned
   entry exactly ``+0.0``.

The state starts from ``W̃ = params`` and all-True masks, so the first
forward pass is dense and the params are sparse from the first update on.

References:
  Bengio et al, `Estimating or Propagating Gradients Through Stochastic
  Neurons for Conditional Computation <https://arxiv.org/abs/1308.3432>`_,
  2013.
  Zhou et al, `Learning N:M Fine-grained Structured Sparse Neural Networks
  From Scratch <https://arxiv.org/abs/2102.04010>`_, 2021.
  Vanderschueren & De Vleeschouwer, `Are Straight-Through gradients and
  Soft-Thresholding all you need for Sparse Training?
  <https://arxiv.org/abs/2212.01076>`_, 2023.
  Hu et al, `S-STE: Continuous Pruning Function for Efficient 2:4 Sparse
  Pre-training <https://arxiv.org/abs/2409.09099>`_, 2024.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree, UInt32

from jaxsparse import allocation as allocation_lib
from jaxsparse import layout as layout_lib
from jaxsparse import masking as masks_lib
from jaxsparse import patterns as patterns_lib
from jaxsparse import schedules, threshold
from jaxsparse.methods.pruning import _resolve_sparsity
from jaxsparse.sparsify import NO_PARAMS, StraightThrough
from jaxsparse.types import (
  MaskTree,
  Params,
  ScalarOrSchedule,
  Selection,
  Updates,
)

# The default N:M pattern (NVIDIA's 2:4), an immutable NamedTuple.

# Schedules are checked at these steps; 2**30 stands for "after training".
_PROBES = (0, 2**30)

NEEDS_SPARSIFY = (
  "{name} adds a decay term to the gradients the optimizer sees, which only "
  "js.sparsify can do; use js.sparsify(optimizer, {name}(...)) instead of "
  "optax.chain."
)


class StraightThroughState(NamedTuple):
  """State of :func:`ste`, :func:`sr_ste` and :func:`st3`.

  Attributes:
    count: int32 scalar, steps taken.
    dense: the dense weights ``W̃``: a copy of each selected param (same
      shape, dtype and sharding), ``None`` for the others.
    masks: the mask tree of the sparse weights the params hold.
  """

  count: Int[Array, ""]
  dense: PyTree[Array | None]
  masks: MaskTree


class SSTEState(NamedTuple):
  """State of :func:`s_ste`.

  Attributes:
    count: int32 scalar, steps taken.
    dense: the dense weights ``W̃`` (``None`` for unselected params).
    masks: the mask tree (every group of ``m`` keeps ``n``).
    scale: float32 scalar ``β`` per selected param (``None`` elsewhere),
      computed from the initial weights and then frozen.
  """

  count: Int[Array, ""]
  dense: PyTree[Array | None]
  masks: MaskTree
  scale: PyTree[Float[Array, ""] | None]


def _is_none(x: Any) -> bool:
  return x is None


# A rule maps (new dense weights, state, leaf specs) to (new masks, new sparse
# weights); both trees hold None where a param is not selected. `None` sparse
# weights mean hard masking, ``mask ⊙ W̃'``, which STE and SR-STE apply
# exactly.
Rule = Callable[[PyTree, Any, PyTree], tuple[MaskTree, PyTree | None]]


def _opaque_zero(count: Int[Array, ""]) -> UInt32[Array, ""]:
  """A zero XLA cannot prove is zero (``count`` is never negative)."""
  return jnp.minimum(count, 0).astype(jnp.uint32)


def _rounded(x: Array, zero: UInt32[Array, ""]) -> Array:
  """``x``, rounded to its dtype before it meets any later add.

  Under jit XLA:CPU fuses a multiply and the add that consumes it into one
  FMA, which rounds once where eager execution rounds twice; a bitwise xor
  with an opaque zero keeps them apart, so jit and eager agree bitwise.
  """
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[
    x.dtype.itemsize
  ]
  flipped = jax.lax.bitcast_convert_type(x, bits) ^ zero.astype(bits)
  return jax.lax.bitcast_convert_type(flipped, x.dtype)


def _init_dense(
  name: str, params: Params, where: Selection, pattern: masks_lib.PatternSpec
) -> tuple[PyTree, MaskTree]:
  """The dense copy of the selected params and all-True masks."""
  chosen = masks_lib.resolve_where(where, params, name, pattern)
  dense = jax.tree.map(lambda p, c: jnp.copy(p) if c else None, params, chosen)
  return dense, masks_lib.init_masks(params, chosen)


def _hard_updates(
  old: Bool[Array, "..."] | None,
  new: Bool[Array, "..."] | None,
  u: Array,
  p: Array,
  d: Array | None,
) -> Array:
  """Updates with ``p + out == new ⊙ d`` exactly (``p == old ⊙ (d - u)``).

  Kept before and after: the params equal the old dense weights, so the
  optimizer's update itself lands on ``d``; newly kept: the params are 0, so
  the update is ``d``; pruned: ``-p``.
  """
  if new is None:
    return u
  grown = jnp.where(new, d.astype(u.dtype), -p.astype(u.dtype))
  return jnp.where(new & old, u, grown)


def _soft_updates(
  new: Bool[Array, "..."] | None,
  u: Array,
  p: Array,
  t: Array | None,
  zero: UInt32[Array, ""],
) -> Array:
  """Updates with ``p + out == t`` up to one rounding, ``+0.0`` if pruned."""
  if new is None:
    return u
  t = _rounded(t.astype(p.dtype), zero).astype(jnp.float32)
  delta = (t - p.astype(jnp.float32)).astype(u.dtype)
  return jnp.where(new, delta, -p.astype(u.dtype))


def _straight_through(
  name: str,
  *,
  where: Selection,
  pattern: masks_lib.PatternSpec,
  rule: Rule,
  init_scale: Callable[[PyTree, PyTree], PyTree] | None = None,
  decay: float | None = None,
) -> StraightThrough:
  """Shared body: dense weights in the state, masks and targets by ``rule``."""

  def init_fn(params: Params) -> StraightThroughState | SSTEState:
    dense, masks = _init_dense(name, params, where, pattern)
    count = jnp.zeros([], jnp.int32)
    if init_scale is None:
      return StraightThroughState(count, dense, masks)
    specs = masks_lib.leaf_specs(where, params, name, pattern)
    return SSTEState(count, dense, masks, init_scale(dense, specs))

  def update_fn(
    updates: Updates,
    state: StraightThroughState | SSTEState,
    params: Params | None = None,
    *,
    grads: Updates | None = None,
    **extra_args: Any,
  ) -> tuple[Updates, StraightThroughState | SSTEState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS.format(name=name))
    masks_lib.check_same_params(state.masks, params, name)
    if decay is not None and grads is None:
      raise ValueError(NEEDS_SPARSIFY.format(name=name))
    zero = _opaque_zero(state.count)
    # Rounded so that the optimizer's last multiply is not fused into the add
    # below (see _rounded); the values are unchanged.
    updates = jax.tree.map(
      lambda d, u: u if d is None else _rounded(u, zero),
      state.dense,
      updates,
      is_leaf=_is_none,
    )
    dense = optax.apply_updates(state.dense, updates)
    specs = masks_lib.leaf_specs(where, params, name, pattern)
    masks, targets = rule(dense, state, specs)
    if targets is None:
      updates = jax.tree.map(
        _hard_updates,
        state.masks,
        masks,
        updates,
        params,
        dense,
        is_leaf=_is_none,
      )
    else:
      updates = jax.tree.map(
        lambda m, u, p, t: _soft_updates(m, u, p, t, zero),
        masks,
        updates,
        params,
        targets,
        is_leaf=_is_none,
      )
    return updates, state._replace(
      count=optax.safe_increment(state.count), dense=dense, masks=masks
    )

  def optimizer_gradients(
    grads: Updates, state: StraightThroughState | SSTEState, params: Params
  ) -> Updates:
    del params
    if decay is None:
      return grads

    zero = _opaque_zero(state.count)

    def add_decay(m, g, d):
      if m is None:
        return g
      lam = jnp.asarray(decay, g.dtype)
      return jnp.where(m, g, g + _rounded(lam * d.astype(g.dtype), zero))

    return jax.tree.map(
      add_decay, state.masks, grads, state.dense, is_leaf=_is_none
    )

  return StraightThrough(init_fn, update_fn, optimizer_gradients)


def _magnitudes(dense: PyTree) -> PyTree:
  return jax.tree.map(
    lambda d: None if d is None else jnp.abs(d).astype(jnp.float32),
    dense,
    is_leaf=_is_none,
  )


def _hard_rule(
  sparsity: ScalarOrSchedule, allocation: allocation_lib.Allocation
) -> Rule:
  """Masks keep the largest ``|W̃'|``; sparse weights ``m ⊙ W̃'``."""

  def rule(dense, state, specs):
    target = schedules.value_at(sparsity, state.count)
    masks = masks_lib.masks_from_scores(
      _magnitudes(dense), target, pattern=specs, allocation=allocation
    )
    return masks, None

  return rule


def ste(
  sparsity: ScalarOrSchedule | None = None,
  *,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  allocation: allocation_lib.Allocation = allocation_lib.Uniform(),
  where: Selection = None,
) -> StraightThrough:
  """Straight-through estimator: sparse forward pass, dense weight update.

  The model runs on ``W = m(W̃) ⊙ W̃`` and the dense weights take the
  gradient of the sparse ones, ``W̃ ← W̃ - η ∇_W L``; after every step the
  mask ``m`` keeps the largest ``|W̃|`` at the (scheduled) sparsity per
  pattern unit, so a pruned weight whose dense value grows back re-enters
  it. With :class:`jaxsparse.NM` this is the STE baseline of Zhou et al.

  Works inside :func:`jaxsparse.sparsify` (the optimizer sees every
  gradient) or as the last link of ``optax.chain(optimizer, ste(...))``.

  Args:
    sparsity: fraction of zeros in ``[0, 1)``, or a schedule of the step
      count (e.g. :func:`jaxsparse.gmp`). ``None`` with :class:`NM` means the
      N:M level ``1 - n/m``.
    pattern: static; :class:`Unstructured`, :class:`NM`, :class:`Block` or
      :class:`Channel`.
    allocation: static; :func:`uniform`, :func:`er`, :func:`erk` or
      :func:`global_threshold`.
    where: static; which params are sparsified (see
      :func:`jaxsparse.resolve_where`).

  Returns:
    A :class:`jaxsparse.StraightThrough` with state
    :class:`StraightThroughState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.straight_through import ste
    >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> tx = js.sparsify(optax.sgd(1.0), ste(0.5))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[-2.5, 0.0], [0.0, 0.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[3.5, -4.0], [0.0, 0.0]]

  References:
    Bengio et al, `Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation <https://arxiv.org/abs/1308.3432>`_,
    2013.
    Zhou et al, `Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch <https://arxiv.org/abs/2102.04010>`_, 2021.
  """
  sparsity = _resolve_sparsity(sparsity, pattern, allocation, _PROBES, "ste")
  return _straight_through(
    "ste",
    where=where,
    pattern=pattern,
    rule=_hard_rule(sparsity, allocation),
  )


def sr_ste(
  pattern: patterns_lib.Pattern = patterns_lib.NM(2, 4),
  *,
  sparsity: ScalarOrSchedule | None = None,
  decay: float = 2e-4,
  where: Selection = None,
) -> StraightThrough:
  """SR-STE: STE plus a decay that pulls pruned dense weights to zero.

  Eq. 3 of Zhou et al: the dense weights are updated with

  ``W̃ ← W̃ - η (∇_W L + λ_W (1 - m) ⊙ W̃)``,

  where ``m`` is the mask of the forward pass and ``λ_W = decay``; the
  sparse weights are ``m(W̃) ⊙ W̃`` as in :func:`ste`. The decay term is
  added to the gradients the optimizer sees, so SR-STE needs
  :func:`jaxsparse.sparsify` (``optax.chain`` raises).

  Args:
    pattern: static; :class:`NM` (the paper's setting), or another pattern
      with an explicit ``sparsity``.
    sparsity: ``None`` for the N:M level ``1 - n/m``; otherwise a fraction
      of zeros in ``[0, 1)`` or a schedule.
    decay: ``λ_W`` (2e-4 in the paper), a non-negative float.
    where: static; which params are sparsified.

  Returns:
    A :class:`jaxsparse.StraightThrough` with state
    :class:`StraightThroughState`.

  References:
    Zhou et al, `Learning N:M Fine-grained Structured Sparse Neural Networks
    From Scratch <https://arxiv.org/abs/2102.04010>`_, 2021.
  """
  if not isinstance(decay, numbers.Real) or not decay >= 0:
    raise ValueError(
      f"sr_ste: decay={decay!r} must be a non-negative float (λ_W, 2e-4 in "
      "the paper)."
    )
  allocation = allocation_lib.Uniform()
  sparsity = _resolve_sparsity(sparsity, pattern, allocation, _PROBES, "sr_ste")
  return _straight_through(
    "sr_ste",
    where=where,
    pattern=pattern,
    rule=_hard_rule(sparsity, allocation),
    decay=float(decay),
  )


def _soft_threshold(
  d: Array, tau: Float[Array, "..."], mask: Bool[Array, "..."]
) -> Float[Array, "..."]:
  """``sign(d) max(|d| - τ, 0)`` on the kept entries, 0 elsewhere (f32)."""
  d = d.astype(jnp.float32)
  shrunk = jnp.sign(d) * jnp.maximum(jnp.abs(d) - tau, jnp.float32(0))
  return jnp.where(mask, shrunk, jnp.float32(0))


def _channel_rescale(d: Array, mask: Bool[Array, "..."]) -> Float[Array, "..."]:
  """ST-3's per-output-channel weight rescaling (the authors' code).

  ``s_c = 1.01 / (r_c + 0.01)`` with ``r_c = (mean_c(|W̃| ⊙ m) + 1e-6) /
  (mean_c(|W̃|) + 1e-6)``, means over the inputs ``K`` of each column of a
  matrix ``[K, N]`` (an output channel). Returns ``s`` broadcast to ``d``.
  """
  magnitude = jnp.abs(d.astype(jnp.float32))
  # (mean(a) + ε) / (mean(b) + ε) as (sum(a) + nε) / (sum(b) + nε): no
  # multiply feeds an add, so XLA cannot fuse an FMA and jit equals eager.
  eps = jnp.float32(1e-6 * d.shape[0])
  kept = jnp.where(mask, magnitude, jnp.float32(0))
  ratio = (jnp.sum(kept, axis=0, keepdims=True) + eps) / (
    jnp.sum(magnitude, axis=0, keepdims=True) + eps
  )
  scale = jnp.float32(1.01) / (ratio + jnp.float32(0.01))
  return jnp.broadcast_to(scale, d.shape)


def st3(
  sparsity: ScalarOrSchedule,
  *,
  sigma: bool = False,
  rescale: bool = True,
  pattern: masks_lib.PatternSpec = patterns_lib.Unstructured(),
  where: Selection = None,
) -> StraightThrough:
  """ST-3: straight-through gradients through a global soft threshold.

  The sparse weights are ``W = s ⊙ sign(W̃) max(|W̃| - τ_l, 0)`` with one
  global threshold over all selected leaves: the masks keep exactly
  ``N - round(s_t N)`` of the ``N`` selected entries, the largest by
  ``|W̃| / σ_l``, and ``τ_l = σ_l τ`` where ``τ`` is the largest pruned
  ``|W̃| / σ_l`` (0 when nothing is pruned). The dense weights take the
  gradient of the sparse ones. ST-3 has ``σ_l = 1``; ST-3σ
  (``sigma=True``) normalises each layer by ``σ_l = 1 / sqrt(Σ_i d_i)``
  over its shape, so sparsity is spread more uniformly over layers. With
  ``rescale`` the kept weights are multiplied per output channel ``c`` by
  ``s_c = 1.01 / (r_c + 0.01)``, ``r_c = (mean_c(|W̃| ⊙ m) + 1e-6) /
  (mean_c(|W̃|) + 1e-6)``, as in the authors' code; the paper ramps the
  sparsity up with a cubic schedule (:func:`jaxsparse.gmp`).

  A kept entry whose ``|W̃|`` ties the threshold soft-thresholds to 0.

  Args:
    sparsity: fraction of zeros in ``[0, 1)`` or a schedule (e.g.
      ``js.gmp(0.9, begin, end)``), over all selected params together.
    sigma: static; ST-3σ's per-layer threshold normalisation.
    rescale: static; the per-output-channel weight rescaling.
    pattern: static; must be :class:`Unstructured` (a global soft
      threshold prunes single entries).
    where: static; which params are sparsified.

  Returns:
    A :class:`jaxsparse.StraightThrough` with state
    :class:`StraightThroughState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.straight_through import st3
    >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> tx = js.sparsify(optax.sgd(0.0), st3(0.5, rescale=False))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, -2.0], [1.0, 0.0]]

  References:
    Vanderschueren & De Vleeschouwer, `Are Straight-Through gradients and
    Soft-Thresholding all you need for Sparse Training?
    <https://arxiv.org/abs/2212.01076>`_, 2023.
  """
  if not isinstance(pattern, patterns_lib.Unstructured):
    raise ValueError(
      f"st3: pattern={pattern!r} is not supported; ST-3 soft-thresholds "
      "single entries with one global threshold, so it needs "
      "pattern=js.Unstructured(). For N:M use s_ste or sr_ste."
    )
  sparsity = _resolve_sparsity(
    sparsity, pattern, allocation_lib.GlobalThreshold(), _PROBES, "st3"
  )

  def rule(dense, state, specs):
    target = schedules.value_at(sparsity, state.count)
    leaves, treedef = jax.tree.flatten(dense, is_leaf=_is_none)
    layouts = [s.layout if s else None for s in jax.tree.leaves(specs)]
    chosen = [i for i, d in enumerate(leaves) if d is not None]
    # 1 / σ_l: ST-3σ scores |W̃| / σ_l with σ_l = 1 / sqrt(sum of dims).
    # Opaque to XLA, so that τ / c stays a division under jit (as in eager)
    # rather than a multiply by a folded reciprocal.
    zero = _opaque_zero(state.count)
    inv_sigma = [
      _rounded(
        jnp.float32(
          math.sqrt(sum(layouts[i].slice_shape(leaves[i].shape)))
          if sigma
          else 1.0
        ),
        zero,
      )
      for i in chosen
    ]
    scores = [
      jnp.abs(leaves[i]).astype(jnp.float32) * c
      for i, c in zip(chosen, inv_sigma)
    ]
    total = sum(s.size for s in scores)
    kept = threshold.topk_masks(scores, threshold.num_kept(total, target))
    tau = jnp.max(
      jnp.stack(
        [jnp.max(jnp.where(m, jnp.float32(0), s)) for s, m in zip(scores, kept)]
      )
    )
    masks: list[Array | None] = [None] * len(leaves)
    targets: list[Array | None] = [None] * len(leaves)
    for i, c, m in zip(chosen, inv_sigma, kept):
      w = _soft_threshold(leaves[i], tau / c, m)
      if rescale:
        w = w * layout_lib.on_matrices(
          _channel_rescale, layouts[i], leaves[i], m
        )
      masks[i], targets[i] = m, w
    return (
      jax.tree.unflatten(treedef, masks),
      jax.tree.unflatten(treedef, targets),
    )

  return _straight_through("st3", where=where, pattern=pattern, rule=rule)


def _leaf_soft_threshold(
  pattern: patterns_lib.NM, d: Array, layout: layout_lib.Layout
) -> tuple[Bool[Array, "..."], Float[Array, "..."]]:
  """:func:`_nm_soft_threshold` on each matrix of the leaf's layout."""
  mask = layout_lib.on_matrices(
    lambda m: _nm_soft_threshold(pattern, m)[0], layout, d
  )
  soft = layout_lib.on_matrices(
    lambda m: _nm_soft_threshold(pattern, m)[1], layout, d
  )
  return mask, soft


def _nm_soft_threshold(
  pattern: patterns_lib.NM, d: Array
) -> tuple[Bool[Array, "..."], Float[Array, "..."]]:
  """S-STE's pruning: mask and ``sign(w) max(|w| - t, 0)`` per group.

  ``t`` is the largest magnitude among the ``m - n`` pruned entries of each
  group of ``m`` along the pattern's axis. When that axis is sharded over
  Explicit mesh axes the leaf is gathered, as :func:`patterns.select` does.
  """
  magnitude = jnp.abs(d).astype(jnp.float32)
  level = 1.0 - pattern.n / pattern.m
  mask = patterns_lib.select(pattern, magnitude, level)
  pruned = jnp.where(mask, jnp.float32(0), magnitude)
  sharding = patterns_lib.explicit_sharding(pruned)
  axis = pattern.axis % d.ndim
  if sharding is not None and (
    axis >= len(sharding.spec) or sharding.spec[axis] is None
  ):
    sharding = None
  if sharding is not None:
    replicated = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec()
    )
    pruned = jax.sharding.reshard(pruned, replicated)
  moved = jnp.moveaxis(pruned, axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, pattern.m)
  t = jnp.broadcast_to(jnp.max(groups, axis=-1, keepdims=True), groups.shape)
  t = jnp.moveaxis(t.reshape(moved.shape), -1, axis)
  if sharding is not None:
    t = jax.sharding.reshard(t, sharding)
  return mask, _soft_threshold(d, t, mask)


def _mse_scale(
  pattern: patterns_lib.NM, d: Array, layout: layout_lib.Layout
) -> Float[Array, ""]:
  """``β = <W̃, S(W̃)> / <S(W̃), S(W̃)>`` (1 where ``S(W̃) == 0``).

  Summed on a replicated copy, so the scale is bitwise the same on any
  number of devices.
  """
  _, soft = _leaf_soft_threshold(pattern, d, layout)
  dense = d.astype(jnp.float32)
  sharding = patterns_lib.explicit_sharding(dense)
  if sharding is not None:
    replicated = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec()
    )
    dense = jax.sharding.reshard(dense, replicated)
    soft = jax.sharding.reshard(soft, replicated)
  num = jnp.sum(dense * soft)
  den = jnp.sum(soft * soft)
  return jnp.where(
    den > 0, num / jnp.where(den > 0, den, jnp.float32(1)), jnp.float32(1)
  )


def s_ste(
  pattern: patterns_lib.Pattern = patterns_lib.NM(2, 4),
  *,
  where: Selection = None,
) -> StraightThrough:
  """S-STE: a continuous N:M pruning function with a frozen scale.

  In every group of ``m`` along the pattern's axis let ``t`` be the largest
  magnitude among the ``m - n`` pruned entries; the sparse weights are

  ``W = β S(W̃)``, ``S(W̃)_i = sign(W̃_i) max(|W̃_i| - t, 0)``,

  with one scale per tensor, ``β = <W̃, S(W̃)> / <S(W̃), S(W̃)>`` (the
  least-squares fit of ``W̃`` by ``β S(W̃)``), computed once from the
  initial weights and then frozen in the state, as the authors' code does.
  The dense weights take the gradient of the sparse ones (straight-through).
  Unlike hard thresholding, ``S`` is continuous when two entries of a group
  swap ranks. The paper's MVUE activation-gradient estimator and FP8 matmuls
  are model-side and not part of this transformation.

  Args:
    pattern: static; an :class:`NM` pattern (2:4 in the paper).
    where: static; which params are sparsified.

  Returns:
    A :class:`jaxsparse.StraightThrough` with state :class:`SSTEState`.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxsparse as js
    >>> from jaxsparse.methods.straight_through import s_ste
    >>> params = {"w": jnp.array([[3.0], [1.0], [-3.0], [-0.5]])}
    >>> tx = js.sparsify(optax.sgd(0.0), s_ste(js.NM(2, 4)))
    >>> state = tx.init(params)
    >>> float(state.method.scale["w"])  # S(w) = [2, 0, -2, 0]; β = 12 / 8
    1.5
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"].ravel().tolist()
    [3.0, 0.0, -3.0, 0.0]

  References:
    Hu et al, `S-STE: Continuous Pruning Function for Efficient 2:4 Sparse
    Pre-training <https://arxiv.org/abs/2409.09099>`_, 2024.
  """
  if not isinstance(pattern, patterns_lib.NM):
    raise ValueError(
      f"s_ste: pattern={pattern!r} is not supported; S-STE's soft threshold "
      "is defined per group of m entries, so it needs an N:M pattern such as "
      "js.NM(2, 4). For unstructured soft thresholding use st3."
    )
  patterns_lib.check_pattern(pattern)

  def init_scale(dense, specs):
    return jax.tree.map(
      lambda d, spec: (
        None if d is None else _mse_scale(pattern, d, spec.layout)
      ),
      dense,
      specs,
      is_leaf=_is_none,
    )

  def rule(dense, state, specs):
    leaves, treedef = jax.tree.flatten(dense, is_leaf=_is_none)
    scales = jax.tree.leaves(state.scale, is_leaf=_is_none)
    layouts = [s.layout if s else None for s in jax.tree.leaves(specs)]
    masks: list[Array | None] = [None] * len(leaves)
    targets: list[Array | None] = [None] * len(leaves)
    for i, (d, beta) in enumerate(zip(leaves, scales)):
      if d is not None:
        masks[i], soft = _leaf_soft_threshold(pattern, d, layouts[i])
        targets[i] = beta * soft
    return (
      jax.tree.unflatten(treedef, masks),
      jax.tree.unflatten(treedef, targets),
    )

  return _straight_through(
    "s_ste", where=where, pattern=pattern, rule=rule, init_scale=init_scale
  )
