"""The conformance suite every jaxsparse method passes.

``CONFIGS`` names a factory per method/pattern/allocation combination; the
tests in ``conformance_test.py`` run each through the invariants of
DESIGN.md. A new method adds its entries here.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as js
from jaxsparse import masking


class Config(NamedTuple):
  make: Callable[[], object]
  pattern: object = js.Unstructured()
  allocation: object = js.Uniform()
  sparsity_at: Callable[[int], float] = lambda count: 0.0
  needs_grads: bool = False  # only inside js.sparsify
  # The step whose sparsity the masks hold after step `count` (updates every
  # other step unless a config says otherwise).
  last_update: Callable[[int], int] = lambda count: count - count % 2
  # False for methods whose sparsity follows a threshold, not a count (e.g.
  # regularisers); their masks must still match the zeros.
  exact_counts: bool = True


def constant(value):
  return lambda count: value


CONFIGS = {
  "magnitude": Config(
    lambda: js.magnitude_pruning(0.8, update_every=2), sparsity_at=constant(0.8)
  ),
  "magnitude_gmp": Config(
    lambda: js.magnitude_pruning(js.gmp(0.9, 0, 6), update_every=2),
    sparsity_at=lambda count: float(js.gmp(0.9, 0, 6)(count)),
  ),
  "magnitude_nm": Config(
    lambda: js.magnitude_pruning(pattern=js.NM(2, 4), update_every=3),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
    last_update=lambda count: count - count % 3,
  ),
  "magnitude_block": Config(
    lambda: js.magnitude_pruning(0.75, pattern=js.Block(4, 4), update_every=2),
    pattern=js.Block(4, 4),
    sparsity_at=constant(0.75),
  ),
  "magnitude_channel": Config(
    lambda: js.magnitude_pruning(0.5, pattern=js.Channel(), update_every=2),
    pattern=js.Channel(),
    sparsity_at=constant(0.5),
  ),
  "magnitude_erk": Config(
    lambda: js.magnitude_pruning(0.9, allocation=js.erk(), update_every=2),
    allocation=js.erk(),
    sparsity_at=constant(0.9),
  ),
  "global_magnitude": Config(
    lambda: js.global_magnitude_pruning(0.85, update_every=2),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.85),
  ),
  "random": Config(
    lambda: js.random_pruning(0.7, seed=3, update_every=2),
    sparsity_at=constant(0.7),
  ),
  "rigl": Config(
    lambda: js.rigl(0.8, update_every=2, end_step=6),
    allocation=js.erk(),
    sparsity_at=constant(0.8),
    needs_grads=True,
  ),
  "set": Config(
    lambda: js.set_sparse(0.8, drop_fraction=0.5, update_every=2),
    allocation=js.er(),
    sparsity_at=constant(0.8),
  ),
  "random_erk": Config(
    lambda: js.random_pruning(0.9, allocation=js.erk(), update_every=2),
    allocation=js.erk(),
    sparsity_at=constant(0.9),
  ),
  # -- pruning at initialisation (SNIP, GraSP, SynFlow) --
  # Masks are computed once, in init, from the model below (then fixed).
  "snip": Config(
    lambda: init_pruning_method("snip", 0.8),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.8),
    last_update=lambda count: 0,
  ),
  "grasp": Config(
    lambda: init_pruning_method("grasp", 0.7),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.7),
    last_update=lambda count: 0,
  ),
  "synflow": Config(
    lambda: init_pruning_method("synflow", 0.9),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.9),
    last_update=lambda count: 0,
  ),
  # -- straight-through and N:M training (STE, SR-STE, ST-3, S-STE) --
  # (until the names are exported from jaxsparse, reach the module directly)
  "ste": Config(
    lambda: js.ste(js.gmp(0.9, 0, 6)),
    sparsity_at=lambda count: float(js.gmp(0.9, 0, 6)(count)),
    last_update=lambda count: count,
  ),
  "ste_nm": Config(
    lambda: js.ste(pattern=js.NM(2, 4)),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
    last_update=lambda count: count,
  ),
  "sr_ste": Config(
    lambda: js.sr_ste(js.NM(2, 4), decay=0.1),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
    needs_grads=True,
    last_update=lambda count: count,
  ),
  "sr_ste_14": Config(
    lambda: js.sr_ste(js.NM(1, 4)),
    pattern=js.NM(1, 4),
    sparsity_at=constant(0.75),
    needs_grads=True,
    last_update=lambda count: count,
  ),
  "st3": Config(
    lambda: js.st3(js.gmp(0.9, 0, 6)),
    allocation=js.GlobalThreshold(),
    sparsity_at=lambda count: float(js.gmp(0.9, 0, 6)(count)),
    last_update=lambda count: count,
  ),
  "st3_sigma": Config(
    lambda: js.st3(0.85, sigma=True),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.85),
    last_update=lambda count: count,
  ),
  "s_ste": Config(
    lambda: js.s_ste(js.NM(2, 4)),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
    last_update=lambda count: count,
  ),
  # -- dynamic sparse training (SNFS, SRigL, patterned RigL/SET) --
  "rigl_nm": Config(
    lambda: js.rigl(pattern=js.NM(2, 4), update_every=2, end_step=6),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
    needs_grads=True,
  ),
  "rigl_block": Config(
    lambda: js.rigl(0.75, pattern=js.Block(4, 4), update_every=2),
    pattern=js.Block(4, 4),
    allocation=js.erk(),
    sparsity_at=constant(0.75),
    needs_grads=True,
  ),
  "set_nm": Config(
    lambda: js.set_sparse(
      pattern=js.NM(2, 4), drop_fraction=0.5, update_every=2
    ),
    pattern=js.NM(2, 4),
    sparsity_at=constant(0.5),
  ),
  # SNFS moves weights between layers (only the total is fixed), so the
  # per-leaf counts are not known here; dynamic_test checks the total.
  "snfs": Config(
    lambda: js.snfs(0.8, update_every=2, end_step=6),
    sparsity_at=constant(0.8),
    needs_grads=True,
    exact_counts=False,
  ),
  # Constant fan-in at 0.75: every fan-in (36, 16, 32) keeps a quarter, so
  # out * k equals the per-leaf count exactly.
  "srigl": Config(
    lambda: js.srigl(0.75, update_every=2, end_step=6, ablation_threshold=0.0),
    sparsity_at=constant(0.75),
    needs_grads=True,
  ),
  # With ablation the fan-in is floor(B / a): the count may drop by B mod a.
  "srigl_ablation": Config(
    lambda: js.srigl(0.75, update_every=2, ablation_threshold=0.9),
    sparsity_at=constant(0.75),
    needs_grads=True,
    exact_counts=False,
  ),
  # -- others (AC/DC, LAMP, LOBSTER, group lasso) --
  "lamp": Config(
    lambda: js.lamp_pruning(0.85, update_every=2),
    allocation=js.GlobalThreshold(),
    sparsity_at=constant(0.85),
  ),
  # Phases over steps 0..6: dense, sparse x2, dense x3 (the last one is the
  # final dense phase), sparse; masks change at every phase switch.
  "acdc": Config(
    lambda: js.acdc(
      0.8,
      total_steps=8,
      warmup_steps=1,
      phase_steps=2,
      final_dense_steps=1,
      final_sparse_steps=2,
    ),
    allocation=js.GlobalThreshold(),
    sparsity_at=lambda count: 0.8 if count in (1, 2, 6, 7) else 0.0,
    last_update=lambda count: count,
  ),
  "acdc_block": Config(
    lambda: js.acdc(
      0.75,
      total_steps=8,
      warmup_steps=1,
      phase_steps=2,
      final_dense_steps=1,
      final_sparse_steps=2,
      pattern=js.Block(4, 4),
      allocation=js.uniform(),
    ),
    pattern=js.Block(4, 4),
    sparsity_at=lambda count: 0.75 if count in (1, 2, 6, 7) else 0.0,
    last_update=lambda count: count,
  ),
  "lobster": Config(
    lambda: js.lobster(0.1, 0.3, prune_every=2),
    needs_grads=True,
    exact_counts=False,
  ),
  "group_lasso_channel": Config(
    lambda: js.group_lasso(10.0, 0.1, js.Channel()),
    pattern=js.Channel(),
    exact_counts=False,
  ),
  "group_lasso_block": Config(
    lambda: js.group_lasso(10.0, 0.1, js.Block(4, 4)),
    pattern=js.Block(4, 4),
    exact_counts=False,
  ),
}


def make_params(dtype=jnp.float32, seed=0):
  """A small model: two dense layers, a conv kernel, biases, an embedding."""
  keys = jax.random.split(jax.random.key(seed), 4)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(
    dtype
  )
  return {
    "conv": {
      "kernel": normal(keys[0], (3, 3, 4, 8)),
      "bias": jnp.zeros(8, dtype),
    },
    "dense0": {
      "kernel": normal(keys[1], (16, 32)),
      "bias": jnp.zeros(32, dtype),
    },
    "dense1": {"kernel": normal(keys[2], (32, 8)), "bias": jnp.zeros(8, dtype)},
    "embed": {"embedding": normal(keys[3], (10, 16))},
  }


def fake_grads(params, step):
  key = jax.random.fold_in(jax.random.key(42), step)
  leaves, treedef = jax.tree.flatten(params)
  grads = [
    jax.random.normal(
      jax.random.fold_in(key, i), leaf.shape, jnp.float32
    ).astype(leaf.dtype)
    for i, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, grads)


def run(tx, params, steps, step_fn=None):
  """Runs ``steps`` fake-gradient updates, yielding (count, params, state)."""
  state = tx.init(params)
  if step_fn is None:
    step_fn = lambda g, s, p: tx.update(g, s, p)
  for count in range(steps):
    updates, state = step_fn(fake_grads(params, count), state, params)
    params = jax.tree.map(
      lambda p, u: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(
        p.dtype
      ),
      params,
      updates,
    )
    yield count, params, state


def expected_counts(config, params, masks, count):
  """Kept entries per masked leaf (or in total, for global allocation)."""
  from jaxsparse import patterns

  sparsity = config.sparsity_at(count)
  leaves = [
    (p, m)
    for p, m in zip(
      jax.tree.leaves(params), masking.treedef_leaves(params, masks)
    )
    if m is not None
  ]
  sizes = [p.size for p, _ in leaves]
  if isinstance(config.allocation, js.GlobalThreshold):
    return [
      sum(sizes) - int(np.round(np.float32(sparsity) * np.float32(sum(sizes))))
    ]
  per_leaf = js.layer_sparsities(
    config.allocation, [p.shape for p, _ in leaves], sparsity
  )
  out = []
  for (p, _), s in zip(leaves, per_leaf):
    pattern = config.pattern
    if isinstance(pattern, js.NM):
      kept = int(patterns.nm_kept_per_group(pattern, s))
      out.append(p.size // pattern.m * kept)
    else:
      unit = p.size // patterns.unit_scores(pattern, jnp.zeros(p.shape)).size
      out.append(int(patterns.num_kept(p.size // unit, s)) * unit)
  return out


def kept_counts(params, masks, global_count):
  counts = [int(np.asarray(m).sum()) for m in jax.tree.leaves(masks)]
  return [sum(counts)] if global_count else counts


def assert_pruned_are_zero(testcase, params, masks):
  mask_leaves = masking.treedef_leaves(params, masks)
  for p, m in zip(jax.tree.leaves(params), mask_leaves):
    if m is None:
      continue
    p = np.asarray(p)
    bits = p.view(np.uint16 if p.dtype.itemsize == 2 else np.uint32)
    pruned_bits = bits[~np.asarray(m)]
    testcase.assertTrue(
      np.all(pruned_bits == 0), "a pruned weight is not bitwise +0.0"
    )


# -- the model scored by the pruning-at-initialisation configs --
# A dense branch (dense0 -> dense1) plus a conv branch (the conv kernel over a
# 3x3x4 input: a VALID convolution at its one position), summed into 8
# logits. Matmuls and einsums only, so it also runs on params sharded over
# Explicit mesh axes; it computes in the params' dtype.


def init_pruning_apply(params, x):
  """``x``: (batch, 3, 3, 4) -> logits (batch, 8)."""
  kernel = params["dense0"]["kernel"]
  x = jnp.asarray(x, kernel.dtype)
  flat = x.reshape(x.shape[0], -1)[:, :16]
  hidden = jax.nn.relu(flat @ kernel + params["dense0"]["bias"][None, :])
  conv = jnp.einsum("bhwi,hwio->bo", x, params["conv"]["kernel"])
  conv = jax.nn.relu(conv + params["conv"]["bias"][None, :])
  dense1 = params["dense1"]
  return hidden @ dense1["kernel"] + dense1["bias"][None, :] + conv


def init_pruning_batch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3, 3, 4)).astype(np.float32)
  y = np.eye(8, dtype=np.float32)[[0, 3, 5, 7]]
  return x, y


def init_pruning_loss(params, batch):
  x, y = batch
  logits = init_pruning_apply(params, x).astype(jnp.float32)
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def init_pruning_method(name, sparsity):
  from jaxsparse.methods import init_pruning

  if name == "synflow":
    return init_pruning.synflow(
      sparsity, init_pruning_apply, (1, 3, 3, 4), iterations=10
    )
  factory = getattr(init_pruning, name)
  return factory(sparsity, init_pruning_loss, init_pruning_batch())
