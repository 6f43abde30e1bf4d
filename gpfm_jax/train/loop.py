"""The gpfm-train run: runtime setup, validation, model/teachers/data/optimizer from the config, restore or init,
the step loop with checkpoints, logging, the sanity metric, pre-emption and non-finite-loss handling.

`train(config, workdir) -> RunResult`; `gpfm_jax.train.main` is the command line around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpfm_jax.train import checkpoint as ckpt
from gpfm_jax.train import config as config_lib
from gpfm_jax.train import config_schema
from gpfm_jax.train import sharding
from gpfm_jax.train.metrics_writer import MetricsWriter
from gpfm_jax.train.optim import make_optimizer
from gpfm_jax.train.schedules import make_schedules, peak_lr
from gpfm_jax.train.step import init_state, jit_train_step, make_train_step

log = logging.getLogger("gpfm_jax.train")
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "nonfinite" | "nothing_to_do"
    start_step: int
    end_step: int  # the checkpointed / reached iteration count
    first_loss: float | None = None
    last_loss: float | None = None
    wall_s: float = 0.0
    message: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Runtime


_runtime_done = False


def setup_runtime(cfg: ml_collections.ConfigDict) -> None:
    """jax settings that must precede backend initialisation, and jax.distributed for multi-process runs."""
    global _runtime_done
    if _runtime_done:
        return
    r = config_schema.parse(cfg).runtime
    if r.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(r.cpu_devices))
    if r.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", r.cpu_collectives)
    if r.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(r.compile_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    mode = r.distributed
    if mode not in ("auto", "on", "off"):
        raise config_lib.ConfigError(f"config.runtime.distributed={mode!r}: expected auto, on or off")
    explicit = bool(r.coordinator_address) or r.num_processes > 1
    if mode == "on" or (mode == "auto" and (explicit or _cluster_env())):
        kwargs = {}
        address = r.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
        num = r.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
        pid = r.process_id if r.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
        if address:
            kwargs["coordinator_address"] = address
        if num:
            kwargs["num_processes"] = num
        if pid >= 0:
            kwargs["process_id"] = pid
        jax.distributed.initialize(**kwargs)  # the rest (SLURM, TPU pods, Open MPI) is auto-detected by jax
    _runtime_done = True


def _cluster_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Data


class DataStream:
    """This process's data shards, each a grain iterator (its own shuffle, crops and masks), merged per step into
    one sample-major per-process batch; num_skipped summed. Shard s of S reads records s, s + S, ... of the source."""

    def __init__(self, source: Any, pipeline: Any, shard_indices: list[int], shard_count: int):
        import grain

        from gpfm_jax.data import make_iterator

        self._indices = list(shard_indices)
        self._count = shard_count
        self.iterators = {i: make_iterator(source, pipeline, grain.sharding.ShardOptions(i, shard_count, True))
                          for i in shard_indices}

    @property
    def shard_indices(self) -> list[int]:
        return self._indices

    @property
    def shard_count(self) -> int:
        return self._count

    def get_shard_states(self) -> dict[int, Any]:
        return {i: it.get_state() for i, it in self.iterators.items()}

    def set_shard_states(self, states: dict[int, Any]) -> None:
        for i, state in states.items():
            self.iterators[i].set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], int]:
        parts, skipped = [], 0
        for i in self._indices:
            batch = dict(next(self.iterators[i]))
            skipped += int(batch.pop("num_skipped", 0))
            parts.append(batch)
        if len(parts) == 1:
            return parts[0], skipped
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, skipped


# ---------------------------------------------------------------------------------------------------------------
# Sanity metric


def make_sanity_fn(model, schedules, student_temp: float, mesh):
    """Student vs EMA teacher on the batch's unmasked global crops: CLS cosine, argmax agreement of the DINO
    prototypes, and the teacher's mean entropy / max probability. A collapsing or diverging run shows here first."""
    backbone, head = model.backbone, model.dino_head
    rules = sharding.logical_rules()

    def fn(params, teacher, centers, global_crops, step):
        with nn.logical_axis_rules(rules):
            x = global_crops.reshape((-1,) + global_crops.shape[2:])
            s = backbone.apply({"params": params["backbone"]}, x)["cls"].astype(jnp.float32)
            t = backbone.apply({"params": teacher["backbone"]}, x)["cls"].astype(jnp.float32)
            s_logits = head.apply({"params": params["dino_head"]}, s).astype(jnp.float32)
            t_logits = head.apply({"params": teacher["dino_head"]}, t).astype(jnp.float32)
        cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-12)
        tau = schedules.teacher_temp(step)
        t_probs = jax.nn.softmax((t_logits - centers["dino"]) / tau, -1)
        s_probs = jax.nn.softmax(s_logits / student_temp, -1)
        entropy = -jnp.sum(t_probs * jnp.log(t_probs + 1e-12), -1)
        return {
            "sanity/cls_cosine": jnp.mean(cos),
            "sanity/argmax_agreement": jnp.mean(jnp.argmax(s_probs, -1) == jnp.argmax(t_probs, -1)),
            "sanity/teacher_entropy": jnp.mean(entropy),
            "sanity/teacher_max_prob": jnp.mean(jnp.max(t_probs, -1)),
        }

    jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state.params, state.teacher, state.centers, batch["global_crops"], state.step - 1)

    return run


# ---------------------------------------------------------------------------------------------------------------
# Signals


class _StopFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _host_sum_and_any(skipped: int, stop: bool) -> tuple[int, bool]:
    if jax.process_count() == 1:
        return skipped, stop
    from jax.experimental import multihost_utils

    both = multihost_utils.process_allgather(np.asarray([skipped, int(stop)], np.int64))
    both = np.asarray(both).reshape(-1, 2)
    return int(both[:, 0].sum()), bool(both[:, 1].any())


# ---------------------------------------------------------------------------------------------------------------
# The run


def initial_state(model, tx, root: jax.Array, shardings: Any, init_from: str = ""):
    """A fresh TrainState made directly in its shardings; with `init_from` (an encoder bundle) the student backbone
    and the EMA teacher backbone both start from the bundle's params (heads and optimizer state fresh)."""
    state = jax.jit(lambda k: init_state(model, tx, k), out_shardings=shardings)(root)
    if init_from:
        abstract = jax.eval_shape(lambda: state.params["backbone"])
        backbone = ckpt.load_init_backbone(init_from, model.vit, abstract)
        state = state._replace(
            params={**state.params, "backbone": jax.device_put(backbone, shardings.params["backbone"])},
            teacher={**state.teacher, "backbone": jax.device_put(backbone, shardings.teacher["backbone"])})
    return state


def write_config(cfg: config_schema.TrainConfig, workdir: Path, resolved: dict[str, Any]) -> None:
    text = config_schema.to_configdict(cfg).to_json_best_effort(indent=2, sort_keys=True)
    (workdir / "config.json").write_text(text + "\n")
    (workdir / "config_resolved.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> RunResult:
    t_start = time.perf_counter()
    cfg = config_schema.parse(cfg)
    setup_runtime(cfg)
    workdir = Path(workdir).absolute()
    devices = config_lib.mesh_devices(cfg)
    config_lib.validate(cfg, num_devices=len(devices))
    primary = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)  # every process: harmless on a shared filesystem

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
    model, expert_params = config_lib.build_model(cfg)
    global_batch_size = cfg.data.global_batch_size
    schedules = make_schedules(config_lib.schedule_config(cfg), global_batch_size)
    abstract_params = jax.eval_shape(model.init_student, jax.random.key(0))
    tx = make_optimizer(abstract_params, schedules, config_lib.optim_config(cfg))
    step_cfg = config_lib.step_config(cfg, num_devices=len(devices))
    root = jax.random.key(cfg.seed)
    abstract_state = jax.eval_shape(lambda k: init_state(model, tx, k), root)
    shardings = sharding.state_shardings(abstract_state, mesh)
    end_step = config_lib.total_steps(cfg)

    resolved = {
        "backend": jax.default_backend(), "process_count": jax.process_count(), "devices": len(devices),
        "mesh": dict(mesh.shape), "compute_dtype": config_lib.compute_dtype(cfg),
        "teacher_dtypes": config_lib.teacher_dtypes(cfg), "max_masked": step_cfg.max_masked,
        "koleo_groups": step_cfg.koleo_groups, "data_shards": config_lib.num_shards(cfg), "end_step": end_step,
        "peak_lr": peak_lr(config_lib.schedule_config(cfg), global_batch_size),
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params))),
    }
    ckpt_dir = workdir / CHECKPOINT_DIR
    if primary:
        write_config(cfg, workdir, resolved)
        ckpt.write_encoder_meta(ckpt_dir, model.vit)

    # data: this process feeds shards [p * S/P, (p + 1) * S/P)
    shard_count = config_lib.num_shards(cfg)
    per_process = shard_count // jax.process_count()
    first = jax.process_index() * per_process
    source = config_lib.make_source(cfg, workdir)
    stream = DataStream(source, config_lib.pipeline_config(cfg), list(range(first, first + per_process)),
                        shard_count)

    checkpointer = ckpt.Checkpointer(ckpt_dir, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.keep_period,
                                     cfg.checkpoint.async_save)
    state, restored_step = checkpointer.restore_latest(ckpt.with_shardings(abstract_state, shardings), stream)
    if state is None:
        state = initial_state(model, tx, root, shardings, cfg.init_from)
        start = 0
        origin = f"initialised (seed {cfg.seed}" + (f", backbone from {cfg.init_from})" if cfg.init_from else ")")
    else:
        start = int(restored_step)
        origin = f"restored step {start} from {ckpt_dir}"
    experts = sharding.place(expert_params, mesh)
    step_fn = jit_train_step(make_train_step(model, schedules, tx, step_cfg), mesh, abstract_state, expert_params)
    sanity_fn = make_sanity_fn(model, schedules, step_cfg.loss.student_temp, mesh) if cfg.log.sanity_every else None

    writer = MetricsWriter(workdir, primary=primary, total_steps=end_step, start_step=start,
                           batch_size=global_batch_size, tb_every=cfg.log.every, tensorboard=cfg.log.tensorboard,
                           progress=cfg.log.progress)
    writer.message(f"gpfm-train: {origin}; iterations {start} -> {end_step}; {len(devices)} devices "
                   f"{dict(mesh.shape)} on {jax.process_count()} process(es); workdir {workdir}")
    result = RunResult("done", start, start)
    if start >= end_step:
        writer.message(f"nothing to do: the checkpoint is at iteration {start} >= {end_step}")
        writer.close()
        checkpointer.close()
        return dataclasses.replace(result, status="nothing_to_do", wall_s=time.perf_counter() - t_start)

    stop = _StopFlag()
    stop.install()
    step = start
    try:
        writer.start_timer()
        while step < end_step:
            local, skipped = next(stream)
            if step == cfg.runtime.inject_nan_at_step:
                local = {**local, "global_crops": np.full_like(local["global_crops"], np.nan)}
            batch = sharding.global_batch(local, mesh)
            state, metrics = step_fn(state, batch, experts)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            skipped, stopping = _host_sum_and_any(skipped, stop.signum is not None)
            metrics["data/num_skipped"] = float(skipped)
            loss = metrics["loss/total"]
            if not math.isfinite(loss):
                writer.write_step(step, metrics)
                checkpointer.wait()
                good = checkpointer.all_steps()
                result.status = "nonfinite"
                result.message = (f"non-finite loss ({loss}) at iteration {step}: stopping without saving; the last "
                                  f"good checkpoint is " + (f"step {good[-1]} in {ckpt_dir}" if good else "none"))
                writer.message(result.message)
                break
            result.first_loss = loss if result.first_loss is None else result.first_loss
            result.last_loss = loss
            writer.write_step(step, metrics)
            step += 1
            if sanity_fn is not None and (step % cfg.log.sanity_every == 0 or step == end_step):
                writer.write_scalars(step - 1, {k: float(v) for k, v in jax.device_get(sanity_fn(state, batch)).items()})
            if stopping:
                checkpointer.save(step, state, stream, force=True)
                checkpointer.wait()
                result.status = "preempted"
                result.message = f"signal received: saved iteration {step} to {ckpt_dir} and stopped"
                writer.message(result.message)
                break
            checkpointer.save(step, state, stream, force=step == end_step)
            if cfg.runtime.step_sleep_s:
                time.sleep(cfg.runtime.step_sleep_s)
        result.end_step = step
        checkpointer.wait()
    finally:
        stop.restore()
        writer.close()
        checkpointer.close()
    result.wall_s = time.perf_counter() - t_start
    if result.status == "done":
        result.message = (f"done: iterations {start} -> {step} in {result.wall_s:.1f} s; loss {result.first_loss:.4f} "
                          f"-> {result.last_loss:.4f}; checkpoints in {ckpt_dir}")
        writer.message(result.message)
    return result
