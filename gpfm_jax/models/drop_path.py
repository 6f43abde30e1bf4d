"""Stochastic depth (drop path) for the ViT's residual branches, per sample or on a random batch subset.

Kept apart from the modules (gpfm_jax/models/vit.py) because the draws are a contract with the training step:
batch-subset drop path draws one subset per group of the batch (one group per device) and a microbatch draws
exactly what its groups draw in the whole batch (exact gradient accumulation, gpfm_jax/step/microbatch.py).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def drop_path_mode(rate: float, mode: str) -> str:
    """DINOv2 switches to batch-subset stochastic depth when the rate exceeds 0.1."""
    if mode == "auto":
        return "subset" if rate > 0.1 else "sample"
    return mode


def batch_shards() -> int:
    """How many devices split the logical "batch" axis here: the mesh set by `jax.set_mesh` and the flax logical
    axis rules in force (1 outside a mesh, as in plain `apply`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = next((mapped for name, mapped in nn.get_logical_axis_rules() if name == "batch"), None)
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(math.prod(mesh.shape[a] for a in axes if a in mesh.shape))


def group_keys(rng: jax.Array, groups: int, group_ids: jax.Array | None, total_groups: int) -> jax.Array:
    """One key per group of this call: `split(rng, groups)`, or, for a microbatch holding groups `group_ids` of a
    batch of `total_groups` groups, those groups' keys of `split(rng, total_groups)`: a group draws the same
    stochastic depth whichever microbatch carries it (exact gradient accumulation)."""
    if group_ids is None:
        return jax.random.split(rng, groups)
    return jax.random.split(rng, total_groups)[group_ids]


def _subset_pick(x: jax.Array, rate: float, rng: jax.Array, groups: int, group_ids: jax.Array | None = None,
                 total_groups: int = 0) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Batch-subset stochastic depth drawn per group of the batch (DINOv2 draws per GPU): the batch is viewed as
    [groups, B / groups], each group keeps its own random subset of max(int(B/groups (1 - rate)), 1) samples. With
    one group per device (the trainer's default) the gather and scatter-add stay on the device: no activation
    crosses devices. One group (of one) is a single permutation of the whole batch.
    Returns the picked samples and the function that adds the branch's output on them back into x."""
    batch = x.shape[0]
    if batch % groups:
        raise ValueError(f"batch-subset drop path: batch {batch} does not split into {groups} groups")
    per_group = batch // groups
    subset = max(int(per_group * (1.0 - rate)), 1)
    scale = per_group / subset
    if groups == 1 and group_ids is None:
        index = jax.random.permutation(rng, batch)[:subset]
        picked = nn.with_logical_constraint(x[index], ("batch", "tokens", "embed"))
        return picked, lambda residual: x.at[index].add(residual * jnp.asarray(scale, residual.dtype))
    rest = x.shape[1:]
    shards = batch_shards()
    # the group axis carries the batch sharding when the groups split evenly over the devices
    constrain = nn.with_logical_constraint if groups % shards == 0 else (lambda a, _: a)
    xs = constrain(x.reshape((groups, per_group) + rest), ("batch", None, "tokens", "embed"))
    keys = group_keys(rng, groups, group_ids, total_groups)
    index = jax.vmap(lambda k: jax.random.permutation(k, per_group)[:subset])(keys)
    index = constrain(index, ("batch", None))
    picked = jax.vmap(lambda xi, ii: xi[ii])(xs, index)  # [groups, subset, ...]: a gather batched over groups
    picked = constrain(picked.reshape((groups * subset,) + rest), ("batch", "tokens", "embed"))

    def combine(branch_out: jax.Array) -> jax.Array:
        residual = branch_out.reshape((groups, subset) + rest) * jnp.asarray(scale, x.dtype)
        residual = constrain(residual, ("batch", None, "tokens", "embed"))
        out = jax.vmap(lambda xi, ii, ri: xi.at[ii].add(ri))(xs, index, residual.astype(x.dtype))
        return out.reshape(x.shape)

    return picked, combine


def _sample_keep(x: jax.Array, rate: float, rng: jax.Array, groups: int, group_ids: jax.Array | None,
                 total_groups: int) -> jax.Array:
    """Per-sample stochastic depth: 1 / keep_prob for the samples whose branch is kept, 0 for the others."""
    batch, keep_prob = x.shape[0], 1.0 - rate
    if group_ids is None:
        keep = jax.random.bernoulli(rng, keep_prob, (batch,) + (1,) * (x.ndim - 1))
    else:  # the whole batch's draw (one flat stream of bits, whatever its shape), this microbatch's groups of it
        per_group = batch // groups
        keep = jax.random.bernoulli(rng, keep_prob, (total_groups, per_group) + (1,) * (x.ndim - 1))
        keep = keep[group_ids].reshape((batch,) + (1,) * (x.ndim - 1))
    return keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype)


def add_residuals(
    xs: Sequence[jax.Array], branch: Callable[[list[jax.Array]], list[jax.Array]], rate: float, mode: str,
    rngs: Sequence[jax.Array] | None, groups: int = 1, group_ids: jax.Array | None = None, total_groups: int = 0,
) -> list[jax.Array]:
    """[x + branch(x) for each crop set x] with stochastic depth, `branch` called once on all the sets (so that it
    can run their tokens through its linear layers as one matrix); set i draws from `rngs[i]` exactly what
    `add_residual(xs[i], ..., rngs[i])` draws."""
    if rate == 0.0 or rngs is None:
        return [x + out for x, out in zip(xs, branch(list(xs)))]
    if drop_path_mode(rate, mode) == "subset":
        picks = [_subset_pick(x, rate, rng, groups, group_ids, total_groups) for x, rng in zip(xs, rngs)]
        outs = branch([picked for picked, _ in picks])
        return [combine(out) for (_, combine), out in zip(picks, outs)]
    keeps = [_sample_keep(x, rate, rng, groups, group_ids, total_groups) for x, rng in zip(xs, rngs)]
    return [x + out * keep for x, out, keep in zip(xs, branch(list(xs)), keeps)]


def add_residual(
    x: jax.Array, branch: Callable[[jax.Array], jax.Array], rate: float, mode: str, rng: jax.Array | None,
    groups: int = 1, group_ids: jax.Array | None = None, total_groups: int = 0,
) -> jax.Array:
    """x + branch(x) with stochastic depth.

    "sample": each sample's branch is kept with p = 1 - rate and rescaled by 1 / p.
    "subset": the branch is computed only on a random subset of each of `groups` contiguous groups of the batch
    (max(int(b (1 - rate)), 1) of its b samples) and added back scaled by b / subset, which also saves that share of
    the compute (DINOv2: per GPU; the training step passes one group per device).
    `group_ids` (int [groups], with `total_groups`): this batch is a microbatch holding those groups of a batch of
    `total_groups`; each group draws what it would draw in the whole batch (the step's gradient accumulation).
    """
    rngs = None if rng is None else [rng]
    return add_residuals([x], lambda ys: [branch(ys[0])], rate, mode, rngs, groups, group_ids, total_groups)[0]
