"""Exact global top-k: jaxsparse's bisection against sorting a concatenation.

Command (from the repository root)::

  python -m benchmarks.global_threshold           # 1e6..1e8, then sharded
  python -m benchmarks.global_threshold --quick   # 1e4, 1e5 + sharded 1e5
  python -m benchmarks.global_threshold --sharded # the sharded part only

For each total size ``n`` (float32 scores split into 4 leaves) every method
marks the ``k = n - round(0.9 n)`` largest entries:

* ``bisection``: ``js.topk_masks(leaves, k)``, 32 counting passes on the
  float32 bit pattern, no concatenation;
* ``sort``: concatenate, ``jnp.sort``, take the ``k``-th largest value ``t``,
  mask ``leaf >= t``;
* ``top_k``: the same with ``jax.lax.top_k(flat, k)`` (static ``k``).

The scores are distinct (a bijective hash of the index written into the
float32 bit pattern), so a threshold selects exactly ``k`` entries and all
methods must return the same masks; the script checks both. (With ties at
``t``, ``leaf >= t`` would keep more than ``k``; the bisection breaks ties
and stays exact.) Times are medians over ``--repeats`` runs after a warm-up
run, methods interleaved; memory is XLA's own account,
``jax.jit(f).lower(...).compile().memory_analysis()``. A baseline whose time,
extrapolated as ``n log n`` from the previous size, would exceed
``--max-seconds`` is skipped and reported as such.

Sharded part (``--devices 8``, default): a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` shards every leaf's
rows 8 ways (``NamedSharding(mesh, P("x", None))``) and compares, per
device:

* ``sharded bisection``: ``js.topk_masks`` under ``jit`` on the sharded
  leaves; the masks come out sharded like the leaves and only scalar counts
  are all-reduced;
* ``gather + sort``: the sort baseline on the same sharded inputs, where
  ``jnp.sort`` of the concatenation forces an all-gather of every leaf.

Memory is ``memory_analysis()`` of the SPMD executable, which accounts one
device: temp + arguments per device. The script checks the collectives in
the compiled HLO (no all-gather for the bisection) and that both return the
same masks. The 8 virtual devices share the host's cores, so the times
measure total work, not a real 8-chip speed-up.
"""

import argparse
import datetime
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as js

_COLLECTIVE = r"(all-gather|all-reduce|all-to-all|collective-permute)"
_CHILD = "JAXSPARSE_BENCHMARK_SHARDED_CHILD"  # set in the re-run subprocess
_HASH = 0x9E3779B1  # odd, so i -> i * _HASH mod 2**27 is a bijection
_BITS = 27


def make_leaves(n: int, parts: int, rows_multiple: int = 1) -> list[jax.Array]:
  """``parts`` float32 leaves holding ``n`` distinct positive scores.

  Each leaf is ``(rows, cols)`` with ``rows`` a multiple of ``rows_multiple``
  (the number of shards of the rows).
  """
  m = n // parts
  options = [
    c
    for c in (1000, 625, 500, 250, 125, 100, 50, 25, 10, 5, 1)
    if m % c == 0 and (m // c) % rows_multiple == 0
  ]
  if n % parts or n > 2**_BITS or not options:
    raise ValueError(
      f"n={n} must divide into {parts} leaves of rows divisible by "
      f"{rows_multiple}, and be <= 2**27"
    )
  cols = options[0]

  @jax.jit
  def leaf(offset):
    i = jnp.arange(m, dtype=jnp.uint32) + offset
    mixed = (i * jnp.uint32(_HASH)) & jnp.uint32(2**_BITS - 1)
    bits = jnp.uint32(0x3C000000) + mixed  # floats in [2**-7, 2**9)
    scores = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return scores.reshape(m // cols, cols)

  return [leaf(jnp.uint32(j * m)) for j in range(parts)]


def bisection(leaves: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  return js.topk_masks(leaves, k)


def sort_threshold(leaves: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  flat = jnp.concatenate([leaf.ravel() for leaf in leaves])
  t = jnp.sort(flat)[flat.size - k]
  return [leaf >= t for leaf in leaves]


def top_k_threshold(k: int) -> Callable[[list[jax.Array]], list[jax.Array]]:
  def f(leaves):
    flat = jnp.concatenate([leaf.ravel() for leaf in leaves])
    t = jax.lax.top_k(flat, k)[0][-1]
    return [leaf >= t for leaf in leaves]

  return f


class Method:
  """A compiled method, its memory account and its timings."""

  def __init__(
    self,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    **jit_kwargs: Any,
  ):
    self.name = name
    self.args = args
    self.compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    self.collectives = sorted(
      set(re.findall(_COLLECTIVE, self.compiled.as_text()))
    )
    memory = self.compiled.memory_analysis()
    self.temp = memory.temp_size_in_bytes
    self.arg_bytes = memory.argument_size_in_bytes
    self.out_bytes = memory.output_size_in_bytes
    self.times: list[float] = []
    self.skipped = ""

  def run(self) -> tuple[list[jax.Array], float]:
    start = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.args))
    return out, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="sizes 1e4 and 1e5 (smoke test)"
  )
  parser.add_argument("--sizes", type=float, nargs="+", default=None)
  parser.add_argument("--leaves", type=int, default=4)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max-seconds", type=float, default=600.0)
  parser.add_argument(
    "--devices",
    type=int,
    default=8,
    help="virtual CPU devices of the sharded part (0 skips it)",
  )
  parser.add_argument(
    "--sharded",
    action="store_true",
    help="run only the sharded part (in this process if it has the devices)",
  )
  args = parser.parse_args()
  if args.sharded:
    if jax.device_count() >= args.devices:
      sharded_main(args)
    elif os.environ.get(_CHILD):
      raise SystemExit(
        f"--sharded needs {args.devices} devices, found {jax.devices()}; "
        "run on CPU (JAX_PLATFORMS=cpu)."
      )
    else:
      run_sharded_subprocess(args)
    return
  single_device_main(args)
  if args.devices:
    print()
    run_sharded_subprocess(args)


def run_sharded_subprocess(args: argparse.Namespace) -> None:
  """Re-runs this script with ``--sharded`` on ``args.devices`` CPU devices."""
  env = dict(os.environ, **{_CHILD: "1"})
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={args.devices}"
  ).strip()
  flags = [flag for flag in sys.argv[1:] if flag != "--sharded"]
  command = [sys.executable, "-m", "benchmarks.global_threshold", *flags]
  command.append("--sharded")
  subprocess.run(command, env=env, check=True)


def check_and_time(
  methods: list["Method"],
  n: int,
  k: int,
  previous: dict[str, tuple[int, float]],
  args: argparse.Namespace,
) -> dict[str, int]:
  """Skips baselines estimated past ``--max-seconds``; runs each live method
  once (warm-up and correctness: exactly ``k`` kept, masks equal to the
  first method's), then ``--repeats`` timed runs. Returns the kept counts."""
  for method in methods[1:]:
    if method.name in previous:
      n0, t0 = previous[method.name]
      estimate = t0 * n / n0 * math.log(n) / math.log(n0)
      if estimate > args.max_seconds:
        method.skipped = f"skipped: ~{estimate:.0f} s estimated"
  live = [m for m in methods if not m.skipped]
  reference = None
  counts = {}
  for method in live:
    out, _ = method.run()
    counts[method.name] = sum(int(np.asarray(o).sum()) for o in out)
    if counts[method.name] != k:
      raise AssertionError(f"{method.name}: {counts[method.name]} != k={k}")
    out = [np.asarray(o) for o in out]
    if reference is None:
      reference = out
    elif not all(
      np.array_equal(a, b) for a, b in zip(out, reference, strict=True)
    ):
      raise AssertionError(f"{method.name}: masks differ from bisection")
    del out
  for _ in range(args.repeats):
    for method in live:
      _, elapsed = method.run()
      method.times.append(elapsed)
  return counts


def single_device_main(args: argparse.Namespace) -> None:
  sizes = args.sizes or ([1e4, 1e5] if args.quick else [1e6, 1e7, 1e8])

  print(f"# exact global top-k threshold, {datetime.date.today()}")
  print(f"# jax {jax.__version__}, devices {jax.devices()}")
  print(
    f"# {args.leaves} float32 leaves, sparsity {args.sparsity} "
    f"(k = n - round(s n) kept), median of {args.repeats} runs after warm-up"
  )
  print()
  print(
    "| elements | method | median ms | time / bisection | temp MB "
    "| temp / input | args MB | outputs MB | selected |"
  )
  print("|" + " --- |" * 9)
  previous: dict[str, tuple[int, float]] = {}
  for size in sizes:
    n = int(size)
    k = n - round(args.sparsity * n)
    leaves = make_leaves(n, args.leaves)
    k_array = jnp.int32(k)
    methods = [
      Method("bisection (js.topk_masks)", bisection, (leaves, k_array)),
      Method("sort (jnp.sort)", sort_threshold, (leaves, k_array)),
      Method("top_k (lax.top_k)", top_k_threshold(k), (leaves,)),
    ]
    counts = check_and_time(methods, n, k, previous, args)

    base = statistics.median(methods[0].times)
    input_bytes = 4 * n
    for method in methods:
      if method.skipped:
        timing = f"{method.skipped} | -"
        selected = "-"
      else:
        median = statistics.median(method.times)
        previous[method.name] = (n, median)
        ms = 1e3 * median
        timing = f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"
        timing += f" | {median / base:.2f}x"
        selected = f"{counts[method.name]} (k={k})"
      print(
        f"| {n:.0e}".replace("e+0", "e")
        + f" | {method.name} | {timing} | {method.temp / 1e6:.4g} "
        f"| {method.temp / input_bytes:.2f} | {method.arg_bytes / 1e6:.4g} "
        f"| {method.out_bytes / 1e6:.4g} | {selected} |",
        flush=True,
      )
    del leaves, methods


def sharded_main(args: argparse.Namespace) -> None:
  """Bisection on sharded leaves against gather + sort, per device."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  devices = args.devices
  sizes = args.sizes or ([1e5] if args.quick else [1e6, 1e7, 1e8])
  # Auto axes: XLA inserts the gather that sorting a sharded axis needs.
  mesh = jax.make_mesh(
    (devices,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  sharding = NamedSharding(mesh, P("x", None))
  print(
    f"# sharded {devices}-way over rows (Auto mesh axes), "
    f"{datetime.date.today()}"
  )
  print(f"# jax {jax.__version__}, {len(jax.devices())} devices:")
  print(f"# {jax.devices()}")
  print(
    f"# {args.leaves} float32 leaves, sparsity {args.sparsity}, median of "
    f"{args.repeats} runs after warm-up; memory per device from "
    "memory_analysis() of the SPMD executable"
  )
  print()
  print(
    "| elements | method | median ms | time / bisection | temp MB/dev "
    "| args MB/dev | temp+args MB/dev | mem / bisection | collectives "
    "| selected |"
  )
  print("|" + " --- |" * 10)
  previous: dict[str, tuple[int, float]] = {}
  for size in sizes:
    n = int(size)
    k = n - round(args.sparsity * n)
    leaves = [
      jax.device_put(leaf, sharding)
      for leaf in make_leaves(n, args.leaves, rows_multiple=devices)
    ]
    k_array = jnp.int32(k)
    out_shardings = [sharding] * args.leaves
    methods = [
      Method(
        "sharded bisection (js.topk_masks)",
        bisection,
        (leaves, k_array),
        out_shardings=out_shardings,
      ),
      Method(
        "gather + sort (jnp.sort)",
        sort_threshold,
        (leaves, k_array),
        out_shardings=out_shardings,
      ),
    ]
    if "all-gather" in methods[0].collectives:
      raise AssertionError("the sharded bisection gathers")
    counts = check_and_time(methods, n, k, previous, args)
    base = statistics.median(methods[0].times)
    base_memory = methods[0].temp + methods[0].arg_bytes
    for method in methods:
      memory = method.temp + method.arg_bytes
      if method.skipped:
        timing = f"{method.skipped} | -"
        selected = "-"
      else:
        median = statistics.median(method.times)
        previous[method.name] = (n, median)
        ms = 1e3 * median
        timing = f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"
        timing += f" | {median / base:.2f}x"
        selected = f"{counts[method.name]} (k={k})"
      print(
        f"| {n:.0e}".replace("e+0", "e")
        + f" | {method.name} | {timing} | {method.temp / 1e6:.4g} "
        f"| {method.arg_bytes / 1e6:.4g} | {memory / 1e6:.4g} "
        f"| {memory / base_memory:.2f}x "
        f"| {', '.join(method.collectives) or 'none'} | {selected} |",
        flush=True,
      )
    del leaves, methods


if __name__ == "__main__":
  main()
