r"""LeNet-300-100 on MNIST, gradual magnitude pruning to 90% sparsity.

LeNet-300-100 (784-300-100-10, ReLU) trained with adam (lr 1e-3, batch 128)
for 20 epochs (9,360 steps) on the original MNIST idx files. Every kernel is
pruned per layer (uniform allocation) on Zhu & Gupta's cubic schedule from
step 468 (one epoch) to step 5,616 (60% of training), masks updated every
100 steps; the rest fine-tunes at 90% sparsity. A dense model is trained in
the same run with the same seed and batches.

Run from the repository root::

  python -m experiments.train \
    --config experiments/configs/mnist_lenet300_gmp.py \
    --config.data_dir=../shared/data/mnist

Result (``experiments/results/mnist_lenet300_gmp.md``; 2-core CPU, jax
0.10.2, 2026-11-22, 74 s in all): sparse test accuracy 98.55% at 0.9000
sparsity with 2,562 dense-equivalent steps of 9,360; dense 98.08% (seed 1:
98.13% and 98.01%). ``:runlocal`` trains 300 steps in seconds.
"""

import ml_collections

from experiments.configs.scale import add_scale_fields

STEPS_PER_EPOCH = 60_000 // 128  # 468


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; ``arg='runlocal'`` shrinks it to seconds."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "idx"
  config.data_dir = "../shared/data/mnist"
  config.model = ml_collections.ConfigDict({"name": "lenet_300_100"})

  config.batch_size = 128
  config.num_steps = 20 * STEPS_PER_EPOCH
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"
  config.warmup_steps = 0
  config.weight_decay = 0.0
  config.momentum = 0.9

  config.method = "gmp"
  config.schedule = "gmp"
  config.final_sparsity = 0.9
  config.begin_step = STEPS_PER_EPOCH
  config.end_step = int(0.6 * config.num_steps)
  config.update_every = 100
  config.pattern = "unstructured"
  config.allocation = "uniform"
  config.exclude = ()
  config.dense_baseline = True

  config.eval_every = STEPS_PER_EPOCH
  config.log_every = 50
  config.workdir = ""
  add_scale_fields(config)  # mesh, checkpoints, multi-host

  if arg == "runlocal":
    config.num_steps = 300
    config.begin_step = 50
    config.end_step = 200
    config.update_every = 25
    config.eval_every = 150
  elif arg:
    raise ValueError(f"mnist_lenet300_gmp: unknown config argument {arg!r}.")
  return config
