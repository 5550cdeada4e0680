r"""The one trainer: dense or sparse training of a classifier, as configured.

Launch from the repository root::

  python -m experiments.train --config experiments/configs/digits_gmp.py
  python -m experiments.train \
    --config experiments/configs/mnist_lenet300_gmp.py:runlocal \
    --config.data_dir=/path/to/mnist --config.workdir=/tmp/lenet

The config (see ``experiments/configs/``) holds numbers and names;
:func:`make_transform` is the one place that turns the names into optax and
jaxsparse objects:

* ``optimizer``: ``adam``, ``adamw`` or ``sgd`` (with ``momentum``), with a
  ``constant`` or ``cosine`` learning-rate schedule (``warmup_steps``).
* ``method``: ``dense`` (the optimizer alone), ``magnitude``
  (:func:`jaxsparse.magnitude_pruning`), ``global_magnitude``
  (:func:`jaxsparse.global_magnitude_pruning`), ``random``
  (:func:`jaxsparse.random_pruning`), or ``gmp`` (magnitude pruning on Zhu &
  Gupta's schedule). Sparse methods wrap the optimizer with
  :func:`jaxsparse.sparsify`.
* ``schedule``: ``gmp`` ramps the sparsity from 0 at ``begin_step`` to
  ``final_sparsity`` at ``end_step`` (:func:`jaxsparse.gmp`); ``constant``
  holds ``final_sparsity`` from the first mask update at ``begin_step``.
* ``pattern``: ``unstructured``, ``nm:N:M``, ``block:R:C`` or
  ``channel[:AXIS]``; ``allocation``: ``uniform``, ``er``, ``erk`` or
  ``global``; ``exclude``: regexes of params kept dense.

One training step is ``value_and_grad``, ``tx.update`` and
``optax.apply_updates`` under one ``jax.jit``; nothing runs after it. The run
ends with a table (one row per model: the sparse one, and a dense baseline
when ``dense_baseline`` is set) and, under ``workdir``, ``metrics.jsonl`` (one
JSON line per evaluation) and ``final.json``.

Dense-equivalent steps: the sum over steps of that step's training FLOPs over
the dense model's. A ``Dense`` layer's forward and backward FLOPs are
proportional to ``fan_in * fan_out`` times the density of its kernel mask
during the step (biases and activations, ``O(fan_out)``, are ignored); layers
without a mask count as dense.

Batches are sharded over the local accelerators (``data`` axis; one device on
CPU); params and optimizer state are replicated, with shardings derived from
``jax.eval_shape(tx.init, params)``. Multi-host runs are not supported yet.
"""

import functools
import inspect
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import jaxsparse as js
from experiments import data as data_lib
from experiments import models

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "configs", "digits_gmp.py"
)

# Method name -> factory. Each factory gets the config fields its signature
# names (see make_method); ``method_args`` adds method-specific ones.
METHODS = {
  "gmp": "magnitude_pruning",
  "magnitude": "magnitude_pruning",
  "global_magnitude": "global_magnitude_pruning",
  "random": "random_pruning",
  "lamp": "lamp_pruning",
  "snip": "snip",
  "grasp": "grasp",
  "synflow": "synflow",
  "set": "set_sparse",
  "rigl": "rigl",
  "snfs": "snfs",
  "srigl": "srigl",
  "ste": "ste",
  "sr_ste": "sr_ste",
  "st3": "st3",
  "s_ste": "s_ste",
  "acdc": "acdc",
  "lobster": "lobster",
  "group_lasso": "group_lasso",
}


class Context(NamedTuple):
  """What methods that look at the model or data at init may need.

  Attributes:
    loss_fn: ``(params, batch) -> scalar`` (SNIP, GraSP).
    batch: one training batch ``(x, y)``.
    apply_fn: ``(params, x) -> logits`` (SynFlow).
    input_shape: one example's shape, batch axis first (``(1, ...)``).
  """

  loss_fn: Callable[[Any, Any], jax.Array]
  batch: Any
  apply_fn: Callable[[Any, jax.Array], jax.Array]
  input_shape: tuple[int, ...]


def parse_pattern(spec: str) -> js.Pattern:
  """``unstructured``, ``nm:N:M``, ``block:R:C``, ``channel[:AXIS]``."""
  name, *args = spec.lower().split(":")
  try:
    numbers = [int(a) for a in args]
  except ValueError:
    numbers = None
  if name == "unstructured" and not args:
    return js.Unstructured()
  if name == "nm" and numbers is not None and len(numbers) == 2:
    return js.NM(*numbers)
  if name == "block" and numbers is not None and len(numbers) == 2:
    return js.Block(*numbers)
  if name == "channel" and numbers is not None and len(numbers) <= 1:
    return js.Channel(*numbers)
  raise ValueError(
    f"pattern={spec!r} is not understood; use 'unstructured', 'nm:N:M' "
    "(e.g. 'nm:2:4'), 'block:R:C' (e.g. 'block:4:4') or 'channel[:AXIS]'."
  )


def make_allocation(name: str) -> js.allocation.Allocation:
  """``uniform``, ``er``, ``erk`` or ``global``."""
  allocations = {
    "uniform": js.uniform,
    "er": js.er,
    "erk": js.erk,
    "global": js.global_threshold,
  }
  if name not in allocations:
    raise ValueError(
      f"allocation={name!r} is not one of {sorted(allocations)}."
    )
  return allocations[name]()


def make_optimizer(
  config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
  """The dense optimizer with its learning-rate schedule."""
  if config.lr_schedule == "constant":
    learning_rate = config.learning_rate
  elif config.lr_schedule == "cosine":
    learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=config.num_steps,
    )
  else:
    raise ValueError(
      f"lr_schedule={config.lr_schedule!r}; use 'constant' or 'cosine'."
    )
  if config.optimizer == "adam":
    return optax.adam(learning_rate)
  if config.optimizer == "adamw":
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)
  if config.optimizer == "sgd":
    return optax.sgd(learning_rate, momentum=config.momentum or None)
  raise ValueError(
    f"optimizer={config.optimizer!r}; use 'adam', 'adamw' or 'sgd'."
  )


def make_sparsity(config: ml_collections.ConfigDict) -> Any:
  """``final_sparsity`` held constant, or ramped by :func:`jaxsparse.gmp`."""
  if config.schedule == "gmp":
    return js.gmp(config.final_sparsity, config.begin_step, config.end_step)
  if config.schedule == "constant" and config.method != "gmp":
    return config.final_sparsity
  raise ValueError(
    f"schedule={config.schedule!r} with method={config.method!r}; use "
    "'gmp', or 'constant' with a method other than 'gmp'."
  )


def make_method(
  config: ml_collections.ConfigDict, context: Context | None = None
) -> Any:
  """The configured jaxsparse method (``config.method`` is not ``dense``).

  The factory ``METHODS[config.method]`` receives the fields its signature
  names: ``sparsity`` (from :func:`make_sparsity`; methods that keep their
  sparsity fixed get ``final_sparsity``), ``pattern`` and ``allocation``
  (unless the config says ``"default"``: the factory's own default),
  ``where``, ``update_every``, ``begin_step``, ``end_step``, ``seed``, the
  context's ``loss_fn``, ``batch``, ``apply_fn`` and ``input_shape``, and
  every key of ``config.method_args``. A non-default pattern or allocation
  the factory does not take, or a ``method_args`` key it does not name, is
  an error, never dropped.
  """
  if config.method not in METHODS:
    raise ValueError(
      f"method={config.method!r} is not one of {['dense', *METHODS]}."
    )
  factory = getattr(js, METHODS[config.method])
  accepted = inspect.signature(factory).parameters
  fixed = "update_every" not in accepted or config.method in (
    "rigl",
    "set",
    "snfs",
    "srigl",
  )
  offered = dict(
    sparsity=config.final_sparsity if fixed else make_sparsity(config),
    where=js.default_where(config.exclude),
    update_every=config.update_every,
    begin_step=config.begin_step,
    end_step=config.end_step,
    seed=config.seed,
  )
  # "default" leaves the factory's own default (RigL: ERK, SR-STE: 2:4).
  for name, parse, neutral in (
    ("pattern", parse_pattern, "unstructured"),
    ("allocation", make_allocation, "uniform"),
  ):
    if config[name] == "default":
      continue
    if name not in accepted and config[name] != neutral:
      raise ValueError(
        f"method={config.method!r} (js.{factory.__name__}) takes no {name}; "
        f"set {name}='default'."
      )
    offered[name] = parse(config[name])
  if context is not None:
    offered.update(context._asdict())
  method_args = dict(config.get("method_args", {}))
  unknown = sorted(set(method_args) - set(accepted))
  if unknown:
    raise ValueError(
      f"method_args {unknown} are not arguments of js.{factory.__name__}; "
      f"it takes {sorted(accepted)}."
    )
  kwargs = {k: v for k, v in offered.items() if k in accepted}
  kwargs.update(method_args)
  return factory(**kwargs)


def make_transform(
  config: ml_collections.ConfigDict, context: Context | None = None
) -> optax.GradientTransformation:
  """The optimizer, wrapped by the configured sparsity method if any."""
  optimizer = make_optimizer(config)
  if config.method == "dense":
    return optimizer
  return js.sparsify(optimizer, make_method(config, context))


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """``digits`` (scikit-learn) or ``idx`` files in ``config.data_dir``."""
  if config.dataset == "digits":
    return data_lib.load_digits(seed=config.seed)
  if config.dataset == "idx":
    return data_lib.load_idx(config.data_dir)
  raise ValueError(f"dataset={config.dataset!r}; use 'digits' or 'idx'.")


def make_model(
  config: ml_collections.ConfigDict, num_classes: int
) -> nn.Module:
  """``mlp`` (``model.hidden`` sizes), ``lenet_300_100`` or ``lenet5``."""
  if config.model.name == "mlp":
    return models.MLP((*config.model.hidden, num_classes))
  if config.model.name == "lenet_300_100":
    return models.lenet_300_100(num_classes)
  if config.model.name == "lenet5":
    return models.LeNet5(num_classes)
  raise ValueError(
    f"model.name={config.model.name!r}; use 'mlp', 'lenet_300_100' or 'lenet5'."
  )


# --------------------------------------------------------------------------
# Measurements.


@jax.jit
def flop_density(params: Any, masks: Any) -> jax.Array:
  """Training FLOPs of the masked model over the dense one's.

  Each ``Dense`` kernel (a 2-D param) costs ``fan_in * fan_out`` times the
  density of its mask; a kernel without a mask (or ``masks=None``) is dense.
  """
  if masks is None:
    masks = jax.tree.map(lambda _: None, params)

  def kept_and_size(p, m):
    if jnp.ndim(p) != 2:
      return 0.0, 0
    return (p.size if m is None else jnp.sum(m, dtype=jnp.float32)), p.size

  # Params first: a None mask leaf is then passed to kept_and_size as is.
  pairs = jax.tree.leaves(
    jax.tree.map(kept_and_size, params, masks),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  return sum(k for k, _ in pairs) / sum(n for _, n in pairs)


def sparsity_stats(params: Any, masks: Any, where: Any) -> dict:
  """Mask sparsity and exact-zero fraction over the selected params."""
  chosen = jax.tree.leaves(js.resolve_where(where, params, "train"))
  leaves = [np.asarray(p) for p in jax.tree.leaves(params)]
  selected = [p for p, c in zip(leaves, chosen, strict=True) if c]
  size = sum(p.size for p in selected)
  zeros = sum(int(np.sum(p == 0)) for p in selected)
  stats = {"zero_fraction": zeros / size, "sparsity": None}
  if masks is not None:
    stats["sparsity"] = 1 - js.masking.density(masks)
  return stats


# --------------------------------------------------------------------------
# Training.


def training_devices() -> list[jax.Device]:
  """All local devices on accelerators; one device on CPU.

  CPU "devices" (``--xla_force_host_platform_device_count``,
  ``jax_num_cpu_devices``) share the same cores, so splitting a batch over
  them gains nothing, and their all-reduces can stall past XLA's rendezvous
  timeout on a loaded machine.
  """
  devices = jax.local_devices()
  return devices[:1] if devices[0].platform == "cpu" else devices


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: nn.Module, key: jax.Array, x: jax.Array) -> Any:
  """``model.init(key, x)["params"]``, compiled once per model."""
  return model.init(key, x)["params"]


def train_model(
  config: ml_collections.ConfigDict,
  dataset: data_lib.Dataset,
  name: str,
  log: Any,
) -> dict:
  """Trains one model as configured; returns its final metrics."""
  # Devices: batches split over a "data" axis, params replicated.
  devices = training_devices()
  mesh = jax.make_mesh(
    (len(devices),), ("data",), (AxisType.Auto,), devices=devices
  )
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  if config.batch_size % len(devices):
    raise ValueError(
      f"batch_size={config.batch_size} must be divisible by the "
      f"{len(devices)} devices the batch is split over."
    )

  # Data.
  train_batches = data_lib.batches(
    dataset.x_train, dataset.y_train, config.batch_size, config.seed
  )

  # Model and optimizer state, with shardings from shapes.
  model = make_model(config, dataset.num_classes)
  init_key = jax.random.key(config.seed)
  params = jax.device_put(
    init_params(model, init_key, dataset.x_train[:1]), replicated
  )

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  context = Context(
    loss_fn=loss_fn,
    # The first training batch (a fresh iterator with the same seed).
    batch=next(
      data_lib.batches(
        dataset.x_train, dataset.y_train, config.batch_size, config.seed
      )
    ),
    apply_fn=lambda params, x: model.apply({"params": params}, x),
    input_shape=(1, *dataset.x_train.shape[1:]),
  )
  tx = make_transform(config, context)
  sparse = config.method != "dense"
  state_shapes = jax.eval_shape(tx.init, params)
  state_shardings = jax.tree.map(lambda _: replicated, state_shapes)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, opt_state, dense_equivalent, x, y):
    # This step's forward and backward passes run with the current masks.
    density = flop_density(params, js.masks(opt_state) if sparse else None)
    loss, grads = jax.value_and_grad(loss_fn)(params, (x, y))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dense_equivalent + density, loss

  @jax.jit
  def accuracy(params, x, y):
    logits = model.apply({"params": params}, x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)

  def evaluate(step, params, masks, dense_equivalent, loss):
    record = {
      "model": name,
      "method": config.method,
      "step": step,
      "train_loss": float(loss),
      "test_accuracy": float(accuracy(params, dataset.x_test, dataset.y_test)),
      "dense_equivalent_steps": float(dense_equivalent),
      "flop_density": float(flop_density(params, masks)),
    }
    log(record)
    return record

  dense_equivalent = jax.device_put(jnp.zeros([], jnp.float32), replicated)
  loss = jnp.nan
  start = time.perf_counter()
  bar = tqdm.trange(
    config.num_steps, desc=name, unit="step", dynamic_ncols=True
  )
  for step in bar:
    x, y = jax.device_put(next(train_batches), batch_sharding)
    params, opt_state, dense_equivalent, loss = train_step(
      params, opt_state, dense_equivalent, x, y
    )
    done = step + 1
    if done % config.log_every == 0:  # also bounds the queue of dispatches
      bar.set_postfix(loss=f"{float(loss):.4f}")
    if done % config.eval_every == 0 and done < config.num_steps:
      masks = js.masks(opt_state) if sparse else None
      record = evaluate(done, params, masks, dense_equivalent, loss)
      bar.set_postfix(loss=f"{float(loss):.4f}", acc=record["test_accuracy"])
  bar.close()
  jax.block_until_ready(params)
  train_time = time.perf_counter() - start

  masks = js.masks(opt_state) if sparse else None
  final = evaluate(config.num_steps, params, masks, dense_equivalent, loss)
  where = js.default_where(config.exclude)
  final.update(sparsity_stats(params, masks, where), train_time_s=train_time)
  if sparse:
    print(f"\n{name}: per-layer summary")
    # With pattern "default" the method picks its pattern; the table then
    # checks only that masks and zeros agree (any mask is Unstructured).
    pattern = (
      js.Unstructured()
      if config.pattern == "default"
      else parse_pattern(config.pattern)
    )
    print(js.summary(params, masks, pattern))
  return final


def format_table(results: dict[str, dict]) -> str:
  """One row per model: steps, dense-equivalent steps, sparsity, accuracy."""
  header = (
    "model",
    "method",
    "steps",
    "dense-eq steps",
    "sparsity (masks)",
    "zeros",
    "test acc",
    "train s",
  )
  rows = [
    (
      name,
      r["method"],
      str(r["step"]),
      f"{r['dense_equivalent_steps']:.1f}",
      "-" if r["sparsity"] is None else f"{r['sparsity']:.4f}",
      f"{r['zero_fraction']:.4f}",
      f"{100 * r['test_accuracy']:.2f}%",
      f"{r['train_time_s']:.1f}",
    )
    for name, r in results.items()
  ]
  widths = [
    max(len(row[i]) for row in [header, *rows]) for i in range(len(header))
  ]
  line = lambda row: " | ".join(
    c.ljust(w) for c, w in zip(row, widths, strict=True)
  ).rstrip()
  rule = "-+-".join("-" * w for w in widths)
  return "\n".join([line(header), rule, *map(line, rows)])


def run(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """Trains the configured model (and the dense baseline if enabled).

  Args:
    config: a config from ``experiments/configs/``.

  Returns:
    Final metrics per model: ``{"sparse": {...}, "dense": {...}}`` (only
    ``"dense"`` when ``config.method == "dense"``). Each holds ``step``,
    ``dense_equivalent_steps``, ``sparsity`` (over masked params, from the
    masks; ``None`` without masks), ``zero_fraction`` (exact zeros over the
    selected params), ``test_accuracy``, ``train_loss`` and ``train_time_s``.
  """
  dataset = load_data(config)
  print(
    f"data: {config.dataset} {dataset.x_train.shape} train, "
    f"{dataset.x_test.shape} test; devices: {training_devices()}"
  )
  runs = {"dense" if config.method == "dense" else "sparse": config}
  if config.dense_baseline and config.method != "dense":
    dense_config = ml_collections.ConfigDict(config.to_dict())
    dense_config.method = "dense"
    runs["dense"] = dense_config

  metrics_file = None
  if config.workdir:
    os.makedirs(config.workdir, exist_ok=True)
    metrics_file = open(os.path.join(config.workdir, "metrics.jsonl"), "w")

  def log(record):
    if metrics_file is not None:
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()

  try:
    results = {
      name: train_model(c, dataset, name, log) for name, c in runs.items()
    }
  finally:
    if metrics_file is not None:
      metrics_file.close()

  print()
  print(format_table(results))
  if config.workdir:
    with open(os.path.join(config.workdir, "final.json"), "w") as f:
      json.dump({"results": results, "config": config.to_dict()}, f, indent=2)
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(_CONFIG.value)


if __name__ == "__main__":
  # Defined here, not at import: importing this module (tests, notebooks
  # calling run()) defines no global flag and loads no config file.
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    default=_DEFAULT_CONFIG,
    help_string="Config file, optionally with an argument: path.py:runlocal.",
  )
  app.run(main)
