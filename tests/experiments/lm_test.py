"""The character-level GPT, its trainer, checkpoints and the one-shot study."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpt, lm
from experiments.configs import shakespeare_gpt

TEXT = lm.DEFAULT_DATA_PATH


def _runlocal_config():
  config = shakespeare_gpt.get_config("runlocal")
  if not os.path.exists(config.data_path):
    pytest.skip(f"{config.data_path} not found")
  return config


@pytest.fixture(scope="module")
def trained():
  config = _runlocal_config()
  result = lm.train(config, log=lambda _: None)
  return config, result


def test_encode_decode_and_split_cover_the_text():
  text = "to be, or not to be:\nthat is the question." * 3
  data = lm.make_data(text, val_fraction=0.1)
  assert data.vocab == "".join(sorted(set(text)))
  assert len(data.train) + len(data.val) == len(text)
  assert len(data.train) == round(0.9 * len(text))
  assert lm.decode(np.concatenate([data.train, data.val]), data.vocab) == text
  with pytest.raises(ValueError, match="not in the vocabulary"):
    lm.encode("xyz!", data.vocab)


def test_batches_are_deterministic_shifted_segments():
  ids = np.arange(1000, dtype=np.int32)
  a = lm.batches(ids, 16, 8, seed=3)
  b = lm.batches(ids, 16, 8, seed=3)
  c = lm.batches(ids, 16, 8, seed=4)
  for _ in range(3):
    (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(xa, xc)
    assert xa.shape == ya.shape == (8, 16)
    # Contiguous: ids are positions, so each row counts up by one.
    np.testing.assert_array_equal(np.diff(xa, axis=1), 1)
    np.testing.assert_array_equal(ya, xa + 1)
  e1 = lm.eval_segments(ids, 16, 5, seed=0)
  e2 = lm.eval_segments(ids, 16, 5, seed=0)
  np.testing.assert_array_equal(e1[0], e2[0])


def test_model_is_causal():
  model = gpt.GPT(
    vocab_size=11, block_size=12, num_layers=2, num_heads=2, width=16
  )
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 11)
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 11)
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  a, b = apply(tokens), apply(changed)
  assert a.shape == (2, 12, 11)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.all(np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 0)


def test_every_linear_layer_is_a_dense_in_a_block():
  model = gpt.GPT(
    vocab_size=11, block_size=8, num_layers=2, num_heads=2, width=8
  )
  params = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )["params"]
  assert set(params) == {"wte", "wpe", "Block_0", "Block_1", "ln_f", "lm_head"}
  assert params["Block_0"]["attn"]["qkv"]["kernel"].shape == (8, 24)
  assert params["Block_0"]["mlp"]["fc"]["kernel"].shape == (8, 32)


def test_runlocal_training_lowers_the_validation_loss(trained):
  config, result = trained
  data = result["data"]
  model = result["model"]
  x0 = jnp.zeros((1, config.block_size), jnp.int32)
  init = model.init(jax.random.key(config.seed), x0)["params"]
  val = lm.eval_segments(data.val, config.block_size, config.eval_segments, 0)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  before = lm.evaluate(apply_fn, init, val)["val_loss"]
  after = result["metrics"]["val_loss"]
  assert before == pytest.approx(np.log(len(data.vocab)), abs=0.3)
  assert after < before - 0.5
  assert result["metrics"]["val_perplexity"] == pytest.approx(np.exp(after))


def test_checkpoint_round_trip(trained, tmp_path):
  config, result = trained
  lm.save_checkpoint(
    str(tmp_path),
    result["params"],
    result["vocab"],
    config,
    result["metrics"],
  )
  model, params, vocab, loaded_config = lm.load_checkpoint(str(tmp_path))
  assert vocab == result["vocab"]
  assert model == result["model"]
  assert loaded_config.to_dict() == config.to_dict()
  chex.assert_trees_all_equal(params, result["params"])
  val = lm.eval_segments(
    result["data"].val, config.block_size, config.eval_segments, 0
  )
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  restored = lm.evaluate(apply_fn, params, val)
  assert restored == lm.evaluate(apply_fn, result["params"], val)
  assert restored["val_loss"] == result["metrics"]["val_loss"]


def test_load_checkpoint_names_the_missing_file(tmp_path):
  with pytest.raises(ValueError, match="lm.json"):
    lm.load_checkpoint(str(tmp_path))


def _numpy_magnitude(params, sparsity):
  """Reference: zero the round(s * size) smallest |w| of each block kernel."""

  def prune(path, w):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if not (name.startswith("Block_") and name.endswith("kernel")):
      return w
    w = np.asarray(w)
    order = np.argsort(np.abs(w), axis=None, kind="stable")
    out = w.copy().reshape(-1)
    out[order[: round(sparsity * w.size)]] = 0
    return jnp.asarray(out.reshape(w.shape))

  return jax.tree_util.tree_map_with_path(prune, params)


def test_study_magnitude_matches_a_numpy_reference(trained):
  from experiments import oneshot_lm

  config, result = trained
  model = result["model"]
  study = oneshot_lm.run_study(
    model,
    result["params"],
    config,
    result["data"],
    ["magnitude"],
    ["50%", "2:4"],
    calibration_segments=8,
    log=lambda _: None,
  )
  assert study["dense"]["val_loss"] == result["metrics"]["val_loss"]
  cell = study["rows"]["magnitude"]["50%"]
  assert cell["ok"] and cell["sparsity"] == pytest.approx(0.5, abs=1e-6)
  assert cell["mask_sparsity"] == pytest.approx(0.5, abs=1e-6)
  assert study["rows"]["magnitude"]["2:4"]["ok"]
  val = lm.eval_segments(
    result["data"].val, config.block_size, config.eval_segments, 0
  )
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  reference = lm.evaluate(
    apply_fn, _numpy_magnitude(result["params"], 0.5), val
  )
  assert cell["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
  assert cell["val_loss"] != study["dense"]["val_loss"]


def test_study_quick_writes_the_table_and_keeps_notes(tmp_path):
  from experiments import oneshot_lm

  _runlocal_config()
  out = tmp_path / "oneshot_lm.md"
  out.write_text("old\n<!-- notes -->\nHand-written reading.\n")
  study = oneshot_lm.main_study(
    None,
    str(out),
    quick=True,
    method_names=["magnitude", "wanda"],
    log=lambda _: None,
  )
  text = out.read_text()
  assert "| magnitude |" in text and "| wanda |" in text
  assert "| method | 50% |" in text
  assert text.rstrip().endswith("Hand-written reading.")
  assert "old" not in text.split("<!-- notes -->")[0]
  for row in study["rows"].values():
    assert row["50%"]["ok"]
    assert row["50%"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
