"""A small nanoGPT-style character language model in Flax linen.

Pre-LayerNorm decoder (Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners"): token and learned position embeddings,
``num_layers`` blocks ``Block_i`` of

  h = h + Attention(LayerNorm(h));  h = h + MLP(LayerNorm(h)),

a final LayerNorm and a linear ``lm_head``. Every linear layer is a plain
``nn.Dense`` (``qkv``: one ``Dense(3 d)``; ``proj``; ``fc``:
``Dense(4 d)``; ``out``: ``Dense(d)``), so one-shot pruning can capture each
layer's inputs with ``nn.intercept_methods``. Attention is causal: the
logits at position ``t`` depend only on tokens ``0..t``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with one fused ``qkv`` projection."""

  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(
        f"width {width} is not divisible by num_heads={self.num_heads}."
      )
    head = width // self.num_heads
    qkv = nn.Dense(3 * width, name="qkv")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    shape = (batch, length, self.num_heads, head)
    q, k, v = (a.reshape(shape) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head).astype(
      x.dtype
    )
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    y = nn.Dense(width, name="proj")(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class MLP(nn.Module):
  """``Dense(4 d)`` -> GELU -> ``Dense(d)``."""

  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x.shape[-1]
    h = nn.gelu(nn.Dense(4 * width, name="fc")(x))
    h = nn.Dense(width, name="out")(h)
    return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """One pre-LayerNorm transformer block."""

  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    x = x + CausalSelfAttention(self.num_heads, self.dropout, name="attn")(
      nn.LayerNorm(name="ln1")(x), deterministic
    )
    return x + MLP(self.dropout, name="mlp")(
      nn.LayerNorm(name="ln2")(x), deterministic
    )


class GPT(nn.Module):
  """Decoder-only transformer: ``int32 [batch, length] -> logits``.

  Attributes:
    vocab_size: number of tokens.
    block_size: longest context (size of the position embedding).
    num_layers: number of blocks (``Block_0`` ... ``Block_{n-1}``).
    num_heads: attention heads per block.
    width: model width ``d``.
    dropout: dropout rate (used only with ``deterministic=False``).
  """

  vocab_size: int
  block_size: int
  num_layers: int = 4
  num_heads: int = 4
  width: int = 256
  dropout: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool = True):
    length = tokens.shape[-1]
    if length > self.block_size:
      raise ValueError(
        f"sequence length {length} exceeds block_size={self.block_size}."
      )
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="wte")(
      tokens
    )
    pos = self.param("wpe", init, (self.block_size, self.width))
    x = x + pos[None, :length]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.dropout, name=f"Block_{i}")(
        x, deterministic
      )
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab_size, name="lm_head")(x)


def num_params(params) -> int:
  """Total number of scalars in a params tree."""
  return sum(p.size for p in jax.tree.leaves(params))
