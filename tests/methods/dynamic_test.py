"""SET, RigL (patterned too), SNFS and SRigL against plain-numpy statements
of their rewiring rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import jaxsparse as js
from jaxsparse import patterns
from jaxsparse.methods import dynamic
from tests.methods import conformance as cf


def numpy_rigl(mask, weights, grads, fraction):
  """RigL's update (Evci et al 2020, Algorithm 1) for one layer.

  Drop floor(f n) active weights with the smallest |w|, then grow as many
  with the largest |g| among the weights not kept; ties go to the lower
  flat index.
  """
  flat_mask, w, g = mask.ravel(), np.abs(weights).ravel(), np.abs(grads).ravel()
  active = int(flat_mask.sum())
  dropped = int(np.floor(np.float32(fraction) * np.float32(active)))
  index = np.arange(flat_mask.size)
  drop_order = np.lexsort((index, -np.where(flat_mask, w, -np.inf)))
  kept = np.zeros_like(flat_mask)
  kept[drop_order[: active - dropped]] = True
  grow_order = np.lexsort((index, -np.where(kept, -np.inf, g)))
  grown = np.zeros_like(flat_mask)
  grown[grow_order[:dropped]] = True
  return (kept | grown).reshape(mask.shape)


class DropAndGrowTest(parameterized.TestCase):
  def test_hand_computed_4x4(self):
    mask = np.array(
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool
    )
    weights = np.array(
      [
        [0.9, 0.1, 0.0, 0.0],
        [0.5, -0.2, 0.0, 0.0],
        [0.0, 0.0, 0.3, -0.8],
        [0.0, 0.0, 0.05, 0.6],
      ],
      np.float32,
    )
    grads = np.array(
      [
        [0.0, 0.0, 2.0, 0.1],
        [0.0, 0.0, 0.0, -3.0],
        [0.5, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
      ],
      np.float32,
    )
    # 8 active, f = 0.5: drop 4 smallest |w| (0.05, 0.1, -0.2, 0.3), grow the
    # 4 largest |g| elsewhere (-3.0, 2.0, 1.0, 0.5).
    new = jax.jit(dynamic.drop_and_grow)(
      jnp.asarray(mask), jnp.abs(weights), jnp.abs(grads), 0.5
    )
    want = np.array(
      [[1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], bool
    )
    np.testing.assert_array_equal(np.asarray(new), want)

  def test_matches_numpy_rule_random(self):
    for seed in range(5):
      keys = jax.random.split(jax.random.key(seed), 3)
      mask = np.asarray(jax.random.bernoulli(keys[0], 0.3, (16, 12)))
      w = np.asarray(jax.random.normal(keys[1], (16, 12))) * mask
      g = np.asarray(jax.random.normal(keys[2], (16, 12)))
      new = jax.jit(dynamic.drop_and_grow)(
        jnp.asarray(mask), jnp.abs(w), jnp.abs(g), 0.3
      )
      np.testing.assert_array_equal(
        np.asarray(new), numpy_rigl(mask, w, g, 0.3)
      )
      self.assertEqual(int(new.sum()), int(mask.sum()))


class RiglTest(parameterized.TestCase):
  def test_transform_follows_rule_and_cosine(self):
    alpha, end = 0.4, 8
    tx = js.sparsify(
      optax.sgd(0.01),
      js.rigl(0.75, drop_fraction=alpha, update_every=2, end_step=end),
    )
    step = jax.jit(tx.update)
    params = cf.make_params()
    state = tx.init(params)
    for count in range(10):
      grads = cf.fake_grads(params, count)
      old = js.masks(state)["dense0"]["kernel"]
      updates, state = step(grads, state, params)
      new = np.asarray(js.masks(state)["dense0"]["kernel"])
      if count % 2 == 0 and 0 < count < end:
        # Eq. 1 of the paper, to float tolerance; the float32 value the
        # transform uses decides floor(f n) exactly.
        fraction = float(dynamic.cosine_drop_fraction(alpha, end)(count))
        self.assertAlmostEqual(
          fraction, float(optax.cosine_decay_schedule(alpha, end)(count))
        )
        self.assertAlmostEqual(
          fraction, alpha / 2 * (1 + math.cos(math.pi * count / end)), places=6
        )
        want = numpy_rigl(
          np.asarray(old),
          np.asarray(params["dense0"]["kernel"]),
          np.asarray(grads["dense0"]["kernel"]),
          fraction,
        )
        np.testing.assert_array_equal(new, want)
        # Genuinely new connections replace dropped ones one for one, at
        # most floor(f n) of them (a dropped weight may be regrown).
        grown = new & ~np.asarray(old)
        self.assertEqual(grown.sum(), (np.asarray(old) & ~new).sum())
        self.assertLessEqual(
          grown.sum(), int(np.floor(np.float32(fraction) * old.sum()))
        )
      elif count > 0:
        np.testing.assert_array_equal(new, np.asarray(old))
      params = optax.apply_updates(params, updates)
      # Grown weights start at zero; pruned ones are zero.
      kernel = np.asarray(params["dense0"]["kernel"])
      self.assertTrue(np.all(kernel[~new] == 0))
      if count > 0 and count % 2 == 0 and count < end:
        self.assertTrue(np.all(kernel[new & ~np.asarray(old)] == 0))

  def test_needs_sparsify(self):
    tx = optax.chain(optax.sgd(0.1), js.rigl(0.5))
    params = cf.make_params()
    with self.assertRaisesRegex(
      ValueError, r"rigl grows connections.*sparsify"
    ):
      tx.update(params, tx.init(params), params)

  def test_errors(self):
    # With the jaxtyping/beartype hook on, the annotation rejects it first.
    with self.assertRaisesRegex((ValueError, TypeError), "sparsity"):
      js.rigl(js.gmp(0.9, 0, 10))
    with self.assertRaisesRegex(ValueError, "keeps per-layer counts"):
      js.rigl(0.9, allocation=js.global_threshold())
    with self.assertRaisesRegex(ValueError, r"drop_fraction=1.5"):
      js.set_sparse(0.9, drop_fraction=1.5)


class SetTest(absltest.TestCase):
  def test_drops_smallest_and_regrows_randomly(self):
    tx = optax.chain(
      optax.sgd(0.0), js.set_sparse(0.5, drop_fraction=0.25, update_every=1)
    )
    params = {"w": jax.random.normal(jax.random.key(0), (32, 32))}
    state = tx.init(params)
    updates, state = tx.update(params, state, params)  # initial random mask
    params = optax.apply_updates(params, updates)
    old = np.asarray(js.masks(state)["w"])
    updates, state = tx.update(params, state, params)
    new = np.asarray(js.masks(state)["w"])
    w = np.abs(np.asarray(params["w"]))
    self.assertEqual(new.sum(), old.sum())
    # Every weight dropped (and not regrown) is among the floor(ζ n) smallest
    # active ones; as many new connections replace them.
    k = int(np.floor(np.float32(0.25) * np.float32(old.sum())))
    kth_smallest = np.sort(w[old])[k - 1]
    self.assertLessEqual(w[old & ~new].max(), kth_smallest)
    self.assertEqual((new & ~old).sum(), (old & ~new).sum())
    self.assertGreater((new & ~old).sum(), k // 2)


def numpy_topk(scores, k):
  """The k largest of a flat array; ties go to the lower index."""
  scores = np.asarray(scores, np.float32).ravel()
  order = np.lexsort((np.arange(scores.size), -scores))
  out = np.zeros(scores.size, bool)
  out[order[:k]] = True
  return out


def numpy_nm_rigl(mask, weights, grows, fraction, n, m):
  """Our N:M RigL/SET rule, groups along axis -2 of a 2-D layer.

  Drop floor(f n_active) smallest |w| across the layer; refill each group
  to n with its largest grow scores among the entries not kept.
  """
  active = int(mask.sum())
  dropped = int(np.floor(np.float32(fraction) * np.float32(active)))
  kept = numpy_topk(
    np.where(mask, np.abs(weights), -np.inf), active - dropped
  ).reshape(mask.shape)
  new = kept.copy()
  rows, cols = mask.shape
  for c in range(cols):
    for start in range(0, rows, m):
      group = slice(start, start + m)
      need = n - int(kept[group, c].sum())
      scores = np.where(kept[group, c], -np.inf, grows[group, c])
      new[group, c] |= numpy_topk(scores, need)
  return new


def numpy_units(x, rows, cols):
  r, c = x.shape
  return x.reshape(r // rows, rows, c // cols, cols).sum(axis=(1, 3))


class PatternedRewiringTest(parameterized.TestCase):
  def test_nm_hand_computed_4x2(self):
    # 2:4 along axis -2: each column is one group of 4, holding 2.
    mask = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
    weights = np.array(
      [[0.9, 0.0], [0.1, 0.0], [0.0, 0.2], [0.0, -0.8]], np.float32
    )
    grads = np.array(
      [[0.0, 0.7], [0.3, 0.1], [0.5, 0.6], [0.4, 0.0]], np.float32
    )
    # 4 active, f = 0.5: drop the 2 smallest |w| of the layer (0.1 in column
    # 0, 0.2 in column 1); refill each column to 2 by its largest |g| among
    # the others: column 0 grows row 2 (0.5), column 1 row 0 (0.7). Plain
    # RigL would grow 0.7 and 0.6, both in column 1, breaking 2:4.
    new = jax.jit(dynamic.pattern_drop_and_grow, static_argnums=0)(
      js.NM(2, 4),
      jnp.asarray(mask),
      jnp.abs(jnp.asarray(weights)),
      jnp.abs(jnp.asarray(grads)),
      0.5,
    )
    want = np.array([[1, 1], [0, 0], [1, 0], [0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(new), want)
    np.testing.assert_array_equal(
      want, numpy_nm_rigl(mask, weights, np.abs(grads), 0.5, 2, 4)
    )

  @parameterized.parameters((2, 4), (1, 4), (3, 8))
  def test_nm_matches_numpy_rule_random(self, n, m):
    pattern = js.NM(n, m)
    rewire = jax.jit(
      lambda mk, w, g: dynamic.pattern_drop_and_grow(
        pattern, mk, jnp.abs(w), jnp.abs(g), 0.4
      )
    )
    for seed in range(3):
      keys = jax.random.split(jax.random.key(seed), 3)
      mask = patterns.nm_select(
        pattern, jax.random.uniform(keys[0], (16, 6)), n
      )
      w = jax.random.normal(keys[1], (16, 6)) * mask
      g = jax.random.normal(keys[2], (16, 6))
      new = np.asarray(rewire(mask, w, g))
      self.assertTrue(patterns.follows(pattern, new))
      np.testing.assert_array_equal(
        new,
        numpy_nm_rigl(
          np.asarray(mask), np.asarray(w), np.abs(np.asarray(g)), 0.4, n, m
        ),
      )

  def test_block_rewires_whole_blocks_by_unit_sums(self):
    pattern = js.Block(2, 2)
    keys = jax.random.split(jax.random.key(0), 3)
    unit_mask = np.asarray(jax.random.bernoulli(keys[0], 0.5, (4, 3)))
    mask = np.repeat(np.repeat(unit_mask, 2, 0), 2, 1)
    w = np.asarray(jax.random.normal(keys[1], (8, 6))) * mask
    g = np.asarray(jax.random.normal(keys[2], (8, 6)))
    new = np.asarray(
      jax.jit(
        lambda mk, a, b: dynamic.pattern_drop_and_grow(pattern, mk, a, b, 0.5)
      )(jnp.asarray(mask), jnp.abs(w), jnp.abs(g))
    )
    self.assertTrue(patterns.follows(pattern, new))
    want_units = numpy_rigl(
      unit_mask,
      numpy_units(np.abs(w), 2, 2),
      numpy_units(np.abs(g), 2, 2),
      0.5,
    )
    np.testing.assert_array_equal(
      new, np.repeat(np.repeat(want_units, 2, 0), 2, 1)
    )

  # rigl_block and set_nm run through the conformance suite too.
  @parameterized.named_parameters(
    ("rigl_nm", "rigl", js.NM(2, 4)),
    ("set_channel", "set", js.Channel()),
  )
  def test_transform_keeps_pattern_after_every_rewiring(self, kind, pattern):
    make = dynamic.rigl if kind == "rigl" else dynamic.set_sparse
    sparsity = None if isinstance(pattern, js.NM) else 0.5
    method = make(
      sparsity,
      pattern=pattern,
      allocation=js.uniform(),
      drop_fraction=0.5,
      update_every=1,
    )
    tx = js.sparsify(optax.adam(1e-2), method)
    names = ("a", "b")
    keys = jax.random.split(jax.random.key(0), 2)
    params = {
      "a": {"kernel": jax.random.normal(keys[0], (8, 8))},
      "b": {"kernel": jax.random.normal(keys[1], (2, 4, 6))},
    }
    step = jax.jit(tx.update)
    state = tx.init(params)
    old = None
    for count in range(3):
      updates, state = step(cf.fake_grads(params, count), state, params)
      params = optax.apply_updates(params, updates)
      masks = js.masks(state)
      for name in names:
        new = np.asarray(masks[name]["kernel"])
        self.assertTrue(patterns.follows(pattern, new), (count, name))
        self.assertEqual(new.sum(), new.size // 2)
        kernel = np.asarray(params[name]["kernel"])
        self.assertTrue(np.all(kernel[~new] == 0))
        if old is not None:  # grown weights start at zero
          self.assertTrue(np.all(kernel[new & ~old[name]] == 0))
      old = {k: np.asarray(masks[k]["kernel"]) for k in names}
      if count > 0:
        self.assertTrue(bool(state.method.regrown))

  def test_pattern_errors(self):
    with self.assertRaisesRegex(ValueError, r"rigl: NM\(.*allocation"):
      dynamic.rigl(pattern=js.NM(2, 4), allocation=js.erk())
    with self.assertRaisesRegex(ValueError, r"set_sparse: sparsity=0.9.*NM"):
      dynamic.set_sparse(0.9, pattern=js.NM(2, 4))
    with self.assertRaisesRegex(ValueError, "rigl: pass a sparsity"):
      dynamic.rigl()
    # With the jaxtyping/beartype hook on, the annotation rejects it first.
    with self.assertRaisesRegex((ValueError, TypeError), "pattern"):
      dynamic.rigl(0.5, pattern="nm_2_4")
    tx = dynamic.rigl(0.5, pattern=js.Block(3, 3))
    with self.assertRaisesRegex(
      ValueError, r"rigl: conv/kernel.*not tiled by Block"
    ):
      tx.init(cf.make_params())


# -- SNFS ---------------------------------------------------------------------


def numpy_regrowth(removed, contributions, capacity):
  """SNFS's regrowth per layer, settled greedily one layer at a time."""
  removed = np.asarray(removed)
  total = int(removed.sum())
  c = np.asarray(contributions, np.float32)
  share = c / c.sum() if c.sum() > 0 else removed / max(total, 1)
  counts = np.minimum(np.round(total * share).astype(int), capacity)
  deficit = total - counts.sum()
  by_share = sorted(range(len(c)), key=lambda i: (-share[i], i))
  for i in by_share:  # shortfall: most momentum first, up to capacity
    add = min(max(deficit, 0), capacity[i] - counts[i])
    counts[i] += add
    deficit -= add
  for i in reversed(by_share):  # surplus: least momentum first
    take = min(max(-deficit, 0), counts[i])
    counts[i] -= take
    deficit += take
  assert deficit == 0
  return counts


def numpy_snfs(masks, weights, momenta, rate):
  """Sparse momentum (Dettmers & Zettlemoyer 2019, Algorithm 1)."""
  kept, removed, contributions, capacity = [], [], [], []
  for mask, w, m in zip(masks, weights, momenta):
    active = int(mask.sum())
    dropped = int(np.floor(np.float32(rate) * np.float32(active)))
    keep = numpy_topk(np.where(mask, np.abs(w), -np.inf), active - dropped)
    kept.append(keep.reshape(mask.shape))
    removed.append(dropped)
    contributions.append(np.abs(m)[mask].mean() if active else 0.0)
    capacity.append(mask.size - (active - dropped))
  grow = numpy_regrowth(removed, contributions, np.array(capacity))
  return [
    keep | numpy_topk(np.where(keep, -np.inf, np.abs(m)), r).reshape(keep.shape)
    for keep, m, r in zip(kept, momenta, grow)
  ]


class SNFSTest(parameterized.TestCase):
  @parameterized.named_parameters(
    # K = 4 split 3:1 by momentum.
    ("proportional", [2, 2], [3.0, 1.0], [4, 4], [3, 1]),
    # Layer 0 wants round(0.9 * 3) = 3 but has room for 2: the leftover goes
    # to layer 1.
    ("capped", [1, 2], [9.0, 1.0], [2, 6], [2, 1]),
    # round(1.5) + round(1.5) = 2 + 2 > K = 3: layer 1 (tied, later) gives
    # one back.
    ("rounding_surplus", [1, 2], [1.0, 1.0], [5, 5], [2, 1]),
    # K = 2 in thirds: round(2/3) = 1 each, 3 > 2; the last of the tied
    # layers gives one back.
    ("three_way", [1, 1, 0], [1.0, 1.0, 1.0], [5, 5, 5], [1, 1, 0]),
    # No momentum anywhere: each layer regrows what it removed.
    ("no_momentum", [3, 1], [0.0, 0.0], [4, 4], [3, 1]),
  )
  def test_regrowth_counts(self, removed, contributions, capacity, want):
    got = jax.jit(dynamic.regrowth_counts)(
      jnp.asarray(removed, jnp.int32),
      jnp.asarray(contributions, jnp.float32),
      jnp.asarray(capacity, jnp.int32),
    )
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
      want, numpy_regrowth(removed, contributions, np.array(capacity))
    )

  def test_regrowth_counts_random_matches_numpy(self):
    rng = np.random.default_rng(0)
    for _ in range(20):
      layers = int(rng.integers(1, 4))
      sizes = rng.integers(4, 40, layers)
      active = np.array([rng.integers(0, s + 1) for s in sizes])
      removed = np.array([rng.integers(0, a + 1) for a in active])
      capacity = sizes - (active - removed)
      contributions = rng.exponential(1.0, layers).astype(np.float32)
      contributions[rng.random(layers) < 0.2] = 0.0
      got = np.asarray(
        jax.jit(dynamic.regrowth_counts)(
          jnp.asarray(removed, jnp.int32),
          jnp.asarray(contributions),
          jnp.asarray(capacity, jnp.int32),
        )
      )
      self.assertEqual(got.sum(), removed.sum())
      self.assertTrue(np.all((got >= 0) & (got <= capacity)))
      np.testing.assert_array_equal(
        got, numpy_regrowth(removed, contributions, capacity)
      )

  def test_rewire_hand_computed(self):
    # Layer a (2x2): 3 active, p = 0.5 prunes floor(1.5) = 1 (|w| = 0.1).
    # Layer b (2x4): 4 active, prunes 2 (|w| = 0.2, 0.3). K = 3.
    # Mean |M| over active: a 0.9, b 0.1 -> a wants round(2.7) = 3 but has
    # 2 free entries: it regrows both, b regrows the leftover 1, at its
    # largest |M| among the entries not kept (0.5, a just-pruned one).
    mask_a = np.array([[1, 1], [1, 0]], bool)
    w_a = np.array([[0.5, -0.1], [0.7, 0.0]], np.float32)
    m_a = np.array([[0.9, 0.9], [0.9, 0.2]], np.float32)
    mask_b = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)
    w_b = np.array([[0.2, 0.8, 0, 0], [0.3, -0.9, 0, 0]], np.float32)
    m_b = np.array([[0.1, 0.1, 0.05, 0.0], [0.1, 0.1, 0.0, 0.02]], np.float32)
    new_a, new_b = jax.jit(dynamic.snfs_rewire)(
      [jnp.asarray(mask_a), jnp.asarray(mask_b)],
      [jnp.asarray(w_a), jnp.asarray(w_b)],
      [jnp.asarray(m_a), jnp.asarray(m_b)],
      0.5,
    )
    np.testing.assert_array_equal(np.asarray(new_a), np.ones((2, 2), bool))
    # b keeps 0.8 and -0.9; among the rest |M| is 0.1 (two just-pruned,
    # ties to the lower index), 0.05, 0.02, 0: the first 0.1 regrows.
    want_b = np.array([[1, 1, 0, 0], [0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(new_b), want_b)
    self.assertEqual(
      int(new_a.sum() + new_b.sum()), int(mask_a.sum() + mask_b.sum())
    )
    for got, want in zip(
      (new_a, new_b),
      numpy_snfs([mask_a, mask_b], [w_a, w_b], [m_a, m_b], 0.5),
    ):
      np.testing.assert_array_equal(np.asarray(got), want)

  def test_transform_follows_rule(self):
    beta, rate, end = 0.8, 0.5, 8
    tx = js.sparsify(
      optax.sgd(0.05),
      dynamic.snfs(
        0.75, prune_rate=rate, momentum=beta, update_every=2, end_step=end
      ),
    )
    step = jax.jit(tx.update)
    params = cf.make_params()
    state = tx.init(params)
    names = ("conv", "dense0", "dense1")
    ema = {k: np.zeros(params[k]["kernel"].shape, np.float32) for k in names}
    total = None
    for count in range(10):
      grads = cf.fake_grads(params, count)
      old = [np.asarray(js.masks(state)[k]["kernel"]) for k in names]
      updates, state = step(grads, state, params)
      new = [np.asarray(js.masks(state)[k]["kernel"]) for k in names]
      for k in names:
        ema[k] = np.float32(beta) * ema[k] + np.float32(1 - beta) * np.asarray(
          grads[k]["kernel"]
        )
        np.testing.assert_allclose(
          np.asarray(state.method.momentum[k]["kernel"]),
          ema[k],
          rtol=1e-5,
          atol=1e-7,
        )
      self.assertIsNone(state.method.momentum["embed"]["embedding"])
      if count == 0:
        total = sum(m.sum() for m in new)
        self.assertEqual(total, sum(m.size - round(0.75 * m.size) for m in new))
      elif count % 2 == 0 and count < end:
        p = float(dynamic.cosine_drop_fraction(rate, end)(count))
        want = numpy_snfs(
          old,
          [np.asarray(params[k]["kernel"]) for k in names],
          # The transform's own M (checked against the EMA above), so
          # float rounding cannot reorder near-ties.
          [np.asarray(state.method.momentum[k]["kernel"]) for k in names],
          p,
        )
        for got, w in zip(new, want):
          np.testing.assert_array_equal(got, w)
        self.assertTrue(bool(state.method.regrown))
      else:
        for got, o in zip(new, old):
          np.testing.assert_array_equal(got, o)
      self.assertEqual(sum(m.sum() for m in new), total)
      params = optax.apply_updates(params, updates)
      for k, m, o in zip(names, new, old):
        kernel = np.asarray(params[k]["kernel"])
        self.assertTrue(np.all(kernel[~m] == 0))
        if count > 0:  # grown weights start at zero
          self.assertTrue(np.all(kernel[m & ~o] == 0))

  def test_errors(self):
    tx = optax.chain(optax.sgd(0.1), dynamic.snfs(0.5))
    params = cf.make_params()
    with self.assertRaisesRegex(ValueError, r"snfs grows.*sparsify"):
      tx.update(params, tx.init(params), params)
    with self.assertRaisesRegex(ValueError, r"snfs: momentum=1.0"):
      dynamic.snfs(0.5, momentum=1.0)
    with self.assertRaisesRegex(ValueError, r"snfs: prune_rate=1.5"):
      dynamic.snfs(0.5, prune_rate=1.5)
    with self.assertRaisesRegex(ValueError, r"snfs: sparsity=1.0"):
      dynamic.snfs(1.0)
    with self.assertRaisesRegex((ValueError, TypeError), "sparsity"):
      dynamic.snfs(js.gmp(0.9, 0, 10))


# -- SRigL --------------------------------------------------------------------


def numpy_srigl(mask, weights, grads, fraction, k, gamma):
  """SRigL (Lasby et al 2024) for one [..., out] layer, neuron by neuron."""
  shape = mask.shape
  m = mask.reshape(-1, shape[-1]).T
  w = np.abs(weights).reshape(-1, shape[-1]).T
  g = np.abs(grads).reshape(-1, shape[-1]).T
  neurons, fan_in = m.shape
  f = np.float32(fraction)
  active = np.ones(neurons, bool)
  fan = k
  if gamma > 0:
    salient = numpy_rigl(mask, weights, grads, fraction)
    saliency = salient.reshape(-1, shape[-1]).T.sum(axis=1)
    budget = k * neurons
    needed = -(-budget // fan_in)
    order = sorted(range(neurons), key=lambda j: (-saliency[j], j))
    active = saliency >= np.float32(gamma) * np.float32(k)
    active[order[:needed]] = True
    fan = min(budget // active.sum(), fan_in)
  new = np.zeros_like(m)
  for j in range(neurons):
    if not active[j]:
      continue
    c = int(m[j].sum())
    keep = min(c - int(np.floor(f * np.float32(c))), fan)
    kept = numpy_topk(np.where(m[j], w[j], -np.inf), keep)
    grown = numpy_topk(np.where(kept, -np.inf, g[j]), fan - keep)
    new[j] = kept | grown
  return new.T.reshape(shape)


class SRigLTest(parameterized.TestCase):
  MASK = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], bool)

  def rewire(self, mask, w, g, fraction, k, gamma):
    return np.asarray(
      jax.jit(dynamic.constant_fan_in_rewire, static_argnums=5)(
        jnp.asarray(mask),
        jnp.asarray(w),
        jnp.abs(jnp.asarray(g)),
        fraction,
        k,
        gamma,
      )
    )

  def test_hand_computed_constant_fan_in(self):
    # 3 neurons (columns) of fan-in 4, k = 2; f = 0.5 drops 1 per neuron.
    w = np.array(
      [[0.9, 0, 0], [0.2, 0.5, 0], [0, -0.7, 0.3], [0, 0, -0.1]], np.float32
    )
    g = np.array(
      [[0, 0.4, 0.9], [0, 0, 0.2], [0.6, 0, 0], [0.8, 0.3, 0]], np.float32
    )
    # Neuron 0 drops 0.2, grows row 3 (0.8); neuron 1 drops 0.5, grows row 0
    # (0.4); neuron 2 drops -0.1, grows row 0 (0.9). Unstructured RigL would
    # give neuron 0 three weights.
    want = np.array([[1, 1, 1], [0, 0, 0], [0, 1, 1], [1, 0, 0]], bool)
    got = self.rewire(self.MASK, w, g, 0.5, 2, 0.0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
      want, numpy_srigl(self.MASK, w, g, 0.5, 2, 0.0)
    )

  def test_hand_computed_ablation(self):
    w = np.array(
      [[0.9, 0, 0], [0.8, 0.5, 0], [0, -0.7, 0.01], [0, 0, -0.02]], np.float32
    )
    g = np.array(
      [[0, 0.4, 0], [0, 0, 0], [0.6, 0, 0], [0.8, 0.3, 0]], np.float32
    )
    # RigL on the layer (6 active, drop 3): keeps 0.9, 0.8, -0.7, grows
    # 0.8, 0.6, 0.4: salient counts per neuron 4, 2, 0. With γ = 0.5 a
    # neuron needs γ k = 1: neuron 2 is ablated, and the budget 6 is shared
    # by 2 neurons, fan-in 3. Neuron 0 keeps 0.9 and grows rows 3, 2;
    # neuron 1 keeps -0.7 and grows rows 0, 3.
    want = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
    got = self.rewire(self.MASK, w, g, 0.5, 2, 0.5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
      want, numpy_srigl(self.MASK, w, g, 0.5, 2, 0.5)
    )
    # Without ablation every neuron keeps fan-in 2.
    plain = self.rewire(self.MASK, w, g, 0.5, 2, 0.0)
    np.testing.assert_array_equal(plain.sum(axis=0), [2, 2, 2])

  @parameterized.parameters(
    ((12, 5), 3, 0.0),
    ((2, 2, 3, 4), 4, 0.0),
    ((12, 5), 3, 0.9),
    ((12, 6), 2, 1.0),
  )
  def test_matches_numpy_rule_random(self, shape, k, gamma):
    rewire = jax.jit(
      lambda m, w, g: dynamic.constant_fan_in_rewire(
        m, w, jnp.abs(g), 0.5, k, gamma
      )
    )
    for seed in range(3):
      keys = jax.random.split(jax.random.key(seed), 3)
      flat = (int(np.prod(shape[:-1])), shape[-1])
      scores = jax.random.uniform(keys[0], flat)
      mask = np.asarray(
        numpy_rank_rows(np.asarray(scores).T, k).T.reshape(shape)
      )
      w = np.asarray(jax.random.normal(keys[1], shape)) * mask
      g = np.asarray(jax.random.normal(keys[2], shape))
      got = np.asarray(rewire(jnp.asarray(mask), w, g))
      np.testing.assert_array_equal(got, numpy_srigl(mask, w, g, 0.5, k, gamma))
      fan = got.reshape(-1, shape[-1]).sum(axis=0)
      alive = fan[fan > 0]
      self.assertLen(set(alive.tolist()), 1)  # constant fan-in
      self.assertLessEqual(got.sum(), mask.sum())

  def test_transform_constant_fan_in_and_rule(self):
    alpha, end = 0.5, 8
    tx = js.sparsify(
      optax.sgd(0.05),
      dynamic.srigl(
        0.75,
        drop_fraction=alpha,
        update_every=2,
        end_step=end,
        ablation_threshold=0.0,
      ),
    )
    step = jax.jit(tx.update)
    params = cf.make_params()
    state = tx.init(params)
    names = ("conv", "dense0", "dense1")
    for count in range(9):
      grads = cf.fake_grads(params, count)
      old = {k: np.asarray(js.masks(state)[k]["kernel"]) for k in names}
      updates, state = step(grads, state, params)
      for k in names:
        new = np.asarray(js.masks(state)[k]["kernel"])
        fan_in = new.reshape(-1, new.shape[-1]).sum(axis=0)
        want_k = new.size // new.shape[-1] // 4
        np.testing.assert_array_equal(fan_in, want_k)
        if count % 2 == 0 and 0 < count < end:
          f = float(dynamic.cosine_drop_fraction(alpha, end)(count))
          np.testing.assert_array_equal(
            new,
            numpy_srigl(
              old[k],
              np.asarray(params[k]["kernel"]),
              np.asarray(grads[k]["kernel"]),
              f,
              want_k,
              0.0,
            ),
          )
        elif count > 0:
          np.testing.assert_array_equal(new, old[k])
      params = optax.apply_updates(params, updates)
      for k in names:
        new = np.asarray(js.masks(state)[k]["kernel"])
        kernel = np.asarray(params[k]["kernel"])
        self.assertTrue(np.all(kernel[~new] == 0))
        if count > 0:
          self.assertTrue(np.all(kernel[new & ~old[k]] == 0))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"srigl: ablation_threshold=1.5"):
      dynamic.srigl(0.9, ablation_threshold=1.5)
    with self.assertRaisesRegex(ValueError, "srigl: rewiring keeps per-layer"):
      dynamic.srigl(0.9, allocation=js.global_threshold())
    tx = dynamic.srigl(0.5, where=lambda path, leaf: "dense0" in path)
    params = cf.make_params()
    with self.assertRaisesRegex(ValueError, r"srigl: dense0/bias.*fan-in"):
      tx.init(params)
    tx = optax.chain(optax.sgd(0.1), dynamic.srigl(0.5))
    with self.assertRaisesRegex(ValueError, r"srigl grows.*sparsify"):
      tx.update(params, tx.init(params), params)


def numpy_rank_rows(scores, k):
  """Rows keeping their k largest scores."""
  return np.stack([numpy_topk(row, k) for row in scores])


if __name__ == "__main__":
  absltest.main()
