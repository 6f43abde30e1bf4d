"""Remat policies (gpfm_jax/models/remat.py): the same gradients as no remat, and the attention output kept."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax.models import remat
from gpfm_jax.models.vit import ViTConfig, VisionTransformer

TINY = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)


@functools.cache
def _params(scan: bool):
    """Initial params of TINY, one init per layout: neither the remat policy, the attention implementation nor the
    drop path rate changes the params (their shapes, initialisers and init key are the same)."""
    cfg = ViTConfig(**TINY, scan_layers=scan)
    init = jax.jit(VisionTransformer(cfg).init)
    return init(jax.random.key(1), jnp.zeros((4, 28, 28, 3)))


def _loss_and_params(policy: str, impl: str, scan: bool = False):
    cfg = ViTConfig(**TINY, remat_policy=policy, attention_impl=impl, scan_layers=scan, drop_path_rate=0.2)
    model = VisionTransformer(cfg)
    images = jax.random.normal(jax.random.key(0), (4, 28, 28, 3))
    params = _params(scan)

    def loss(p):
        out = model.apply(p, images, train=True, rngs={"drop_path": jax.random.key(2)})
        return (out["tokens"] ** 2).mean()

    return loss, params


def _saved(policy: str, impl: str) -> str:
    loss, params = _loss_and_params(policy, impl)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("impl,scan", [("loop", False), ("xla", True)])
def test_dots_and_attention_saveable_gradients_equal_no_remat(impl, scan):
    loss, params = _loss_and_params("none", impl, scan)
    # jitted: one compile, not one per op (and as the train step runs it)
    ref = jax.jit(jax.grad(loss))(params)
    loss_r, _ = _loss_and_params(remat.DOTS_AND_ATTENTION, impl, scan)
    got = jax.jit(jax.grad(loss_r))(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["loop", "xla"])
def test_attention_output_is_saved_only_by_the_new_policy(impl):
    named = f"named '{remat.ATTENTION_OUT}'"
    assert _saved(remat.DOTS_AND_ATTENTION, impl).count(named) == TINY["depth"]
    assert named not in _saved("dots_saveable", impl)


def test_policy_names():
    assert remat.policy("full") is None
    assert remat.policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    assert remat.policy(remat.DOTS_AND_ATTENTION) is remat.dots_and_attention_saveable
    with pytest.raises(ValueError, match="remat_policy"):
        ViTConfig(**TINY, remat_policy="dots_savable")
    with pytest.raises(ValueError, match="remat_policy: unknown remat policy 'save_only_these_names'"):
        ViTConfig(**TINY, remat_policy="save_only_these_names")  # a policy factory, not a policy


def test_flash_attention_forward_is_saved():
    """cuDNN's forward primitive (not traceable without a GPU) is recognised by name, its backward is not."""

    class Prim:
        def __init__(self, name):
            self.name = name

    assert remat.dots_and_attention_saveable(Prim("dot_product_attention_fwd_wrapper"))
    assert not remat.dots_and_attention_saveable(Prim("dot_product_attention_bwd_wrapper"))
    assert not remat.dots_and_attention_saveable(Prim("exp"))
