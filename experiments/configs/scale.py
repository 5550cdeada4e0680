"""The scale fields every trainer config shares (docs/scaling.md).

Configs call :func:`add_scale_fields` so ``--config.mesh.*``,
``--config.checkpoint_every`` and the rest can be set from the command line;
the trainer uses these same defaults for a config that lacks them.
"""

import ml_collections


def add_scale_fields(config: ml_collections.ConfigDict) -> None:
  """Adds mesh, partition, checkpoint and multi-host fields with defaults."""
  # Mesh: shape (one -1 = the rest) and axis names; num_devices 0 = all local
  # accelerators, or one device on CPU.
  config.mesh = ml_collections.ConfigDict(
    dict(shape=(-1,), axes=("data",), axis_types="auto", num_devices=0)
  )
  config.partition = "data_parallel"  # or "fsdp", "tensor_parallel"
  # Checkpoints under workdir/checkpoints/<model> every K steps (0 = off), the
  # newest keep_checkpoints kept; resume: "auto" (when one exists), "never" or
  # "required".
  config.checkpoint_every = 0
  config.keep_checkpoints = 3
  config.resume = "auto"
  config.save_params = True  # workdir/params_<model>.npz at the end
  # Tests only: SIGKILL the run right after the checkpoint of this step (a
  # preemption simulation); 0 = never.
  config.stop_after_step = 0
  # jax.distributed: on when enabled or an address is given (flags or
  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); enabled
  # with no address auto-detects Cloud TPU and SLURM.
  config.distributed = ml_collections.ConfigDict(
    dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  )
