"""Memory of one-shot calibration: streaming statistics vs held activations.

Command (from the repository root)::

  python -m benchmarks.oneshot_memory            # the shakespeare GPT shapes
  python -m benchmarks.oneshot_memory --full     # nanoGPT's ~10M shapes
  python -m benchmarks.oneshot_memory --quick    # tiny shapes, seconds

:func:`jaxsparse.oneshot.prune` gathers each block's input statistics with
one jitted forward pass per calibration batch and keeps only float32 sums
(``sq_sum: [in]``; SparseGPT also ``gram = XᵀX: [in, in]``), one block at a
time. The naive alternative runs the whole calibration set once and keeps
the inputs ``X: [tokens, in]`` of every Dense layer of every block.

Both are compiled for the GPT of ``experiments/configs/shakespeare_gpt.py``
(random params; memory depends only on shapes) and measured with XLA's
``compiled.memory_analysis()`` (arguments + outputs + temporaries of one
call); nothing is executed. The streaming peak is the largest, over blocks,
of one batch's call plus the running sums held between batches; the naive
peak is one call over all segments. Byte accounting of what each approach
must keep (statistics vs activations) is printed beside it, and the ratio
naive / streaming.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import lm
from experiments.configs import shakespeare_gpt
from jaxsparse import oneshot

MIB = 2**20


def _bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  )


def held_activations_fn(apply_fn, paths):
  """``(params, x) -> {path: inputs}``: every selected layer's inputs."""
  wanted = frozenset(paths)

  def run(params, x):
    held = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense) and (
        context.method_name == "__call__"
      ):
        path = "/".join(context.module.path) + "/kernel"
        if path in wanted:
          held[path] = args[0].reshape(-1, args[0].shape[-1])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(params, x)
    if set(held) != wanted:
      raise ValueError(f"captured {sorted(held)}, wanted {sorted(wanted)}.")
    return held

  return jax.jit(run)


def measure(config, segments: int, batch: int, gram: bool) -> dict:
  """Peak bytes of both approaches for ``segments`` calibration segments."""
  model = lm.make_model(config, 65)
  x_all = jax.ShapeDtypeStruct((segments, config.block_size), jnp.int32)
  x_one = jax.ShapeDtypeStruct((batch, config.block_size), jnp.int32)
  params = jax.eval_shape(
    lambda t: model.init(jax.random.key(0), t)["params"], x_one
  )
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  layers = oneshot.layers(apply_fn, params, jnp.zeros(x_one.shape, x_one.dtype))
  blocks: dict[str, list] = {}
  for layer in layers:
    if layer.path.startswith("Block_"):
      blocks.setdefault(oneshot.block_of(layer.path), []).append(layer)
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))

  streaming = 0
  stats_bytes = 0
  for members in blocks.values():
    paths = [layer.path for layer in members]
    step = oneshot.capture.statistics_fn(apply_fn, params, paths, gram=gram)
    compiled = step.lower(params, x_one).compile()
    sums = sum(
      4 * (1 + 2 * d + (d * d if gram else 0))
      for d in (layer.shape[0] for layer in members)
    )
    # One call, plus the running sums it is added to.
    streaming = max(streaming, _bytes(compiled) + sums)
    stats_bytes = max(stats_bytes, sums)

  all_paths = [layer.path for m in blocks.values() for layer in m]
  naive = _bytes(
    held_activations_fn(apply_fn, all_paths).lower(params, x_all).compile()
  )
  tokens = segments * config.block_size
  act_bytes = sum(
    4 * tokens * layer.shape[0] for m in blocks.values() for layer in m
  )
  return {
    "params": param_bytes,
    "streaming": streaming,
    "naive": naive,
    "stats": stats_bytes,
    "activations": act_bytes,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes")
  parser.add_argument("--full", action="store_true", help="nanoGPT ~10M")
  parser.add_argument("--segments", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  arg = "runlocal" if args.quick else "full" if args.full else None
  config = shakespeare_gpt.get_config(arg)
  segments = 16 if args.quick else args.segments
  batch = min(args.batch, segments)
  m = config.model
  print(
    f"GPT {m.num_layers} blocks, width {m.width}, context "
    f"{config.block_size}; calibration {segments} segments "
    f"({segments * config.block_size:,} tokens), batches of {batch}; "
    f"device {jax.devices()[0].platform}"
  )
  header = (
    f"{'method statistics':<22} {'streaming MiB':>14} {'naive MiB':>10} "
    f"{'ratio':>7} {'kept: sums MiB':>15} {'kept: acts MiB':>15}"
  )
  print(header)
  print("-" * len(header))
  for name, gram in (("sq_sum (Wanda)", False), ("gram (SparseGPT)", True)):
    r = measure(config, segments, batch, gram)
    print(
      f"{name:<22} {r['streaming'] / MIB:>14.2f} {r['naive'] / MIB:>10.2f} "
      f"{r['naive'] / r['streaming']:>6.1f}x {r['stats'] / MIB:>15.3f} "
      f"{r['activations'] / MIB:>15.2f}"
    )
  print(
    "streaming: max over blocks of one batch's jitted statistics call "
    "(arguments incl. params + outputs + temporaries) plus its running "
    "sums; naive: one call over all segments returning every block layer's "
    "inputs. Both from compiled.memory_analysis()."
  )


if __name__ == "__main__":
  main()
