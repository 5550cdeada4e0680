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

Scale (``docs/scaling.md``): ``mesh`` (shape, axis names, ``auto`` or
``explicit`` axis types, ``num_devices``: by default every local accelerator,
one device on CPU) and ``partition`` (``data_parallel``, ``fsdp`` or
``tensor_parallel``, from :mod:`jaxsparse.sharding`) give params a
``NamedSharding`` each; masks and every method's state take their params'
(:func:`jaxsparse.sharding.state_shardings`); batches are split over the
``data`` axis. The step is ``jax.jit`` with in/out shardings and donated
state. With ``checkpoint_every`` set, params, optimizer state (masks, PRNG
keys), dense-equivalent steps and the data position are saved with orbax
under ``workdir/checkpoints/<model>``; a rerun resumes from the newest
readable one, onto the current mesh. ``distributed`` (or
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)
starts ``jax.distributed`` for multi-host runs.
"""

import functools
import inspect
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import jaxsparse as js
from experiments import data as data_lib
from experiments import models
from jaxsparse import sharding as js_sharding

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
# Devices, meshes and shardings.


def training_devices() -> list[jax.Device]:
  """All local devices on accelerators; one device on CPU.

  CPU "devices" (``--xla_force_host_platform_device_count``,
  ``jax_num_cpu_devices``) share the same cores, so splitting a batch over
  them gains nothing, and their all-reduces can stall past XLA's rendezvous
  timeout on a loaded machine. Set ``mesh.num_devices`` to use more (tests
  of sharded training do). In a multi-process run every process's devices
  are used (:func:`mesh_devices`).
  """
  devices = jax.local_devices()
  return devices[:1] if devices[0].platform == "cpu" else devices


def _field(config: ml_collections.ConfigDict, name: str, default: Any) -> Any:
  """``config[name]``, or ``default`` for configs that predate the field."""
  return config[name] if name in config else default


def mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.mesh`` with defaults for the fields it lacks."""
  mesh = ml_collections.ConfigDict(
    dict(shape=(-1,), axes=("data",), axis_types="auto", num_devices=0)
  )
  if "mesh" in config:
    mesh.update(config.mesh.to_dict())
  return mesh


def mesh_devices(num_devices: int = 0) -> list[jax.Device]:
  """The devices a mesh spans: ``num_devices`` of them, or the default.

  The default (``0``) is :func:`training_devices` in a single process and
  every device of every process (``jax.devices()``) in a multi-process run.
  """
  available = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  if num_devices == 0:
    return available if jax.process_count() > 1 else training_devices()
  if not 0 < num_devices <= len(available):
    raise ValueError(
      f"mesh.num_devices={num_devices}, but {len(available)} devices are "
      "available; use 0 (the default) or a number up to that. On CPU, more "
      "devices come from JAX_NUM_CPU_DEVICES=N (before JAX starts)."
    )
  return available[:num_devices]


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh``: ``shape`` (one ``-1`` = the rest), ``axes``,
  ``axis_types`` (``auto`` or ``explicit``) over ``num_devices`` devices."""
  mc = mesh_config(config)
  devices = mesh_devices(mc.num_devices)
  shape, axes = list(mc.shape), tuple(mc.axes)
  if len(shape) != len(axes):
    raise ValueError(
      f"mesh.shape={tuple(shape)} and mesh.axes={axes} differ in length; "
      "give one size per axis name."
    )
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={tuple(shape)}: at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
        f"mesh.shape={tuple(shape)}: {len(devices)} devices do not divide "
        f"by {known}; change the fixed sizes or mesh.num_devices."
      )
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
      f"{len(devices)} are used; set mesh.num_devices or use -1."
    )
  types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if mc.axis_types not in types:
    raise ValueError(
      f"mesh.axis_types={mc.axis_types!r}; use 'auto' or 'explicit'."
    )
  return jax.make_mesh(
    tuple(shape),
    axes,
    (types[mc.axis_types],) * len(axes),
    devices=devices,
  )


def partition_rules(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Any:
  """``config.partition``: ``data_parallel``, ``fsdp`` (over ``data``) or
  ``tensor_parallel`` (over ``model``); see :mod:`jaxsparse.sharding`."""
  name = _field(config, "partition", "data_parallel")
  if name not in js_sharding.PRESETS:
    raise ValueError(
      f"partition={name!r}; use one of {sorted(js_sharding.PRESETS)}."
    )
  needs = {"fsdp": "data", "tensor_parallel": "model"}.get(name)
  if needs and needs not in mesh.axis_names:
    raise ValueError(
      f"partition={name!r} splits params over a {needs!r} mesh axis, but "
      f"mesh.axes={tuple(mesh.axis_names)}; add it (e.g. "
      "mesh.shape=(2, -1), mesh.axes=('data', 'model'))."
    )
  return js_sharding.PRESETS[name]()


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array.

  Each process transfers only the shards its own devices hold, so in a
  multi-process run every process feeds its slice of the global batch.
  """
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(tree: Any) -> Any:
  """NumPy copies of a tree of (possibly multi-process) global arrays."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def is_explicit(mesh: jax.sharding.Mesh) -> bool:
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """Starts ``jax.distributed`` when the config or environment asks.

  ``config.distributed`` (``enabled``, ``coordinator_address``,
  ``num_processes``, ``process_id``) or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  give the values; ``enabled=True`` with none given lets
  ``jax.distributed.initialize()`` detect them (Cloud TPU, SLURM, Open MPI).
  Must run before anything else touches JAX's devices.

  Returns:
    Whether this call initialised it.
  """
  dist = ml_collections.ConfigDict(
    dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  )
  if "distributed" in config:
    dist.update(config.distributed.to_dict())
  env = os.environ
  address = dist.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  num = dist.num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
  pid = dist.process_id
  if pid < 0:
    pid = int(env.get("JAX_PROCESS_ID", "-1"))
  if not (dist.enabled or address):
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs = {}
  if address:
    kwargs["coordinator_address"] = address
  if num:
    kwargs["num_processes"] = num
  if pid >= 0:
    kwargs["process_id"] = pid
  jax.distributed.initialize(**kwargs)
  return True


# --------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """An orbax manager of ``state`` (arrays) + ``meta`` (JSON) items."""
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep or None),
    item_names=("state", "meta"),
  )


def save_checkpoint(
  manager: ocp.CheckpointManager, step: int, state: Any, meta: dict
) -> None:
  """Starts an (asynchronous) save of ``state`` and ``meta`` at ``step``."""
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
    ),
  )


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable step folders to ``<step>.corrupt-<time>``.

  Kept for inspection, never deleted; out of the manager's step list, so
  the resumed run saves those steps anew (orbax skips existing steps).
  """
  if not steps:
    return
  if jax.process_index() == 0:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      src = os.path.join(str(manager.directory), str(step))
      dst = f"{src}.corrupt-{stamp}"
      if not os.path.isdir(src):
        continue
      os.rename(src, dst)
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
      print(f"WARNING: moved unreadable {src} to {dst}", file=sys.stderr)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxsparse-set-aside-checkpoints")
  manager.reload()


def restore_checkpoint(
  manager: ocp.CheckpointManager, target: Any
) -> tuple[int, Any, dict] | None:
  """The newest checkpoint that restores onto ``target``, or ``None``.

  ``target`` is a tree of ``jax.ShapeDtypeStruct`` whose ``sharding`` is
  the current mesh's, so a checkpoint written on another mesh (8 devices,
  FSDP) restores onto this one (4 devices, or 1). A checkpoint that fails to
  restore (truncated or missing files) is reported with a warning naming
  its step and the error, and the next older one is tried; once one
  restores, the unreadable newer ones are set aside (:func:`set_aside`),
  never deleted.

  Raises:
    RuntimeError: checkpoints exist but none restores (the message names
      the directory).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  errors, failed = [], []
  for step in steps:
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many types
      message = f"{type(e).__name__}: {str(e)[:500]}"
      errors.append(f"step {step}: {message}")
      logging.warning(
        "checkpoint at step %d in %s could not be restored (%s); trying "
        "an older one. The files are left in place.",
        step,
        manager.directory,
        message,
      )
      print(
        f"WARNING: checkpoint at step {step} in {manager.directory} could "
        f"not be restored ({message}); trying an older one.",
        file=sys.stderr,
      )
      failed.append(step)
      continue
    set_aside(manager, failed)
    return step, restored.state, dict(restored.meta)
  if steps:
    raise RuntimeError(
      f"No checkpoint in {manager.directory} could be restored (steps "
      f"{steps}): {'; '.join(errors)}. The files are left in place; move the "
      "directory away (or set resume='never' with another workdir) to start "
      "afresh."
    )
  return None


# --------------------------------------------------------------------------
# Training.


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
  # Mesh: batches split over "data"; params, masks and optimizer state as
  # the partition rules say.
  mesh = make_mesh(config)
  replicated = NamedSharding(mesh, P())
  data_axis = "data" if "data" in mesh.axis_names else None
  batch_sharding = NamedSharding(mesh, P(data_axis))
  data_size = mesh.shape[data_axis] if data_axis else 1
  if config.batch_size % data_size:
    raise ValueError(
      f"batch_size={config.batch_size} must be divisible by the "
      f"{data_size} devices of the 'data' axis the batch is split over."
    )
  rules = partition_rules(config, mesh)
  chief = jax.process_index() == 0
  # Virtual CPU devices run their programs on a small shared thread pool:
  # with several steps in flight, threads blocked in one step's all-reduce
  # can starve the devices that still have to reach it (seen: a 10-minute
  # stall, then XLA's collective timeout abort, on a 2-core machine). On
  # such meshes each step finishes before the next is dispatched.
  one_step_at_a_time = mesh.devices.flat[0].platform == "cpu" and (
    mesh.devices.size > 1
  )

  # Model, params and optimizer state, with shardings from shapes.
  model = make_model(config, dataset.num_classes)
  init_key = jax.random.key(config.seed)
  example = dataset.x_train[:1]
  param_shapes = jax.eval_shape(init_params, model, init_key, example)
  param_shardings = js_sharding.param_shardings(param_shapes, mesh, rules)
  params = jax.jit(
    init_params, static_argnums=0, out_shardings=param_shardings
  )(model, init_key, example)

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  context = Context(
    loss_fn=loss_fn,
    # The first training batch (the data order is a function of the seed).
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
  state_shardings = js_sharding.state_shardings(tx, params, param_shardings)
  explicit = is_explicit(mesh)
  # Explicit axes: the forward/backward pass runs on gathered params (a
  # reshard to replicated, whose transpose reduce-scatters the gradients),
  # so storage and the optimizer update stay sharded as the rules say.
  gathered = jax.tree.map(lambda _: replicated, param_shardings)

  def train_step(params, opt_state, dense_equivalent, x, y):
    # This step's forward and backward passes run with the current masks.
    density = flop_density(params, js.masks(opt_state) if sparse else None)
    compute = (
      (lambda p: jax.sharding.reshard(p, gathered))
      if explicit
      else (lambda p: p)
    )
    loss, grads = jax.value_and_grad(lambda p, b: loss_fn(compute(p), b))(
      params, (x, y)
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dense_equivalent + density, loss

  train_step = jax.jit(
    train_step,
    in_shardings=(
      param_shardings,
      state_shardings,
      replicated,
      batch_sharding,
      batch_sharding,
    ),
    out_shardings=(param_shardings, state_shardings, replicated, replicated),
    donate_argnums=(0, 1, 2),
  )

  @functools.partial(jax.jit, out_shardings=replicated)
  def accuracy(params, x, y):
    params = jax.sharding.reshard(params, gathered) if explicit else params
    logits = model.apply({"params": params}, x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)

  x_test = to_global(dataset.x_test, replicated)
  y_test = to_global(dataset.y_test, replicated)

  def evaluate(step, params, masks, dense_equivalent, loss):
    record = {
      "model": name,
      "method": config.method,
      "step": step,
      "train_loss": float(loss),
      "test_accuracy": float(accuracy(params, x_test, y_test)),
      "dense_equivalent_steps": float(dense_equivalent),
      "flop_density": float(flop_density(params, masks)),
    }
    if chief:
      log(record)
    return record

  # Checkpoints: workdir/checkpoints/<model name>, one manager per model.
  every = _field(config, "checkpoint_every", 0)
  resume = _field(config, "resume", "auto")
  if resume not in ("auto", "never", "required"):
    raise ValueError(
      f"resume={resume!r}; use 'auto' (resume when a checkpoint exists), "
      "'never' or 'required'."
    )
  manager = None
  ckpt_dir = os.path.join(config.workdir or "", "checkpoints", name)
  if config.workdir and (every or resume != "never"):
    if resume == "required" and not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(
        f"resume='required' but {ckpt_dir} does not exist; set resume='auto' "
        "to start afresh when there is no checkpoint."
      )
    if every or os.path.isdir(ckpt_dir):
      manager = checkpoint_manager(
        ckpt_dir, _field(config, "keep_checkpoints", 3)
      )
  elif resume == "required":
    raise ValueError("resume='required' needs a workdir.")
  if manager is not None and resume == "never" and manager.all_steps():
    raise ValueError(
      f"resume='never' but {ckpt_dir} holds checkpoints (steps "
      f"{sorted(manager.all_steps())}) that new saves would mix with; use "
      "another workdir, move them away, or set resume='auto'."
    )

  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  dense_equivalent = jax.device_put(jnp.zeros([], jnp.float32), replicated)
  start_step, resumed_loss = 0, float("nan")
  if manager is not None and resume != "never":
    target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      {
        "params": param_shapes,
        "opt_state": state_shapes,
        "dense_equivalent": jax.ShapeDtypeStruct((), jnp.float32),
      },
      {
        "params": param_shardings,
        "opt_state": state_shardings,
        "dense_equivalent": replicated,
      },
    )
    restored = restore_checkpoint(manager, target)
    if restored is None and resume == "required":
      raise FileNotFoundError(
        f"resume='required' but {ckpt_dir} holds no checkpoint."
      )
    if restored is not None:
      start_step, state, meta = restored
      if start_step > config.num_steps:
        raise ValueError(
          f"{name}: the checkpoint in {ckpt_dir} is at step {start_step}, "
          f"past num_steps={config.num_steps}; raise num_steps or use "
          "another workdir."
        )
      params, opt_state = state["params"], state["opt_state"]
      dense_equivalent = state["dense_equivalent"]
      resumed_loss = meta.get("train_loss", float("nan"))
      if chief:
        print(
          f"{name}: resumed from step {start_step} ({ckpt_dir}; data "
          f"position {meta['data_step']})"
        )

  def checkpoint(step):
    meta = {
      "step": step,
      "data_step": step,  # batches are a function of (seed, step)
      "seed": config.seed,
      "model": name,
      "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))),
      "train_loss": float(loss),
    }
    state = {
      "params": params,
      "opt_state": opt_state,
      "dense_equivalent": dense_equivalent,
    }
    save_checkpoint(manager, step, state, meta)

  train_batches = data_lib.batches(
    dataset.x_train,
    dataset.y_train,
    config.batch_size,
    config.seed,
    start_step=start_step,
  )
  stop_after = _field(config, "stop_after_step", 0)
  loss = resumed_loss
  start = time.perf_counter()
  bar = tqdm.trange(
    start_step,
    config.num_steps,
    initial=start_step,
    total=config.num_steps,
    desc=name,
    unit="step",
    dynamic_ncols=True,
    disable=not chief,
  )
  with jax.set_mesh(mesh):
    for step in bar:
      x, y = next(train_batches)
      x, y = to_global(x, batch_sharding), to_global(y, batch_sharding)
      params, opt_state, dense_equivalent, loss = train_step(
        params, opt_state, dense_equivalent, x, y
      )
      if one_step_at_a_time:
        jax.block_until_ready(loss)
      done = step + 1
      if done % config.log_every == 0:  # also bounds the dispatch queue
        bar.set_postfix(loss=f"{float(loss):.4f}")
      if (
        manager is not None
        and every
        and (done % every == 0 or done == config.num_steps)
      ):
        checkpoint(done)
      if done == stop_after:
        # Preemption simulation for tests: die abruptly (SIGKILL) right
        # after this step's checkpoint is committed.
        if manager is not None:
          manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      if done % config.eval_every == 0 and done < config.num_steps:
        masks = js.masks(opt_state) if sparse else None
        record = evaluate(done, params, masks, dense_equivalent, loss)
        bar.set_postfix(loss=f"{float(loss):.4f}", acc=record["test_accuracy"])
    bar.close()
    jax.block_until_ready(params)
    train_time = time.perf_counter() - start
    if manager is not None:
      manager.wait_until_finished()
      manager.close()

    masks = js.masks(opt_state) if sparse else None
    final = evaluate(config.num_steps, params, masks, dense_equivalent, loss)
  # Single-device copies (jaxsparse's reports take jax arrays).
  host_params, host_masks = jax.tree.map(jnp.asarray, to_host((params, masks)))
  where = js.default_where(config.exclude)
  final.update(
    sparsity_stats(host_params, host_masks, where), train_time_s=train_time
  )
  if config.workdir and chief and _field(config, "save_params", True):
    flat = {
      js.masking.path_str(p): v
      for p, v in jax.tree_util.tree_flatten_with_path(host_params)[0]
    }
    np.savez(
      os.path.join(config.workdir, f"params_{name}.npz"),
      **{k: np.asarray(v) for k, v in flat.items()},
    )
  if sparse and chief:
    print(f"\n{name}: per-layer summary")
    # With pattern "default" the method picks its pattern; the table then
    # checks only that masks and zeros agree (any mask is Unstructured).
    pattern = (
      js.Unstructured()
      if config.pattern == "default"
      else parse_pattern(config.pattern)
    )
    print(js.summary(host_params, host_masks, pattern))
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
  initialize_distributed(config)
  chief = jax.process_index() == 0
  dataset = load_data(config)
  if chief:
    print(
      f"data: {config.dataset} {dataset.x_train.shape} train, "
      f"{dataset.x_test.shape} test; devices: {make_mesh(config).devices}; "
      f"processes: {jax.process_count()}"
    )
  runs = {"dense" if config.method == "dense" else "sparse": config}
  if config.dense_baseline and config.method != "dense":
    dense_config = ml_collections.ConfigDict(config.to_dict())
    dense_config.method = "dense"
    runs["dense"] = dense_config

  metrics_file = None
  if config.workdir and chief:
    os.makedirs(config.workdir, exist_ok=True)
    resuming = _field(config, "resume", "auto") != "never" and os.path.isdir(
      os.path.join(config.workdir, "checkpoints")
    )
    metrics_file = open(
      os.path.join(config.workdir, "metrics.jsonl"), "a" if resuming else "w"
    )

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

  if chief:
    print()
    print(format_table(results))
  if config.workdir and chief:
    with open(os.path.join(config.workdir, "final.json"), "w") as f:
      json.dump({"results": results, "config": config.to_dict()}, f, indent=2)
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # orbax logs every save at INFO; keep warnings (damaged checkpoints) and
  # errors. --verbosity=0 on the command line still shows everything.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
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
