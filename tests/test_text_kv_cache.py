"""The incremental (key/value-cached) text decoder against the full-buffer one: the attention module equals flax's,
every step's logits equal the full decoder's row, and greedy / beam search through the cache choose the same
sequences as through the full buffer and as brute-force enumeration."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax.text import decode
from gpfm_jax.text.models import Attention, TextModel, init_params
from gpfm_jax.text.train import model_stepper
from test_text_models import D, _brute_force, _cfg, _toy_logits_fn

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

# float32 logits of magnitude ~1: the two paths differ only in matmul shapes (one query row against the cache vs.
# all rows), so the rounding differs; measured max |diff| ~1e-6.
ATOL = 1e-5


def test_attention_equals_flax_multihead():
    cfg = _cfg("report")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, cfg.width)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 7, cfg.width)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) < 0.7).at[..., 0].set(True)
    ref = nn.MultiHeadDotProductAttention(num_heads=cfg.heads, deterministic=True)
    params = ref.init(jax.random.key(0), x, kv, mask=mask)
    want = ref.apply(params, x, kv, mask=mask)
    got = Attention(cfg).apply(params, x, kv, mask)  # the same parameter tree
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def _step_logits(model, params, mem, mm, prefix, tokens):
    """[R, T, V]: the cached decoder fed tokens[:, t] at step t (one lax.scan)."""
    st = model_stepper(model, params, mem, mm, prefix, tokens.shape[1])

    def body(cache, t):
        logits, cache = st.step(cache, tokens, t)
        return cache, logits

    return jnp.swapaxes(jax.lax.scan(body, st.cache, jnp.arange(tokens.shape[1]))[1], 0, 1)


@pytest.mark.parametrize("kind", ["report", "slide_vqa", "tile_vqa"])
def test_cached_step_logits_equal_full_decoder(kind):
    cfg = _cfg(kind)
    model = TextModel(cfg)
    params = init_params(cfg, D, jax.random.key(5))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 9, D)), jnp.float32)
    m = jnp.asarray(np.arange(9)[None] < np.array([[9], [6], [3]]))  # padded tiles too
    question = jnp.asarray(rng.integers(1, 11, (3, 4)), jnp.int32).at[1, 3].set(0) if kind == "tile_vqa" else None
    prefix = (jnp.asarray([[3, 5, 0], [7, 0, 0], [2, 4, 6]], jnp.int32) if kind == "slide_vqa"
              else jnp.zeros((3, 0), jnp.int32))
    tokens = jnp.asarray(rng.integers(0, 11, (3, 16)), jnp.int32)
    mem, mm = model.apply({"params": params}, x, m, question, method="encode")
    full = jax.jit(functools.partial(model.apply, method="decode"))({"params": params}, mem, mm, prefix, tokens)
    cached = jax.jit(functools.partial(_step_logits, model))(params, mem, mm, prefix, tokens)
    full, cached = np.asarray(full), np.asarray(cached)
    assert np.abs(full).max() > 0.1  # a real signal, not zeros
    np.testing.assert_allclose(cached, full, atol=ATOL, rtol=0)


def test_cached_decoding_equals_full_buffer_decoding():
    """Greedy and beam search (width 3, trigram blocking, length penalty) choose the same sequences with the cache
    as with the full buffer, on a model sharp enough that the texts differ per slide; so do all the final beams
    with their scores (beams other than the best one come through reorderings of the cache)."""
    cfg = _cfg("report")
    model = TextModel(cfg)
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 2 else p, init_params(cfg, D, jax.random.key(6)))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 7, D)), jnp.float32)
    batch, beam, length = 2, 3, 14
    mem, mm = model.apply({"params": params}, x, jnp.ones((2, 7), bool), None, method="encode")

    def both(params, mem, mm):
        out = {}
        for k in (1, beam):
            mk, mmk = jnp.repeat(mem, k, 0), jnp.repeat(mm, k, 0)
            pre = jnp.zeros((batch * k, 0), jnp.int32)
            full = functools.partial(model.apply, {"params": params}, mk, mmk, pre, method="decode")
            cached = model_stepper(model, params, mk, mmk, pre, length)
            for name, dec in (("full", full), ("cached", cached)):
                if k == 1:
                    out[name, "greedy"] = decode.greedy(dec, 1, batch, length)
                else:
                    out[name, "beam"] = decode.beam_search(dec, 1, batch, length, beam, True, 0.6)
                    out[name, "beams"] = decode.beams(dec, 1, batch, length, beam, True)
        return out

    out = jax.jit(both)(params, mem, mm)
    np.testing.assert_array_equal(np.asarray(out["cached", "greedy"]), np.asarray(out["full", "greedy"]))
    np.testing.assert_array_equal(np.asarray(out["cached", "beam"][0]), np.asarray(out["full", "beam"][0]))
    np.testing.assert_allclose(np.asarray(out["cached", "beam"][1]), np.asarray(out["full", "beam"][1]), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out["cached", "beams"][0]), np.asarray(out["full", "beams"][0]))
    np.testing.assert_allclose(np.asarray(out["cached", "beams"][1]), np.asarray(out["full", "beams"][1]), atol=1e-4)
    seqs = np.asarray(out["cached", "beam"][0])
    assert (seqs[:, 1:] != 0).sum() > 4 and (seqs[0] != seqs[1]).any()


def test_cached_beam_search_equals_brute_force(cache_dir, block=True, alpha=0.7):
    """The existing brute-force check, with the beam search reading the key/value cache. (Here the best beam keeps
    row 0 throughout, so a missing cache reorder goes unseen: `test_cached_decoding_equals_full_buffer_decoding`
    compares every beam and catches it — checked by deleting the reorder.)"""
    cfg = _cfg("report", 3)
    model = TextModel(cfg)
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, init_params(cfg, D, jax.random.key(2)))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, D)), jnp.float32)
    length, beam = 6, 32
    want, want_score = _brute_force(_toy_logits_fn(), 1, length, 3, block, alpha)  # the same toy model, full buffer

    def search(params):
        mem, mm = model.apply({"params": params}, x, jnp.ones((1, 5), bool), None, method="encode")
        st = model_stepper(model, params, jnp.repeat(mem, beam, 0), jnp.repeat(mm, beam, 0),
                           jnp.zeros((beam, 0), jnp.int32), length)
        return decode.beam_search(st, 1, 1, length, beam, block, alpha)

    seq, score = jax.jit(search)(params)
    assert np.asarray(seq)[0].tolist() == want
    assert abs(float(score[0]) - want_score) < 1e-4


def test_prefix_plus_length_beyond_positions_is_an_error():
    cfg = _cfg("slide_vqa")
    model = TextModel(cfg)
    mem, mm = jnp.zeros((1, 3, cfg.width)), jnp.ones((1, 3), bool)
    params = jax.eval_shape(lambda: init_params(cfg, D, jax.random.key(7)))  # shapes only: traced, not run
    with pytest.raises(ValueError, match="exceeds the model's max_length 24"):
        jax.eval_shape(lambda p: model_stepper(model, p, mem, mm, jnp.ones((1, 5), jnp.int32), 20).cache, params)
