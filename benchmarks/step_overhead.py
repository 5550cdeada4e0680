"""Train-step overhead of jaxsparse pruning against the dense optax step.

Command (from the repository root)::

  python -m benchmarks.step_overhead           # full run, ~1 min on 2 cores
  python -m benchmarks.step_overhead --quick   # tiny smoke test, seconds

An MLP 784-1024-1024-10 (ReLU, plain ``jnp``) on a batch of 256 random inputs
and labels, softmax cross-entropy, ``optax.adam(1e-3)``. Every variant runs
the same jitted step (``value_and_grad`` + ``tx.update`` +
``optax.apply_updates``, params and optimizer state donated); only ``tx``
differs:

* ``dense``: ``optax.adam(1e-3)``, the baseline;
* ``magnitude, no update``: ``js.sparsify(adam, js.magnitude_pruning(
  js.gmp(0.9, 0, 1000), update_every=100))``, timing only the steps that keep
  the masks (``count % 100 != 0``);
* ``magnitude, update``: the same with ``update_every=1``, so every timed
  step recomputes the masks;
* ``global, no update`` / ``global, update``: the same two with
  ``js.global_magnitude_pruning`` (one exact top-k over all kernels).

Variants are interleaved in rounds (order rotated each round) so they share
the machine's noise; each step is timed on its own with
``jax.block_until_ready``. The table gives the median step time and its ratio
to the dense median, plus the median over rounds of the per-round ratio (more
robust to drift). Goals (DESIGN.md, Performance rules): no-update steps
<= 1.05x dense; update steps <= 3x dense. Ratios are printed, never asserted.

Two diagnostic columns explain CPU costs: minor page faults per step
(``getrusage``; XLA:CPU allocates its temp arena on every call, and glibc
serves blocks over 32 MiB with fresh ``mmap`` pages that fault on first touch)
and XLA's temp size from ``compiled.memory_analysis()``. The last column checks
the result: the achieved sparsity, after asserting that every pruned weight
is exactly 0.
"""

import argparse
import datetime
import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js


class Variant(NamedTuple):
  name: str
  tx: optax.GradientTransformation
  update_every: int | None  # None: dense; mask updates at count % n == 0
  time_updates: bool  # time the update steps (True) or the others (False)


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, Any]:
  """He-normal kernels ``[in, out]`` and zero biases, linen-style names."""
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, n_in, n_out) in enumerate(
    zip(keys, sizes[:-1], sizes[1:], strict=True)
  ):
    kernel = jax.random.normal(k, (n_in, n_out), jnp.float32)
    params[f"Dense_{i}"] = {
      "kernel": kernel * jnp.sqrt(2.0 / n_in),
      "bias": jnp.zeros((n_out,), jnp.float32),
    }
  return params


def mlp(params: dict[str, Any], x: jax.Array) -> jax.Array:
  n = len(params)
  for i in range(n):
    layer = params[f"Dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def make_variants() -> list[Variant]:
  adam = lambda: optax.adam(1e-3)
  schedule = js.gmp(0.9, 0, 1000)

  def magnitude(every):
    return js.sparsify(
      adam(), js.magnitude_pruning(schedule, update_every=every)
    )

  def global_(every):
    return js.sparsify(
      adam(), js.global_magnitude_pruning(schedule, update_every=every)
    )

  return [
    Variant("dense", adam(), None, False),  # (a)
    Variant("magnitude, no update", magnitude(100), 100, False),  # (b)
    Variant("magnitude, update", magnitude(1), 1, True),  # (c)
    Variant("global, no update", global_(100), 100, False),
    Variant("global, update", global_(1), 1, True),  # (d)
  ]


class Runner:
  """One variant's compiled step, live (donated) state and step count."""

  def __init__(self, variant: Variant, params: Any, x: Any, y: Any):
    self.variant = variant
    self.params = jax.tree.map(jnp.copy, params)
    self.state = variant.tx.init(self.params)
    self.x, self.y = x, y
    lowered = make_step(variant.tx).lower(self.params, self.state, x, y)
    self.step = lowered.compile()
    self.temp_bytes = self.step.memory_analysis().temp_size_in_bytes
    self.count = 0
    self.times: list[float] = []
    self.faults: list[int] = []  # minor page faults during each timed step

  def is_update(self) -> bool:
    every = self.variant.update_every
    return every is not None and self.count % every == 0

  def run(self, timed: bool) -> None:
    """One step; records it if ``timed`` and the step is of the timed kind."""
    wanted = self.is_update() == self.variant.time_updates
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    self.params, self.state, loss = self.step(
      self.params, self.state, self.x, self.y
    )
    jax.block_until_ready((self.params, self.state, loss))
    elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    self.count += 1
    if timed and wanted:
      self.times.append(elapsed)
      self.faults.append(faults)

  def run_timed(self, n: int) -> None:
    """Steps until ``n`` more wanted steps were timed (others run untimed)."""
    target = len(self.times) + n
    while len(self.times) < target:
      self.run(timed=True)


def check_sparsity(runner: Runner) -> float:
  """Fraction of zeros in the masked kernels; checks pruned weights are 0."""
  if runner.variant.update_every is None:
    return float("nan")
  masks = js.masks(runner.state)
  pairs = [
    (np.asarray(p), np.asarray(m))
    for p, m in zip(
      jax.tree.leaves(runner.params),
      jax.tree.leaves(masks, is_leaf=lambda m: m is None),
      strict=True,
    )
    if m is not None
  ]
  for p, m in pairs:
    if np.any(p[~m] != 0):
      raise AssertionError(f"{runner.variant.name}: a pruned weight is not 0")
  kept = sum(int(m.sum()) for _, m in pairs)
  return 1 - kept / sum(m.size for _, m in pairs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny model, few steps (smoke test)"
  )
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="per round")
  args = parser.parse_args()

  if args.quick:
    sizes, batch, rounds, steps = (784, 64, 64, 10), 32, 2, 3
  else:
    sizes, batch, rounds, steps = (784, 1024, 1024, 10), 256, 20, 4
  rounds = args.rounds or rounds
  steps = args.steps or steps

  key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
  params = init_mlp(key_p, sizes)
  x = jax.random.normal(key_x, (batch, sizes[0]), jnp.float32)
  y = jax.random.randint(key_y, (batch,), 0, sizes[-1])

  print(f"# jaxsparse step overhead, {datetime.date.today()}")
  print(f"# jax {jax.__version__}, devices {jax.devices()}")
  print(
    f"# MLP {'-'.join(map(str, sizes))}, batch {batch}, adam(1e-3); "
    f"{rounds} rounds x {steps} timed steps per variant"
  )
  runners = [Runner(v, params, x, y) for v in make_variants()]
  for r in runners:  # warm up (step 0 is an update step for every method)
    r.run(timed=False)
    r.run(timed=False)

  per_round: list[list[float]] = [[] for _ in runners]
  for i in range(rounds):
    gc.collect()
    order = list(range(len(runners)))
    order = order[i % len(order) :] + order[: i % len(order)]
    for j in order:
      before = len(runners[j].times)
      runners[j].run_timed(steps)
      per_round[j].append(statistics.median(runners[j].times[before:]))

  dense_median = statistics.median(runners[0].times)
  print()
  print(
    "| variant | timed steps | median ms | ratio vs dense "
    "| per-round ratio (median) | minor page faults / step "
    "| XLA temp MB | sparsity at end |"
  )
  print("|" + " --- |" * 8)
  ratios = {}
  for j, r in enumerate(runners):
    median = statistics.median(r.times)
    ratios[r.variant.name] = median / dense_median
    round_ratio = statistics.median(
      np.asarray(per_round[j]) / np.asarray(per_round[0])
    )
    print(
      f"| {r.variant.name} | {len(r.times)} | {1e3 * median:.2f} "
      f"| {median / dense_median:.3f}x | {round_ratio:.3f}x "
      f"| {statistics.median(r.faults):.0f} | {r.temp_bytes / 1e6:.1f} "
      f"| {check_sparsity(r):.3f} |"
    )
  print()
  if args.quick:
    print("# --quick: a smoke test; the goals apply to the full run only")
    return
  for family in ("magnitude", "global"):
    b = ratios[f"{family}, no update"]
    c = ratios[f"{family}, update"]
    print(
      f"# {family}: no update {b:.3f}x (goal <= 1.05x: "
      f"{'met' if b <= 1.05 else 'missed'}); update {c:.3f}x (goal <= 3x: "
      f"{'met' if c <= 3 else 'missed'}); amortised over update_every=100: "
      f"{(99 * b + c) / 100:.3f}x"
    )


if __name__ == "__main__":
  main()
