"""Rematerialisation policies for the ViT blocks: what the backward pass keeps from the forward, by name.

"none" keeps everything (fewest FLOPs, most memory), "full" keeps only each block's input (recomputes the whole
forward), the `jax.checkpoint_policies` predicates (`JAX_POLICIES`, e.g. "dots_saveable": every matmul output)
pick in between, and
"dots_and_attention_saveable" is `dots_saveable` plus the attention output. Why the last one: on GPU the attention
is cuDNN flash attention, a custom call and not a `dot_general`, so `dots_saveable` does not keep it and the
backward pass runs the attention forward again (its residuals: the output and the softmax statistics). With this
policy they are kept (the cuDNN forward primitive's outputs, and the output of the other implementations, named
`ATTENTION_OUT` in gpfm_jax/models/attention.py). gpfm-plan --search picks among them by FLOPs and memory.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

ATTENTION_OUT = "attention_out"  # checkpoint_name of the attention output (before the output projection)
DOTS_AND_ATTENTION = "dots_and_attention_saveable"
SPECIAL = ("none", "full", DOTS_AND_ATTENTION)
# the jax.checkpoint_policies that are policies themselves (the others, e.g. save_only_these_names, are factories
# that would pass a name check and fail at trace time)
JAX_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                "checkpoint_dots_with_no_batch_dims", "everything_saveable", "nothing_saveable")

_save_attention_name = jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)


def _is_flash_attention_forward(prim: Any) -> bool:
    """cuDNN's fused attention forward (jax.nn.dot_product_attention(implementation="cudnn")): its primitives are
    named "dot_product_attention_fwd[...]" and return the output and the softmax statistics the backward reads."""
    return "dot_product_attention" in prim.name and "fwd" in prim.name


def dots_and_attention_saveable(prim: Any, *avals: Any, **params: Any) -> bool:
    """Save every matmul output (as dots_saveable), the flash-attention forward's outputs and `ATTENTION_OUT`."""
    return bool(jax.checkpoint_policies.dots_saveable(prim, *avals, **params)
                or _is_flash_attention_forward(prim)
                or _save_attention_name(prim, *avals, **params))


def policy(name: str) -> Callable[..., bool] | None:
    """The jax.checkpoint policy for a configured name; None for "full" (save nothing but the inputs)."""
    if name == "full":
        return None
    if name == DOTS_AND_ATTENTION:
        return dots_and_attention_saveable
    if name not in JAX_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}: expected one of {SPECIAL + JAX_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


def wrap(block: type[nn.Module], name: str, scan_layers: bool) -> type[nn.Module]:
    """`block` rematerialised under the named policy ("none": unchanged)."""
    if name == "none":
        return block
    return nn.remat(block, policy=policy(name), prevent_cse=not scan_layers)
