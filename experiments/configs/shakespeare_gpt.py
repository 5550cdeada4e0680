r"""A character-level GPT on tiny-shakespeare (for the one-shot LLM study).

Default: 4 blocks, width 192, 4 heads, context 128 (about 1.8M params),
adamw (peak lr 1.5e-3, weight decay 0.1, 100 warmup steps, cosine decay),
batch 32, 1,500 steps (6.1M training characters), gradient clipping at 1.0,
no dropout. Sized for a shared 2-core CPU: ~0.5 s a step on one free core
(~15 minutes), under an hour at a quarter of a core.

Run from the repository root::

  python -m experiments.lm --config experiments/configs/shakespeare_gpt.py \
    --config.checkpoint_dir=/tmp/gpt_ckpt

Measured (2026-12-01, jax 0.10.2, one core of a shared, heavily loaded
2-core CPU at nice 5; 1,410 s of training): validation loss 1.545 nats/char,
perplexity 4.69 (1.795 at step 500, 1.610 at step 1,000; final train loss
1.27).

Arguments:

* ``:full``: nanoGPT's shakespeare-char size (6 blocks, width 384, 6 heads,
  context 256, ~10.7M params, dropout 0.2, batch 64, lr 1e-3, 5,000 steps).
  For a GPU: on a CPU it takes many hours.
* ``:runlocal``: a tiny model for tests (seconds).
"""

import ml_collections

from experiments import lm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; ``arg`` is ``None``, ``'full'`` or ``'runlocal'``."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data_path = lm.DEFAULT_DATA_PATH
  config.val_fraction = 0.1
  config.block_size = 128
  config.model = ml_collections.ConfigDict(
    {"num_layers": 4, "num_heads": 4, "width": 192, "dropout": 0.0}
  )

  config.batch_size = 32
  config.num_steps = 1500
  config.optimizer = "adamw"
  config.learning_rate = 1.5e-3
  config.lr_schedule = "cosine"
  config.warmup_steps = 100
  config.weight_decay = 0.1
  config.momentum = 0.9
  config.grad_clip = 1.0

  config.eval_every = 500
  config.eval_segments = 256
  config.eval_batch_size = 64
  config.log_every = 50
  config.checkpoint_dir = ""

  if arg == "full":
    config.block_size = 256
    config.model.num_layers = 6
    config.model.num_heads = 6
    config.model.width = 384
    config.model.dropout = 0.2
    config.batch_size = 64
    config.num_steps = 5000
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.eval_segments = 512
  elif arg == "runlocal":
    config.block_size = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.width = 32
    config.batch_size = 16
    config.num_steps = 60
    config.warmup_steps = 5
    config.learning_rate = 3e-3
    config.eval_every = 30
    config.eval_segments = 32
    config.log_every = 20
  elif arg:
    raise ValueError(f"shakespeare_gpt: unknown config argument {arg!r}.")
  return config
