"""The outside-model zoo: models written elsewhere, in tiny configurations.

Each entry builds ``Model(apply_fn, params, batch, ...)`` where ``apply_fn(
params, batch)`` runs the model as its library intends (linen ``apply`` with
its other collections closed over, nnx ``merge``, Hugging Face's own
``__call__``). Nothing here is jaxsparse-aware: the zoo tests find the
kernels from the traced computation.

Flax's own layers (linen and nnx): Dense, DenseGeneral with multi-axis
features and ``axis``, MultiHeadDotProductAttention / nnx.MultiHeadAttention,
Einsum, Conv + BatchNorm, Embed, LayerNorm, RMSNorm, ``nn.scan`` +
``nn.remat`` stacks and ``nnx.scan`` + ``nnx.remat`` stacks. Model libraries
(the ``zoo`` extra, pinned): Hugging Face ``transformers`` 4.57 Flax GPT-2,
BERT and Llama, and ``flaxmodels`` 0.1.3 ResNet-18.
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class Model(NamedTuple):
  """A zoo entry.

  Attributes:
    apply_fn: ``apply_fn(params, batch)`` -> an array (logits).
    params: the params tree the optimizer sees.
    batch: one input batch.
    layouts: expected contraction axes of some kernels (reference values
      from the library's own definition of the layer).
    not_kernels: paths (regexes) that must not be found as kernels.
    blocks: whether the model has several blocks (one-shot must find more
      than one group).
    subset: a regex limiting the sparsified kernels of a large model to
      keep CI fast (ResNet-18's 3x3x512 convolutions: their mask updates
      compile for tens of seconds and their input Hessians (K = 4608) take
      minutes on a 2-core CPU), or ``None`` for every kernel. Layouts are
      still checked for every kernel.
  """

  apply_fn: Callable[[Any, Any], Any]
  params: Any
  batch: Any
  layouts: dict[str, tuple[int, ...]]
  not_kernels: tuple[str, ...]
  blocks: bool
  subset: str | None = None


def _tokens(batch=2, length=8, vocab=64, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


# --- flax linen ---------------------------------------------------------


class LinenLayers(nn.Module):
  """Dense, DenseGeneral with multi-axis features and contracting axes,
  Einsum."""

  @nn.compact
  def __call__(self, x):  # [batch, tokens, 16]
    h = nn.relu(nn.Dense(32, name="dense")(x))
    h = nn.DenseGeneral((4, 8), name="split")(h)  # [b, t, 4, 8]
    h = nn.DenseGeneral(16, axis=(-2, -1), name="merge")(h)
    h = nn.Einsum((16, 4, 8), "btd,dnh->btnh", name="qkv")(h)
    h = nn.Einsum((4, 8, 16), "btnh,nhd->btd", name="out")(nn.tanh(h))
    h = nn.DenseGeneral(8, axis=1, name="over_tokens")(h)  # contracts t
    return nn.Dense(4, name="head")(h)


class LinenAttention(nn.Module):
  """Embed, MultiHeadDotProductAttention, LayerNorm, RMSNorm, a tied head."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(64, 32, name="embed")
    x = embed(ids)
    x = x + self.param(
      "pos_embedding", nn.initializers.normal(0.02), (1, ids.shape[1], 32)
    )
    for i in range(2):
      h = nn.LayerNorm(name=f"ln_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=4, name=f"attn_{i}")(
        h, mask=nn.make_causal_mask(ids)
      )
      h = nn.RMSNorm(name=f"rms_{i}")(x)
      x = x + nn.Dense(32, name=f"mlp_{i}")(nn.gelu(h))
    return embed.attend(x)


class LinenConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):  # [batch, 8, 8, 4]
    for i, features in enumerate((16, 32)):
      x = nn.Conv(features, (3, 3), use_bias=False, name=f"conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x)
      x = nn.relu(x)
    return nn.Dense(10, name="head")(x.mean((1, 2)))


class _ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    h = nn.gelu(nn.Dense(32)(h))
    return x + nn.Dense(16)(h), None


class LinenScan(nn.Module):
  @nn.compact
  def __call__(self, x):  # [batch, tokens, 16]
    stack = nn.scan(
      nn.remat(_ScanLayer),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=3,
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(4, name="head")(x)


def _linen(module, batch, layouts, not_kernels, blocks, **init_kwargs):
  variables = module.init(jax.random.key(0), batch, **init_kwargs)
  params = variables.pop("params")
  others = dict(variables)

  def apply_fn(p, x):
    return module.apply({"params": p, **others}, x)

  return Model(apply_fn, params, batch, layouts, not_kernels, blocks)


def linen_layers():
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  layouts = {
    "dense/kernel": (0,),
    "split/kernel": (0,),
    "merge/kernel": (0, 1),
    "qkv/kernel": (0,),
    "out/kernel": (0, 1),
    "over_tokens/kernel": (0,),
  }
  return _linen(LinenLayers(), x, layouts, ("bias",), blocks=False)


def linen_attention():
  layouts = {
    "attn_0/query/kernel": (0,),
    "attn_0/out/kernel": (0, 1),
    "mlp_1/kernel": (0,),
  }
  not_kernels = ("embed", "pos_embedding", "ln_", "rms_", "bias")
  return _linen(LinenAttention(), _tokens(), layouts, not_kernels, True)


def linen_conv_bn():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  layouts = {"conv_0/kernel": (0, 1, 2), "head/kernel": (0,)}
  return _linen(LinenConvBN(), x, layouts, ("bn_",), blocks=True)


def linen_scan():
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  layouts = {"layers/Dense_0/kernel": (1,), "head/kernel": (0,)}
  return _linen(LinenScan(), x, layouts, ("LayerNorm", "bias"), blocks=True)


# --- flax nnx -----------------------------------------------------------


class NnxTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(64, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(4, 32, decode=False, rngs=rngs)
    self.rms = nnx.RMSNorm(32, rngs=rngs)
    self.up = nnx.Einsum("btd,dnh->btnh", (32, 4, 16), rngs=rngs)
    self.down = nnx.LinearGeneral((4, 16), 32, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(32, 64, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    x = x + self.attn(self.norm(x))
    x = x + self.down(nnx.gelu(self.up(self.rms(x))))
    return self.head(x)


class NnxConvBN(nnx.Module):
  def __init__(self, rngs):
    self.conv_0 = nnx.Conv(4, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn_0 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
    self.conv_1 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
    self.bn_1 = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_0(self.conv_0(x)))
    x = nnx.relu(self.bn_1(self.conv_1(x)))
    return self.head(x.mean((1, 2)))


class _NnxLayer(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NnxScan(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxLayer(rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(x, layer):
      return layer(x)

    return self.head(step(x, self.layers))


def _nnx(module, batch, layouts, not_kernels, blocks):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def apply_fn(p, x):
    return nnx.merge(graphdef, p, rest)(x)

  return Model(apply_fn, params, batch, layouts, not_kernels, blocks)


def nnx_transformer():
  layouts = {
    "attn/query/kernel": (0,),
    "attn/out/kernel": (0, 1),
    "up/kernel": (0,),
    "down/kernel": (0, 1),
  }
  not_kernels = ("embed", "norm", "rms", "bias")
  model = NnxTransformer(nnx.Rngs(0))
  return _nnx(model, _tokens(), layouts, not_kernels, blocks=False)


def nnx_conv_bn():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  layouts = {"conv_1/kernel": (0, 1, 2), "head/kernel": (0,)}
  return _nnx(NnxConvBN(nnx.Rngs(0)), x, layouts, ("bn_",), blocks=True)


def nnx_scan():
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  layouts = {"layers/up/kernel": (1,), "head/kernel": (0,)}
  not_kernels = ("norm", "bias")
  return _nnx(NnxScan(nnx.Rngs(0)), x, layouts, not_kernels, blocks=True)


# --- Hugging Face transformers (Flax) -------------------------------------


def _hf(model_cls, config, batch, layouts, not_kernels):
  with warnings.catch_warnings():
    # transformers 4.x announces the end of its Flax classes on import.
    warnings.simplefilter("ignore")
    model = model_cls(config, seed=0)

  def apply_fn(p, ids):
    return model(ids, params=p).logits

  params = jax.tree.map(jnp.asarray, model.params)
  return Model(apply_fn, params, batch, layouts, not_kernels, blocks=True)


def _transformers():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers  # noqa: PLC0415

  return transformers


def hf_gpt2():
  tf = _transformers()
  config = tf.GPT2Config(
    vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4
  )
  layouts = {  # FlaxConv1D stores [out, in] and contracts its axis 1
    "transformer/h/0/attn/c_attn/kernel": (1,),
    "transformer/h/1/mlp/c_proj/kernel": (1,),
  }
  not_kernels = ("wte", "wpe", "ln_", "bias")
  return _hf(tf.FlaxGPT2LMHeadModel, config, _tokens(), layouts, not_kernels)


def hf_bert():
  tf = _transformers()
  config = tf.BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
  )
  layouts = {
    "bert/encoder/layer/0/attention/self/query/kernel": (0,),
    "bert/encoder/layer/1/output/dense/kernel": (0,),
  }
  not_kernels = ("embeddings", "LayerNorm", "bias")
  return _hf(tf.FlaxBertForMaskedLM, config, _tokens(), layouts, not_kernels)


def hf_llama():
  tf = _transformers()
  config = tf.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
  )
  layouts = {
    "model/layers/0/self_attn/k_proj/kernel": (0,),
    "model/layers/1/mlp/down_proj/kernel": (0,),
    "lm_head/kernel": (0,),
  }
  not_kernels = ("embed_tokens", "norm")
  return _hf(tf.FlaxLlamaForCausalLM, config, _tokens(), layouts, not_kernels)


# --- flaxmodels --------------------------------------------------------------


def flaxmodels_resnet18():
  import flaxmodels  # noqa: PLC0415

  model = flaxmodels.ResNet18(output="logits", pretrained=None, num_classes=10)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  params, stats = variables["params"], variables["batch_stats"]

  def apply_fn(p, x):
    return model.apply({"params": p, "batch_stats": stats}, x, train=False)

  layouts = {
    "Conv_0/kernel": (0, 1, 2),
    "BasicBlock_2/Conv_2/kernel": (0, 1, 2),  # the 1x1 shortcut
    "Dense_0/kernel": (0,),
  }
  return Model(
    apply_fn,
    params,
    x,
    layouts,
    ("BatchNorm",),
    blocks=True,
    subset=r"^(Conv_0|BasicBlock_[012]/|Dense_0)",
  )


MODELS = {
  "linen_layers": linen_layers,
  "linen_attention": linen_attention,
  "linen_conv_bn": linen_conv_bn,
  "linen_scan": linen_scan,
  "nnx_transformer": nnx_transformer,
  "nnx_conv_bn": nnx_conv_bn,
  "nnx_scan": nnx_scan,
  "hf_gpt2": hf_gpt2,
  "hf_bert": hf_bert,
  "hf_llama": hf_llama,
  "flaxmodels_resnet18": flaxmodels_resnet18,
}
