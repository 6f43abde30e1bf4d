"""Crop sets through one ViT forward (gpfm_jax/models/crops.py) equal the separate forwards, drop path included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax.models.vit import ViTConfig, VisionTransformer

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, attention_impl="xla")
RTOL, ATOL = 1e-5, 1e-5  # fp32: the same row-wise maths, only the matmul blocking differs


def _inputs(b_global=4, b_local=8):
    k = jax.random.split(jax.random.key(0), 3)
    global_crops = jax.random.normal(k[0], (b_global, 16, 16, 3))
    local_crops = jax.random.normal(k[1], (b_local, 8, 8, 3))
    masks = jax.random.bernoulli(k[2], 0.3, (b_global, 16))
    return global_crops, local_crops, masks


@functools.cache
def _params(scan: bool):
    """Initial params of TINY, one init per layout (the drop path settings and remat policy change no param)."""
    init = jax.jit(VisionTransformer(ViTConfig(**TINY, scan_layers=scan)).init)
    return init(jax.random.key(1), jnp.zeros((4, 16, 16, 3)))


def _both(cfg, kw, grads=False):
    """(separate, together): jitted functions of (params, global key, local key) giving the outputs of the two
    separate forwards and of the concatenated one (with grads: the gradients of a loss on their tokens)."""
    model = VisionTransformer(cfg)
    g, l, m = _inputs()

    def separate(p, key_global, key_local):
        sg = model.apply(p, g, m, rngs={"drop_path": key_global}, **kw)
        sl = model.apply(p, l, rngs={"drop_path": key_local}, **kw)
        return sg, sl

    def together(p, key_global, key_local):
        return model.apply(p, (g, l), (m, None), rngs={"drop_path": key_global, "drop_path_1": key_local}, **kw)

    if grads:
        loss = lambda f: lambda *a: sum(jnp.sum(o["tokens"] ** 2) for o in f(*a))  # noqa: E731
        return (jax.jit(jax.grad(loss(separate))),
                jax.jit(jax.grad(loss(together))))
    return jax.jit(separate), jax.jit(together)


@pytest.mark.parametrize("scan,rate,mode,groups", [(False, 0.0, "auto", 1), (False, 0.2, "sample", 1),
                                                   (False, 0.4, "subset", 1), (True, 0.4, "subset", 2)])
def test_concatenated_forward_equals_separate_forwards(scan, rate, mode, groups):
    cfg = ViTConfig(**TINY, scan_layers=scan, drop_path_rate=rate, drop_path_mode=mode)
    params = _params(scan)
    separate, together = _both(cfg, dict(train=True, drop_path_groups=groups))
    keys = jax.random.key(2), jax.random.key(3)
    (sg, sl), (cg, cl) = separate(params, *keys), together(params, *keys)
    for ref, got in ((sg, cg), (sl, cl)):
        for name in ("cls", "patch", "tokens"):
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(ref[name]), rtol=RTOL, atol=ATOL)
    if scan:  # the draws matter: another local key changes the local crops' output
        _, other = together(params, jax.random.key(2), jax.random.key(4))
        assert not np.allclose(np.asarray(other["tokens"]), np.asarray(sl["tokens"]), rtol=RTOL, atol=ATOL)


def test_concatenated_gradients_equal_separate_with_microbatch_groups():
    cfg = ViTConfig(**TINY, drop_path_rate=0.4, remat_policy="dots_saveable")
    kw = dict(train=True, drop_path_groups=2, drop_path_group_ids=jnp.array([1, 3]), drop_path_total_groups=4)
    separate, together = _both(cfg, kw, grads=True)
    args = _params(False), jax.random.key(2), jax.random.key(3)
    ref, got = separate(*args), together(*args)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
