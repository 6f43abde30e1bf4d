"""Process-wide setup of a gpfm-train run: jax settings that must precede backend initialisation, and
`jax.distributed.initialize` for multi-process runs (coordinator, process count and id from the config or the
environment: SLURM, TPU pod slices, Open MPI, JAX_* variables), with the coordination service's heartbeat,
initialisation and shutdown timeouts from the config, and the run's peer heartbeat (train/faults.py)."""

from __future__ import annotations

import atexit
import os
from typing import Any, Mapping

import jax

from gpfm_jax.train.config_schema import ConfigError, RuntimeConfig
from gpfm_jax.train.faults import PeerHeartbeat, start_death_notice

_runtime_done = False
_heartbeat: PeerHeartbeat | None = None


def cluster_env(env: Mapping[str, str]) -> bool:
    """Does the environment name a multi-process job (so runtime.distributed="auto" initialises jax.distributed)?"""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def distributed_kwargs(r: RuntimeConfig, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The jax.distributed.initialize arguments for this config and environment; None for a single-process run."""
    if r.distributed not in ("auto", "on", "off"):
        raise ConfigError(f"config.runtime.distributed={r.distributed!r}: expected auto, on or off")
    explicit = bool(r.coordinator_address) or r.num_processes > 1
    if not (r.distributed == "on" or (r.distributed == "auto" and (explicit or cluster_env(env)))):
        return None
    kwargs: dict[str, Any] = dict(heartbeat_timeout_seconds=int(r.heartbeat_timeout_s),
                                  shutdown_timeout_seconds=int(r.shutdown_timeout_s),
                                  initialization_timeout=int(r.initialization_timeout_s))
    address = r.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = r.num_processes or int(env.get("JAX_NUM_PROCESSES", 0))
    pid = r.process_id if r.process_id >= 0 else int(env.get("JAX_PROCESS_ID", -1))
    if address:
        kwargs["coordinator_address"] = address
    if num:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    return kwargs  # the rest (SLURM, TPU pods, Open MPI) is auto-detected by jax


def jax_settings(r: RuntimeConfig) -> list[tuple[str, Any]]:
    """The jax.config updates this config asks for (before the backend starts)."""
    settings: list[tuple[str, Any]] = []
    if r.cpu_devices:
        settings.append(("jax_num_cpu_devices", int(r.cpu_devices)))
    if r.cpu_collectives:
        settings.append(("jax_cpu_collectives_implementation", r.cpu_collectives))
    if r.compile_cache_dir:
        settings += [("jax_compilation_cache_dir", str(r.compile_cache_dir)),
                     ("jax_persistent_cache_min_compile_time_secs", 0.0),
                     ("jax_persistent_cache_min_entry_size_bytes", 0)]
    return settings


def setup(r: RuntimeConfig, heartbeat_interval_s: float = 1.0) -> None:
    """Once per process (later calls do nothing: the backend is up by then)."""
    global _runtime_done, _heartbeat
    if _runtime_done:
        return
    for name, value in jax_settings(r):
        jax.config.update(name, value)
    kwargs = distributed_kwargs(r, os.environ)
    if kwargs is not None:
        jax.distributed.initialize(**kwargs)
        client = _distributed_client()
        if jax.process_count() > 1:
            start_death_notice(jax.process_index(), jax.process_count())
        if client is not None and jax.process_count() > 1:
            _heartbeat = PeerHeartbeat(client, jax.process_index(), jax.process_count(), heartbeat_interval_s)
            atexit.register(_heartbeat.stop)  # after jax's own exit handler, so it runs before the shutdown
    _runtime_done = True


def heartbeat() -> PeerHeartbeat | None:
    """The process's peer heartbeat (multi-process runs), or None."""
    return _heartbeat


def _distributed_client() -> Any:
    """jax's coordination-service client (the key-value store multihost_utils also uses); None if this jax version
    keeps it elsewhere (the peer heartbeat is then off and JAX's own heartbeat timeout is the only bound)."""
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None
