"""Multi-process training: 2 processes x 4 CPU devices vs 1 process x 8.

The two processes find each other through ``jax.distributed`` on localhost
(process 0 reads its settings from flags, process 1 from the environment
variables), each feeds its half of every global batch, and they write one
checkpoint together. The result is compared with a single process that
trains on the same 8-device mesh shape.

Tolerance: the cross-process all-reduce (gloo) adds the devices' partial
gradients in another order than XLA:CPU's in-process all-reduce, and float
addition is not associative, so params differ by a few ulps (measured: at
most 2e-7 after 60 steps); the masks (which weights are zero) are equal.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import train
from experiments.configs import digits_gmp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FLAGS = {
  "dense_baseline": False,
  "num_steps": 60,
  "begin_step": 10,
  "end_step": 40,
  "eval_every": 30,
  "partition": "fsdp",
  "mesh.num_devices": 8,
  "checkpoint_every": 30,
}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, *extra_flags):
  """Trains with 2 processes x 4 CPU devices; returns their return codes
  and outputs."""
  address = f"localhost:{free_port()}"
  command = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config",
    "experiments/configs/digits_gmp.py:runlocal",
    f"--config.workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in FLAGS.items()),
    *extra_flags,
  ]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_NUM_CPU_DEVICES": "4",
  }
  env.pop("XLA_FLAGS", None)
  processes = [
    subprocess.Popen(  # settings from flags
      command
      + [
        f"--config.distributed.coordinator_address={address}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=0",
      ],
      cwd=REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    ),
    subprocess.Popen(  # settings from the environment
      command,
      cwd=REPO_ROOT,
      env={
        **env,
        "JAX_COORDINATOR_ADDRESS": address,
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
      },
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    ),
  ]
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=300)[0])
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in processes], outputs


def load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_two_processes_match_one_process(tmp_path):
  workdir = tmp_path / "multi"
  codes, outputs = run_two_processes(workdir)
  for code, out in zip(codes, outputs):
    assert code == 0, out[-3000:]
  assert "processes: 2" in outputs[0]
  assert "sparse | gmp" in outputs[0]  # only process 0 prints the table
  assert "sparse | gmp" not in outputs[1]
  steps = os.listdir(workdir / "checkpoints" / "sparse")
  assert sorted(s for s in steps if s.isdigit()) == ["30", "60"]

  # One process, 8 devices (this pytest process has 8 CPU devices).
  config = digits_gmp.get_config("runlocal")
  config.workdir = str(tmp_path / "single")
  config.update_from_flattened_dict(FLAGS)
  train.run(config)

  with (
    np.load(workdir / "params_sparse.npz") as multi,
    np.load(tmp_path / "single" / "params_sparse.npz") as single,
  ):
    assert sorted(multi.files) == sorted(single.files)
    for key in multi.files:
      np.testing.assert_array_equal(
        multi[key] == 0, single[key] == 0, err_msg=key
      )
      np.testing.assert_allclose(
        multi[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key
      )


@pytest.mark.slow  # ~60 s: two 2-process runs
def test_two_processes_resume_bitwise(tmp_path):
  codes, outputs = run_two_processes(tmp_path / "whole")
  assert codes == [0, 0], outputs[0][-3000:]
  codes, outputs = run_two_processes(
    tmp_path / "killed", "--config.stop_after_step=30"
  )
  assert all(c != 0 for c in codes), outputs[0][-3000:]  # SIGKILLed
  codes, outputs = run_two_processes(tmp_path / "killed")
  assert codes == [0, 0], outputs[0][-3000:]
  assert "resumed from step 30" in outputs[0]
  whole = load(tmp_path / "whole" / "params_sparse.npz")
  resumed = load(tmp_path / "killed" / "params_sparse.npz")
  for key in whole:
    np.testing.assert_array_equal(
      whole[key].view(np.uint8), resumed[key].view(np.uint8), err_msg=key
    )
