"""Text models and decoding: causal mask, padding invariance, beam search against greedy and brute-force
enumeration, answer ranking against per-answer likelihoods."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax.text import decode
from gpfm_jax.text.models import TextModel, TextModelConfig, init_params

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

D = 12


def _cfg(kind, vocab=11):
    return TextModelConfig(kind=kind, vocab_size=vocab, width=16, heads=2, layers=2, encoder_layers=1,
                           region_size=4, memory_slots=8, max_length=24, dropout=0.0)


@pytest.fixture(scope="module")
def report_model():
    cfg = _cfg("report")
    return TextModel(cfg), init_params(cfg, D, jax.random.key(0))


def test_causal_mask(report_model):
    model, params = report_model
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, D)), jnp.float32)
    m = jnp.ones((2, 9), bool)
    tok = jnp.asarray(rng.integers(1, 11, (2, 10)), jnp.int32)
    apply = jax.jit(model.apply)
    base = apply({"params": params}, x, m, jnp.zeros((2, 0), jnp.int32), tok)
    for j in (3, 7):
        changed = tok.at[:, j].set((tok[:, j] % 10) + 1)
        out = apply({"params": params}, x, m, jnp.zeros((2, 0), jnp.int32), changed)
        np.testing.assert_array_equal(np.asarray(out[:, :j]), np.asarray(base[:, :j]))
        assert np.abs(np.asarray(out[:, j]) - np.asarray(base[:, j])).max() > 1e-4


@pytest.mark.parametrize("kind", ["report", "slide_vqa", "tile_vqa"])
def test_padded_tiles_change_nothing(kind):
    cfg = _cfg(kind)
    model = TextModel(cfg)
    params = init_params(cfg, D, jax.random.key(1))
    rng = np.random.default_rng(1)
    bag = rng.normal(size=(10, D)).astype(np.float32)
    tok = jnp.asarray(rng.integers(1, 11, (1, 6)), jnp.int32)
    prefix = jnp.asarray([[3, 5, 0]], jnp.int32) if kind == "slide_vqa" else jnp.zeros((1, 0), jnp.int32)
    question = jnp.asarray([[2, 7, 4, 0]], jnp.int32) if kind == "tile_vqa" else None
    outs = []
    apply = jax.jit(model.apply)
    for size in (10, 37):
        x = np.zeros((1, size, D), np.float32)
        x[0, :10] = bag
        x[0, 10:] = rng.normal(size=(size - 10, D))  # garbage under the mask must not matter either
        m = np.arange(size)[None] < 10
        outs.append(np.asarray(apply({"params": params}, jnp.asarray(x), jnp.asarray(m), prefix, tok, question)))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)


def _toy_logits_fn(vocab=3, seed=2):
    """A causal toy decoder (the report model's decoder, memory bound) over a 3-token vocabulary."""
    cfg = _cfg("report", vocab)
    model = TextModel(cfg)
    params = init_params(cfg, D, jax.random.key(seed))
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params)  # sharper distributions
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(1, 5, D)), jnp.float32)
    mem, mm = model.apply({"params": params}, x, jnp.ones((1, 5), bool), None, method="encode")

    def fn(tokens):
        r = tokens.shape[0]
        return model.apply({"params": params}, jnp.repeat(mem, r, 0), jnp.repeat(mm, r, 0),
                           jnp.zeros((r, 0), jnp.int32), tokens, method="decode")

    return jax.jit(fn)


def _brute_force(fn, start, length, vocab, block, alpha):
    """Best sequence by exhaustive enumeration: score = sum log p up to the end token, / generated ** alpha."""
    seqs, ends = [], []
    for body in itertools.product(range(vocab), repeat=length - 1):
        if 0 in body and any(b != 0 for b in body[body.index(0):]):
            continue  # nothing but padding after the end
        seq = [start, *body]
        end = body.index(0) + 1 if 0 in body else length - 1  # generated tokens incl. the end
        if block and any((seq[t - 2], seq[t - 1], seq[t]) in {tuple(seq[i:i + 3]) for i in range(t - 2)}
                         for t in range(3, end + 1)):
            continue
        seqs.append(seq)
        ends.append(end)
    logp = np.asarray(jax.nn.log_softmax(fn(jnp.asarray(seqs, jnp.int32)), -1))  # one batched call
    scores = [sum(lp[t - 1, seq[t]] for t in range(1, end + 1)) / end**alpha
              for lp, seq, end in zip(logp, seqs, ends)]
    i = int(np.argmax(scores))
    return seqs[i], scores[i]


@pytest.mark.parametrize("block,alpha", [(False, 0.0), (True, 0.7)])
def test_beam_search_equals_brute_force(block, alpha, cache_dir):  # cache_dir: test_text_kv_cache's brute force
    fn = _toy_logits_fn()
    length, vocab = 6, 3
    want, want_score = _brute_force(fn, 1, length, vocab, block, alpha)
    seq, score = jax.jit(functools.partial(decode.beam_search, fn, 1, 1, length, 32, block, alpha))()
    assert np.asarray(seq)[0].tolist() == want
    assert abs(float(score[0]) - want_score) < 1e-4


def test_beam_one_is_greedy():
    cfg = _cfg("report")
    model = TextModel(cfg)
    params = init_params(cfg, D, jax.random.key(3))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 7, D)), jnp.float32)
    mem, mm = model.apply({"params": params}, x, jnp.ones((4, 7), bool), None, method="encode")
    fn = functools.partial(model.apply, {"params": params}, mem, mm, jnp.zeros((4, 0), jnp.int32), method="decode")
    g = jax.jit(functools.partial(decode.greedy, fn, 0, 4, 12))()
    b, _ = jax.jit(functools.partial(decode.beam_search, fn, 0, 4, 12, 1, False))()
    np.testing.assert_array_equal(np.asarray(g), np.asarray(b))
    assert (np.asarray(g)[:, 1:] != 0).any()  # the decoded text is not empty


def test_answer_ranking_is_argmax_likelihood():
    cfg = _cfg("tile_vqa")
    model = TextModel(cfg)
    params = init_params(cfg, D, jax.random.key(4))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 2, D)), jnp.float32)
    m = jnp.ones((3, 2), bool)
    q = jnp.asarray(rng.integers(1, 11, (3, 5)), jnp.int32)
    answers = jnp.asarray([[1, 4, 0, 0, 0], [1, 4, 5, 0, 0], [1, 9, 9, 2, 0], [1, 3, 0, 0, 0]], jnp.int32)
    mem, mm = model.apply({"params": params}, x, m, q, method="encode")
    reps = answers.shape[0]
    fn = functools.partial(model.apply, {"params": params}, jnp.repeat(mem, reps, 0), jnp.repeat(mm, reps, 0),
                           jnp.zeros((3 * reps, 0), jnp.int32), method="decode")
    best, ll = jax.jit(decode.rank_answers, static_argnums=(0, 2))(fn, answers, 3)
    apply = jax.jit(model.apply)
    for b in range(3):
        want = []
        for a in np.asarray(answers):  # each (question, answer) on its own, through the whole model
            logits = apply({"params": params}, x[b:b + 1], m[b:b + 1], jnp.zeros((1, 0), jnp.int32),
                           jnp.asarray(a[None]), q[b:b + 1])
            logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
            end = list(a[1:]).index(0) + 1
            want.append(sum(logp[t - 1, a[t]] for t in range(1, end + 1)))
        np.testing.assert_allclose(np.asarray(ll[b]), want, atol=1e-4)
        assert int(best[b]) == int(np.argmax(want))
