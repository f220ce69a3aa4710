"""Small Flax NNX models shared by every experiment, notebook and test.

Each model is an ``nnx.Module`` with explicit ``rngs`` and no mutable
collections (LayerNorm/GroupNorm instead of BatchNorm, no dropout), so
``train.functional`` turns it into a pure ``apply(params, x)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """Multi-layer perceptron with GELU activations."""

  def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = jax.nn.gelu(layer(x))
    return self.layers[-1](x)


class Conv3x3(nnx.Module):
  """3x3 convolution ('SAME' padding) written as patches times a matrix.

  The same function as ``nnx.Conv(cin, cout, (3, 3), strides=stride)``; on CPU,
  and batched over a grid of runs with ``vmap``, a matrix product compiles to
  far faster code than XLA's convolution and its gradients.
  """

  def __init__(self, cin: int, cout: int, stride: int = 1, *, rngs: nnx.Rngs):
    self.stride = stride
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (9 * cin, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,)))

  def __call__(self, x):
    s = self.stride
    pads = [_same_padding(n, s) for n in x.shape[1:3]]
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    h, w = (-(-n // s) for n in x.shape[1:3])
    # The 9 shifted views by static slicing, ordered (channel, dy, dx) like conv_general_dilated_patches.
    views = [padded[:, dy : dy + s * h : s, dx : dx + s * w : s] for dy in range(3) for dx in range(3)]
    patches = jnp.stack(views, axis=-1).reshape(x.shape[0], h, w, -1)
    return patches @ self.kernel + self.bias.reshape(1, 1, 1, -1)


def _same_padding(size: int, stride: int) -> tuple[int, int]:
  """XLA's 'SAME' padding of a 3-wide window: the extra cell goes at the end."""
  total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
  return total // 2, total - total // 2


class ResBlock(nnx.Module):
  """Pre-activation residual block: GroupNorm, ReLU, 3x3 conv, twice."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(channels, num_groups=min(8, channels), rngs=rngs)
    self.conv1 = Conv3x3(channels, channels, rngs=rngs)
    self.norm2 = nnx.GroupNorm(channels, num_groups=min(8, channels), rngs=rngs)
    self.conv2 = Conv3x3(channels, channels, rngs=rngs)

  def __call__(self, x):
    y = self.conv1(jax.nn.relu(self.norm1(x)))
    return x + self.conv2(jax.nn.relu(self.norm2(y)))


class ResNet(nnx.Module):
  """A small ResNet-style CNN: stem, residual stages with stride-2 downsampling, pooled head."""

  def __init__(self, in_channels: int, num_classes: int, widths=(16, 32), blocks: int = 1, *, rngs: nnx.Rngs):
    self.stem = Conv3x3(in_channels, widths[0], rngs=rngs)
    stages = []
    for i, w in enumerate(widths):
      down = Conv3x3(widths[max(i - 1, 0)], w, stride=1 if i == 0 else 2, rngs=rngs)
      stages.append(nnx.List([down] + [ResBlock(w, rngs=rngs) for _ in range(blocks)]))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for stage in self.stages:
      for layer in stage:
        x = layer(x)
    return self.head(jax.nn.relu(x).mean(axis=(1, 2)))


class CharLSTM(nnx.Module):
  """Embedding, one LSTM layer, linear read-out: a character language model."""

  def __init__(self, vocab: int, embed: int, hidden: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, embed, rngs=rngs)
    self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(embed, hidden, rngs=rngs))
    self.out = nnx.Linear(hidden, vocab, rngs=rngs)

  def __call__(self, tokens):
    return self.out(self.rnn(self.embed(tokens)))


class Attention(nnx.Module):
  """Multi-head attention with an optional causal mask and padding mask."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.kv = nnx.Linear(dim, 2 * dim, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x, context=None, *, causal=False, context_mask=None):
    context = x if context is None else context
    b, t, d = x.shape
    h = self.heads
    q = self.q(x).reshape(b, t, h, d // h)
    k, v = jnp.split(self.kv(context).reshape(b, context.shape[1], 2 * h, d // h), 2, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    mask = jnp.ones((t, context.shape[1]), bool)
    if causal:
      mask = jnp.tril(mask)
    mask = mask[None, None]
    if context_mask is not None:
      mask = mask & context_mask[:, None, None, :]
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
    return self.o(out.reshape(b, t, d))


class Block(nnx.Module):
  """Pre-norm Transformer block: self-attention, optional cross-attention, MLP."""

  def __init__(self, dim: int, heads: int, cross: bool = False, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, rngs=rngs)
    self.cross = nnx.data((nnx.LayerNorm(dim, rngs=rngs), Attention(dim, heads, rngs=rngs)) if cross else None)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.mlp2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, context=None, *, causal=False, self_mask=None, context_mask=None):
    x = x + self.attn(self.norm1(x), causal=causal, context_mask=self_mask)
    if self.cross is not None:
      norm, attn = self.cross
      x = x + attn(norm(x), context, context_mask=context_mask)
    return x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only Transformer language model with learned positions."""

  def __init__(self, vocab: int, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 256, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.out = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
    for block in self.blocks:
      x = block(x, causal=True)
    return self.out(self.norm(x))


class Seq2SeqTransformer(nnx.Module):
  """Encoder-decoder Transformer (pre-norm) for sequence-to-sequence tasks; token 0 is padding."""

  def __init__(
    self,
    src_vocab: int,
    tgt_vocab: int,
    dim: int = 64,
    heads: int = 4,
    layers: int = 2,
    max_len: int = 64,
    *,
    rngs: nnx.Rngs,
  ):
    self.src_embed = nnx.Embed(src_vocab, dim, rngs=rngs)
    self.tgt_embed = nnx.Embed(tgt_vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
    self.encoder = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
    self.decoder = nnx.List([Block(dim, heads, cross=True, rngs=rngs) for _ in range(layers)])
    self.enc_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.dec_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.out = nnx.Linear(dim, tgt_vocab, rngs=rngs)

  def encode(self, src):
    mask = src != 0
    x = self.src_embed(src) + self.pos[None, : src.shape[1]]
    for block in self.encoder:
      x = block(x, self_mask=mask)
    return self.enc_norm(x), mask

  def decode(self, memory, src_mask, tgt_in):
    y = self.tgt_embed(tgt_in) + self.pos[None, : tgt_in.shape[1]]
    for block in self.decoder:
      y = block(y, memory, causal=True, context_mask=src_mask)
    return self.out(self.dec_norm(y))

  def __call__(self, src, tgt_in):
    memory, mask = self.encode(src)
    return self.decode(memory, mask, tgt_in)
