r"""Packed 2:4 inference of a pruned character-level GPT, end to end.

Loads a GPT trained by :mod:`experiments.lm`, prunes every ``nn.Dense``
kernel inside its blocks to 2:4 with one-shot SparseGPT (as
:mod:`experiments.oneshot_lm` does: ``oneshot.prune(..., where=WHERE,
pattern=js.NM(2, 4))``, calibration segments from the TRAIN split), packs
the pruned kernels with :func:`jaxsparse.nn.pack` and runs the unchanged
model on them with :func:`jaxsparse.nn.apply`::

  python -m experiments.packed_lm --checkpoint_dir=/tmp/gpt_ckpt \
    --dtype bfloat16 --out experiments/results/packed_lm.md

Reported, for the trained float32 params (and, with ``--dtype bfloat16``,
for the params cast to bfloat16 and then packed):

* validation perplexity ``exp(mean next-char cross-entropy)`` of the dense
  model, the masked dense pruned model (``model.apply`` on the pruned
  params) and the packed model (``js.nn.apply``), and the largest
  ``|logit_packed - logit_masked|`` over the validation set: the packed
  model computes ``x @ where(M, W, 0) + b``, so the two must agree;
* bytes: the masked kernels and the whole params tree in memory (sum of
  the array leaves), packed against masked dense. 2:4 keeps ``n G N``
  values and ``n ceil(G/4) N`` ``uint8`` position words (``G = K/4``), so a
  kernel with ``K % 16 == 0`` packs to ``1/2 + 1/(8 itemsize)`` of its dense
  bytes: ``0.53125`` in float32, ``0.5625`` in bfloat16 (see
  :func:`packed_kernel_ratio`); and the orbax checkpoint bytes on disk, with
  orbax's default ``StandardCheckpointer`` (zstd) and uncompressed (the
  savers of ``benchmarks/packed_checkpoint.py``);
* the wall time of one jitted forward pass on ``eval_batch_size``
  validation segments, masked dense against packed (``impl="auto"``, per
  layer the fastest implementation of the nearest case measured on this
  platform in ``jaxsparse/kernels/tuned.json``; on a CPU both candidates,
  the plain-``jnp`` reference and ``"dense"``, decode the 2:4 weight and
  run one dense matmul, so packing saves memory there, not time).

``--quick`` trains the tiny ``:runlocal`` model in-process (for tests).
"""

import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import jaxsparse as js
import jaxsparse.nn as jsnn
from benchmarks import packed_checkpoint
from experiments import gpt, lm, oneshot_lm
from experiments.configs import shakespeare_gpt
from jaxsparse import oneshot

PATTERN = js.NM(2, 4)
NOTES_MARKER = oneshot_lm.NOTES_MARKER


def packed_kernel_ratio(pattern: js.NM, itemsize: int, k: int) -> float:
  """Packed / dense bytes of an N:M kernel ``[k, N]`` (any ``N``).

  ``(n G itemsize + n ceil(G / w) word_bytes) / (k itemsize)`` with
  ``G = k / m`` groups and ``w`` positions per index word
  (:func:`jaxsparse.kernels.packing.index_layout`); for 2:4 with
  ``k % 16 == 0``: ``1/2 + 1/(8 itemsize)``.
  """
  return js.kernels.packing.nm_dense_fraction(pattern, itemsize, k)


def calibration_batches(
  data: lm.CharData,
  block_size: int,
  segments: int,
  seed: int,
  batch: int = 32,
) -> list[jax.Array]:
  """``segments`` train segments (seed ``seed``) in batches of ``batch``."""
  x, _ = lm.segments(
    data.train, block_size, segments, np.random.default_rng(seed)
  )
  return [jnp.asarray(x[i : i + batch]) for i in range(0, len(x), batch)]


def prune_2_4(
  model: gpt.GPT, params: Any, calibration: list[jax.Array]
) -> oneshot.OneShotResult:
  """One-shot SparseGPT to 2:4 of every block's Dense kernels."""
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return oneshot.prune(
    apply_fn,
    params,
    calibration,
    oneshot.sparsegpt(),
    where=oneshot_lm.WHERE,
    pattern=PATTERN,
  )


def check_packed(packed: Any, params: Any, masks: Any) -> list[str]:
  """Paths of the packed kernels; raises unless every masked kernel is a
  2:4 :class:`~jaxsparse.kernels.PackedNM` that unpacks (bitwise) to
  ``where(mask, w, 0)`` and every other leaf is unchanged."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = jax.tree.leaves(packed, is_leaf=jsnn.is_packed)
  mask_leaves = js.masking.treedef_leaves(params, masks)
  unpacked = jax.tree.leaves(jax.jit(jsnn.unpack)(packed))
  paths = []
  for (key, w), leaf, m, u in zip(
    flat, leaves, mask_leaves, unpacked, strict=True
  ):
    path = js.masking.path_str(key)
    if m is None:
      if jsnn.is_packed(leaf) or not np.array_equal(leaf, w):
        raise AssertionError(f"{path}: has no mask but changed when packed")
      continue
    if not isinstance(leaf, js.kernels.PackedNM) or leaf.pattern != PATTERN:
      raise AssertionError(f"{path}: masked but not packed 2:4: {leaf!r}")
    dense = np.asarray(u)
    expected = np.where(np.asarray(m), np.asarray(w), 0)
    if not np.array_equal(dense, expected):
      raise AssertionError(f"{path}: unpacks to other values than w * mask")
    paths.append(path)
  return paths


def cast(params: Any, dtype: Any) -> Any:
  """Every floating leaf of ``params`` as ``dtype``."""
  return jax.tree.map(
    lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
    params,
  )


def _same(a: Any, b: Any) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def checkpoint_bytes(trees: dict[str, Any]) -> dict[str, dict[str, int]]:
  """``{format: {name: bytes on disk}}`` of each tree saved with orbax.

  Formats: ``"default"`` (``StandardCheckpointer``: OCDBT, zstd) and
  ``"uncompressed"`` (``PyTreeCheckpointHandler(use_compression=False)``),
  via ``benchmarks/packed_checkpoint.py``; each checkpoint is restored and
  compared bitwise with the saved tree.
  """
  savers = {
    "default": packed_checkpoint.save_default,
    "uncompressed": packed_checkpoint.save_raw,
  }
  out: dict[str, dict[str, int]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for fmt, save in savers.items():
      out[fmt] = {}
      for name, tree in trees.items():
        path = os.path.join(tmp, f"{fmt}_{name}")
        _, restored = save(path, tree, jax.eval_shape(lambda t=tree: t))
        if not _same(restored, tree):
          raise AssertionError(f"{fmt} checkpoint of {name}: restored differs")
        out[fmt][name] = packed_checkpoint.disk_bytes(path)
  return out


def evaluate_together(
  runs: dict[str, tuple[Callable, Any]],
  data: tuple[np.ndarray, np.ndarray],
  batch_size: int,
  against: str,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """Each ``fn(params, x)``'s loss and logit gap to ``runs[against]``.

  One jitted pass per batch runs every model (as :func:`lm.evaluate`:
  mean next-char cross-entropy, perplexity ``exp(loss)``).

  Returns:
    ``({name: {"val_loss", "val_perplexity"}}, {name: max |logits -
    logits of against|}``) (the gaps in float32, for ``name != against``).
  """
  x, y = data
  params = {name: p for name, (_, p) in runs.items()}

  @jax.jit
  def step(params, x, y):
    logits = {
      name: fn(params[name], x).astype(jnp.float32)
      for name, (fn, _) in runs.items()
    }
    losses = {n: lm.cross_entropy(v, y) * y.size for n, v in logits.items()}
    gaps = {
      n: jnp.max(jnp.abs(v - logits[against]))
      for n, v in logits.items()
      if n != against
    }
    return losses, gaps

  total = dict.fromkeys(runs, 0.0)
  gap = {name: 0.0 for name in runs if name != against}
  for i in range(0, len(x), batch_size):
    losses, gaps = step(params, x[i : i + batch_size], y[i : i + batch_size])
    for name in runs:
      total[name] += float(losses[name])
    for name in gap:
      gap[name] = max(gap[name], float(gaps[name]))
  metrics = {}
  for name, loss in total.items():
    loss /= y.size
    metrics[name] = {"val_loss": loss, "val_perplexity": float(np.exp(loss))}
  return metrics, gap


def time_forward(
  runs: dict[str, tuple[Callable, Any]], x: Any, repeats: int
) -> dict[str, float]:
  """Median seconds of each jitted ``fn(params, x)``, calls interleaved.

  Each function is compiled and run once before timing; the timed calls
  alternate between the functions so load changes hit all of them alike.
  """
  jitted = {name: (jax.jit(fn), p) for name, (fn, p) in runs.items()}
  for fn, p in jitted.values():
    jax.block_until_ready(fn(p, x))
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, (fn, p) in jitted.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(p, x))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def run_dtype(
  model: gpt.GPT,
  dense: Any,
  pruned: Any,
  masks: Any,
  val: tuple[np.ndarray, np.ndarray],
  batch_size: int,
  repeats: int,
  reference: Any = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Perplexities, logit gaps, bytes and forward times for one dtype.

  ``dense`` and ``pruned`` are already in the dtype; ``pruned`` is packed
  here with ``masks``. ``reference``: the float32 pruned params, to size
  the rounding of this dtype (``logit_gap_vs_reference``: the largest
  logit difference of the masked model in this dtype against float32).
  """
  dtype = jnp.dtype(jax.tree.leaves(pruned)[0].dtype)
  packed = jsnn.pack(pruned, masks, PATTERN)
  packed_paths = check_packed(packed, pruned, masks)
  dense_fn = lambda p, x: model.apply({"params": p}, x)
  packed_fn = lambda p, x: jsnn.apply(model, p, x, impl="auto")
  runs = {"masked": (dense_fn, pruned), "packed": (packed_fn, packed)}
  if reference is not None:
    runs["float32"] = (dense_fn, reference)
  ppl, gaps = evaluate_together(runs, val, batch_size, against="masked")
  ppl["dense"] = lm.evaluate(dense_fn, dense, val, batch_size)
  gap, rounding = gaps["packed"], gaps.get("float32")
  kernels = packed_checkpoint.kernel_bytes(pruned, masks, packed)
  itemsize = jnp.dtype(dtype).itemsize
  expected = sum(
    int(w.nbytes) * packed_kernel_ratio(PATTERN, itemsize, w.shape[0])
    for w, m in zip(
      jax.tree.leaves(pruned), js.masking.treedef_leaves(pruned, masks)
    )
    if m is not None
  )
  disk = checkpoint_bytes({"masked": pruned, "packed": packed})
  x = jnp.asarray(val[0][:batch_size])
  seconds = time_forward(
    {"masked": (dense_fn, pruned), "packed": (packed_fn, packed)},
    x,
    repeats,
  )
  impls = sorted(
    {
      js.kernels.ops.choose(leaf, (x.size, leaf.shape[0]), x_dtype=dtype)
      for leaf in jax.tree.leaves(packed, is_leaf=jsnn.is_packed)
      if jsnn.is_packed(leaf)
    }
  )
  result = {
    "dtype": str(dtype),
    "perplexity": {k: v["val_perplexity"] for k, v in ppl.items()},
    "loss": {k: v["val_loss"] for k, v in ppl.items()},
    "logit_gap": gap,
    "logit_gap_vs_reference": rounding,
    "packed_kernels": len(packed_paths),
    "kernel_bytes": {"masked": kernels[0], "packed": kernels[1]},
    "expected_packed_kernel_bytes": expected,
    "param_bytes": {
      "masked": packed_checkpoint.array_bytes(pruned),
      "packed": packed_checkpoint.array_bytes(packed),
    },
    "disk_bytes": disk,
    "forward_s": seconds,
    "forward_batch": tuple(x.shape),
    "impl": "/".join(impls),
  }
  log(
    f"{result['dtype']}: perplexity dense {ppl['dense']['val_perplexity']:.4f}"
    f", masked {ppl['masked']['val_perplexity']:.6f}, packed "
    f"{ppl['packed']['val_perplexity']:.6f}, max |logit gap| {gap:.2e} "
    f"(vs float32: {rounding}); "
    f"kernel bytes {kernels[1]}/{kernels[0]} = {kernels[1] / kernels[0]:.5f}"
    f"; forward {seconds['masked'] * 1e3:.1f} ms masked, "
    f"{seconds['packed'] * 1e3:.1f} ms packed ({result['impl']})"
  )
  return result


def run_study(
  model: gpt.GPT,
  params: Any,
  config: Any,
  data: lm.CharData,
  dtypes: list[str],
  calibration_segments: int = 128,
  seed: int = 0,
  repeats: int = 10,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Prunes ``params`` to 2:4 once (float32), then measures each dtype.

  Returns:
    ``{"prune": {"ok", "sparsity", "seconds"}, "rows": {dtype: ...}}``
    (rows as :func:`run_dtype` returns them); the bfloat16 row casts the
    dense and the pruned float32 params, then packs.
  """
  val = lm.eval_segments(data.val, config.block_size, config.eval_segments, 0)
  calibration = calibration_batches(
    data, config.block_size, calibration_segments, seed
  )
  start = time.perf_counter()
  result = prune_2_4(model, params, calibration)
  jax.block_until_ready(result.params)
  prune = oneshot_lm.check_pruned(
    params, result.params, result.masks, {"pattern": PATTERN}
  )
  prune["seconds"] = time.perf_counter() - start
  if not prune["ok"]:
    raise AssertionError("the pruned params do not follow 2:4")
  log(f"pruned to 2:4 in {prune['seconds']:.1f} s")
  rows = {}
  for name in dtypes:
    dtype = jnp.dtype(name)
    rows[name] = run_dtype(
      model,
      cast(params, dtype),
      cast(result.params, dtype),
      result.masks,
      val,
      config.eval_batch_size,
      repeats,
      reference=None if name == "float32" else result.params,
      log=log,
    )
  return {"prune": prune, "rows": rows}


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.4f}"


def format_markdown(
  study: dict[str, Any], header: dict[str, str], notes: str = ""
) -> str:
  """The results page: header, perplexity, bytes and time tables, notes."""
  rows = study["rows"]
  out = ["# Packed 2:4 inference of a pruned character-level GPT", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  out += [
    "",
    "## Validation perplexity (lower is better) and packed = masked check",
    "",
    "| params | dense | 2:4 masked dense (`model.apply`) | 2:4 packed "
    "(`js.nn.apply`) | max abs logit diff, packed vs masked | max abs "
    "logit diff, masked vs float32 masked |",
    "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name, r in rows.items():
    p = r["perplexity"]
    rounding = r["logit_gap_vs_reference"]
    out.append(
      f"| {name} | {p['dense']:.4f} | {p['masked']:.6f} | "
      f"{p['packed']:.6f} | {r['logit_gap']:.2e} | "
      f"{'-' if rounding is None else f'{rounding:.2e}'} |"
    )
  out += [
    "",
    "## Bytes, 2:4 masked dense vs packed",
    "",
    "Kernels: the pruned block kernels alone (packed: values + `uint8` "
    "position words; `expected` is `1/2 + 1/(8 itemsize)` of the dense "
    "bytes for 2:4 with K a multiple of 16). Whole params: every leaf of the "
    "params tree (embeddings, LayerNorms, biases and `lm_head` stay dense). "
    "On disk: the sum of the file sizes of an orbax checkpoint of the whole "
    "params (restored and compared bitwise).",
    "",
    "| params | what | masked dense | packed | packed / dense |",
    "| --- | --- | ---: | ---: | ---: |",
  ]
  for name, r in rows.items():
    kb, pb = r["kernel_bytes"], r["param_bytes"]
    expected = r["expected_packed_kernel_bytes"] / kb["masked"]
    out.append(
      f"| {name} | block kernels in memory ({r['packed_kernels']} packed; "
      f"expected {expected:.5f}) | {kb['masked']:,} | {kb['packed']:,} | "
      f"{kb['packed'] / kb['masked']:.5f} |"
    )
    out.append(
      f"| {name} | whole params in memory | {pb['masked']:,} | "
      f"{pb['packed']:,} | {_ratio(pb['packed'], pb['masked'])} |"
    )
    for fmt, label in (
      ("default", "orbax default (zstd) on disk"),
      ("uncompressed", "orbax uncompressed on disk"),
    ):
      d = r["disk_bytes"][fmt]
      out.append(
        f"| {name} | {label} | {d['masked']:,} | {d['packed']:,} | "
        f"{_ratio(d['packed'], d['masked'])} |"
      )
  out += [
    "",
    "## Forward pass time on CPU (jitted, median; no GPU here)",
    "",
    "| params | batch (segments x chars) | masked dense ms | packed ms "
    "(impl) | packed / masked |",
    "| --- | --- | ---: | ---: | ---: |",
  ]
  for name, r in rows.items():
    s = r["forward_s"]
    b = r["forward_batch"]
    out.append(
      f"| {name} | {b[0]} x {b[1]} | {s['masked'] * 1e3:.1f} | "
      f"{s['packed'] * 1e3:.1f} ({r['impl']}) | "
      f"{_ratio(s['packed'], s['masked'])} |"
    )
  out += ["", NOTES_MARKER, notes]
  return "\n".join(out).rstrip() + "\n"


def main_study(
  checkpoint_dir: str | None,
  out: str,
  quick: bool = False,
  dtype: str = "float32",
  calibration_segments: int = 128,
  seed: int = 0,
  repeats: int | None = None,
  data_path: str | None = None,
  command: str = "",
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Loads (or with ``quick`` trains) the model, runs the study, writes
  ``out`` (keeping any text below the notes marker).

  ``dtype``: ``"float32"`` measures the trained params; ``"bfloat16"``
  measures them and also the params cast to bfloat16.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: pass 'float32' or 'bfloat16'.")
  if quick:
    config = shakespeare_gpt.get_config("runlocal")
    if data_path:
      config.data_path = data_path
    trained = lm.train(config, log=lambda _: None)
    model, params = trained["model"], trained["params"]
    calibration_segments = min(calibration_segments, 16)
    repeats = repeats or 3
  else:
    if not checkpoint_dir:
      raise ValueError("pass --checkpoint_dir (or --quick).")
    model, params, _, config = lm.load_checkpoint(checkpoint_dir)
    if data_path:
      config.data_path = data_path
    repeats = repeats or 10
  data = lm.make_data(lm.load_text(config.data_path), config.val_fraction)
  dtypes = ["float32"] if dtype == "float32" else ["float32", "bfloat16"]
  start = time.perf_counter()
  study = run_study(
    model,
    params,
    config,
    data,
    dtypes,
    calibration_segments=calibration_segments,
    seed=seed,
    repeats=repeats,
    log=log,
  )
  m = config.model
  prune = study["prune"]
  header = {
    "command": f"`{command}`" if command else "(library call)",
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, shared), "
    f"no GPU; jax {jax.__version__}, device {jax.devices()[0].platform}",
    "model": f"GPT, {m.num_layers} blocks, width {m.width}, {m.num_heads} "
    f"heads, context {config.block_size}, vocab {len(data.vocab)}: "
    f"{gpt.num_params(params):,} params",
    "pruning": "one-shot SparseGPT to 2:4 (groups of 4 along the input "
    f"axis) of the {study['rows']['float32']['packed_kernels']} block "
    f"kernels `{oneshot_lm.WHERE}`, {calibration_segments} calibration "
    f"segments x {config.block_size} chars from the train split (seed "
    f"{seed}); sparsity {prune['sparsity']:.4f}, pattern "
    f"{'ok' if prune['ok'] else 'FAIL'}, {prune['seconds']:.0f} s",
    "packing": "`js.nn.pack(pruned, masks, js.NM(2, 4))`; every masked "
    "kernel checked to be a `PackedNM` that unpacks bitwise to the pruned "
    "kernel; bfloat16: the float32 params cast, then packed",
    "evaluation": f"{config.eval_segments} fixed validation segments x "
    f"{config.block_size} chars; perplexity = exp(mean cross-entropy)",
    "timing": f"median of {repeats} interleaved calls after one warm-up "
    "call each",
    "study wall time": f"{time.perf_counter() - start:.0f} s",
  }
  oneshot_lm.write_page(
    out, lambda notes: format_markdown(study, header, notes), log
  )
  return study


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  main_study(
    FLAGS.checkpoint_dir,
    FLAGS.out,
    quick=FLAGS.quick,
    dtype=FLAGS.dtype,
    calibration_segments=FLAGS.calibration_segments,
    seed=FLAGS.seed,
    repeats=FLAGS.repeats or None,
    data_path=FLAGS.data_path or None,
    command="python -m experiments.packed_lm " + " ".join(sys.argv[1:]),
    log=lambda s: print(s, flush=True),
  )


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint_dir", "", "Directory from experiments.lm.")
  flags.DEFINE_string(
    "out", "experiments/results/packed_lm.md", "Markdown file to write."
  )
  flags.DEFINE_bool("quick", False, "Tiny in-process model (for tests).")
  flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "float32: the trained params; bfloat16: also the params cast to it.",
  )
  flags.DEFINE_integer("calibration_segments", 128, "Calibration segments.")
  flags.DEFINE_integer("seed", 0, "Seed of the calibration draw.")
  flags.DEFINE_integer("repeats", 0, "Timed forward calls (0: 10, quick 3).")
  flags.DEFINE_string("data_path", "", "Override the checkpoint's text file.")
  app.run(main)
