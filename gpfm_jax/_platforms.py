"""Keeps libtpu quiet on machines without a TPU.

With the `tpu` extra installed (gpfm-plan's deviceless TPU compiles need libtpu on any machine), JAX tries the TPU
backend at its first use even where there is no TPU chip, and libtpu prints a screen of `TPU_WORKER_HOSTNAMES` /
`InitGoogle` warnings on every command. When the user has not chosen the platforms (JAX_PLATFORMS unset) and
jax finds no TPU chip, the TPU backend is left out of the list JAX tries; on a TPU host (chips present) nothing
changes, and an explicit JAX_PLATFORMS always wins.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def _has_cuda() -> bool:
    plugin = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))
    return plugin and bool(glob.glob("/dev/nvidia[0-9]*"))


def quiet_libtpu_without_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    from jax._src import hardware_utils  # the check jax's own TPU start-up uses

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    jax.config.update("jax_platforms", "cuda,cpu" if _has_cuda() else "cpu")
