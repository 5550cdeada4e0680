"""SparseGPT: one-shot pruning with approximate OBS reconstruction.

Frantar & Alistarh, `SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot <https://arxiv.org/abs/2301.00774>`_, 2023 (Algorithm 1).

Kernels are ``[in, out]`` (the transpose of PyTorch's ``W``), so the paper's
column sweep runs over the input features, the rows of the kernel, and every
output neuron (a column) is solved at once with the same inverse Hessian.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse.oneshot.base import LayerStatistics, OneShotMethod
from jaxsparse.patterns import NM, Pattern, Unstructured, nm_select

GRAM_MSG = (
  "sparsegpt: stats.gram is None; accumulate the Gram matrix XᵀX (the "
  "method sets needs_gram=True for the driver)."
)


def check_layer(
  kernel: Array, stats: LayerStatistics, pattern: Pattern, name: str
) -> None:
  """Raises ``ValueError`` for input that method ``name`` cannot prune."""
  if kernel.ndim != 2:
    raise ValueError(
      f"{name}: kernel must be 2-D [in, out], got shape {kernel.shape}; the "
      "driver flattens DenseGeneral kernels before calling prune_layer."
    )
  if stats.sum.shape != kernel.shape[:1]:
    raise ValueError(
      f"{name}: stats.sum has shape {stats.sum.shape} but the kernel has "
      f"{kernel.shape[0]} inputs; gather the statistics of this layer's input."
    )
  if stats.gram is None:
    raise ValueError(GRAM_MSG)
  if isinstance(pattern, NM):
    if pattern.axis % 2 != 0:
      raise ValueError(
        f"{name}: {pattern!r} must group along the input axis -2 of an "
        "[in, out] kernel; use NM(n, m) with the default axis."
      )
    if kernel.shape[0] % pattern.m:
      raise ValueError(
        f"{name}: {kernel.shape[0]} inputs are not divisible into groups of "
        f"{pattern.m} for {pattern!r}; exclude this layer or change m."
      )
  elif not isinstance(pattern, Unstructured):
    raise ValueError(
      f"{name}: pattern {pattern!r} is not supported; use js.Unstructured() "
      "or js.NM(n, m)."
    )


def hessian_inverse_factor(
  stats: LayerStatistics, damp: Float[ArrayLike, ""]
) -> tuple[Float[Array, "in in"], Bool[Array, " in"]]:
  """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) and dead inputs.

  ``H = 2 XᵀX / count``; an input that never fires (``H_ii = 0``) gets
  ``H_ii = 1`` and is reported as dead; then ``λ = damp · mean(diag H)`` is
  added to the diagonal.
  """
  if stats.gram is None:
    raise ValueError(GRAM_MSG)
  gram = jnp.asarray(stats.gram, jnp.float32)
  count = jnp.asarray(stats.count, jnp.float32)
  h = 2.0 * gram / jnp.maximum(count, 1.0)
  diag = jnp.diagonal(h)
  dead = diag == 0
  diag = jnp.where(dead, 1.0, diag)
  diag = diag + damp * jnp.mean(diag)
  eye = jnp.eye(h.shape[0], dtype=jnp.float32)
  h = jnp.where(eye > 0, diag[:, None] * eye, h)
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
  hinv = 0.5 * (hinv + hinv.T)
  upper = jnp.linalg.cholesky(hinv).T
  return jnp.triu(upper), dead


def _rank_keep(scores: Array, kept: Array) -> Array:
  """Per column, keeps the ``kept`` highest scores (ties: lower row)."""
  order = jnp.argsort(-scores, axis=0, stable=True)
  rank = jnp.argsort(order, axis=0, stable=True)
  return rank < kept


def _sweep(
  kernel: Float[Array, "in out"],
  upper: Float[Array, "in in"],
  keep: Bool[Array, "in out"],
  sparsity: Float[Array, ""],
  *,
  blocksize: int,
  mode: Pattern | None,
) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
  """SparseGPT's lazy-batched column sweep over the inputs (rows).

  ``mode=None`` keeps the given ``keep`` mask; ``Unstructured()`` chooses, at
  the start of each block, per output the block's largest ``w² / U_ii²``
  (``round(s·i₂) - round(s·i₁)`` pruned in rows ``i₁:i₂``, so each output
  prunes exactly ``round(s·in)``); ``NM`` chooses, every ``m`` rows, the
  ``n`` largest ``w² / U_ii²`` of the current (updated) weights.
  """
  n_in, n_out = kernel.shape
  blocksize = min(blocksize, n_in)  # n_in is a multiple of m for N:M
  n_blocks = -(-n_in // blocksize)
  padded = n_blocks * blocksize
  pad = padded - n_in
  w = jnp.pad(kernel, ((0, pad), (0, 0)))
  keep = jnp.pad(keep, ((0, pad), (0, 0)))
  u = jnp.pad(upper, ((0, pad), (0, pad)))
  u = u + jnp.diag(jnp.concatenate([jnp.zeros(n_in), jnp.ones(pad)]))
  group = mode.m if isinstance(mode, NM) else 1
  real = (jnp.arange(padded) < n_in)[:, None]
  rows = jnp.arange(blocksize)

  def block(b, carry):
    w, keep = carry
    i1 = b * blocksize
    w1 = jax.lax.dynamic_slice(w, (i1, 0), (blocksize, n_out))
    keep1 = jax.lax.dynamic_slice(keep, (i1, 0), (blocksize, n_out))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))
    d = jnp.diagonal(u1)
    if isinstance(mode, Unstructured):
      real1 = jax.lax.dynamic_slice(real, (i1, 0), (blocksize, 1))
      i2 = jnp.minimum(i1 + blocksize, n_in).astype(jnp.float32)
      pruned = jnp.round(sparsity * i2) - jnp.round(
        sparsity * i1.astype(jnp.float32)
      )
      kept = jnp.sum(real1, dtype=jnp.int32) - pruned.astype(jnp.int32)
      scores = jnp.where(real1, w1**2 / (d**2)[:, None], -jnp.inf)
      keep1 = _rank_keep(scores, kept)

    def step(g, carry):
      w1, keep1, err1 = carry
      r0 = g * group
      if isinstance(mode, NM):
        wg = jax.lax.dynamic_slice(w1, (r0, 0), (group, n_out))
        dg = jax.lax.dynamic_slice(d, (r0,), (group,))
        chosen = nm_select(NM(mode.n, mode.m), wg**2 / (dg**2)[:, None], mode.n)
        keep1 = jax.lax.dynamic_update_slice(keep1, chosen, (r0, 0))
      for k in range(group):
        r = r0 + k
        wr = w1[r]
        q = jnp.where(keep1[r], wr, 0.0)
        e = (wr - q) / d[r]
        ur = jnp.where(rows > r, u1[r], 0.0)
        w1 = w1 - ur[:, None] * e[None, :]
        w1 = w1.at[r].set(q)
        err1 = err1.at[r].set(e)
      return w1, keep1, err1

    err1 = jnp.zeros_like(w1)
    w1, keep1, err1 = jax.lax.fori_loop(
      0, blocksize // group, step, (w1, keep1, err1)
    )
    u_rows = jax.lax.dynamic_slice(u, (i1, 0), (blocksize, padded))
    w = w - u_rows.T @ err1  # U is upper: rows before i1 get exact zeros
    w = jax.lax.dynamic_update_slice(w, w1, (i1, 0))
    keep = jax.lax.dynamic_update_slice(keep, keep1, (i1, 0))
    return w, keep

  w, keep = jax.lax.fori_loop(0, n_blocks, block, (w, keep))
  return w[:n_in], keep[:n_in]


@functools.partial(jax.jit, static_argnames=("blocksize", "mode"))
def _solve(kernel, stats, keep, sparsity, damp, *, blocksize, mode):
  kernel = jnp.asarray(kernel, jnp.float32)
  upper, dead = hessian_inverse_factor(stats, damp)
  kernel = jnp.where(dead[:, None], 0.0, kernel)
  return _sweep(
    kernel,
    upper,
    keep,
    jnp.asarray(sparsity, jnp.float32),
    blocksize=blocksize,
    mode=mode,
  )


def reconstruct(
  kernel: Float[ArrayLike, "in out"],
  stats: LayerStatistics,
  mask: Bool[ArrayLike, "in out"],
  *,
  blocksize: int = 128,
  damp: float = 0.01,
) -> Float[Array, "in out"]:
  """SparseGPT's weight reconstruction for a given mask (no mask selection).

  Sweeps the inputs in order; input ``i`` of each output is frozen (kept) or
  zeroed (pruned), and a pruned weight's error ``e = w_i / U_ii`` updates the
  later inputs, ``w_j ← w_j - e · U_ij`` (``j > i``), ``U`` the upper Cholesky
  factor of ``H⁻¹``. This equals sequential OBS, which eliminates input ``i``
  from ``H⁻¹`` after each step; blocks only batch the updates.

  Args:
    kernel: ``[in, out]`` weights.
    stats: input statistics with ``gram``.
    mask: ``True`` where a weight is kept.
    blocksize: inputs per lazy batch (static).
    damp: fraction of ``mean(diag H)`` added to ``diag H``.

  Returns:
    The reconstructed kernel, exactly zero where ``mask`` is ``False``.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  check_layer(kernel, stats, Unstructured(), "sparsegpt")
  mask = jnp.asarray(mask, bool)
  new, _ = _solve(
    kernel, stats, mask, 0.0, damp, blocksize=blocksize, mode=None
  )
  return jnp.where(mask, new, 0.0)


def sparsegpt(
  blocksize: int = 128, damp: float = 0.01, update_weights: bool = True
) -> OneShotMethod:
  """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) for one layer.

  With ``H = 2XᵀX / count`` (dead inputs: ``H_ii = 1`` and their weights
  zeroed), ``H += λI`` with ``λ = damp · mean(diag H)``, and ``U`` the upper
  Cholesky factor of ``H⁻¹``, the inputs are swept in order. The mask is
  chosen by the OBS saliency ``w_i² / U_ii²`` (unstructured: per output, per
  block of ``blocksize`` inputs at its start; N:M: every ``m`` inputs, from
  the weights updated so far). Each pruned weight's error ``e = w_i / U_ii``
  is propagated to the later inputs of the block, ``w_j -= e · U_ij``, and
  after the block to all later inputs at once (lazy batch).

  Unlike the reference code, which thresholds a block over all outputs
  together, the unstructured mask keeps the same count per output (like
  Wanda): ``round(s·i₂) - round(s·i₁)`` pruned per output in inputs
  ``i₁:i₂``, hence exactly ``round(s·in)`` per output.

  Args:
    blocksize: inputs per lazy batch (static); a multiple of ``m`` for N:M.
    damp: relative dampening of the Hessian diagonal; keep it positive when
      ``XᵀX`` may be singular (fewer tokens than inputs), or the Cholesky
      factor is NaN.
    update_weights: if ``False``, return the mask only: kept weights keep
      their original values.

  Returns:
    A :class:`~jaxsparse.oneshot.base.OneShotMethod` (``needs_gram=True``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxsparse.oneshot.base import LayerStatistics
    >>> from jaxsparse.patterns import Unstructured
    >>> x = jnp.arange(24.0).reshape(6, 4) % 5
    >>> stats = LayerStatistics(jnp.float32(6), x.sum(0), (x**2).sum(0),
    ...                         x.T @ x)
    >>> w, mask = sparsegpt(blocksize=4).prune_layer(
    ...     jnp.ones((4, 2)), stats, 0.5, Unstructured())
    >>> mask.sum(0).tolist()
    [2, 2]

  References:
    Frantar and Alistarh, `SparseGPT: Massive Language Models Can Be
    Accurately Pruned in One-Shot <https://arxiv.org/abs/2301.00774>`_, 2023.
  """
  if not (isinstance(blocksize, int) and blocksize > 0):
    raise ValueError(f"sparsegpt: blocksize={blocksize!r} must be an int > 0.")
  if not damp >= 0:
    raise ValueError(f"sparsegpt: damp={damp!r} must be >= 0.")

  def prune_layer(
    kernel: Float[Array, "in out"],
    stats: LayerStatistics,
    sparsity: float | Float[Array, ""],
    pattern: Pattern,
  ) -> tuple[Float[Array, "in out"], Bool[Array, "in out"]]:
    kernel = jnp.asarray(kernel, jnp.float32)
    check_layer(kernel, stats, pattern, "sparsegpt")
    if isinstance(pattern, NM):
      if blocksize % pattern.m:
        raise ValueError(
          f"sparsegpt: blocksize={blocksize} is not a multiple of "
          f"{pattern!r}.m; pick a blocksize divisible by {pattern.m}."
        )
      mode: Pattern = NM(pattern.n, pattern.m)
    else:
      if isinstance(sparsity, (int, float)) and not 0 <= sparsity < 1:
        raise ValueError(f"sparsegpt: sparsity={sparsity!r} must be in [0, 1).")
      mode = Unstructured()
    keep = jnp.ones(kernel.shape, bool)
    new, mask = _solve(
      kernel, stats, keep, sparsity, damp, blocksize=blocksize, mode=mode
    )
    if not update_weights:
      new = kernel
    return jnp.where(mask, new, 0.0), mask

  return OneShotMethod("sparsegpt", True, prune_layer)
