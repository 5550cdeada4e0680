r"""Runs a study (methods x sparsities x seeds) and writes its table and plot.

A study config (``experiments/configs/study_*.py``) defines ``get_config(arg)``
(the base training config, as for ``experiments.train``) and
``get_study(arg)``: a dict with

* ``name``, ``title``: the results file is ``<out>/<name>.md`` and the plot
  ``<out>/<name>.png``;
* ``columns``: ``[(label, overrides), ...]``, e.g. ``("90%",
  {"final_sparsity": 0.9})``; the plot's x value is the column's
  ``final_sparsity``;
* ``methods``: ``[(label, overrides), ...]``; ``overrides`` may hold
  ``per_column``: ``{column label: overrides}``. A method with ``method:
  dense`` runs once per seed and is drawn as a line across the columns;
* ``seeds``: the seeds (the run's ``seed`` drives init, batches and masks).

Every run trains with :func:`experiments.train.run` in a worker process and
writes ``<workdir>/runs/<method>/<column>/seed<k>/final.json``; runs whose
file exists are skipped, so a killed sweep resumes where it stopped. Then the
results file gets the table of test accuracy (mean ± std over seeds, in %),
the achieved sparsity, and the command, machine and versions; text below the
line ``<!-- notes -->`` of an existing results file is kept.

Run from the repository root::

  python -m experiments.sweep \
    --config experiments/configs/study_mnist_lenet300.py
  python -m experiments.sweep \
    --config experiments/configs/study_mnist_lenet300.py:runlocal --jobs 2
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from typing import Any

import numpy as np

NOTES_MARKER = "<!-- notes -->"


def load_study(spec: str) -> tuple[Any, dict, str | None]:
  """``path.py[:arg]`` -> (base config, study dict, arg)."""
  path, _, arg = spec.partition(":")
  arg = arg or None
  module_spec = importlib.util.spec_from_file_location("study_config", path)
  if module_spec is None or not os.path.exists(path):
    raise ValueError(f"--config {path!r}: no such study config file.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for name in ("get_config", "get_study"):
    if not hasattr(module, name):
      raise ValueError(f"--config {path!r} defines no {name}(arg).")
  return module.get_config(arg), module.get_study(arg), arg


def slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "x"


def plan_runs(base: Any, study: dict, workdir: str) -> list[dict]:
  """One entry per (method, column, seed); dense methods ignore columns."""
  runs = []
  for method_label, method_overrides in study["methods"]:
    method_overrides = dict(method_overrides)
    per_column = method_overrides.pop("per_column", {})
    unknown = set(per_column) - {label for label, _ in study["columns"]}
    if unknown:
      raise ValueError(
        f"study {study['name']}: method {method_label!r} has per_column "
        f"entries {sorted(unknown)} that are not column labels."
      )
    dense = method_overrides.get("method") == "dense"
    columns = study["columns"][:1] if dense else study["columns"]
    for column_label, column_overrides in columns:
      for seed in study["seeds"]:
        config = base.copy_and_resolve_references()
        overrides = {
          **({} if dense else column_overrides),
          **method_overrides,
          **per_column.get(column_label, {}),
          "seed": seed,
          "dense_baseline": False,
        }
        run_dir = os.path.join(
          workdir,
          "runs",
          slug(method_label),
          "dense" if dense else slug(column_label),
          f"seed{seed}",
        )
        overrides["workdir"] = run_dir
        with config.unlocked():
          for key, value in overrides.items():
            if key not in config and key != "method_args":
              raise ValueError(
                f"study {study['name']}: {method_label!r} overrides unknown "
                f"config field {key!r}."
              )
            config[key] = value
        runs.append(
          dict(
            method=method_label,
            column=None if dense else column_label,
            seed=seed,
            config=config,
            final=os.path.join(run_dir, "final.json"),
          )
        )
  return runs


def _train(config: Any) -> float:
  """Worker: trains one run, its output in ``<workdir>/log.txt``."""
  from experiments import train  # imported in the worker process

  os.makedirs(config.workdir, exist_ok=True)
  start = time.perf_counter()
  with open(os.path.join(config.workdir, "log.txt"), "w") as log:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
      train.run(config)
  return time.perf_counter() - start


def run_all(runs: list[dict], jobs: int) -> None:
  todo = [r for r in runs if not os.path.exists(r["final"])]
  print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go")
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
    max_workers=jobs, mp_context=context
  ) as pool:
    futures = {pool.submit(_train, r["config"]): r for r in todo}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      r = futures[future]
      name = f"{r['method']} / {r['column'] or 'dense'} / seed {r['seed']}"
      try:
        seconds = future.result()
      except Exception as error:
        raise RuntimeError(
          f"run {name} failed; see {r['config'].workdir}/log.txt"
        ) from error
      print(f"[{done}/{len(todo)}] {name}: {seconds:.0f} s", flush=True)


def collect(runs: list[dict]) -> dict:
  """(method, column) -> list of final metrics over the finished seeds."""
  cells: dict = {}
  for r in runs:
    if not os.path.exists(r["final"]):
      continue
    with open(r["final"]) as f:
      final = json.load(f)["results"]
    result = final.get("sparse", final.get("dense"))
    cells.setdefault((r["method"], r["column"]), []).append(result)
  return cells


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  v = scale * np.asarray(values, np.float64)
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():.{digits}f} ± {std:.{digits}f} ({len(v)})"


def table(study: dict, cells: dict, metric: str, scale: float, digits: int):
  columns = [label for label, _ in study["columns"]]
  lines = [
    "| method | " + " | ".join(columns) + " |",
    "| --- |" + " --- |" * len(columns),
  ]
  for method, _ in study["methods"]:
    row = []
    for column in columns:
      results = cells.get((method, column), cells.get((method, None)))
      values = [r[metric] for r in results or [] if r[metric] is not None]
      row.append(mean_std(values, scale, digits) if values else "-")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(study: dict, cells: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = [overrides["final_sparsity"] for _, overrides in study["columns"]]
  figure, axes = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap("tab20").colors
  markers = "osD^v<>ph*"
  for index, (method, _) in enumerate(study["methods"]):
    dense = (method, None) in cells
    accs = []
    for column, _ in study["columns"]:
      results = cells.get((method, None if dense else column), [])
      accs.append([100 * r["test_accuracy"] for r in results])
    mean = [np.mean(a) if a else np.nan for a in accs]
    std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accs]
    if dense:
      axes.axhline(mean[0], color="black", linestyle="--", label=method)
    else:
      axes.errorbar(
        xs,
        mean,
        yerr=std,
        marker=markers[index % len(markers)],
        color=colors[(2 * index) % 20 + (2 * index) // 20 % 2],
        capsize=3,
        label=method,
      )
  axes.set_xlabel("sparsity")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(study["title"])
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7, ncol=2)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_results(
  study: dict,
  cells: dict,
  out: str,
  command: str,
  seconds: float,
  planned: int | None = None,
) -> str:
  import jax

  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"{study['name']}.md")
  notes = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if NOTES_MARKER in text:
      notes = text[text.index(NOTES_MARKER) :]
  plot_name = f"{study['name']}.png"
  finished = sum(len(v) for v in cells.values())
  train_minutes = sum(r["train_time_s"] for v in cells.values() for r in v) / 60
  plot(study, cells, os.path.join(out, plot_name))
  seeds = ", ".join(map(str, study["seeds"]))
  header = [
    f"# {study['title']}",
    "",
    f"Generated by `{command}` on {datetime.date.today()}: "
    f"{platform.machine()} CPU x{os.cpu_count()} ({platform.system()}), "
    f"jax {jax.__version__}, Python {platform.python_version()}; "
    f"{train_minutes:.0f} min of training over {finished} runs (sum of "
    f"their train_time_s), {seconds / 60:.1f} min of it in this invocation.",
    f"Seeds {seeds}; each cell is mean ± std (sample std) over the seeds "
    "finished, their number in brackets."
    + (
      ""
      if planned is None or finished == planned
      else f" **Incomplete: {finished} of {planned} runs finished**; run "
      "the command again to train the rest."
    ),
    "",
    "## Test accuracy (%)",
    "",
    table(study, cells, "test_accuracy", 100.0, 2),
    "",
    "## Achieved sparsity of the masked params (from the masks)",
    "",
    table(study, cells, "sparsity", 1.0, 4),
    "",
    "## Dense-equivalent training steps (fraction of a dense run's FLOPs)",
    "",
    table_fraction(study, cells),
    "",
    f"![test accuracy vs sparsity]({plot_name})",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(header) + "\n" + (notes or NOTES_MARKER + "\n"))
  return path


def table_fraction(study: dict, cells: dict) -> str:
  fractions = {
    key: [
      dict(r, fraction=r["dense_equivalent_steps"] / r["step"]) for r in results
    ]
    for key, results in cells.items()
  }
  return table(study, fractions, "fraction", 1.0, 3)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="study.py[:arg]")
  parser.add_argument("--jobs", type=int, default=1, help="parallel runs")
  parser.add_argument(
    "--workdir", default="", help="run outputs (default /tmp/jaxsparse/NAME)"
  )
  parser.add_argument(
    "--out", default="experiments/results", help="results folder"
  )
  parser.add_argument(
    "--table_only",
    action="store_true",
    help="write the table from the runs finished so far; train nothing",
  )
  args = parser.parse_args(argv)
  base, study, arg = load_study(args.config)
  name = study["name"] + (f"_{arg}" if arg else "")
  study = dict(study, name=name)
  workdir = args.workdir or os.path.join("/tmp/jaxsparse", name)
  runs = plan_runs(base, study, workdir)
  start = time.perf_counter()
  if not args.table_only:
    run_all(runs, args.jobs)
  seconds = time.perf_counter() - start
  command = "python -m experiments.sweep " + " ".join(
    a for a in (argv if argv is not None else sys.argv[1:])
  )
  path = write_results(
    study, collect(runs), args.out, command, seconds, planned=len(runs)
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
