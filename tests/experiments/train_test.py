"""Smoke tests of the trainer: digits and MNIST in seconds, and the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import data, train
from experiments.configs import digits_gmp, mnist_lenet300_gmp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
MNIST_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")


def test_digits_runlocal_reaches_the_configured_sparsity(tmp_path):
  config = digits_gmp.get_config("runlocal")
  config.workdir = str(tmp_path)
  results = train.run(config)
  sparse, dense = results["sparse"], results["dense"]
  assert sparse["sparsity"] == pytest.approx(config.final_sparsity, abs=1e-3)
  assert sparse["zero_fraction"] == pytest.approx(
    config.final_sparsity, abs=1e-3
  )
  assert sparse["test_accuracy"] > 0.5  # chance is 0.1
  assert dense["test_accuracy"] > 0.5
  assert dense["zero_fraction"] == 0.0
  assert sparse["dense_equivalent_steps"] < sparse["step"]
  assert dense["dense_equivalent_steps"] == pytest.approx(dense["step"])
  assert (tmp_path / "final.json").exists()
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2


def test_mnist_runlocal_reads_the_idx_files():
  if not os.path.isdir(MNIST_DIR):
    pytest.skip(f"{MNIST_DIR} not found")
  config = mnist_lenet300_gmp.get_config("runlocal")
  config.data_dir = MNIST_DIR
  config.dense_baseline = False
  results = train.run(config)
  assert set(results) == {"sparse"}
  assert results["sparse"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
  assert results["sparse"]["test_accuracy"] > 0.5


def test_cli_prints_the_final_table():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config",
      "experiments/configs/digits_gmp.py:runlocal",
      "--config.dense_baseline=False",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "dense-eq steps" in result.stdout
  assert "sparse | gmp" in result.stdout
  assert "total (masked)" in result.stdout  # js.summary


def test_load_idx_names_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
    data.load_idx(str(tmp_path))


@pytest.mark.parametrize(
  "spec, error",
  [("nm:2", "nm:2"), ("blocks:4:4", "blocks"), ("channel:x", "channel:x")],
)
def test_parse_pattern_rejects_bad_specs(spec, error):
  with pytest.raises(ValueError, match=error):
    train.parse_pattern(spec)


def short_config(workdir, **overrides):
  config = digits_gmp.get_config("runlocal")
  config.workdir = str(workdir)
  config.dense_baseline = False
  config.num_steps = 30
  config.begin_step = 5
  config.end_step = 25
  config.update_every = 5
  config.eval_every = 30
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def one_device_params(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  train.run(short_config(workdir))
  with np.load(workdir / "params_sparse.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize(
  "partition, axis_types, shape, axes",
  [
    ("data_parallel", "explicit", (-1,), ("data",)),
    ("fsdp", "auto", (-1,), ("data",)),
    ("tensor_parallel", "explicit", (2, -1), ("data", "model")),
    ("tensor_parallel", "auto", (2, -1), ("data", "model")),
  ],
)
def test_sharded_training_matches_one_device(
  one_device_params, tmp_path, partition, axis_types, shape, axes
):
  # 8 devices split each batch 8 ways (or 2 ways with a model axis), so the
  # loss mean and gradient sums add in another order: close, not bitwise.
  config = short_config(
    tmp_path,
    partition=partition,
    **{
      "mesh.num_devices": 8,
      "mesh.axis_types": axis_types,
      "mesh.shape": shape,
      "mesh.axes": axes,
    },
  )
  result = train.run(config)["sparse"]
  assert result["sparsity"] == pytest.approx(config.final_sparsity, abs=1e-3)
  with np.load(tmp_path / "params_sparse.npz") as f:
    for key, expected in one_device_params.items():
      np.testing.assert_allclose(
        f[key], expected, rtol=1e-4, atol=1e-5, err_msg=key
      )


def test_mesh_and_partition_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="'model' mesh axis"):
    train.run(short_config(tmp_path, partition="tensor_parallel"))
  with pytest.raises(ValueError, match="mesh.num_devices=16"):
    train.run(short_config(tmp_path, **{"mesh.num_devices": 16}))
  with pytest.raises(ValueError, match="partition='zero'"):
    train.run(short_config(tmp_path, partition="zero"))
