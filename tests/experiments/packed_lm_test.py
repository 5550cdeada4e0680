"""Packed 2:4 inference of a pruned GPT, end to end (``--quick`` path)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
import jaxsparse.nn as jsnn
from experiments.configs import shakespeare_gpt


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  from experiments import packed_lm

  config = shakespeare_gpt.get_config("runlocal")
  if not os.path.exists(config.data_path):
    pytest.skip(f"{config.data_path} not found")
  out = tmp_path_factory.mktemp("packed_lm") / "packed_lm.md"
  out.write_text("old\n<!-- notes -->\nHand-written reading.\n")
  study = packed_lm.main_study(
    None, str(out), quick=True, dtype="bfloat16", log=lambda _: None
  )
  return config, study, out.read_text()


def _nm_bytes(k: int, n_out: int, itemsize: int) -> int:
  """2:4 packed bytes of a [k, n_out] kernel, from kernels.packing's layout:
  n G N values of itemsize bytes plus n ceil(G / 4) N uint8 words (2-bit
  positions, 4 per byte), G = k / 4."""
  groups = k // 4
  return 2 * groups * n_out * itemsize + 2 * math.ceil(groups / 4) * n_out


def test_packed_perplexity_equals_masked_dense(quick):
  _, study, _ = quick
  assert study["prune"]["ok"]
  assert study["prune"]["sparsity"] == 0.5
  f32 = study["rows"]["float32"]
  p = f32["perplexity"]
  assert p["packed"] == pytest.approx(p["masked"], rel=1e-5)
  assert f32["logit_gap"] < 1e-4
  # Pruning changed the model: the check is not dense against dense.
  assert p["masked"] != p["dense"]
  assert f32["logit_gap_vs_reference"] is None
  bf16_row = study["rows"]["bfloat16"]
  bf16 = bf16_row["perplexity"]
  assert bf16["packed"] == pytest.approx(bf16["masked"], rel=2e-2)
  # bfloat16 rounding moves the logits away from float32's.
  assert bf16_row["logit_gap_vs_reference"] > 0


def test_packed_kernel_bytes_follow_the_layout(quick):
  config, study, _ = quick
  width = config.model.width
  # qkv [d, 3d], proj [d, d], fc [d, 4d], out [4d, d] in every block.
  shapes = [(width, 3 * width), (width, width), (width, 4 * width)]
  shapes = (shapes + [(4 * width, width)]) * config.model.num_layers
  for name, itemsize in (("float32", 4), ("bfloat16", 2)):
    row = study["rows"][name]
    assert row["packed_kernels"] == len(shapes)
    dense = sum(k * n * itemsize for k, n in shapes)
    packed = sum(_nm_bytes(k, n, itemsize) for k, n in shapes)
    assert row["kernel_bytes"] == {"masked": dense, "packed": packed}
    # Every K here is a multiple of 16: exactly 1/2 + 1/(8 itemsize).
    assert packed / dense == 0.5 + 1 / (8 * itemsize)
    params = row["param_bytes"]
    assert params["masked"] - params["packed"] == dense - packed
    disk = row["disk_bytes"]["uncompressed"]
    assert disk["packed"] < disk["masked"]
  assert study["rows"]["float32"]["kernel_bytes"]["packed"] * 32 == (
    study["rows"]["float32"]["kernel_bytes"]["masked"] * 17
  )


def test_results_page_has_the_tables_and_keeps_notes(quick):
  _, study, text = quick
  before, notes = text.split("<!-- notes -->")
  assert notes.strip() == "Hand-written reading."
  assert "old" not in before
  assert "| float32 |" in before and "| bfloat16 |" in before
  assert "## Forward pass time on CPU" in before
  f32 = study["rows"]["float32"]
  assert f"{f32['perplexity']['packed']:.6f}" in before
  assert set(f32["forward_s"]) == {"masked", "packed"}


def test_check_packed_rejects_a_kernel_left_dense():
  from experiments import packed_lm

  w = jax.random.normal(jax.random.key(0), (8, 4))
  params = {"Dense_0": {"kernel": w, "bias": jnp.zeros(4)}}
  mask = js.patterns.select(js.NM(2, 4), jnp.abs(w), 0.5)
  masks = {"Dense_0": {"kernel": mask, "bias": None}}
  packed = jsnn.pack(params, masks, js.NM(2, 4))
  assert packed_lm.check_packed(packed, params, masks) == ["Dense_0/kernel"]
  left_dense = {"Dense_0": {"kernel": w * mask, "bias": jnp.zeros(4)}}
  with pytest.raises(AssertionError, match="Dense_0/kernel"):
    packed_lm.check_packed(left_dense, params, masks)
  other = jsnn.pack(
    {"Dense_0": {"kernel": np.asarray(w) + 1, "bias": jnp.zeros(4)}},
    masks,
    js.NM(2, 4),
  )
  with pytest.raises(AssertionError, match="unpacks"):
    packed_lm.check_packed(other, params, masks)
