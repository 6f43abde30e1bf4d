"""KoLeo regulariser: -mean_i log(d(x_i, x_nn(i)) + eps) on L2-normalised vectors (DINOv2 `KoLeoLoss`).

DINOv2 measures d with torch's `nn.PairwiseDistance(2, eps=1e-8)`, which is ||x - y + eps|| (eps added to every
coordinate of the difference), not ||x - y||. It matters more than it looks: at init, with LayerScale 1e-5, every
image's CLS is nearly the same vector, neighbour distances are ~1e-6 and the eps term moves the loss by ~0.4% and
its gradient far more. `pairwise_eps=True` (the default) reproduces it; False measures ||x - y|| (exactly 0 for
duplicates, with a zero gradient there). See docs/fidelity.md.

The nearest neighbour is searched within the LOCAL batch in the reference (one GPU's 96 images). A jitted step
sees the global batch, so `num_groups` splits it into that many contiguous groups (set it to the number of data
shards to reproduce the reference, 1 for the whole batch) and averages the per-group losses, which is what
averaging the per-GPU losses' gradients does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _safe_norm(x: jax.Array) -> jax.Array:
    """||x|| with a finite (zero) gradient at x = 0, where duplicate points would otherwise give NaN."""
    sq = jnp.sum(x * x, axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def koleo_loss(x: jax.Array, num_groups: int = 1, eps: float = 1e-8, pairwise_eps: bool = True) -> jax.Array:
    """x [B, D] -> scalar. Neighbours by max inner product among the other samples of the same group."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    groups = x.reshape(num_groups, x.shape[0] // num_groups, x.shape[-1])
    n = groups.shape[1]
    dots = jnp.einsum("gid,gjd->gij", groups, groups)
    dots = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, dots)  # DINOv2 writes -1 on the diagonal: same argmax
    nn_index = jnp.argmax(jax.lax.stop_gradient(dots), axis=-1)  # [G, n]
    neighbours = jnp.take_along_axis(groups, nn_index[..., None], axis=1)
    distances = _safe_norm(groups - neighbours + (eps if pairwise_eps else 0.0))
    return jnp.mean(-jnp.log(distances + eps))


def koleo_global_views(cls_tokens: jax.Array, num_groups: int = 1, eps: float = 1e-8,
                       pairwise_eps: bool = True) -> jax.Array:
    """cls_tokens [G, B, D] (pre-head student CLS, views stacked): sum over views of the per-view KoLeo loss.

    Views are kept apart so two crops of the same image are never each other's neighbour.
    """
    return sum(koleo_loss(cls_tokens[v], num_groups, eps, pairwise_eps) for v in range(cls_tokens.shape[0]))
