"""DSnoT: training-free mask refinement by pruning-and-growing swaps.

Zhang et al, `Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs <https://arxiv.org/abs/2310.08915>`_, ICLR 2024.

Starting from a base method's mask and kept weights (Wanda by default),
each output neuron (a column of the ``[in, out]`` kernel) swaps one pruned
weight for one kept weight per cycle so that the expected output error
against the dense layer shrinks; weight values are never changed.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.oneshot.rules import wanda, wanda_scores
from jaxsparse.patterns import NM, Pattern, Unstructured

_VAR_FLOOR = 1e-12
# The authors' --update_threshold 0.1 on E[x] summed over 2048-token
# sequences, in per-token units.
AUTHORS_UPDATE_THRESHOLD = 0.1 / 2048


def input_moments(
  stats: LayerStatistics,
) -> tuple[Float[Array, " in"], Float[Array, " in"]]:
  """``E[x] = sum / count`` and ``Var[x] = sq_sum / count - E[x]²`` (≥ 0)."""
  count = jnp.maximum(jnp.asarray(stats.count, jnp.float32), 1.0)
  mean = jnp.asarray(stats.sum, jnp.float32) / count
  var = jnp.asarray(stats.sq_sum, jnp.float32) / count - mean**2
  return mean, jnp.maximum(var, 0.0)


def _take(x: Array, idx: Int[Array, " out"]) -> Array:
  """``x[idx[j], j]`` for every column ``j``."""
  return jnp.take_along_axis(x, idx[None, :], axis=0)[0]


def _put(x: Array, idx: Int[Array, " out"], value: Array) -> Array:
  """``x[idx[j], j] = value[j]`` for every column ``j``."""
  cols = jnp.arange(x.shape[1])
  return x.at[idx, cols].set(value)


@functools.partial(jax.jit, static_argnames=("group", "same_sign", "monotone"))
def refine(
  kernel: Float[Array, "in out"],
  weights: Float[Array, "in out"],
  mask: Bool[Array, "in out"],
  stats: LayerStatistics,
  update_threshold: Float[Array, ""],
  pow_of_var_regrowing: Float[Array, ""],
  max_cycles: Int[Array, ""],
  *,
  group: int,
  same_sign: bool,
  monotone: bool,
) -> Bool[Array, "in out"]:
  """DSnoT's swap cycles on a given mask (``True`` = kept); see :func:`dsnot`.

  ``kernel`` is the dense ``W``, ``weights`` the working ``V`` (the base's
  kept values, ``W`` where pruned). ``group=0``: unstructured; ``group=m``:
  the pruned weight must come from the regrown weight's group of ``m``
  inputs (N:M stays N:M).
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  n_in, n_out = kernel.shape
  mean, var = input_moments(stats)
  contrib = weights * mean[:, None]  # D_ij = V_ij E[x_i]
  pruned0 = ~mask
  # Δ_j = Σ_i (W_ij - M_ij V_ij) E[x_i]; Σ_{pruned} D_ij when V = W.
  residual = kernel - jnp.where(mask, weights, 0.0)
  delta0 = jnp.sum(residual * mean[:, None], axis=0)
  scale = jnp.where(
    pow_of_var_regrowing != 0,
    jnp.maximum(var, _VAR_FLOOR) ** pow_of_var_regrowing,
    1.0,
  )
  grow = jnp.where(pruned0, contrib / scale[:, None], 0.0)
  grow_order = jnp.argsort(grow, axis=0, stable=True)
  importance = wanda_scores(weights, stats)
  neg_cand = mask & (contrib < 0)
  pos_cand = mask & (contrib > 0)
  neg_order = jnp.argsort(
    jnp.where(neg_cand, importance, jnp.inf), axis=0, stable=True
  )
  pos_order = jnp.argsort(
    jnp.where(pos_cand, importance, jnp.inf), axis=0, stable=True
  )
  n_neg = jnp.sum(neg_cand, axis=0, dtype=jnp.int32)
  n_pos = jnp.sum(pos_cand, axis=0, dtype=jnp.int32)
  zeros = jnp.zeros(n_out, jnp.int32)

  def cond(state):
    cycle, _, _, active, *_ = state
    return (cycle < max_cycles) & jnp.any(active)

  def body(state):
    cycle, keep, delta, active, lo, hi, pn, pp = state
    up = delta > 0
    # Grow: the pruned weight with the largest sign(Δ)·D_i / Var_i^p > 0.
    g = _take(grow_order, jnp.clip(jnp.where(up, hi, lo), 0, n_in - 1))
    g_metric = _take(grow, g)
    g_ok = jnp.where(up, g_metric > 0, g_metric < 0)
    if group:
      start = (g // group) * group
      idx = start[None, :] + jnp.arange(group)[:, None]
      cand = jnp.take_along_axis(keep & mask, idx, axis=0)
      score = jnp.where(
        cand, jnp.take_along_axis(importance, idx, axis=0), jnp.inf
      )
      p = start + jnp.argmin(score, axis=0).astype(start.dtype)
      p_ok = jnp.any(cand, axis=0)
    else:
      # Prune: the least |W|·‖x‖ kept weight with sign(Δ)·D_j < 0.
      p_neg = _take(neg_order, jnp.minimum(pn, n_in - 1))
      p_pos = _take(pos_order, jnp.minimum(pp, n_in - 1))
      p = jnp.where(up, p_neg, p_pos)
      p_ok = jnp.where(up, pn < n_neg, pp < n_pos)
    after = delta + _take(contrib, p) - _take(contrib, g)
    swap = active & (jnp.abs(delta) > update_threshold) & g_ok & p_ok
    if same_sign:
      swap = swap & (jnp.sign(after) == jnp.sign(delta0))
    if monotone:
      swap = swap & (jnp.abs(after) < jnp.abs(delta))
    keep = _put(keep, g, _take(keep, g) | swap)
    keep = _put(keep, p, _take(keep, p) & ~swap)
    delta = jnp.where(swap, after, delta)
    step = swap.astype(jnp.int32)
    up_step = jnp.where(up, step, 0)
    down_step = step - up_step
    return (
      cycle + 1,
      keep,
      delta,
      swap,
      lo + down_step,
      hi - up_step,
      pn + up_step,
      pp + down_step,
    )

  state = (
    jnp.int32(0),
    mask,
    delta0,
    jnp.ones(n_out, bool),
    zeros,
    zeros + (n_in - 1),
    zeros,
    zeros,
  )
  return jax.lax.while_loop(cond, body, state)[1]


def dsnot(
  base: OneShotMethod | None = None,
  *,
  max_cycles: int = 50,
  update_threshold: float = AUTHORS_UPDATE_THRESHOLD,
  pow_of_var_regrowing: float = 1.0,
  same_sign: bool | None = None,
  monotone: bool = True,
) -> OneShotMethod:
  """DSnoT (Zhang et al. 2024): refine a base mask by swaps, no training.

  The base gives a mask ``M`` and a kernel; the working weights are
  ``V = where(M, base kernel, W)`` (kept: the base's values, e.g.
  SparseGPT's reconstruction; pruned: the dense ``W`` as regrowth
  candidates; ``V = W`` for Wanda and magnitude). With ``D_ij = V_ij E[x_i]``
  (``E[x] = sum / count``), each output ``j`` tracks the expected error
  against the dense layer, ``Δ_j = Σ_i (W_ij - M_ij V_ij) E[x_i]``. One
  cycle, for every output with ``|Δ_j| > update_threshold``:

  * grow ``g = argmax_{i pruned} sign(Δ_j) D_ij / Var[x_i]^p`` among those
    with ``sign(Δ_j) D_ij > 0`` (``Var[x] = sq_sum/count - E[x]²``,
    ``p = pow_of_var_regrowing``; ``p = 0`` drops the division);
  * prune ``q = argmin_{i kept} |V_ij| ‖x_i‖`` (Wanda's metric) among those
    with ``sign(Δ_j) D_ij < 0`` (unstructured); for N:M, among the kept
    weights of ``g``'s group of ``m`` inputs (any sign), so each group
    still keeps ``n``;
  * swap, ``Δ_j ← Δ_j + D_qj - D_gj``.

  The output kernel is ``M ⊙ V`` with the refined ``M``. Only weights of
  the base mask's pruned (kept) set are grown (pruned), each at most once.
  An output stops for good (its swap is not made) when ``|Δ_j| <=
  update_threshold``; when no candidate of the needed sign is left (the
  authors' code then walks into zero-metric entries; stopping keeps counts
  exact); with ``monotone``, when the swap would not shrink ``|Δ_j|``;
  with ``same_sign``, when it would flip ``sign(Δ_j)`` from its initial
  sign. All stop after ``max_cycles``. Kept counts per output (and per N:M
  group) are those of the base mask.

  Differences from the authors' code (``zyxxmu/DSnoT``, ``lib/prune.py``):

  * Units. Their ``E[x]`` is ``Σ_tokens x / n_sequences``, i.e. ``seq_len``
    (2048) times the per-token mean used here, and they stop at
    ``|Δ| <= 0.1``; the default ``update_threshold = 0.1 / 2048`` is the
    same rule per token.
  * ``monotone=True`` is not in their code (pass ``monotone=False`` for
    their unstructured rule). There both moves of a swap push ``Δ_j`` the
    same way and can overshoot; ``Δ_j`` then swings between signs for all
    ``max_cycles``, which on narrow layers (50 swaps of a 192-input row
    replace half its pruned set) raises the output error several-fold.
  * Their default ``--skip_layer mlp`` leaves LLaMA's MLP layers at the
    base mask; here every layer given to the method is refined (restrict
    ``where`` of :func:`~jaxsparse.oneshot.prune` to do the same).
  * SparseGPT start: their ``--initial_method sparsegpt`` takes only the
    mask (by ``w² / [U]_ii²`` on the dense weights, no reconstruction) and
    refines it on ``W``; here SparseGPT's reconstructed kept weights are
    kept (``V`` above). ``dsnot(sparsegpt(update_weights=False))`` is
    theirs up to the mask (ours sweeps with updates).
  * N:M pruning metric: theirs is the base's own metric (SparseGPT's for a
    SparseGPT start); here always Wanda's on ``V``. ``Var[x]``: theirs
    averages within-sequence variances; here the variance over all tokens.

  Args:
    base: the method giving the initial mask and kept weights (default:
      :func:`wanda`).
    max_cycles: most swaps per output (the authors' 50).
    update_threshold: stop once ``|Δ_j|`` (per-token units) is at most this.
    pow_of_var_regrowing: ``p`` in the growing criterion (the authors' 1).
    same_sign: reject swaps after which ``sign(Δ_j)`` differs from its
      initial sign. ``None`` follows the authors' defaults: off for
      unstructured, on for N:M.
    monotone: reject swaps that do not shrink ``|Δ_j|`` (see above).

  Returns:
    A :class:`~jaxsparse.oneshot.base.OneShotMethod` that needs the base's
    statistics (the Gram matrix only if the base needs it).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.oneshot.base import LayerStatistics
    >>> from jaxsparse.patterns import Unstructured
    >>> x = jnp.arange(24.0).reshape(6, 4) % 5
    >>> stats = LayerStatistics(jnp.float32(6), x.sum(0), (x**2).sum(0),
    ...                         None)
    >>> w, mask = dsnot().prune_layer(
    ...     jnp.ones((4, 2)), stats, 0.5, Unstructured())
    >>> mask.sum(0).tolist()
    [2, 2]

  References:
    Zhang et al, `Dynamic Sparse No Training: Training-Free Fine-tuning for
    Sparse LLMs <https://arxiv.org/abs/2310.08915>`_, 2024.
  """
  base = wanda() if base is None else base
  if not isinstance(base, OneShotMethod):
    raise ValueError(
      f"dsnot: base={base!r} is not a OneShotMethod; pass e.g. oneshot.wanda()."
    )
  if not (isinstance(max_cycles, int) and max_cycles >= 0):
    raise ValueError(f"dsnot: max_cycles={max_cycles!r} must be an int >= 0.")
  if not update_threshold >= 0:
    raise ValueError(
      f"dsnot: update_threshold={update_threshold!r} must be >= 0."
    )

  def prune_layer(
    kernel: Float[Array, "in out"],
    stats: LayerStatistics,
    sparsity: float | Float[Array, ""],
    pattern: Pattern,
  ) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
    if isinstance(pattern, NM):
      if pattern.axis % 2 != 0:
        raise ValueError(
          f"dsnot: {pattern!r} must group along the input axis -2 of an "
          "[in, out] kernel; use NM(n, m) with the default axis."
        )
      group = pattern.m
    elif isinstance(pattern, Unstructured):
      group = 0
    else:
      raise ValueError(
        f"dsnot: pattern {pattern!r} is not supported; use js.Unstructured() "
        "or js.NM(n, m)."
      )
    if jnp.ndim(kernel) != 2:
      raise ValueError(
        f"dsnot: kernel must be 2-D [in, out], got shape {jnp.shape(kernel)}."
      )
    new, mask = base.prune_layer(kernel, stats, sparsity, pattern)
    mask = jnp.asarray(mask, bool)
    weights = jnp.where(mask, jnp.asarray(new, kernel.dtype), kernel)
    mask = refine(
      kernel,
      weights,
      mask,
      stats,
      jnp.float32(update_threshold),
      jnp.float32(pow_of_var_regrowing),
      jnp.int32(max_cycles),
      group=group,
      same_sign=bool(group) if same_sign is None else same_sign,
      monotone=monotone,
    )
    return jnp.where(mask, weights, jnp.zeros_like(weights)), mask

  return OneShotMethod(f"dsnot({base.name})", base.needs_gram, prune_layer)
