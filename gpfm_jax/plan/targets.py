"""The accelerator targets `gpfm-plan` compiles for, and how to get their devices without owning them.

A target is a slice shape plus the published per-chip figures the roofline needs. TPU devices come from libtpu's
topology description (`pip install -e ".[tpu]"`), H100 devices from XLA's GPU compiler given a
`GpuTargetConfigProto` (`h100_sxm.textproto` / `h200_sxm.textproto`, shipped with the package;
`pip install -e ".[gpu]"`), the CPU target
from fake host devices. Nothing runs on the devices: programs are only lowered and compiled.

Names count chips (v5p-8 = 8 chips). Cloud's accelerator types count TensorCores for v4 and v5p, so the 8-chip
v5p slice is the one Cloud calls `v5p-16` (topology 2x2x2); v5e / v6e types count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from importlib_resources import files

GiB = 2**30
GB = 10**9
H100_TARGET_CONFIG = "h100_sxm.textproto"
H100_HBM = 85_045_477_376  # "80 GB": 81,106 MiB total as the CUDA runtime reports it (= device_memory_size)
H200_TARGET_CONFIG = "h200_sxm.textproto"
# "141 GB": measured on our H200 run, XLA's bytes_limit 127,594,921,984 at XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
# (docs/device_check_h200.json) -> 150.11e9 bytes total (143,158 MiB)
H200_HBM = 150_111_672_922


@dataclasses.dataclass(frozen=True)
class Target:
    """One slice. Bandwidths are per chip and per direction; `dcn_bytes_per_s` is the link between islands (groups
    of `island_size` chips joined by ICI / NVLink): the data-centre network / InfiniBand."""

    name: str
    platform: str  # "tpu" | "gpu" | "cpu"
    chips: int
    hosts: int
    hbm_bytes: int  # per chip, what the compiler may use
    peak_bf16_flops: float  # dense, per chip
    link_bytes_per_s: float  # ICI / NVLink, per chip, one direction
    island_size: int  # chips per ICI / NVLink domain
    dcn_bytes_per_s: float = 0.0  # between islands, per chip, one direction (0: one island)
    topology: tuple[tuple[str, Any], ...] = ()  # get_topology_desc kwargs
    sources: str = ""
    gpu_config: str = ""  # GPU targets: the GpuTargetConfigProto file shipped with the package

    @property
    def backend(self) -> str:
        """The jax.default_backend() name gpfm-train would see on this target."""
        return self.platform


def _tpu(name: str, topology_name: str, chips_per_host: tuple[int, int, int], chips: int, **figures) -> Target:
    hosts = chips // (chips_per_host[0] * chips_per_host[1] * chips_per_host[2])
    kwargs = dict(topology_name=topology_name, platform="tpu", chips_per_host_bounds=chips_per_host,
                  num_slices=1, wrap=(False, False, False))
    if topology_name.startswith(("v4", "v5p")):
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip (both TensorCores)
    return Target(name=name, platform="tpu", chips=chips, hosts=hosts, island_size=chips,
                  topology=tuple(sorted(kwargs.items())), **figures)


_GOOGLE = "Google Cloud TPU system architecture pages (peak bf16, HBM, interchip interconnect BW per chip)"
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _tpu("v4-8", "v4:2x2x2", (2, 2, 1), 8, hbm_bytes=32 * GiB, peak_bf16_flops=275e12,
             link_bytes_per_s=300 * GB,  # 6 ICI links x 400 Gb/s per direction (TPU v4 paper)
             sources=_GOOGLE + "; ICI from the TPU v4 paper (Jouppi et al. 2023)"),
        _tpu("v5p-8", "v5p:2x2x2", (2, 2, 1), 8, hbm_bytes=int(95.74 * GiB),  # libtpu's own per-chip limit
             peak_bf16_flops=459e12, link_bytes_per_s=600 * GB, sources=_GOOGLE + " (ICI 4800 Gbps)"),
        _tpu("v5e-8", "v5e:2x4", (2, 4, 1), 8, hbm_bytes=16 * GiB, peak_bf16_flops=197e12,
             link_bytes_per_s=200 * GB, sources=_GOOGLE + " (ICI 1600 Gbps)"),
        _tpu("v6e-8", "v6e:2x4", (2, 4, 1), 8, hbm_bytes=32 * GiB, peak_bf16_flops=918e12,
             link_bytes_per_s=448 * GB, sources=_GOOGLE + " (ICI 3584 Gbps)"),
        Target("h100-8", "gpu", chips=8, hosts=1, hbm_bytes=H100_HBM, peak_bf16_flops=989.4e12,
               link_bytes_per_s=450 * GB, island_size=8, topology=(("topology", "1x1x8"),),
               gpu_config=H100_TARGET_CONFIG,
               sources="NVIDIA H100 SXM datasheet: 989.4 TFLOP/s bf16 dense, 80 GB HBM3, NVLink 900 GB/s "
                       "bidirectional"),
        Target("h100-16", "gpu", chips=16, hosts=2, hbm_bytes=H100_HBM, peak_bf16_flops=989.4e12,
               link_bytes_per_s=450 * GB, island_size=8, dcn_bytes_per_s=50 * GB,
               topology=(("topology", "2x1x8"),), gpu_config=H100_TARGET_CONFIG,
               sources="as h100-8; between the two 8-GPU nodes one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100)"),
        Target("h200-1", "gpu", chips=1, hosts=1, hbm_bytes=H200_HBM, peak_bf16_flops=989.4e12,
               link_bytes_per_s=450 * GB, island_size=1, topology=(("topology", "1x1x1"),),
               gpu_config=H200_TARGET_CONFIG,
               sources="NVIDIA H200 SXM datasheet: 989.4 TFLOP/s bf16 dense (the H100's GH100 at the same clocks), "
                       "141 GB HBM3e at 4.8 TB/s; memory total measured on our H200 (docs/device_check_h200.json)"),
        Target("h200-8", "gpu", chips=8, hosts=1, hbm_bytes=H200_HBM, peak_bf16_flops=989.4e12,
               link_bytes_per_s=450 * GB, island_size=8, topology=(("topology", "1x1x8"),),
               gpu_config=H200_TARGET_CONFIG,
               sources="as h200-1; NVLink 900 GB/s bidirectional (HGX H200)"),
        Target("cpu-8", "cpu", chips=8, hosts=1, hbm_bytes=2 * GiB, peak_bf16_flops=20e9, link_bytes_per_s=10 * GB,
               island_size=8, sources="fake host devices for tests; figures are nominal"),
    )
}

# bf16 dense peak per device kind (jax Device.device_kind), for measured MFU (tools/device_check.py).
PEAK_BF16_BY_DEVICE_KIND = {
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100": 989.4e12,
    "NVIDIA H200": 989.4e12,  # same GH100 die and clocks as H100 SXM, more HBM
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v6 lite": 918e12,
}


def peak_bf16_for(device_kind: str) -> float | None:
    """Published dense bf16 peak for a device kind; a longest-prefix match ("NVIDIA H100 80GB HBM3" ...)."""
    best = None
    for kind, peak in PEAK_BF16_BY_DEVICE_KIND.items():
        if device_kind.startswith(kind) and (best is None or len(kind) > len(best[0])):
            best = (kind, peak)
    return None if best is None else best[1]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def gpu_target_config(name: str = H100_TARGET_CONFIG) -> str:
    """The text of a GpuTargetConfigProto shipped with the package (a GPU target's `gpu_config`)."""
    return files("gpfm_jax.plan").joinpath(name).read_text()


def prepare_environment() -> None:
    """Environment settings that must precede jax's backend initialisation: several processes may load libtpu
    for deviceless compiles at once (otherwise the second one fails on libtpu's lockfile), no GCE metadata server
    is asked for a TPU that is not there, and the CUDA plugin registers without probing a driver (its version check
    calls cuInit, which fails without a GPU and leaves the "cuda" platform unregistered)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # register the CUDA plugin without a driver


def module_available(name: str) -> bool:
    """Whether `import name` would find the module, without raising: `importlib.util.find_spec("a.b")` imports `a`
    and raises ModuleNotFoundError when `a` itself is absent (the `jax_plugins` namespace exists only where a JAX
    plugin is installed), so a missing parent counts as "not installed", never as an error."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package; a module whose __spec__ is None
        return False


def _cuda_plugin_installed() -> bool:
    return any(module_available(f"jax_plugins.xla_cuda{v}") for v in (13, 12))


def missing_requirement(target: Target) -> str | None:
    """None when this machine can compile for the target; else one line naming what to install (or set)."""
    if target.platform == "tpu" and not module_available("libtpu"):
        return f"target {target.name} needs libtpu: pip install -e \".[tpu]\" (or pip install 'gpfm_jax[tpu]')"
    if target.platform == "gpu" and not _cuda_plugin_installed():
        return (f"target {target.name} needs the JAX CUDA plugin: pip install -e \".[gpu]\" (or pip install "
                f"'gpfm_jax[gpu]')")
    if target.platform == "cpu":
        import jax

        if len(jax.devices("cpu")) < target.chips:
            return (f"target {target.name} needs {target.chips} CPU devices, jax has {len(jax.devices('cpu'))}: set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={target.chips} before jax starts")
    return None


def available(target: Target) -> bool:
    """Whether this machine can compile for the target (the extra is installed, or enough CPU devices)."""
    return missing_requirement(target) is None


def devices(target: Target) -> list:
    """The target's devices: abstract TPU / GPU devices from a topology description, or host CPU devices."""
    import jax

    problem = missing_requirement(target)
    if problem:
        raise RuntimeError(problem)
    if target.platform == "cpu":
        return jax.devices("cpu")[: target.chips]
    from jax.experimental import topologies

    kwargs = dict(target.topology)
    if target.platform == "tpu":
        topo = topologies.get_topology_desc(**kwargs)
    else:
        topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                            target_config=gpu_target_config(target.gpu_config),
                                            **kwargs)
    found = list(topo.devices)
    if len(found) != target.chips:
        raise RuntimeError(f"target {target.name}: the topology has {len(found)} devices, expected {target.chips}")
    return found
