"""Checkpoint and resume in the trainer: kill, resume, other meshes, damage.

Every comparison is bitwise: a resumed run must end with the params an
uninterrupted run on the same mesh ends with, and a checkpoint restored onto
another mesh must hold the values that were saved.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import train
from experiments.configs import digits_gmp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def small_config(workdir, **overrides):
  config = digits_gmp.get_config("runlocal")
  config.workdir = str(workdir)
  config.dense_baseline = False
  config.num_steps = 100
  config.begin_step = 10
  config.end_step = 60
  config.eval_every = 50
  config.checkpoint_every = 40
  config.keep_checkpoints = 5
  config.update_from_flattened_dict(overrides)
  return config


def cli_overrides(config):
  flags = []
  for key in (
    "workdir",
    "dense_baseline",
    "num_steps",
    "begin_step",
    "end_step",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "stop_after_step",
  ):
    flags.append(f"--config.{key}={config[key]}")
  return flags


def load_params(workdir, name="sparse"):
  with np.load(os.path.join(workdir, f"params_{name}.npz")) as f:
    return {k: f[k] for k in f.files}


def assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(
      a[key].view(np.uint8), b[key].view(np.uint8), err_msg=key
    )


def steps_in(workdir, name="sparse"):
  folder = os.path.join(workdir, "checkpoints", name)
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted run (1 device), checkpoints at 40, 80 and 100."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  results = train.run(small_config(workdir))
  return workdir, results


def test_killed_run_resumes_to_bitwise_equal_params(uninterrupted, tmp_path):
  reference_dir, reference = uninterrupted
  config = small_config(tmp_path, stop_after_step=80)
  killed = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config",
      "experiments/configs/digits_gmp.py:runlocal",
      *cli_overrides(config),
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
  assert steps_in(tmp_path) == [40, 80]
  assert not (tmp_path / "final.json").exists()

  config.stop_after_step = 0
  resumed = train.run(config)["sparse"]
  assert_bitwise_equal(load_params(tmp_path), load_params(reference_dir))
  for key in ("dense_equivalent_steps", "test_accuracy", "sparsity"):
    assert resumed[key] == reference["sparse"][key], key
  assert steps_in(tmp_path) == [40, 80, 100]


def test_restore_onto_other_meshes(tmp_path):
  # Saved from 8 devices with FSDP over explicit axes ...
  source = tmp_path / "fsdp8"
  config = small_config(
    source,
    num_steps=40,
    partition="fsdp",
    **{"mesh.num_devices": 8, "mesh.axis_types": "explicit"},
  )
  train.run(config)
  saved = load_params(source)
  # ... restored (no step left to train) onto 4 devices and onto 1.
  for devices, partition in ((4, "fsdp"), (1, "data_parallel")):
    target = tmp_path / f"restore{devices}"
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    config = small_config(
      target,
      num_steps=40,
      partition=partition,
      resume="required",
      **{"mesh.num_devices": devices},
    )
    train.run(config)
    assert_bitwise_equal(load_params(target), saved)


def corrupt(step_dir):
  """Truncates every data file of a saved step to half its size."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if name == "commit_success.txt":
        continue
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_damaged_latest_checkpoint_falls_back(uninterrupted, tmp_path, capfd):
  reference_dir, _ = uninterrupted
  shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
  shutil.rmtree(tmp_path / "checkpoints" / "sparse" / "100")
  corrupt(tmp_path / "checkpoints" / "sparse" / "80")

  train.run(small_config(tmp_path))
  err = capfd.readouterr().err
  assert "checkpoint at step 80" in err and "could not be restored" in err
  # Resumed from 40, trained to 100: the same params as without damage.
  assert_bitwise_equal(load_params(tmp_path), load_params(reference_dir))
  # The damaged step is kept aside, not deleted; 80 and 100 saved anew.
  names = os.listdir(tmp_path / "checkpoints" / "sparse")
  assert any(n.startswith("80.corrupt-") for n in names), names
  assert steps_in(tmp_path) == [40, 80, 100]


def test_no_readable_checkpoint_is_a_clear_error(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
  for step in (40, 80, 100):
    corrupt(tmp_path / "checkpoints" / "sparse" / str(step))
  with pytest.raises(RuntimeError, match="No checkpoint in .*sparse"):
    train.run(small_config(tmp_path))
  assert steps_in(tmp_path) == [40, 80, 100]  # nothing deleted or moved
  with pytest.raises(ValueError, match="resume='never' but .*sparse holds"):
    train.run(small_config(tmp_path, resume="never"))


def test_missing_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="resume='required'"):
    train.run(small_config(tmp_path, resume="required", checkpoint_every=0))
