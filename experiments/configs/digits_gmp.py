r"""Default main job: GMP to 90% sparsity of an MLP on scikit-learn's digits.

A 64-256-128-10 MLP trained with adam on the 8x8 digits that ship with
scikit-learn (1,438 train / 359 test images); magnitude pruning on Zhu &
Gupta's cubic schedule from step 200 to step 1,200, masks updated every 50
steps, then 800 steps of fine-tuning at 90% sparsity. A dense model is
trained beside it with the same seed and data order.

Run from the repository root (no data files needed)::

  python -m experiments.train --config experiments/configs/digits_gmp.py

Expected (2-core CPU, jax 0.10.2, 2026-11-22; ~15 s in all, ~5 s per model):
sparse test accuracy 98.61% at 0.9000 sparsity (masks and exact zeros) with
628.9 dense-equivalent steps of 2,000; dense 98.33%. ``:runlocal`` (200
steps) runs in a few seconds.
"""

import ml_collections

from experiments.configs.scale import add_scale_fields


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; ``arg='runlocal'`` shrinks it to seconds."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "digits"
  config.data_dir = ""
  config.model = ml_collections.ConfigDict(
    {"name": "mlp", "hidden": (256, 128)}
  )

  config.batch_size = 64
  config.num_steps = 2000
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"
  config.warmup_steps = 0
  config.weight_decay = 0.0
  config.momentum = 0.9

  config.method = "gmp"
  config.schedule = "gmp"
  config.final_sparsity = 0.9
  config.begin_step = 200
  config.end_step = 1200
  config.update_every = 50
  config.pattern = "unstructured"
  config.allocation = "uniform"
  config.exclude = ()
  config.dense_baseline = True

  config.eval_every = 500
  config.log_every = 50
  config.workdir = ""

  add_scale_fields(config)  # mesh, checkpoints, multi-host

  if arg == "runlocal":
    config.num_steps = 200
    config.begin_step = 20
    config.end_step = 120
    config.update_every = 10
    config.eval_every = 100
  elif arg:
    raise ValueError(f"digits_gmp: unknown config argument {arg!r}.")
  return config
