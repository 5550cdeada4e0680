r"""One-shot pruning study of a character-level GPT (perplexity table).

Loads a GPT trained by :mod:`experiments.lm`, prunes every ``nn.Dense``
kernel inside its blocks (``Block_i/attn/{qkv,proj}``,
``Block_i/mlp/{fc,out}``) with :func:`jaxsparse.oneshot.prune` (embeddings,
position embeddings and ``lm_head`` stay dense, as in Wanda and SparseGPT),
and reports the validation perplexity ``exp(mean next-char cross-entropy)``
for each method and sparsity setting::

  python -m experiments.oneshot_lm --checkpoint_dir=/tmp/gpt_ckpt \
    --out experiments/results/oneshot_lm.md

Calibration: ``--calibration_segments`` (128) segments of ``block_size``
characters drawn from the TRAIN split with ``--seed``. Evaluation: the
trainer's fixed validation segments (``config.eval_segments``), so the dense
row equals the trainer's final perplexity. ``--quick`` trains the tiny
``:runlocal`` model in-process and runs one setting (for tests).
"""

import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import jaxsparse as js
from experiments import gpt, lm
from experiments.configs import shakespeare_gpt
from jaxsparse import oneshot

WHERE = r"^Block_\d+/.*/kernel$"
NOTES_MARKER = "<!-- notes -->"


def methods() -> dict[str, Callable[[], Any] | None]:
  """Method name -> factory (``None`` where the library lacks it)."""
  dsnot = getattr(oneshot, "dsnot", None)
  return {
    "magnitude": oneshot.magnitude,
    "wanda": oneshot.wanda,
    "sparsegpt": oneshot.sparsegpt,
    "wanda+dsnot": (None if dsnot is None else lambda: dsnot(oneshot.wanda())),
    "sparsegpt+dsnot": (
      None if dsnot is None else lambda: dsnot(oneshot.sparsegpt())
    ),
  }


SETTINGS = {
  "50%": {"sparsity": 0.5},
  "60%": {"sparsity": 0.6},
  "70%": {"sparsity": 0.7},
  "2:4": {"pattern": js.NM(2, 4)},
  "4:8": {"pattern": js.NM(4, 8)},
}


def expected_sparsity(setting: dict) -> float:
  """The fraction of zeros a setting asks for."""
  if "pattern" in setting:
    p = setting["pattern"]
    return 1 - p.n / p.m
  return setting["sparsity"]


def check_pruned(
  dense: Any, pruned: Any, masks: Any, setting: dict
) -> dict[str, Any]:
  """Achieved sparsity over the selected kernels and a pattern check.

  Returns ``{"sparsity": zeros / size over the pruned kernels (exact zeros
  of the params), "mask_sparsity": same from the masks, "ok": bool}``;
  ``ok`` requires exact zeros wherever the mask is ``False``, every other
  param unchanged, and for N:M every group of ``m`` inputs (axis -2) to
  keep exactly ``n`` weights.
  """
  chosen = jax.tree.leaves(js.resolve_where(WHERE, dense, "oneshot_lm"))
  d = jax.tree.leaves(dense)
  p = jax.tree.leaves(pruned)
  m = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
  zeros = size = kept = 0
  ok = True
  for c, a, b, mask in zip(chosen, d, p, m, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if not c:
      ok &= mask is None and np.array_equal(a, b)
      continue
    mask = np.asarray(mask)
    zeros += int(np.sum(b == 0))
    size += b.size
    kept += int(mask.sum())
    ok &= bool(np.all(b[~mask] == 0))
    if "pattern" in setting:
      n, m_ = setting["pattern"].n, setting["pattern"].m
      groups = mask.reshape(-1, m_, mask.shape[-1]).sum(axis=1)
      ok &= bool(np.all(groups == n))
  return {
    "sparsity": zeros / size,
    "mask_sparsity": 1 - kept / size,
    "ok": ok,
  }


def run_study(
  model: gpt.GPT,
  params: Any,
  config: Any,
  data: lm.CharData,
  method_names: list[str],
  setting_names: list[str],
  calibration_segments: int = 128,
  calibration_batch: int = 32,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Prunes ``params`` with each method and setting; evaluates each.

  Returns:
    ``{"dense": metrics, "rows": {method: {setting: {...}}}}``; each cell
    holds ``val_loss``, ``val_perplexity``, ``sparsity``, ``mask_sparsity``,
    ``ok`` and ``prune_s`` (wall time of :func:`oneshot.prune`), or
    ``{"missing": True}`` where the library lacks the method.
  """
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  val = lm.eval_segments(data.val, config.block_size, config.eval_segments, 0)
  x, _ = lm.segments(
    data.train,
    config.block_size,
    calibration_segments,
    np.random.default_rng(seed),
  )
  calibration = [
    jnp.asarray(x[i : i + calibration_batch])
    for i in range(0, len(x), calibration_batch)
  ]
  dense = lm.evaluate(apply_fn, params, val, config.eval_batch_size)
  log(f"dense: perplexity {dense['val_perplexity']:.3f}")
  inputs = input_profile(apply_fn, params, calibration)
  factories = methods()
  rows: dict[str, dict[str, Any]] = {}
  for name in method_names:
    rows[name] = {}
    for setting_name in setting_names:
      setting = SETTINGS[setting_name]
      if factories[name] is None:
        rows[name][setting_name] = {"missing": True}
        continue
      start = time.perf_counter()
      result = oneshot.prune(
        apply_fn,
        params,
        calibration,
        factories[name](),
        where=WHERE,
        **setting,
      )
      jax.block_until_ready(result.params)
      prune_s = time.perf_counter() - start
      cell = lm.evaluate(apply_fn, result.params, val, config.eval_batch_size)
      cell.update(check_pruned(params, result.params, result.masks, setting))
      cell["prune_s"] = prune_s
      rows[name][setting_name] = cell
      log(
        f"{name} {setting_name}: perplexity {cell['val_perplexity']:.3f}, "
        f"sparsity {cell['sparsity']:.4f}, ok {cell['ok']}, "
        f"{prune_s:.1f} s"
      )
  return {"dense": dense, "rows": rows, "inputs": inputs}


def input_profile(
  apply_fn: Callable[[Any, Any], Any], params: Any, calibration: list[Any]
) -> dict[str, dict[str, float]]:
  """Per pruned layer, how uneven its inputs are on the calibration set.

  ``rms_ratio``: the largest per-feature RMS ``sqrt(E[x_i²])`` over the
  median (Wanda's ``‖x_i‖`` ranks like magnitude when this is near 1; large
  LLMs have outlier features far above it); ``outliers``: the share of
  features above 5x the median; ``mean_share``: ``Σ E[x_i]² / Σ E[x_i²]``,
  the part of the input DSnoT's expected-error criterion sees.
  """
  layers = [
    layer.path
    for layer in oneshot.layers(apply_fn, params, calibration[0])
    if re.search(WHERE, layer.path)
  ]
  stats = oneshot.layer_statistics(apply_fn, params, calibration, layers)
  out = {}
  for path in layers:
    s = stats[path]
    count = float(s.count)
    rms = np.sqrt(np.asarray(s.sq_sum, np.float64) / count)
    mean = np.asarray(s.sum, np.float64) / count
    median = float(np.median(rms))
    out[path] = {
      "rms_ratio": float(rms.max() / median),
      "outliers": float(np.mean(rms > 5 * median)),
      "mean_share": float(np.sum(mean**2) / np.sum(rms**2)),
    }
  return out


def _table(rows, settings, cell_fn) -> list[str]:
  lines = [
    "| method | " + " | ".join(settings) + " |",
    "| --- |" + " ---: |" * len(settings),
  ]
  for name, cells in rows.items():
    lines.append(
      f"| {name} | "
      + " | ".join(
        "n/a" if cells[s].get("missing") else cell_fn(cells[s])
        for s in settings
      )
      + " |"
    )
  return lines


def format_markdown(
  study: dict[str, Any],
  settings: list[str],
  header: dict[str, str],
  notes: str = "",
) -> str:
  """The results page: header, perplexity table, checks, times, notes."""
  rows = study["rows"]
  dense = study["dense"]
  out = ["# One-shot pruning of a character-level GPT (tiny-shakespeare)", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  out += [
    f"- dense validation loss {dense['val_loss']:.4f}, perplexity "
    f"**{dense['val_perplexity']:.3f}** (per character)",
    "",
    "## Validation perplexity after one-shot pruning (lower is better)",
    "",
    *_table(rows, settings, lambda c: f"{c['val_perplexity']:.3f}"),
    "",
    "## Achieved sparsity of the pruned kernels (exact zeros; pattern check)",
    "",
    *_table(
      rows,
      settings,
      lambda c: f"{c['sparsity']:.4f} {'ok' if c['ok'] else 'FAIL'}",
    ),
    "",
    "Requested: "
    + ", ".join(f"{s} = {expected_sparsity(SETTINGS[s]):.4f}" for s in settings)
    + ". `ok`: zeros wherever the mask is off, every other param unchanged, "
    "and N:M groups (along the input axis) keep exactly N.",
    "",
    "## Pruning wall time (s, `oneshot.prune` incl. calibration passes and "
    "compilation)",
    "",
    *_table(rows, settings, lambda c: f"{c['prune_s']:.1f}"),
    "",
    *_inputs_table(study.get("inputs", {})),
    NOTES_MARKER,
    notes,
  ]
  return "\n".join(out).rstrip() + "\n"


def _inputs_table(inputs: dict[str, dict[str, float]]) -> list[str]:
  if not inputs:
    return []
  lines = [
    "## Inputs of the pruned layers (dense model, calibration set)",
    "",
    "Largest per-feature RMS input over the median (`max/median`), share of "
    "features above 5x the median, and the mean's share of the second "
    "moment `Σ E[x]² / Σ E[x²]`.",
    "",
    "| layer | max/median | > 5x median | mean share |",
    "| --- | ---: | ---: | ---: |",
  ]
  for path, row in inputs.items():
    lines.append(
      f"| {path} | {row['rms_ratio']:.2f} | {row['outliers']:.3f} | "
      f"{row['mean_share']:.3f} |"
    )
  return [*lines, ""]


def _existing_notes(path: str) -> str:
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    text = f.read()
  return text.split(NOTES_MARKER, 1)[1].strip() if NOTES_MARKER in text else ""


def write_page(path: str, render: Callable[[str], str], log: Callable) -> None:
  """Writes ``render(notes)`` to ``path``, where ``notes`` is the hand-written
  text below ``NOTES_MARKER`` in the page already there (kept across runs)."""
  text = render(_existing_notes(path))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  log(f"wrote {path}")


def main_study(
  checkpoint_dir: str | None,
  out: str,
  quick: bool = False,
  method_names: list[str] | None = None,
  setting_names: list[str] | None = None,
  calibration_segments: int = 128,
  seed: int = 0,
  data_path: str | None = None,
  command: str = "",
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Loads (or with ``quick`` trains) the model, runs the study, writes
  ``out`` (keeping any text below the notes marker)."""
  method_names = method_names or list(methods())
  if quick:
    config = shakespeare_gpt.get_config("runlocal")
    if data_path:
      config.data_path = data_path
    trained = lm.train(config, log=lambda _: None)
    model, params = trained["model"], trained["params"]
    setting_names = setting_names or ["50%"]
    calibration_segments = min(calibration_segments, 16)
  else:
    if not checkpoint_dir:
      raise ValueError("pass --checkpoint_dir (or --quick).")
    model, params, _, config = lm.load_checkpoint(checkpoint_dir)
    if data_path:
      config.data_path = data_path
    setting_names = setting_names or list(SETTINGS)
  unknown = sorted(set(method_names) - set(methods())) + sorted(
    set(setting_names) - set(SETTINGS)
  )
  if unknown:
    raise ValueError(
      f"unknown methods/settings {unknown}; methods: {list(methods())}, "
      f"settings: {list(SETTINGS)}."
    )
  data = lm.make_data(lm.load_text(config.data_path), config.val_fraction)
  start = time.perf_counter()
  study = run_study(
    model,
    params,
    config,
    data,
    method_names,
    setting_names,
    calibration_segments=calibration_segments,
    seed=seed,
    log=log,
  )
  blocks = sum(
    p.size
    for path, p in zip(
      js.masking.leaf_paths(params), jax.tree.leaves(params), strict=True
    )
    if path.startswith("Block_") and path.endswith("kernel")
  )
  m = config.model
  header = {
    "command": f"`{command}`" if command else "(library call)",
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, shared), "
    f"jax {jax.__version__}, device {jax.devices()[0].platform}",
    "model": f"GPT, {m.num_layers} blocks, width {m.width}, {m.num_heads} "
    f"heads, context {config.block_size}, vocab {len(data.vocab)}: "
    f"{gpt.num_params(params):,} params, {blocks:,} in block kernels "
    "(pruned; embeddings, position embeddings, LayerNorms, biases and "
    "lm_head dense)",
    "calibration": f"{calibration_segments} segments x {config.block_size} "
    f"chars from the train split (seed {seed}); sequential layer-by-layer "
    "(each block's statistics from the partly pruned model)",
    "evaluation": f"{config.eval_segments} fixed validation segments x "
    f"{config.block_size} chars; perplexity = exp(mean cross-entropy)",
    "study wall time": f"{time.perf_counter() - start:.0f} s",
  }
  write_page(
    out, lambda notes: format_markdown(study, setting_names, header, notes), log
  )
  return study


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  split = lambda s: [x for x in s.split(",") if x] or None
  main_study(
    FLAGS.checkpoint_dir,
    FLAGS.out,
    quick=FLAGS.quick,
    method_names=split(FLAGS.methods),
    setting_names=split(FLAGS.settings),
    calibration_segments=FLAGS.calibration_segments,
    seed=FLAGS.seed,
    data_path=FLAGS.data_path or None,
    command="python -m experiments.oneshot_lm " + " ".join(sys.argv[1:]),
    log=lambda s: print(s, flush=True),
  )


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint_dir", "", "Directory from experiments.lm.")
  flags.DEFINE_string(
    "out", "experiments/results/oneshot_lm.md", "Markdown file to write."
  )
  flags.DEFINE_bool("quick", False, "Tiny in-process model, one setting.")
  flags.DEFINE_string("methods", "", "Comma-separated subset of methods.")
  flags.DEFINE_string("settings", "", "Comma-separated subset of settings.")
  flags.DEFINE_integer("calibration_segments", 128, "Calibration segments.")
  flags.DEFINE_integer("seed", 0, "Seed of the calibration draw.")
  flags.DEFINE_string("data_path", "", "Override the checkpoint's text file.")
  app.run(main)
