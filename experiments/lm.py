r"""Character-level language modelling: a small GPT on any text file.

Launch from the repository root::

  python -m experiments.lm --config experiments/configs/shakespeare_gpt.py \
    --config.checkpoint_dir=/tmp/gpt_ckpt

Data: the characters of ``config.data_path`` (tiny-shakespeare by default),
vocabulary = the sorted distinct characters, the first 90% train and the
last 10% validation. Training batches are random contiguous segments of
``block_size + 1`` characters (inputs and next-character targets) drawn with
a numpy generator seeded by ``config.seed``. Validation loss is the mean
next-character cross-entropy over ``config.eval_segments`` fixed segments of
the validation split (same starts every time, from ``seed``); perplexity is
``exp(loss)`` (per character).

The optimizer is :func:`experiments.train.make_optimizer` (adamw with a
warmup-cosine schedule in the default config) after global-norm gradient
clipping. At the end the params are saved with orbax under
``checkpoint_dir/params`` and the vocabulary, model config and final metrics
in ``checkpoint_dir/lm.json`` (also at every evaluation, with that step's
metrics, so a run cut short leaves a usable model);
:func:`load_checkpoint` returns ``(model, params, vocab, config)``.
"""

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, logging
from ml_collections import config_flags

from experiments import gpt
from experiments.train import make_optimizer

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "configs", "shakespeare_gpt.py"
)
DEFAULT_DATA_PATH = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "..",
  "shared",
  "data",
  "tinyshakespeare",
  "input.txt",
)
_META_FILE = "lm.json"
_PARAMS_DIR = "params"


class CharData(NamedTuple):
  """A text as int32 character ids, split into train and validation.

  Attributes:
    vocab: the sorted distinct characters; id ``i`` is ``vocab[i]``.
    train: int32 ids of the first ``1 - val_fraction`` of the text.
    val: int32 ids of the rest.
  """

  vocab: str
  train: np.ndarray
  val: np.ndarray


def encode(text: str, vocab: str) -> np.ndarray:
  """Character ids of ``text`` (every character must be in ``vocab``)."""
  lookup = {c: i for i, c in enumerate(vocab)}
  missing = sorted(set(text) - set(lookup))
  if missing:
    raise ValueError(f"characters {missing[:10]} are not in the vocabulary.")
  return np.fromiter((lookup[c] for c in text), np.int32, len(text))


def decode(ids: Any, vocab: str) -> str:
  """The text of character ids."""
  return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


def make_data(text: str, val_fraction: float = 0.1) -> CharData:
  """Sorted character vocabulary; first ``1 - val_fraction`` is train."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction} must be in (0, 1).")
  vocab = "".join(sorted(set(text)))
  ids = encode(text, vocab)
  split = int(round(len(ids) * (1 - val_fraction)))
  return CharData(vocab, ids[:split], ids[split:])


def load_text(path: str) -> str:
  """The whole file as text (UTF-8)."""
  if not os.path.exists(path):
    raise ValueError(
      f"data_path={path!r} does not exist; pass --config.data_path=FILE "
      "(any text file, e.g. tiny-shakespeare's input.txt)."
    )
  with open(path, encoding="utf-8") as f:
    return f.read()


def segments(
  ids: np.ndarray, block_size: int, num: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """``num`` random contiguous segments: inputs and next-char targets.

  Returns:
    ``(x, y)``, int32 ``[num, block_size]`` each, ``y[:, t] = x[:, t + 1]``
    within the segment of ``block_size + 1`` characters.
  """
  if len(ids) < block_size + 1:
    raise ValueError(
      f"{len(ids)} characters are fewer than block_size + 1 = "
      f"{block_size + 1}; use a longer text or a smaller block_size."
    )
  starts = rng.integers(0, len(ids) - block_size, size=num)
  chunk = ids[starts[:, None] + np.arange(block_size + 1)]
  return chunk[:, :-1], chunk[:, 1:]


def batches(
  ids: np.ndarray, block_size: int, batch_size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless deterministic training batches (see :func:`segments`)."""
  rng = np.random.default_rng(seed)
  while True:
    yield segments(ids, block_size, batch_size, rng)


def eval_segments(
  ids: np.ndarray, block_size: int, num: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """The fixed evaluation set: ``num`` segments drawn with ``seed``."""
  # A separate stream from the training batches of the same seed.
  return segments(ids, block_size, num, np.random.default_rng([seed, 1]))


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> gpt.GPT:
  """The GPT of ``config.model`` for ``vocab_size`` characters."""
  m = config.model
  return gpt.GPT(
    vocab_size=vocab_size,
    block_size=config.block_size,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    width=m.width,
    dropout=m.dropout,
  )


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats)."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), targets
  ).mean()


def evaluate(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  data: tuple[np.ndarray, np.ndarray],
  batch_size: int = 64,
) -> dict[str, float]:
  """Mean loss and perplexity ``exp(loss)`` of ``apply_fn`` on ``data``.

  Args:
    apply_fn: ``(params, tokens) -> logits``.
    params: the model's params.
    data: ``(x, y)`` from :func:`eval_segments`.
    batch_size: segments per forward pass (the last pass may be smaller).
  """
  x, y = data

  @jax.jit
  def total(params, x, y):
    logits = apply_fn(params, x)
    return cross_entropy(logits, y) * y.size

  loss = 0.0
  for i in range(0, len(x), batch_size):
    loss += float(total(params, x[i : i + batch_size], y[i : i + batch_size]))
  loss /= y.size
  return {"val_loss": loss, "val_perplexity": float(np.exp(loss))}


# --------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(
  directory: str,
  params: Any,
  vocab: str,
  config: ml_collections.ConfigDict,
  metrics: dict | None = None,
) -> None:
  """Params (orbax) and ``lm.json`` (vocab, config, metrics) in ``directory``.

  An existing checkpoint in ``directory`` is overwritten.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, _PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
  meta = {"vocab": vocab, "config": config.to_dict(), "metrics": metrics}
  with open(os.path.join(directory, _META_FILE), "w") as f:
    json.dump(meta, f, indent=2)


def load_checkpoint(
  directory: str,
) -> tuple[gpt.GPT, Any, str, ml_collections.ConfigDict]:
  """Model, params and vocabulary saved by :func:`save_checkpoint`.

  Returns:
    ``(model, params, vocab, config)``: the model, its params restored
    onto the default device, the vocabulary string and the training config.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, _META_FILE)
  if not os.path.exists(meta_path):
    raise ValueError(
      f"{meta_path} not found; is {directory!r} a directory written by "
      "experiments.lm (--config.checkpoint_dir)?"
    )
  with open(meta_path) as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(meta["config"])
  vocab = meta["vocab"]
  model = make_model(config, len(vocab))
  tokens = jax.ShapeDtypeStruct((1, config.block_size), jnp.int32)
  target = jax.eval_shape(
    lambda t: model.init(jax.random.key(0), t)["params"], tokens
  )
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, _PARAMS_DIR), target)
  return model, params, vocab, config


# --------------------------------------------------------------------------
# Training.


def train(config: ml_collections.ConfigDict, log: Callable = print) -> dict:
  """Trains the configured GPT; saves it when ``checkpoint_dir`` is set.

  Returns:
    ``{"model", "params", "vocab", "data", "metrics"}``; ``metrics`` holds
    ``val_loss``, ``val_perplexity``, ``train_loss`` (last step),
    ``num_params``, ``steps`` and ``train_time_s``.
  """
  data = make_data(load_text(config.data_path), config.val_fraction)
  model = make_model(config, len(data.vocab))
  x0 = np.zeros((1, config.block_size), np.int32)
  params = jax.jit(model.init)(jax.random.key(config.seed), x0)["params"]
  n_params = gpt.num_params(params)
  log(
    f"data: {len(data.train):,} train / {len(data.val):,} val chars, "
    f"vocab {len(data.vocab)}; model: {n_params:,} params; "
    f"device: {jax.devices()[0]}"
  )
  tx = optax.chain(
    optax.clip_by_global_norm(config.grad_clip), make_optimizer(config)
  )
  opt_state = tx.init(params)
  dropout = config.model.dropout > 0

  def loss_fn(params, x, y, key):
    logits = model.apply(
      {"params": params}, x, deterministic=not dropout, rngs={"dropout": key}
    )
    return cross_entropy(logits, y)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  apply_fn = lambda p, x: model.apply({"params": p}, x)
  val = eval_segments(data.val, config.block_size, config.eval_segments, 0)
  train_batches = batches(
    data.train, config.block_size, config.batch_size, config.seed
  )
  key = jax.random.key(config.seed + 1)
  loss = jnp.nan
  start = time.perf_counter()
  for step in range(config.num_steps):
    x, y = next(train_batches)
    params, opt_state, loss = train_step(
      params, opt_state, x, y, jax.random.fold_in(key, step)
    )
    done = step + 1
    if done % config.log_every == 0:
      elapsed = time.perf_counter() - start
      log(f"step {done}: train loss {float(loss):.4f} ({elapsed:.0f} s)")
    if done % config.eval_every == 0 and done < config.num_steps:
      m = evaluate(apply_fn, params, val, config.eval_batch_size)
      log(
        f"step {done}: val loss {m['val_loss']:.4f}, "
        f"perplexity {m['val_perplexity']:.3f}"
      )
      if config.checkpoint_dir:  # a usable model if the run is cut short
        m.update(num_params=n_params, steps=done)
        save_checkpoint(config.checkpoint_dir, params, data.vocab, config, m)
  jax.block_until_ready(params)
  train_time = time.perf_counter() - start
  metrics = evaluate(apply_fn, params, val, config.eval_batch_size)
  metrics.update(
    train_loss=float(loss),
    num_params=n_params,
    steps=config.num_steps,
    train_time_s=train_time,
  )
  log(f"final: {json.dumps(metrics)}")
  if config.checkpoint_dir:
    save_checkpoint(config.checkpoint_dir, params, data.vocab, config, metrics)
    log(f"saved to {os.path.abspath(config.checkpoint_dir)}")
  return {
    "model": model,
    "params": params,
    "vocab": data.vocab,
    "data": data,
    "metrics": metrics,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  train(_CONFIG.value, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    default=_DEFAULT_CONFIG,
    help_string="Config file, optionally with an argument: path.py:full.",
  )
  app.run(main)
