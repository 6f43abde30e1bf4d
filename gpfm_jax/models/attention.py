"""Multi-head attention kernels for the ViT: softmax(q k^T / sqrt(hd)) v, four ways that compute the same function.

- "loop": one sample at a time (lax.map), scale folded into q, normalisation after PV. XLA:CPU otherwise
  materialises the (b, heads, n, n) scores between fusions; per sample they stay in cache (docs/performance.md).
- "xla": `jax.nn.dot_product_attention(implementation="xla")`.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`. jax 0.10.2 refuses
  odd sequence lengths when the call is differentiated (its flash-attention check sees a bias where there is
  none, and cuDNN's bias path needs even lengths), so the ViT's 257 / 197 tokens are padded to an even length and
  the padded keys masked through `key_value_seq_lengths` (cuDNN's padding mask: padded keys get no weight, padded
  query rows are zero and sliced off). Exact: the padded keys never enter the softmax.
- "auto": "loop" on CPU, "cudnn" on GPU in bf16 / fp16 (flash attention needs a half-precision type), "xla"
  otherwise (TPU: XLA's own fusion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpfm_jax.models.remat import ATTENTION_OUT

AUTO = "auto"
IMPLS = ("auto", "loop", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")
SEQ_MULTIPLE = 2  # cuDNN's differentiated path needs even lengths


def resolve_impl(impl: str, backend: str | None = None, dtype: str = "float32") -> str:
    """The implementation "auto" stands for on `backend` (default: jax's default backend) for a compute dtype."""
    if impl != AUTO:
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "loop"
    if backend in ("gpu", "cuda") and jnp.dtype(dtype).name in CUDNN_DTYPES:
        return "cudnn"
    return "xla"


def _sample_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One sample, heads first: q, k, v (heads, n, hd) -> (heads, n, hd). Scale folded into q, logits and softmax
    in fp32 (as jax.nn.dot_product_attention), normalisation applied after the PV product (n x hd, not n x n)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("hqd,hkd->hqk", q * scale, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("hqk,hkd->hqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                     multiple: int = SEQ_MULTIPLE) -> jax.Array:
    """`jax.nn.dot_product_attention` on tokens padded to a multiple of `multiple`, padded keys masked by their
    sequence length; (b, n, heads, hd) in and out. With implementation="xla" this is what the cuDNN call computes,
    which is how the padding is tested on machines without a GPU."""
    b, n = q.shape[:2]
    padded = -(-n // multiple) * multiple
    if padded == n:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    pad = ((0, 0), (0, padded - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    lengths = jnp.full((b,), n, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :n]


def _loop_attention(q: jax.Array, k: jax.Array, v: jax.Array, shards: int) -> jax.Array:
    """The per-sample loop. With the batch split over `shards` devices the loop runs over the samples *within* a
    shard ([b, ...] viewed as [b / shards, shards, ...], mapped over the first axis, vmapped over the shards): a
    loop over the sharded axis itself would make XLA gather the whole batch onto every device."""
    b = q.shape[0]
    qt, kt, vt = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (b, heads, n, hd)
    if shards <= 1 or b % shards:
        return jax.lax.map(lambda x: _sample_attention(*x), (qt, kt, vt)).transpose(0, 2, 1, 3)
    split = lambda t: t.reshape((shards, b // shards) + t.shape[1:]).swapaxes(0, 1)  # noqa: E731
    out = jax.lax.map(lambda x: jax.vmap(_sample_attention)(*x), tuple(split(t) for t in (qt, kt, vt)))
    return out.swapaxes(0, 1).reshape((b,) + out.shape[2:]).transpose(0, 2, 1, 3)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, shards: int) -> jax.Array:
    if impl == "loop":
        return _loop_attention(q, k, v, shards)
    if impl == "cudnn":
        return padded_attention(q, k, v, "cudnn")
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, shards: int = 1) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v for q, k, v (b, n, heads, hd); `impl` already resolved (not "auto"); `shards`:
    the devices the batch axis is split over (only the "loop" implementation needs to know). The output is named
    `remat.ATTENTION_OUT` so that a remat policy can keep it (gpfm_jax/models/remat.py)."""
    return checkpoint_name(_attention(q, k, v, impl, shards), ATTENTION_OUT)
