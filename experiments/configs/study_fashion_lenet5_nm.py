r"""Study 2: LeNet-5 on Fashion-MNIST with 2:4 and 1:4 N:M sparsity.

LeNet-5 (:class:`experiments.models.LeNet5`: conv 8 and 16 filters, 120, 84,
10) trained with adam (lr 1e-3, batch 128) for 4 epochs on Fashion-MNIST.
Every kernel but the first conv's (one input channel) is N:M along its
reduction axis (axis -2: conv input channels, dense inputs). Methods:

* dense;
* SR-STE (Zhou et al 2021; λ_W = 2e-4), S-STE (Hu et al 2024) and STE:
  N:M from the first step, dense weights in the optimizer state;
* one-shot: dense training for 80% of the steps, one N:M magnitude pruning,
  then fine-tuning with the mask fixed.

Run from the repository root (results in
``experiments/results/fashion_lenet5_nm.md``)::

  python -m experiments.sweep \
    --config experiments/configs/study_fashion_lenet5_nm.py --jobs 2
"""

import ml_collections

from experiments.configs import mnist_lenet300_gmp

STEPS_PER_EPOCH = mnist_lenet300_gmp.STEPS_PER_EPOCH


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base training config every run of the study starts from."""
  if arg not in (None, "runlocal"):
    raise ValueError(f"study_fashion_lenet5_nm: unknown argument {arg!r}.")
  config = mnist_lenet300_gmp.get_config()
  config.data_dir = "../shared/data/fashion-mnist"
  config.model = ml_collections.ConfigDict({"name": "lenet5"})
  # 4 epochs: a LeNet-5 step costs ~10x a LeNet-300-100 step on CPU.
  config.num_steps = 4 * STEPS_PER_EPOCH if arg is None else 60
  config.eval_every = config.num_steps
  config.exclude = ("Conv_0",)
  config.dense_baseline = False
  config.method_args = ml_collections.ConfigDict()
  return config


def get_study(arg: str | None = None) -> dict:
  """Methods x N:M patterns x seeds."""
  steps = get_config(arg).num_steps
  every_step = dict(schedule="constant", begin_step=0, update_every=steps)
  one_shot = int(0.8 * steps)
  methods = [
    ("dense", dict(method="dense")),
    ("SR-STE", dict(method="sr_ste", **every_step)),
    ("S-STE", dict(method="s_ste", **every_step)),
    ("STE", dict(method="ste", **every_step)),
    (
      "one-shot magnitude + fine-tune",
      dict(
        method="magnitude",
        schedule="constant",
        begin_step=one_shot,
        end_step=one_shot,
        update_every=steps,
      ),
    ),
  ]
  columns = [
    ("2:4", dict(pattern="nm:2:4", final_sparsity=0.5)),
    ("1:4", dict(pattern="nm:1:4", final_sparsity=0.75)),
  ]
  return dict(
    name="fashion_lenet5_nm",
    title="LeNet-5 on Fashion-MNIST: N:M sparsity",
    columns=columns,
    methods=methods,
    seeds=[0, 1, 2] if arg is None else [0],
  )
