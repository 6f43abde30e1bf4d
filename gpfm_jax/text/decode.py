"""Decoding with fixed shapes, so one jitted program serves every batch of a bucket: greedy, beam search (width,
trigram blocking, maximum length, length penalty) and ranking of a fixed answer list by likelihood.

`logits_fn(tokens int[R, T]) -> f32[R, T, V]` is the decoder with its visual memory bound (rows = batch x beams);
it is re-run over the whole fixed-length buffer at every step (no key/value cache: T <= ~100 and the decoder is a
few layers, and the buffer's shape never changes, so the loop is one `lax.fori_loop`). Token 0 ends a sequence and
pads it afterwards; position 0 holds the start token.

Beam search as in the captioning code HistGen and W2T build on: every live beam extends by every token, the
`beam` best (by summed log-probability) survive; a finished beam only extends by padding at no cost; with
`block_trigrams` a token that would repeat a trigram already in the beam is forbidden. The length penalty divides
a finished sequence's log-probability by length ** alpha (alpha 0: none, HistGen's default) when the final beam is
chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e9


def _blocked(seq, t, vocab: int):
    """bool [R, V]: tokens that would repeat a trigram of seq[:, :t] when placed at position t (t >= 2)."""
    a, b, c = seq[:, :-2], seq[:, 1:-1], seq[:, 2:]  # trigram starting at i: (a_i, b_i, c_i), ends at i + 2
    i = jnp.arange(a.shape[1])
    x, y = jnp.take(seq, t - 2, axis=1), jnp.take(seq, t - 1, axis=1)
    hit = (a == x[:, None]) & (b == y[:, None]) & (i[None] + 2 < t) & (t >= 2)
    return jnp.any(hit[..., None] & (c[..., None] == jnp.arange(vocab)), axis=1)


def greedy(logits_fn, start, batch: int, length: int) -> jax.Array:
    """int [batch, length]: argmax decoding from `start` (scalar id) at position 0."""
    seq = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(start)
    done = jnp.zeros((batch,), bool)

    def body(t, state):
        seq, done = state
        logits = jnp.take(logits_fn(seq), t - 1, axis=1)
        tok = jnp.where(done, 0, jnp.argmax(logits, -1)).astype(jnp.int32)
        return seq.at[:, t].set(tok), done | (tok == 0)

    return jax.lax.fori_loop(1, length, body, (seq, done))[0]


def beam_search(logits_fn, start, batch: int, length: int, beam: int = 3, block_trigrams: bool = True,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(best sequences int [batch, length], their scores [batch]); `logits_fn` sees rows ordered batch-major
    (row = b * beam + k), so its memory must be repeated `beam` times per sample."""
    seq = jnp.zeros((batch, beam, length), jnp.int32).at[:, :, 0].set(start)
    score = jnp.full((batch, beam), NEG).at[:, 0].set(0.0)  # only one live copy of the start at first
    done = jnp.zeros((batch, beam), bool)

    def body(t, state):
        seq, score, done = state
        flat = seq.reshape(batch * beam, length)
        logp = jax.nn.log_softmax(jnp.take(logits_fn(flat), t - 1, axis=1).astype(jnp.float32), -1)
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
        return seq, top, done

    seq, score, done = jax.lax.fori_loop(1, length, body, (seq, score, done))
    ended = (seq[:, :, 1:] == 0)
    n = jnp.where(ended.any(-1), jnp.argmax(ended, -1) + 1, length - 1)  # generated tokens incl. the end
    final = score / (n.astype(jnp.float32) ** length_penalty)
    best = jnp.argmax(final, -1)
    return jnp.take_along_axis(seq, best[:, None, None], axis=1)[:, 0], jnp.take_along_axis(final, best[:, None], 1)[:, 0]


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
