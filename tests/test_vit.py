"""ViT module behaviour: pos-embed resampling, stochastic depth, scan, bf16, SwiGLU, logical sharding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import normalised_batch
from gpfm_jax.models.pos_embed import resample_patch_pos_embed
from gpfm_jax.models.vit import ViTConfig, VisionTransformer, add_residual

TINY = ViTConfig(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4)


def _init(cfg: ViTConfig, shape=(2, 56, 56, 3)):
    model = VisionTransformer(cfg)
    init = jax.jit(model.init)  # one compile, not one per op
    return model, nn.meta.unbox(init(jax.random.key(0), jnp.zeros(shape)))["params"]


@pytest.mark.parametrize("grid", [(20, 24), (8, 8), (37, 37), (16, 5)])
def test_dinov2_pos_embed_rule_matches_torch_scale_factor_interpolate(grid):
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 256, 32)).astype(np.float32)
    ours = np.asarray(resample_patch_pos_embed(jnp.asarray(pos), grid, "dinov2"))
    t = torch.from_numpy(pos).reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(t, scale_factor=((grid[0] + 0.1) / 16, (grid[1] + 0.1) / 16), mode="bicubic", antialias=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 32).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(14, 14), (32, 32), (20, 24)])
def test_timm_pos_embed_rule_matches_resample_abs_pos_embed(grid):
    from timm.layers import resample_abs_pos_embed

    pos = np.random.default_rng(1).normal(size=(1, 28 * 28, 16)).astype(np.float32)
    ours = np.asarray(resample_patch_pos_embed(jnp.asarray(pos), grid, "timm"))
    ref = resample_abs_pos_embed(torch.from_numpy(pos), new_size=list(grid), num_prefix_tokens=0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_per_sample_drop_path_keeps_each_sample_with_probability_1_minus_rate():
    x = jnp.zeros((4000, 2, 3))
    out = np.asarray(add_residual(x, lambda y: jnp.ones_like(y), 0.3, "sample", jax.random.key(0)))
    kept = out[:, 0, 0] > 0
    np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)  # kept: rescaled by 1 / keep_prob
    np.testing.assert_array_equal(out[~kept], 0.0)  # dropped: no branch
    assert np.all(out == out[:, :1, :1])  # one decision per sample
    assert abs(kept.mean() - 0.7) < 3 * np.sqrt(0.7 * 0.3 / 4000)


def test_batch_subset_drop_path_computes_the_branch_on_a_subset_and_rescales():
    x = jnp.arange(10, dtype=jnp.float32)[:, None, None] * jnp.ones((10, 2, 3))
    seen = []

    def branch(y):
        seen.append(y.shape)
        return jnp.ones_like(y)

    out = np.asarray(add_residual(x, branch, 0.4, "subset", jax.random.key(3)))
    assert seen == [(6, 2, 3)]  # int(10 * 0.6) samples only: DINOv2 saves that compute
    delta = out - np.asarray(x)
    changed = np.flatnonzero(delta[:, 0, 0])
    assert len(changed) == 6
    np.testing.assert_allclose(delta[changed], 10 / 6, rtol=1e-6)  # scaled by B / subset
    np.testing.assert_array_equal(np.delete(delta, changed, axis=0), 0.0)


@pytest.mark.slow
def test_drop_path_in_the_model_is_train_only_and_rng_driven():
    cfg = TINY.replace(drop_path_rate=0.4, layerscale_init=1.0)  # > 0.1: batch-subset ("auto"); LS 1 makes it visible
    model, params = _init(cfg)
    x = jnp.asarray(normalised_batch(56, count=5))
    evaluate = jax.jit(lambda p: model.apply({"params": p}, x)["cls"])
    train = jax.jit(lambda p, key: model.apply({"params": p}, x, train=True, rngs={"drop_path": key})["cls"])
    ev1, ev2 = evaluate(params), evaluate(params)
    np.testing.assert_array_equal(ev1, ev2)
    tr1, tr2 = train(params, jax.random.key(1)), train(params, jax.random.key(2))
    assert np.max(np.abs(tr1 - ev1)) > 1e-3 and np.max(np.abs(tr1 - tr2)) > 1e-3
    with pytest.raises(Exception, match="drop_path"):
        model.apply({"params": params}, x, train=True)


@pytest.mark.slow
def test_scan_keeps_the_program_size_independent_of_depth():
    def program_size(depth: int, scan: bool) -> int:
        cfg = TINY.replace(depth=depth, scan_layers=scan, remat_policy="full" if scan else "none")
        model = VisionTransformer(cfg)  # lowering needs the params' shapes only: no init is run
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 56, 56, 3))))["params"]
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)["cls"].sum())
        return len(jax.jit(jax.grad(fwd)).lower(params, jnp.zeros((2, 56, 56, 3))).as_text())

    scanned = program_size(16, True) / program_size(4, True)
    unscanned = program_size(16, False) / program_size(4, False)
    assert scanned < 1.05, scanned
    assert unscanned > 2.5, unscanned


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    cfg = TINY.replace(dtype="bfloat16")
    model, params = _init(cfg)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    x = jnp.asarray(normalised_batch(56, count=2))
    out = jax.jit(lambda p: model.apply({"params": p}, x))(params)
    ref = jax.jit(lambda p: VisionTransformer(TINY).apply({"params": p}, x))(params)
    assert out["cls"].dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out["cls"], np.float32) - np.asarray(ref["cls"])))
    assert 0 < err < 0.1, err


def test_swiglu_ffn_matches_timm_packed_swiglu():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from conftest import randomize_torch_params_
    from gpfm_jax.convert.vit_keys import canonical_keys, infer_vit_config, vit_params_from_torch
    from gpfm_jax.convert.torch_io import tensor_to_numpy

    torch.manual_seed(0)
    ref = TimmViT(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=4, mlp_ratio=2.66667 * 2,
                  mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, init_values=1e-5, num_classes=0).eval()
    randomize_torch_params_(ref, 0)
    state, _ = canonical_keys({k: tensor_to_numpy(v) for k, v in ref.state_dict().items()}, "ref")
    cfg = infer_vit_config(state, "ref", num_heads=4)
    assert cfg.ffn == "swiglu" and cfg.mlp_hidden_dim == 256
    params = vit_params_from_torch(state, cfg, "ref")
    x = normalised_batch(56, count=2)
    ours = VisionTransformer(cfg).apply({"params": params}, x)["tokens"]
    with torch.no_grad():
        want = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)


def test_logical_axes_shard_params_and_activations_without_changing_results():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 8
    model = VisionTransformer(TINY)
    boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((8, 56, 56, 3)))
    specs = nn.get_partition_spec(boxed)["params"]
    assert specs["blocks_0"]["mlp"]["fc1"]["kernel"] == P("embed", "mlp")
    assert specs["blocks_0"]["attn"]["qkv"]["kernel"] == P("embed", "qkv")
    params = nn.meta.unbox(boxed)["params"]
    x = jnp.asarray(np.tile(normalised_batch(56, count=4), (2, 1, 1, 1)))
    want = jax.jit(lambda p: model.apply({"params": p}, x)["patch"])(params)

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("embed", "fsdp"), ("mlp", None), ("qkv", None), ("heads", None), ("tokens", None))
    mesh_specs = nn.logical_to_mesh(specs, rules)
    sharded = jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, mesh_specs,
                                     is_leaf=lambda v: isinstance(v, P))
    assert sharded["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", None)

    @jax.jit
    def fwd(p, images):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": p}, images)["patch"]

    with jax.set_mesh(mesh):
        got = fwd(sharded, jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_batch_subset_drop_path_draws_a_subset_per_group():
    x = jax.random.normal(jax.random.key(0), (16, 3, 4))
    branch = lambda y: 2.0 * y + 1.0  # noqa: E731 - per-sample, so the reference can apply it to any subset
    rng = jax.random.key(7)
    out = np.asarray(add_residual(x, branch, 0.4, "subset", rng, groups=4))
    want = np.asarray(x).copy()
    for s, key in enumerate(jax.random.split(rng, 4)):  # each group of 4 samples keeps int(4 * 0.6) = 2 of them
        index = 4 * s + np.asarray(jax.random.permutation(key, 4)[:2])
        want[index] += np.asarray(branch(x[index])) * (4 / 2)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    changed = np.flatnonzero(np.abs(out - np.asarray(x)).sum(axis=(1, 2)) > 0).reshape(4, 2) // 4
    np.testing.assert_array_equal(changed, np.repeat(np.arange(4)[:, None], 2, axis=1))  # two in every group
    # one group: the single permutation over the whole batch (DINOv2 on one GPU)
    one = np.asarray(add_residual(x, branch, 0.4, "subset", rng, groups=1))
    index = np.asarray(jax.random.permutation(rng, 16)[:9])
    ref = np.asarray(x).copy()
    ref[index] += np.asarray(branch(x[index])) * (16 / 9)
    np.testing.assert_allclose(one, ref, rtol=1e-6, atol=1e-6)


def test_batch_subset_drop_path_under_a_mesh_moves_no_activations():
    """One subset group per device on 8 devices: the same numbers as the 8-group computation on one device, and the
    compiled program has no collective at all (one global permutation all-reduced / all-gathered the activations)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from gpfm_jax.plan.roofline import parse_collectives

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rules = (("batch", ("data", "fsdp")), ("tokens", None), ("embed", None))
    w = jax.random.normal(jax.random.key(1), (16, 16)) / 4.0
    x = jax.random.normal(jax.random.key(2), (32, 5, 16))
    branch = lambda y: jnp.tanh(y @ w)  # noqa: E731

    @jax.jit
    def step(x, key):
        with nn.logical_axis_rules(rules):
            return add_residual(x, branch, 0.4, "subset", key, groups=8)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        got = step(xs, jax.random.key(3))
        hlo = step.lower(xs, jax.random.key(3)).compile().as_text()
    want = add_residual(x, branch, 0.4, "subset", jax.random.key(3), groups=8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert parse_collectives(hlo, 8) == []


def test_padded_attention_with_key_mask_is_exact_to_xla_attention():
    """The cuDNN path pads 257 tokens to 258 and masks the padded key by its sequence length. Through XLA (what
    this machine can run) the padded computation equals plain attention in fp32: outputs and all input gradients."""
    from gpfm_jax.models import attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (3, 257, 4, 16), jnp.float32) for kk in keys)

    def with_grads(fn):
        def run(q, k, v, g):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(g))

        return jax.jit(run)(q, k, v, g)  # one compile, not one per op

    padded = with_grads(lambda q, k, v: attention.padded_attention(q, k, v, "xla"))
    plain = with_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    loop = with_grads(lambda q, k, v: attention.dot_product_attention(q, k, v, "loop"))
    for got, want, other in zip(padded, plain, loop):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(other), np.asarray(want), rtol=1e-5, atol=2e-6)
    assert attention.padded_attention(q[:, :256], k[:, :256], v[:, :256], "xla").shape == (3, 256, 4, 16)


def test_auto_attention_resolves_per_backend_and_dtype():
    from gpfm_jax.models.attention import resolve_impl

    assert resolve_impl("auto", "cpu", "bfloat16") == "loop"
    assert resolve_impl("auto", "gpu", "bfloat16") == "cudnn"  # flash attention needs a half-precision type
    assert resolve_impl("auto", "gpu", "float32") == "xla"
    assert resolve_impl("auto", "tpu", "bfloat16") == "xla"
    assert resolve_impl("xla", "gpu", "bfloat16") == "xla"


def test_loop_attention_on_a_sharded_batch_stays_on_each_device():
    """The CPU attention loop runs over the samples within each batch shard: same numbers as XLA attention, and no
    collective (a loop over the sharded batch axis would all-gather q, k and v onto every device)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from gpfm_jax.models import attention
    from gpfm_jax.plan.roofline import parse_collectives

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    q, k, v = (jax.random.normal(kk, (16, 9, 2, 8)) for kk in jax.random.split(jax.random.key(0), 3))
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, "loop", shards=8))
    with jax.set_mesh(mesh):
        args = [jax.device_put(t, NamedSharding(mesh, P(("data", "fsdp")))) for t in (q, k, v)]
        got = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    assert parse_collectives(hlo, 8) == []
