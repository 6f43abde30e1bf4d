"""Text models on frozen features, in Flax: a HistGen-style report generator, W2T slide VQA and a MUMC-style tile
VQA model. All are encoder-decoders with the same call shape, so one training step and one beam search serve all:

    memory, memory_mask = model.apply(v, x, x_mask, method="encode")          # x f32[B, N, D], x_mask bool[B, N]
    logits = model.apply(v, memory, memory_mask, prefix, tokens, method="decode")  # f32[B, T, V]

or, one chunk of tokens at a time against a key/value cache (greedy / beam search; equal to `decode`'s rows):

    const, cache = model.apply(v, memory, memory_mask, prefix, length, method="decode_start")
    logits, cache = model.apply(v, const, cache, tokens, pos, method="decode_step")  # tokens [B, C] at pos..pos+C-1

`prefix` int[B, P] (0 = padding) is text the decoder reads before its own tokens: W2T's question; empty ([B, 0])
for reports. The tile-VQA model encodes the question with the image instead (`encode(..., question=...)`), as MUMC's
question encoder cross-attends to the image, and its decoder reads no prefix.

- HistGen (github dddavid4real/HistGen): tile features projected to `width`, a *region aggregator* (tiles in
  consecutive groups of `region_size`, one self-attention block per region with a learned region token, whose
  output is the region's vector), a transformer encoder over the region vectors, a *cross-modal memory*
  (`memory_slots` learned vectors both modalities read by attention; the read is added to the visual tokens and to
  the word embeddings), and a `layers`-deep causal transformer decoder. Departures: the memory is read with a full
  softmax rather than HistGen's top-k query, and all text modules start from random weights.
- W2T (github cpystan/WSI-VQA): a transformer encoder over the slide's tiles and a decoder that reads the question
  as a prefix and cross-attends to the slide (here: the same encoder / decoder stack with the region aggregator
  and memory switched off).
- Tile VQA (MUMC, github pengfeiliHEU/MUMC): image tokens (a tile's feature vector, or its patch tokens) feed a
  question encoder with cross-attention; the answer decoder cross-attends to the encoded question. MUMC's BERT
  weights cannot be fetched here: its text modules start from random weights (documented departure).

Padding never changes a result: padded tiles are masked out of every attention (all-padding regions too), so a
slide gives the same logits in any bucket size (tested); a later token never changes an earlier logit (causal
mask, tested).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TextModelConfig:
    kind: str = "report"  # report (HistGen) | slide_vqa (W2T) | tile_vqa (MUMC-style)
    vocab_size: int = 1000
    width: int = 512
    heads: int = 8
    layers: int = 3  # decoder layers (HistGen: 3)
    encoder_layers: int = 3
    mlp_ratio: int = 4
    region_size: int = 96  # HistGen's region aggregator; 0 = off
    memory_slots: int = 2048  # HistGen's cross-modal memory (2048 x 512); 0 = off
    max_length: int = 128  # positions of prefix + tokens
    dropout: float = 0.1

    def __post_init__(self):
        if self.kind not in ("report", "slide_vqa", "tile_vqa"):
            raise ValueError(f"kind must be report | slide_vqa | tile_vqa, got {self.kind!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


class Attention(nn.Module):
    """flax's `MultiHeadDotProductAttention` (same parameters `query` / `key` / `value` / `out`, same
    `nn.dot_product_attention` arithmetic; tested equal), with the key/value projection exposed as its own method so
    an incremental decoder can project a token's keys once and keep them in a cache, and project the visual memory's
    keys once per sample instead of once per generated token."""

    cfg: TextModelConfig

    def setup(self):
        c = self.cfg
        dense = functools.partial(nn.DenseGeneral, axis=-1, features=(c.heads, c.width // c.heads))
        self.query, self.key, self.value = dense(name="query"), dense(name="key"), dense(name="value")
        self.out = nn.DenseGeneral(features=c.width, axis=(-2, -1), name="out")

    def kv(self, x):
        """(keys, values) [B, L, heads, head_dim] of `x` [B, L, width]."""
        return self.key(x), self.value(x)

    def attend(self, x, k, v, mask, train: bool = False):
        """Queries from `x` [B, Q, width] over projected keys / values [B, L, heads, head_dim]; mask [B, 1, Q, L]."""
        drop = train and self.cfg.dropout > 0.0
        y = nn.dot_product_attention(self.query(x), k, v, mask=mask, dropout_rate=self.cfg.dropout,
                                     dropout_rng=self.make_rng("dropout") if drop else None, deterministic=not drop)
        return self.out(y)

    def __call__(self, x, kv_in, mask, train: bool = False):
        return self.attend(x, *self.kv(kv_in), mask, train)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention (mask [B, 1, T, T]), optional cross-attention, MLP.

    `__call__` reads a whole sequence; `step` reads a chunk of it (one generated token, or the prefix) against a
    key/value cache of the earlier positions, with the cross-attention's keys / values projected beforehand
    (`cross_kv`). Both run the same sub-modules, so they agree to float rounding (tested)."""

    cfg: TextModelConfig
    cross: bool = False

    def setup(self):
        c = self.cfg
        self.drop = nn.Dropout(c.dropout)
        self.ln_self, self.self_attn = nn.LayerNorm(name="ln_self"), Attention(c, name="self_attn")
        if self.cross:
            self.ln_cross, self.cross_attn = nn.LayerNorm(name="ln_cross"), Attention(c, name="cross_attn")
        self.ln_mlp = nn.LayerNorm(name="ln_mlp")
        self.mlp_in = nn.Dense(c.width * c.mlp_ratio, name="mlp_in")
        self.mlp_out = nn.Dense(c.width, name="mlp_out")

    def _mlp(self, x, train):
        h = self.mlp_in(self.ln_mlp(x))
        return x + self.drop(self.mlp_out(nn.gelu(h)), deterministic=not train)

    def __call__(self, x, self_mask, memory=None, cross_mask=None, train: bool = False):
        h = self.ln_self(x)
        x = x + self.drop(self.self_attn(h, h, self_mask, train), deterministic=not train)
        if self.cross:
            x = x + self.drop(self.cross_attn(self.ln_cross(x), memory, cross_mask, train), deterministic=not train)
        return self._mlp(x, train)

    def cross_kv(self, memory):
        return self.cross_attn.kv(memory)

    def step(self, x, cache, pos, self_mask, cross, cross_mask):
        """x [R, C, width] at positions pos..pos+C-1; cache = (keys, values) [R, L, heads, head_dim] of every
        position (only those before pos + C are read); returns (x, cache with this chunk's keys / values)."""
        h = self.ln_self(x)
        k, v = self.self_attn.kv(h)
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=1)
        x = x + self.self_attn.attend(h, k, v, self_mask)
        x = x + self.cross_attn.attend(self.ln_cross(x), *cross, cross_mask)
        return self._mlp(x, False), (k, v)


def _pair_mask(q_mask, k_mask):
    return (q_mask[:, None, :, None] & k_mask[:, None, None, :])


class CrossModalMemory(nn.Module):
    """HistGen's shared memory: x + softmax(x M^T / sqrt(d)) M for learned slots M [S, d] (full softmax read)."""

    slots: int

    @nn.compact
    def __call__(self, x):
        m = self.param("slots", nn.initializers.normal(0.02), (self.slots, x.shape[-1]))
        w = jax.nn.softmax(jnp.einsum("...d,sd->...s", x, m) / jnp.sqrt(x.shape[-1]), axis=-1)
        return x + jnp.einsum("...s,sd->...d", w, m)


class RegionAggregator(nn.Module):
    """Tiles in consecutive groups of `region_size` -> one vector per region (a learned token attending over its
    region's real tiles); a region without a real tile is masked out."""

    cfg: TextModelConfig

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        r = self.cfg.region_size
        b, n, d = x.shape
        pad = (-n) % r
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
        g = (n + pad) // r
        x = x.reshape(b * g, r, d)
        mask = mask.reshape(b * g, r)
        token = self.param("region_token", nn.initializers.normal(0.02), (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(token, (b * g, 1, d)), x], axis=1)
        m = jnp.concatenate([jnp.ones((b * g, 1), bool), mask], axis=1)
        x = Block(self.cfg, name="block")(x, _pair_mask(m, m), train=train)
        return x[:, 0].reshape(b, g, d), mask.any(-1).reshape(b, g)


class TextModel(nn.Module):
    cfg: TextModelConfig

    def setup(self):
        c = self.cfg
        self.proj = nn.Dense(c.width, name="proj")
        self.embed = nn.Embed(c.vocab_size, c.width, name="embed")
        self.pos = self.param("pos", nn.initializers.normal(0.02), (c.max_length, c.width))
        self.encoder = [Block(c, cross=c.kind == "tile_vqa", name=f"enc_{i}") for i in range(c.encoder_layers)]
        self.decoder = [Block(c, cross=True, name=f"dec_{i}") for i in range(c.layers)]
        self.ln_enc = nn.LayerNorm(name="ln_enc")
        self.ln_dec = nn.LayerNorm(name="ln_dec")
        self.head = nn.Dense(c.vocab_size, name="head")
        use_regions = c.kind == "report" and c.region_size > 0
        self.regions = RegionAggregator(c, name="regions") if use_regions else None
        self.memory = CrossModalMemory(c.memory_slots, name="memory") if c.kind == "report" and c.memory_slots \
            else None

    def _text(self, tokens):
        return self.embed(tokens) + self.pos[: tokens.shape[1]]

    def encode(self, x, x_mask, question=None, train: bool = False):
        """(memory [B, M, width], memory_mask [B, M]) the decoder cross-attends to."""
        h = self.proj(x)
        if self.cfg.kind == "tile_vqa":  # question tokens attend to each other and to the image tokens
            q_mask = question > 0
            q = self._text(question)
            for blk in self.encoder:
                q = blk(q, _pair_mask(q_mask, q_mask), h, _pair_mask(q_mask, x_mask), train)
            return self.ln_enc(q), q_mask
        if self.regions is not None:
            h, x_mask = self.regions(h, x_mask, train)
        if self.memory is not None:
            h = self.memory(h)
        for blk in self.encoder:
            h = blk(h, _pair_mask(x_mask, x_mask), train=train)
        return self.ln_enc(h), x_mask

    def decode(self, memory, memory_mask, prefix, tokens, train: bool = False):
        """Logits [B, T, V] of the next token at each of `tokens`' positions; the prefix's positions are dropped."""
        p = prefix.shape[1]
        seq = jnp.concatenate([prefix, tokens], axis=1)
        valid = jnp.concatenate([prefix > 0, jnp.ones(tokens.shape, bool)], axis=1)
        t = seq.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]
        h = self._text(seq)
        if self.memory is not None:
            h = self.memory(h)
        for blk in self.decoder:
            h = blk(h, causal, memory, _pair_mask(jnp.ones(seq.shape, bool), memory_mask), train)
        return self.head(self.ln_dec(h[:, p:]))

    def decode_start(self, memory, memory_mask, prefix, length: int):
        """The incremental decoder's (constants, cache) for sequences of `length` tokens after `prefix`: the
        cross-attention keys / values of the memory, the key mask, and a key/value cache [R, P + length, heads,
        head_dim] per layer holding the prefix's entries (the prefix is read in one chunk)."""
        p, c = prefix.shape[1], self.cfg
        if p + length > c.max_length:
            raise ValueError(f"prefix {p} + length {length} exceeds the model's max_length {c.max_length}")
        r = memory.shape[0]
        const = {"cross": tuple(blk.cross_kv(memory) for blk in self.decoder),
                 "cross_mask": memory_mask[:, None, None, :],
                 "valid": jnp.concatenate([prefix > 0, jnp.ones((r, length), bool)], axis=1)}
        shape = (r, p + length, c.heads, c.width // c.heads)
        cache = tuple((jnp.zeros(shape, memory.dtype), jnp.zeros(shape, memory.dtype)) for _ in self.decoder)
        if p:
            cache = self.decode_step(const, cache, prefix, 0)[1]
        return const, cache

    def decode_step(self, const, cache, tokens, pos):
        """(logits [R, C, V], cache): the decoder over `tokens` [R, C] at positions pos..pos+C-1 of prefix + tokens,
        reading the earlier positions from `cache` — the rows of `decode` at those positions, without re-reading
        the sequence."""
        c = tokens.shape[1]
        h = self.embed(tokens) + jax.lax.dynamic_slice_in_dim(self.pos, pos, c)
        if self.memory is not None:
            h = self.memory(h)
        keys = jnp.arange(const["valid"].shape[1])
        causal = keys[None, :] <= pos + jnp.arange(c)[:, None]  # [C, L]
        self_mask = causal[None, None] & const["valid"][:, None, None, :]
        new = []
        for blk, kv, cross in zip(self.decoder, cache, const["cross"], strict=True):
            h, kv = blk.step(h, kv, pos, self_mask, cross, const["cross_mask"])
            new.append(kv)
        return self.head(self.ln_dec(h)), tuple(new)

    def __call__(self, x, x_mask, prefix, tokens, question=None, train: bool = False):
        memory, memory_mask = self.encode(x, x_mask, question, train)
        return self.decode(memory, memory_mask, prefix, tokens, train)


@functools.lru_cache(maxsize=32)
def _jitted_init(cfg: TextModelConfig):
    """One compiled program instead of hundreds of eager ops, and one per config (and input shapes) for the process:
    a jit of a fresh model's `init` would compile again for every model built (every cell of a benchmark)."""
    return jax.jit(TextModel(cfg).init)


def init_params(cfg: TextModelConfig, feature_dim: int, key, tiles: int = 8, prefix: int = 0, question: int = 4):
    """Parameters of `TextModel(cfg)` for features of width `feature_dim` (shapes only matter through the dims)."""
    x = jnp.zeros((1, tiles, feature_dim))
    m = jnp.ones((1, tiles), bool)
    q = jnp.ones((1, question), jnp.int32) if cfg.kind == "tile_vqa" else None
    init = _jitted_init(cfg)
    return init(key, x, m, jnp.zeros((1, prefix), jnp.int32), jnp.zeros((1, 4), jnp.int32), q)["params"]
