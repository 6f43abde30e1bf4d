"""Decoding with fixed shapes, so one jitted program serves every batch of a bucket: greedy, beam search (width,
trigram blocking, maximum length, length penalty) and ranking of a fixed answer list by likelihood.

The decoder comes in one of two forms (rows = batch x beams):
- a `Stepper(cache, step)`: incremental decoding, `step(cache, seq int[R, T], t) -> (logits f32[R, V], cache)`
  reads the token at position t of the current buffer and returns the next token's logits, keeping the earlier
  positions' keys and values in `cache` (a pytree whose leaves all lead with the row axis; beam search reorders
  it with the beams). Each step costs one token's worth of decoder work (`TextModel.decode_start` /
  `decode_step`);
- a `logits_fn(tokens int[R, T]) -> f32[R, T, V]`: the whole fixed-length buffer re-read at every step, with no
  cache (the reference the cached decoder is tested against; `buffer_stepper` wraps it as a Stepper).
Either way the loop is one `lax.fori_loop` over fixed shapes. Token 0 ends a sequence and pads it afterwards;
position 0 holds the start token.

Beam search as in the captioning code HistGen and W2T build on: every live beam extends by every token, the
`beam` best (by summed log-probability) survive; a finished beam only extends by padding at no cost; with
`block_trigrams` a token that would repeat a trigram already in the beam is forbidden. The length penalty divides
a finished sequence's log-probability by length ** alpha (alpha 0: none, HistGen's default) when the final beam is
chosen.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG = -1e9


class Stepper(NamedTuple):
    cache: Any
    step: Callable


def buffer_stepper(logits_fn) -> Stepper:
    """`logits_fn` as a Stepper without a cache: every step re-reads the whole buffer."""
    return Stepper((), lambda cache, seq, t: (jnp.take(logits_fn(seq), t, axis=1), cache))


def _as_stepper(decoder) -> Stepper:
    return decoder if isinstance(decoder, Stepper) else buffer_stepper(decoder)


def _blocked(seq, t, vocab: int):
    """bool [R, V]: tokens that would repeat a trigram of seq[:, :t] when placed at position t (t >= 2)."""
    a, b, c = seq[:, :-2], seq[:, 1:-1], seq[:, 2:]  # trigram starting at i: (a_i, b_i, c_i), ends at i + 2
    i = jnp.arange(a.shape[1])
    x, y = jnp.take(seq, t - 2, axis=1), jnp.take(seq, t - 1, axis=1)
    hit = (a == x[:, None]) & (b == y[:, None]) & (i[None] + 2 < t) & (t >= 2)
    return jnp.any(hit[..., None] & (c[..., None] == jnp.arange(vocab)), axis=1)


def greedy(decoder, start, batch: int, length: int) -> jax.Array:
    """int [batch, length]: argmax decoding from `start` (scalar id) at position 0; `decoder` a Stepper or a
    full-buffer logits_fn (module docstring)."""
    cache, step = _as_stepper(decoder)
    seq = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(start)
    done = jnp.zeros((batch,), bool)

    def body(t, state):
        seq, done, cache = state
        logits, cache = step(cache, seq, t - 1)
        tok = jnp.where(done, 0, jnp.argmax(logits, -1)).astype(jnp.int32)
        return seq.at[:, t].set(tok), done | (tok == 0), cache

    return jax.lax.fori_loop(1, length, body, (seq, done, cache))[0]


def beam_search(decoder, start, batch: int, length: int, beam: int = 3, block_trigrams: bool = True,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(best sequences int [batch, length], their scores [batch]); `decoder` (a Stepper or a full-buffer
    logits_fn) sees rows ordered batch-major (row = b * beam + k), so its memory must be repeated `beam` times per
    sample; a Stepper's cache follows its beam when the beams are reordered."""
    seq, score = beams(decoder, start, batch, length, beam, block_trigrams)
    ended = (seq[:, :, 1:] == 0)
    n = jnp.where(ended.any(-1), jnp.argmax(ended, -1) + 1, length - 1)  # generated tokens incl. the end
    final = score / (n.astype(jnp.float32) ** length_penalty)
    best = jnp.argmax(final, -1)
    return jnp.take_along_axis(seq, best[:, None, None], axis=1)[:, 0], jnp.take_along_axis(final, best[:, None], 1)[:, 0]


def beams(decoder, start, batch: int, length: int, beam: int, block_trigrams: bool) -> tuple[jax.Array, jax.Array]:
    """Every final beam of `beam_search` before the length penalty: (int [batch, beam, length], summed
    log-probabilities [batch, beam])."""
    cache, step = _as_stepper(decoder)
    seq = jnp.zeros((batch, beam, length), jnp.int32).at[:, :, 0].set(start)
    score = jnp.full((batch, beam), NEG).at[:, 0].set(0.0)  # only one live copy of the start at first
    done = jnp.zeros((batch, beam), bool)

    def body(t, state):
        seq, score, done, cache = state
        flat = seq.reshape(batch * beam, length)
        logits, cache = step(cache, flat, t - 1)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        vocab = logp.shape[-1]
        if block_trigrams:
            logp = jnp.where(_blocked(flat, t, vocab), NEG, logp)
        logp = logp.reshape(batch, beam, vocab)
        pad_only = jnp.where(jnp.arange(vocab) == 0, 0.0, NEG)
        logp = jnp.where(done[..., None], pad_only, logp)
        cand = (score[..., None] + logp).reshape(batch, beam * vocab)
        top, idx = jax.lax.top_k(cand, beam)
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        seq = jnp.take_along_axis(seq, src[..., None], axis=1).at[:, :, t].set(tok)
        done = jnp.take_along_axis(done, src, axis=1) | (tok == 0)
        rows = (jnp.arange(batch)[:, None] * beam + src).reshape(-1)
        cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=0), cache)
        return seq, top, done, cache

    seq, score, _, _ = jax.lax.fori_loop(1, length, body, (seq, score, done, cache))
    return seq, score


def sequence_logprob(logits, tokens) -> jax.Array:
    """Sum of log p(tokens[:, t] | tokens[:, :t]) over t >= 1 up to and including the first 0 (end): [R]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    tgt = tokens[:, 1:]
    tok_lp = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    ended_before = jnp.cumsum(tgt == 0, axis=1) - (tgt == 0)  # ends strictly before this position
    return jnp.sum(jnp.where(ended_before == 0, tok_lp, 0.0), axis=1)


def rank_answers(logits_fn, answers, batch: int) -> tuple[jax.Array, jax.Array]:
    """(best answer index [batch], log-likelihoods [batch, A]) of the candidate answers `answers` int [A, T]
    (start, tokens, 0, padding) for every sample; `logits_fn` sees rows ordered batch-major (b * A + a)."""
    a, t = answers.shape
    rows = jnp.broadcast_to(answers[None], (batch, a, t)).reshape(batch * a, t)
    ll = sequence_logprob(logits_fn(rows), rows).reshape(batch, a)
    return jnp.argmax(ll, -1), ll
