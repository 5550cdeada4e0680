"""Structured-sparse matmuls against dense ``jnp.dot`` in the same process.

Command (from the repository root)::

  python -m benchmarks.kernels                  # the issue's grid
  python -m benchmarks.kernels --quick          # tiny smoke run (CI)
  python -m benchmarks.kernels --write_table    # also record the winners
                                                # for impl="auto"

For each weight ``W: [K, K]`` (``--sizes``), batch ``B`` (``--batches``) and
sparsity (``2:4``; blocks of 64 and 128 at 10%, 25%, 50% density: every
block column keeps exactly ``round(density * K / rows)`` blocks at random
rows) the script times, after a warm-up call, the median of ``--repeats``
calls of each implementation, interleaved:

* ``jnp.dot``: the baseline, ``x @ W`` with ``W`` stored dense;
* ``pallas``: the Pallas kernel (GPU/TPU only; absent on CPU, where Pallas
  would only run in interpret mode);
* ``reference``: the plain-``jnp`` op from the packed arrays;
* ``dense``: unpack ``W`` then ``jnp.dot``.

It prints ``baseline time / implementation time`` (above 1 is faster than
dense) and the packed/dense bytes, after checking every implementation's
output against the baseline on the masked weight. ``--write_table`` writes
every case's times into ``jaxsparse/kernels/tuned.json`` under this
platform, which is what ``impl="auto"`` reads. A second table then shows
what the dispatcher does with the table in force (the one just written, or
the shipped one): ``choose`` (the implementation ``impl="auto"`` runs on a
packed weight), ``packing_pays`` (whether ``js.nn.pack(..., for_batch=B)``
packs the layer or keeps it dense), and the resulting speed against dense
under this run's timings; its last line is the slowest case, i.e. whether
anything ends up slower than dense.
"""

import argparse
import datetime
import json
import math
import pathlib
import platform as host_platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as js
from jaxsparse import kernels
from jaxsparse.kernels import ops

TABLE = pathlib.Path(ops.__file__).with_name("tuned.json")


def random_nm(rng: np.random.Generator, k: int, dtype) -> tuple[Any, Any]:
  """A 2:4 weight (largest 2 of |w| per group of 4 along K) and its pack."""
  w = rng.standard_normal((k, k)).astype(np.float32)
  mask = np.asarray(js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5))
  w = jnp.asarray(np.where(mask, w, 0), dtype)
  return w, kernels.pack_nm(w, js.NM(2, 4), mask=mask)


def random_block(
  rng: np.random.Generator, k: int, block: int, density: float, dtype
) -> tuple[Any, Any]:
  """Every block column keeps ``round(density * k / block)`` random blocks."""
  nblocks = k // block
  keep = max(1, round(density * nblocks))
  chosen = np.zeros((nblocks, nblocks), bool)
  for c in range(nblocks):
    chosen[rng.choice(nblocks, keep, replace=False), c] = True
  full = np.repeat(np.repeat(chosen, block, 0), block, 1)
  w = rng.standard_normal((k, k)).astype(np.float32)
  w = jnp.asarray(np.where(full, w, 0), dtype)
  return w, kernels.pack_block(w, js.Block(block, block), max_blocks=keep)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def implementations(platform: str, packed: Any, x: Any) -> dict[str, Any]:
  """The jitted candidates for this case (``pallas`` only where it runs)."""
  op = ops.sparse_matmul
  impls = {
    "reference": jax.jit(lambda x, p: op(x, p, impl="reference")),
    "dense": jax.jit(lambda x, p: op(x, p, impl="dense")),
  }
  reason = ops._unsupported(packed, x.shape, platform, x.dtype)
  if platform != "cpu" and reason is None:
    impls["pallas"] = jax.jit(lambda x, p: op(x, p, impl="pallas"))
  return impls


def run_case(
  name: str, w: Any, packed: Any, x: Any, repeats: int, platform: str
) -> dict[str, Any]:
  baseline = jax.jit(
    lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(
      x.dtype
    )
  )
  want = np.asarray(baseline(x, w), np.float32)
  impls = implementations(platform, packed, x)
  scale = float(np.abs(want).max()) + 1e-6
  tol = 2e-2 if x.dtype == jnp.bfloat16 else 1e-4
  for label, fn in impls.items():
    got = np.asarray(fn(x, packed), np.float32)
    err = float(np.abs(got - want).max()) / scale
    if err > tol:
      raise AssertionError(f"{name}: {label} differs from jnp.dot by {err}")
  seconds: dict[str, list[float]] = {k: [] for k in ["jnp.dot", *impls]}
  for _ in range(3):  # interleave: three rounds of every implementation
    seconds["jnp.dot"].append(median_seconds(lambda: baseline(x, w), repeats))
    for label, fn in impls.items():
      seconds[label].append(
        median_seconds(lambda fn=fn: fn(x, packed), repeats)
      )
  times = {k: statistics.median(v) for k, v in seconds.items()}
  candidates = [k for k in ("pallas", "reference", "dense") if k in times]
  return dict(
    times=times,
    best=min(candidates, key=times.get),
    bytes=kernels.packed_nbytes(packed) / (w.size * w.dtype.itemsize),
  )


def cases(args: argparse.Namespace):
  if args.quick:
    yield "2:4", None, None
    yield "block16 25%", 16, 0.25
    return
  yield "2:4", None, None
  for block in (64, 128):
    for density in (0.1, 0.25, 0.5):
      yield f"block{block} {round(density * 100)}%", block, density


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sizes", default="4096,8192")
  parser.add_argument("--batches", default="1,8,64,512,4096")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--write_table", action="store_true")
  args = parser.parse_args()
  sizes = [256] if args.quick else [int(s) for s in args.sizes.split(",")]
  batches = [1, 16] if args.quick else [int(b) for b in args.batches.split(",")]
  dtype = jnp.dtype(args.dtype)
  platform = ops._platform(None)
  device = jax.devices()[0]
  print(
    f"# {datetime.date.today()} {platform} ({device.device_kind}), jax "
    f"{jax.__version__}, {host_platform.machine()}; dtype {dtype.name}; "
    "ratio = jnp.dot time / implementation time (>1: faster than dense)"
  )
  print(
    "| W | batch | sparsity | packed/dense bytes | jnp.dot ms | pallas | "
    "reference | dense |"
  )
  print("|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  entries = []
  cases_run = []
  for k in sizes:
    for label, block, density in cases(args):
      if block is None:
        w, packed = random_nm(rng, k, dtype)
      else:
        w, packed = random_block(rng, k, block, density, dtype)
      for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, k)), dtype)
        result = run_case(label, w, packed, x, args.repeats, platform)
        times = result["times"]

        def ratio(key, times=times):
          if key not in times:
            return "-"
          return f"{times['jnp.dot'] / times[key]:.2f}x"

        print(
          f"| {k}x{k} | {batch} | {label} | {result['bytes']:.3f} | "
          f"{times['jnp.dot'] * 1e3:.3f} | {ratio('pallas')} | "
          f"{ratio('reference')} | {ratio('dense')} |",
          flush=True,
        )
        cases_run.append((k, batch, label, packed, x.dtype, times))
        entries.append(
          dict(
            op="nm" if block is None else "block",
            pattern=ops.pattern_key(packed),
            k=k,
            n=k,
            batch=batch,
            density=ops.static_density(packed),
            dtype=dtype.name,
            seconds={key: round(v, 7) for key, v in times.items()},
            best=result["best"],
          )
        )
  if args.write_table:
    tables = json.loads(TABLE.read_text())
    tables[platform] = dict(
      device_kind=device.device_kind,
      date=str(datetime.date.today()),
      jax=jax.__version__,
      command="python -m benchmarks.kernels "
      + " ".join(
        f"--{k}={v}" for k, v in vars(args).items() if v not in (None, False)
      ),
      entries=entries,
    )
    TABLE.write_text(json.dumps(tables, indent=1) + "\n")
    print(f"wrote {len(entries)} {platform} cases to {TABLE}")
    ops._tables.cache_clear()
  dispatcher_table(cases_run, platform)


def dispatcher_table(cases_run: list[Any], platform: str) -> None:
  """What ``impl="auto"`` and ``nn.pack(for_batch=)`` do with the table in
  force, timed with this run's measurements (ratios vs ``jnp.dot``)."""
  source = "measured now" if ops.measured(platform) else "no table: defaults"
  print(f"\n# dispatcher on {platform} ({source})")
  print(
    "| W | batch | sparsity | auto runs | auto vs jnp.dot | packing pays | "
    "nn.pack(for_batch) vs jnp.dot |"
  )
  print("|---|---|---|---|---|---|---|")
  slowest = (math.inf, None)
  for k, batch, label, packed, dtype, times in cases_run:
    x_shape = (batch, k)
    picked = ops.choose(packed, x_shape, platform, dtype)
    pays = ops.packing_pays(packed, x_shape, platform, dtype)
    auto = times["jnp.dot"] / times[picked]
    layer = auto if pays else 1.0
    slowest = min(slowest, (layer, f"{k}x{k} batch {batch} {label}"))
    print(
      f"| {k}x{k} | {batch} | {label} | {picked} | {auto:.2f}x | "
      f"{'yes' if pays else 'no (kept dense)'} | {layer:.2f}x |"
    )
  print(
    f"slowest nn.pack(for_batch) layer vs dense: {slowest[0]:.2f}x "
    f"({slowest[1]})"
  )


if __name__ == "__main__":
  main()
