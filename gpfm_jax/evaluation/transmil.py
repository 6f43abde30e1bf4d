"""TransMIL (Shao et al. 2021) in Flax: fc -> square the sequence -> [CLS] -> Nystrom layer -> PPEG -> Nystrom
layer(s) -> LayerNorm -> classifier on [CLS].

The reference codes (the paper's, GPFM's copy, torchmil) run one unpadded bag; here bags arrive padded to a bucket
size, so every length-dependent step uses each bag's own tile count n (from its prefix mask) inside fixed-size
buffers, and a padded bag gives exactly the unpadded result:
- squaring: s = ceil(sqrt(n)); the sequence is [CLS, h_0..h_{n-1}, h_0..h_{s*s-n-1}] (the first tiles repeated);
- PPEG: the s x s grid sits in the corner of a static S x S grid of zeros, and a zero-padded 'SAME' depthwise conv
  over S x S equals the conv over s x s inside that corner;
- Nystrom attention: the sequence of L = s*s + 1 tokens is front-padded with zeros to m * ceil(L / m) (m landmarks)
  as in lucidrains' `nystrom-attention`; landmark means divide by ceil(L / m) (zero rows included, as there).
Deviation: the Moore-Penrose initial scale max(col) * max(row) is taken per bag (the references take it over the
whole batch, so there a bag's output depends on the other bags in its batch); with one bag per batch they agree.
Attention scores for heatmaps: the [CLS] row of the last layer's approximate attention (attn1 @ pinv(attn2) @
attn3), mean over heads, over the bag's first n tokens (torchmil's definition), computed without forming N x N.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpfm_jax.evaluation.mil_layers import Dropout, MILConfig


def pinv_newton(x: jax.Array, iters: int) -> jax.Array:
    """Iterative Moore-Penrose pseudo-inverse of x [h, m, m] (Razavi et al.; as in nystrom-attention), the initial
    scale taken over all heads of this bag."""
    a = jnp.abs(x)
    z = jnp.swapaxes(x, -1, -2) / (jnp.max(a.sum(-1)) * jnp.max(a.sum(-2)))
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """One bag: x [T, dim] (LayerNorm-ed tokens; rows >= length ignored), length = L real tokens (traced int)."""

    dim: int
    heads: int
    landmarks: int
    pinv_iterations: int
    residual_conv_kernel: int
    out_proj: bool
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, length: jax.Array, train: bool, want_cls_attention: bool = False):
        t, m, h = x.shape[0], self.landmarks, self.heads
        d = self.dim // h
        size = m * math.ceil(t / m)  # static buffer: >= m * ceil(L / m) for every L <= T
        per = (length + m - 1) // m  # tokens per landmark
        pad = m * per - length  # zero rows in front (lucidrains pads on the left)
        pos = jnp.arange(size)
        src = pos - pad
        valid = (src >= 0) & (src < length)
        xp = jnp.where(valid[:, None], x[jnp.clip(src, 0, t - 1)], 0.0)
        qkv = nn.Dense(3 * self.dim, use_bias=False, name="to_qkv")(xp)
        q, k, v = (a.reshape(size, h, d).transpose(1, 0, 2) for a in jnp.split(qkv, 3, axis=-1))  # [h, P, d]
        q = q * d**-0.5
        in_seq = pos < m * per  # front padding and real tokens; rows past the padded sequence do not exist
        seg = jnp.where(in_seq, pos // per, m)  # landmark index; m = dropped
        q_l = jax.ops.segment_sum(jnp.moveaxis(q, 1, 0), seg, m + 1)[:m] / per  # [m, h, d]
        k_l = jax.ops.segment_sum(jnp.moveaxis(k, 1, 0), seg, m + 1)[:m] / per
        q_l, k_l = jnp.moveaxis(q_l, 0, 1), jnp.moveaxis(k_l, 0, 1)  # [h, m, d]
        attn1 = jax.nn.softmax(q @ jnp.swapaxes(k_l, -1, -2), axis=-1)  # [h, P, m]
        attn2 = jax.nn.softmax(q_l @ jnp.swapaxes(k_l, -1, -2), axis=-1)  # [h, m, m]
        sim3 = q_l @ jnp.swapaxes(k, -1, -2)  # [h, m, P]
        attn3 = jax.nn.softmax(jnp.where(in_seq, sim3, jnp.finfo(x.dtype).min), axis=-1)
        inv = pinv_newton(attn2, self.pinv_iterations)
        out = (attn1 @ inv) @ (attn3 @ v)  # [h, P, d]
        if self.residual_conv_kernel:
            # Depthwise conv of v along the sequence, one K-tap kernel per head (torch Conv2d(h, h, (K, 1),
            # groups=h)); rows outside the padded sequence are zero, as the conv's zero padding.
            kern = self.param("res_conv", nn.initializers.lecun_normal(), (self.residual_conv_kernel, 1, 1, h))
            out = out + depthwise_1d(v, kern[:, 0, 0, :])
        out = out.transpose(1, 0, 2).reshape(size, self.dim)
        if self.out_proj:
            out = nn.Dense(self.dim, name="to_out")(out)
        out = Dropout(self.dropout, deterministic=not train)(out)
        back = jnp.clip(jnp.arange(t) + pad, 0, size - 1)
        res = out[back]  # [T, dim] token layout again
        if not want_cls_attention:
            return res, None
        row = (attn1[:, pad][:, None, :] @ inv @ attn3)[:, 0]  # [h, P]: the [CLS] query's attention
        return res, row.mean(0)[back]  # [T] in token layout


def depthwise_1d(v: jax.Array, w: jax.Array) -> jax.Array:
    """out[h, i] = sum_k w[k, h] v[h, i + k - K // 2] (zero padded) for v [h, P, d], w [K, h], as shifted adds:
    XLA's CPU grouped convolution took ~2 s per layer on a 20k-tile bag, the shifted adds ~0.1 s."""
    taps = w.shape[0]
    half = taps // 2
    vp = jnp.pad(v, ((0, 0), (half, half), (0, 0)))
    out = jnp.zeros_like(v)
    for k in range(taps):
        out = out + w[k][:, None, None] * jax.lax.slice_in_dim(vp, k, k + v.shape[1], axis=1)
    return out


class DepthwiseConv2D(nn.Module):
    """'SAME' depthwise k x k conv with bias on [1, H, W, C], flax nn.Conv's parameters (kernel [k, k, 1, C], bias),
    computed as k*k shifted adds (XLA's CPU grouped convolution is ~7x slower here)."""

    features: int
    size: int

    @nn.compact
    def __call__(self, g: jax.Array) -> jax.Array:
        kern = self.param("kernel", nn.initializers.lecun_normal(), (self.size, self.size, 1, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        half = self.size // 2
        gp = jnp.pad(g, ((0, 0), (half, half), (half, half), (0, 0)))
        h, w = g.shape[1], g.shape[2]
        out = jnp.zeros_like(g) + bias
        for i in range(self.size):
            for j in range(self.size):
                out = out + gp[:, i : i + h, j : j + w, :] * kern[i, j, 0]
        return out


class PPEG(nn.Module):
    """Pyramid position encoding: tokens on an s x s grid, + depthwise 7x7, 5x5, 3x3 convs (with bias)."""

    dim: int

    @nn.compact
    def __call__(self, tok: jax.Array, side: jax.Array, grid: int) -> jax.Array:
        i, j = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
        inside = (i < side) & (j < side)
        idx = jnp.where(inside, 1 + i * side + j, 0)
        g = jnp.where(inside[..., None], tok[idx], 0.0)[None]  # [1, S, S, dim]
        y = g
        for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
            y = y + DepthwiseConv2D(self.dim, k, name=name)(g)
        y = y[0]
        t = jnp.arange(tok.shape[0])
        cell = jnp.clip(t - 1, 0, None)
        r, c = jnp.clip(cell // side, 0, grid - 1), jnp.clip(cell % side, 0, grid - 1)
        return jnp.where(((t >= 1) & (t <= side * side))[:, None], y[r, c], tok)


class _Bag(nn.Module):
    """TransMIL on one padded bag: x [N, D], mask [N] (a prefix) -> logits [C], scores [N]."""

    cfg: MILConfig
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        c, train = self.cfg, self.train
        dim = c.hidden_dim or x.shape[-1]
        h = nn.Dense(dim, name="fc")(x)
        if c.fc_relu:
            h = nn.relu(h)
        h = Dropout(c.dropout, deterministic=not train)(h)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (dim,))
        size = x.shape[0]
        grid = math.isqrt(size - 1) + 1 if size > 1 else 1  # ceil(sqrt(N)), static
        t = jnp.arange(grid * grid + 1)
        n = jnp.maximum(mask.sum(), 1)
        side = _ceil_sqrt(n)
        src = jnp.where(t - 1 < n, t - 1, t - 1 - n)
        seq = jnp.where((t == 0)[:, None], cls, h[jnp.clip(src, 0, size - 1)])
        length = side * side + 1
        scores = None
        for i in range(c.num_layers):
            last = i == c.num_layers - 1
            attn = NystromAttention(dim, c.heads, c.landmarks or dim // 2, c.pinv_iterations,
                                    c.residual_conv_kernel, c.attn_out_proj, c.attn_dropout, name=f"layers_{i}")
            out, att = attn(nn.LayerNorm(1e-5, name=f"layers_{i}_norm")(seq), length, train, last)
            seq = seq + out
            if i == 0:
                seq = PPEG(dim, name="pos_layer")(seq, side, grid)
            scores = att if last else scores
        logits = nn.Dense(c.num_outputs, name="classifier")(nn.LayerNorm(1e-5, name="norm")(seq)[0])
        return logits, jnp.where(mask, scores[1 : size + 1], 0.0)  # tokens 1..N = tiles 0..N-1


class TransMIL(nn.Module):
    """Batched TransMIL: x f32[B, N, D], mask bool[B, N] (a prefix per bag, as bags.pad_bags makes)."""

    cfg: MILConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        bag = nn.vmap(_Bag, variable_axes={"params": None}, split_rngs={"params": False, "dropout": True})
        return bag(self.cfg, train, name="bag")(x, mask)


def _ceil_sqrt(n: jax.Array) -> jax.Array:
    """Exact integer ceil(sqrt(n)) for traced ints (float sqrt corrected by one step either way)."""
    s = jnp.ceil(jnp.sqrt(n.astype(jnp.float32))).astype(jnp.int32)
    s = jnp.where((s - 1) * (s - 1) >= n, s - 1, s)
    return jnp.where(s * s < n, s + 1, s)
