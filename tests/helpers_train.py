"""A tiny gpfm-train config for the run tests (also a config file: `--config tests/helpers_train.py`), and helpers
to run gpfm-train in a subprocess with its own device count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # also when gpfm-train loads this file as its --config

from xla_flags import FAST_COMPILE  # noqa: E402  (the suite's cheap LLVM compilation, for the processes started here)

from gpfm_jax.train.config_schema import TrainConfig, parse, replace_fields, vit  # noqa: E402
from configs.demo import get_config as demo_config  # noqa: E402


def get_config():
    """Patch-16 student (dim 32, 1 block) on 64 px global / 32 px local crops of the sample slide, 16 images per
    iteration, one 1-block stand-in teacher (UNI's interface): compiles in seconds, well under a second per
    iteration. The demo config (all three teachers) has its own test."""
    c = demo_config()
    c.model.vit = vit(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, layerscale_init=0.1,
                      drop_path_rate=0.1)
    c.teachers = ml_collections.ConfigDict({"uni": "standin"})  # one teacher: a smaller program to compile
    c.loss.distill_cls_weights = ml_collections.ConfigDict({"uni": 1.0})
    c.loss.distill_patch_weights = ml_collections.ConfigDict({"uni": 0.25})
    c.model.heads.update(dict(out_dim=128, hidden_dim=64, bottleneck_dim=32, distill_bottleneck_dim=32))
    c.standin.update(dict(embed_dim=32, depth=1, num_heads=2, pooler_dim=16))
    c.schedule.update(dict(base_lr=2e-2, total_steps=40, warmup_steps=2, teacher_temp_warmup_steps=4,
                           teacher_temp_start=0.04, teacher_temp=0.07,  # the recipe's shape (the demo: 0.01)
                           freeze_last_layer_steps=1))
    c.data.tile_size = 96
    c.data.global_batch_size = 16
    c.data.multicrop.global_size = 64
    c.data.multicrop.local_size = 32
    c.data.multicrop.num_local_crops = 2
    c.data.prefetch_records = 16
    c.data.shards = 2  # two data streams (each with its own masks) in every run: 1 or 2 processes, one program
    c.checkpoint.update(dict(every=2, keep=3, keep_period=0))
    c.log.update(dict(every=1, sanity_every=0, progress=False))
    c.steps = 4
    c.probe.enabled = False  # the demo's end-of-run probe has its own test (test_train_run.py)
    return c


def tiny(one_device: bool = False, **changes) -> TrainConfig:
    """The tiny config, parsed, with dotted-field changes (`tiny(**{"mesh.fsdp": 4})`): what `loop.train` takes."""
    cfg = parse(get_config())
    return replace_fields(cfg, {**({"mesh.num_devices": 1} if one_device else {}), **changes})


def run_cli(workdir, *overrides: str, devices: int = 1, config: str | Path = __file__, wait: bool = True,
            timeout: float = 300, extra_env: dict | None = None):
    """`python -m gpfm_jax.train.main` in a fresh process with `devices` XLA CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "gpfm_jax.train.main", "--config", str(config), "--workdir", str(workdir), *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def start_two_processes(workdir, phases: str, cache, *overrides: str, envs=({}, {})) -> list[subprocess.Popen]:
    """Two processes on localhost (127.0.0.1 coordinator, gloo, 4 CPU devices each, data 2 x fsdp 4) train the tiny
    config together (`run_phases`): `overrides` are key=value config changes or inject.*, `envs` each process's
    extra environment."""
    from emulators import free_port

    port = free_port()
    common = ["mesh.fsdp=4", "runtime.cpu_devices=4", "runtime.cpu_collectives=gloo",
              f"runtime.coordinator_address=127.0.0.1:{port}", "runtime.num_processes=2",
              f"runtime.compile_cache_dir={cache}"]
    return [subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "helpers_train.py"), str(workdir), phases, *common,
         f"runtime.process_id={i}", *overrides],
        cwd=REPO, env=dict(os.environ, XLA_FLAGS=FAST_COMPILE, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
                           **envs[i]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def finish(procs, timeout: float = 400) -> list[str]:
    """Each process's output once it ended (any still running after `timeout` is killed)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


# The uninterrupted two-process run that test_faults' killed peer and test_storage_run's two hosts without a shared
# disk resume to (conftest.py: `pair_reference`, made once per test run): 10 iterations, every second one kept.
PAIR_REFERENCE_STEPS = 10
PAIR_REFERENCE = ("checkpoint.every=2", "checkpoint.keep=5")


def saved_state(checkpoints, step: int) -> dict:
    """The saved state tree of a step as numpy, restored without a target from a checkpoint folder (local or gs://).
    A checkpoint written by another topology (8 devices, 2 processes) comes back on one device."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from gpfm_jax import storage

    storage.refresh(checkpoints)  # this process's client caches listings; other processes wrote since
    with ocp.CheckpointManager(storage.resolve(checkpoints)) as manager:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=one)))
    return jax.tree_util.tree_map(np.array, restored["state"])


def assert_trees_equal(a, b) -> None:
    """Same structure, every leaf bitwise equal (the leaf's path in the message)."""
    import jax
    import numpy as np

    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _set(cfg, key: str, value: str):
    import ast

    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    node[leaf] = value


def run_phases(argv: list[str]) -> int:
    """`python tests/helpers_train.py WORKDIR STEPS[,STEPS...] key=value ...`: the tiny config trained to each
    STEPS in turn in this one process (each phase restores the previous phase's last checkpoint from disk).
    `inject.<name>=<value>` arguments install a fault (tests/fault_injection.py). Exit status as gpfm-train's."""
    from gpfm_jax.train import faults, loop

    workdir, phases, *overrides = argv
    injections = {k[len("inject."):]: v for k, v in (a.split("=", 1) for a in overrides) if k.startswith("inject.")}
    if injections:
        import fault_injection

        fault_injection.install(**injections)
    codes = {"nonfinite": faults.EXIT_NONFINITE, "save_failed": faults.EXIT_SAVE_FAILED,
             "stalled": faults.EXIT_STALLED, "peer_lost": faults.EXIT_PEER_LOST}
    for steps in phases.split(","):
        cfg = get_config()
        for item in overrides:
            key, value = item.split("=", 1)
            if not key.startswith("inject."):
                _set(cfg, key, value)
        cfg.steps = int(steps)
        result = loop.train(parse(cfg), workdir)
        if result.status not in ("done", "nothing_to_do", "preempted"):
            print(result.message, flush=True)
            faults.hard_exit(codes.get(result.status, 1))
        if result.status == "preempted":
            print(result.message, flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(run_phases(sys.argv[1:]))
