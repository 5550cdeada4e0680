"""The study sweep: every study config runs end to end in its runlocal form."""

import os

import ml_collections
import pytest

from experiments import sweep, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
STUDIES = (
  "experiments/configs/study_mnist_lenet300.py",
  "experiments/configs/study_fashion_lenet5_nm.py",
)


@pytest.mark.parametrize("study", STUDIES)
def test_runlocal_writes_table_and_plot(study, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  base, spec, _ = sweep.load_study(f"{study}:runlocal")
  if not os.path.isdir(base.data_dir):
    pytest.skip(f"{base.data_dir} not found")
  out = tmp_path / "results"
  sweep.main(
    [
      "--config",
      f"{study}:runlocal",
      "--workdir",
      str(tmp_path / "runs"),
      "--out",
      str(out),
      "--jobs",
      "1",
    ]
  )
  text = (out / f"{spec['name']}_runlocal.md").read_text()
  assert (out / f"{spec['name']}_runlocal.png").stat().st_size > 0
  for method, _ in spec["methods"]:
    row = next(
      line for line in text.splitlines() if line.startswith(f"| {method} |")
    )
    assert "-" != row.split("|")[2].strip(), row  # an accuracy was recorded
  for _, overrides in spec["columns"]:
    sparsity = overrides["final_sparsity"]
    assert f"{sparsity:.4f} ± 0.0000" in text
  # A second invocation resumes: nothing left to train, notes are kept.
  (out / f"{spec['name']}_runlocal.md").write_text(text + "kept note\n")
  sweep.main(
    [
      "--config",
      f"{study}:runlocal",
      "--workdir",
      str(tmp_path / "runs"),
      "--out",
      str(out),
    ]
  )
  assert "kept note" in (out / f"{spec['name']}_runlocal.md").read_text()


def _config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      method="rigl",
      final_sparsity=0.9,
      schedule="constant",
      pattern="unstructured",
      allocation="default",
      exclude=(),
      update_every=10,
      begin_step=0,
      end_step=100,
      seed=0,
      method_args=ml_collections.ConfigDict(),
    )
  )
  config.update(overrides)
  return config


def test_make_method_rejects_unknown_method_args():
  config = _config(method_args=ml_collections.ConfigDict({"nope": 1}))
  with pytest.raises(
    ValueError, match=r"\['nope'\] are not arguments of js.rigl"
  ):
    train.make_method(config)


def test_make_method_rejects_an_allocation_the_method_does_not_take():
  with pytest.raises(ValueError, match="takes no allocation"):
    train.make_method(
      _config(method="global_magnitude", allocation="erk", schedule="constant")
    )


def test_make_method_passes_what_the_factory_names():
  method = train.make_method(
    _config(method_args=ml_collections.ConfigDict({"drop_fraction": 0.5}))
  )
  assert callable(method.update)
