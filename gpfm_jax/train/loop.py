"""The gpfm-train run: build everything from the config, restore or initialise, then the step loop.

`train(config, workdir) -> RunResult` for a typed TrainConfig; `gpfm_jax.train.main` is the command line around it
(it parses the config file once).

The loop keeps the devices busy: the next batch is read and put on the devices by a background thread while the
current step runs (train/data_stream.py), and step i's metrics are read after step i+1 has been dispatched
(train/step_results.py); the per-iteration time breakdown goes to the logs. Failures (signals, deadlines, lost
peers, full disks, non-finite losses) are train/faults.py's and train/checkpoint.py's; `end_of_run` is where a
finished run reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from gpfm_jax import storage
from gpfm_jax.data.batch import GLOBAL_CROPS
from gpfm_jax.step import sharding
from gpfm_jax.step.sanity import make_sanity_fn
from gpfm_jax.step.train_step import init_state
from gpfm_jax.train import checkpoint as ckpt
from gpfm_jax.train import config as config_lib
from gpfm_jax.train import assembly, collapse, config_schema, encoder_meta, faults, runtime
from gpfm_jax.train.run_dirs import RunDirs, open_run_dirs
from gpfm_jax.train.data_stream import DataStream, Prefetcher
from gpfm_jax.train.metrics_writer import MetricsWriter
from gpfm_jax.train.step_results import HostFlags, StepOutcome, StepReader

log = logging.getLogger("gpfm_jax.train")
FIRST_ITERATIONS = 2  # iterations under deadline.first_step_s (the step and the flags reduction compile)


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "nonfinite" | "nothing_to_do" | "stalled" | "peer_lost" | "save_failed"
    # | "collapsed" (config.sanity.on_collapse = "stop")
    start_step: int
    end_step: int  # the checkpointed / reached iteration count
    first_loss: float | None = None
    last_loss: float | None = None
    wall_s: float = 0.0
    message: str = ""
    probe: dict[str, float] | None = None


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built from the config (`build`)."""

    cfg: config_schema.TrainConfig
    dirs: RunDirs
    mesh: Any
    model: Any
    schedules: Any
    step_fn: Callable
    sanity_fn: Callable | None
    experts: Any
    stream: DataStream
    checkpointer: ckpt.Checkpointer
    writer: MetricsWriter
    context: faults.RunContext
    end_step: int
    start_backbone: Callable[[], Any] | None = None  # the student backbone the run started from (for the probe)


def initial_state(built: assembly.Assembly, root: jax.Array, init_from: str = ""):
    """A fresh TrainState made directly in its shardings; with `init_from` (an encoder bundle) the student backbone
    and the EMA teacher backbone both start from the bundle's params (heads and optimizer state fresh)."""
    state = built.init(root)
    if init_from:
        backbone = encoder_meta.load_init_backbone(init_from, built.model.vit,
                                                   built.abstract_state.params["backbone"])
        shardings = built.shardings
        state = state._replace(
            params={**state.params, "backbone": jax.device_put(backbone, shardings.params["backbone"])},
            teacher={**state.teacher, "backbone": jax.device_put(backbone, shardings.teacher["backbone"])})
    return state


def write_config(cfg: config_schema.TrainConfig, workdir: storage.PathLike, resolved: dict[str, Any]) -> None:
    text = config_schema.to_configdict(cfg).to_json_best_effort(indent=2, sort_keys=True)
    root = storage.resolve(workdir)
    storage.write_text_atomic(root / "config.json", text + "\n")
    storage.write_text_atomic(root / "config_resolved.json",
                              json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n")


def build(cfg: config_schema.TrainConfig, dirs: RunDirs, context: faults.RunContext):
    """Checks and resolves the config, assembles the step (train/assembly.py, as the planner does), builds the data
    stream and restores (or initialises) the state. Returns (run, state, start_step)."""
    devices = config_lib.mesh_devices(cfg)
    config_lib.check_paths(cfg)
    resolved = assembly.resolve(cfg, len(devices), jax.process_count(), jax.default_backend())
    primary = jax.process_index() == 0
    teachers, expert_params = config_lib.load_experts(cfg)
    built = assembly.assemble(resolved, devices, teachers, expert_params)
    model, mesh, end_step = built.model, built.mesh, resolved.end_step

    ckpt_dir = dirs.checkpoints
    context.checkpoint_dir = ckpt_dir
    if (notice := faults.death_notice()) is not None:
        notice.checkpoint_dir(ckpt_dir)
    if primary:
        write_config(cfg, dirs.workdir, resolved.summary(mesh=dict(mesh.shape), param_count=built.param_count()))
        encoder_meta.write_encoder_meta(ckpt_dir, model.vit)

    # data: this process feeds shards [p * S/P, (p + 1) * S/P)
    per_process = resolved.data_shards // resolved.process_count
    first = jax.process_index() * per_process
    source = config_lib.make_source(cfg, dirs.local)
    stream = DataStream(source, resolved.data, list(range(first, first + per_process)), resolved.data_shards,
                        cfg.seed)

    writer = MetricsWriter(dirs.local, primary=primary, total_steps=end_step, batch_size=resolved.global_batch_size,
                           tb_every=cfg.log.every, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    if dirs.where() and primary:
        writer.message(f"gpfm-train: {dirs.where()}")
    checkpointer = ckpt.Checkpointer(ckpt_dir, cfg.checkpoint, announce=writer.message)
    context.enter("restore", 0, cfg.deadline.checkpoint_s, "checkpoint_s")
    state, restored_step = checkpointer.restore_latest(ckpt.with_shardings(built.abstract_state, built.shardings),
                                                       stream)
    context.enter("setup", 0, cfg.deadline.first_step_s, "first_step_s")
    root = jax.random.key(cfg.seed)
    if state is None:
        state = initial_state(built, root, cfg.init_from)
        start = 0
        origin = f"initialised (seed {cfg.seed}" + (f", backbone from {cfg.init_from})" if cfg.init_from else ")")
    else:
        start = int(restored_step)
        origin = f"restored step {start} from {ckpt_dir}"
    experts = sharding.place(expert_params, mesh)
    sanity_fn = (make_sanity_fn(model, built.schedules, resolved.step.loss.student_temp, mesh)
                 if cfg.log.sanity_every else None)
    writer.start(start)
    writer.message(f"gpfm-train: {origin}; iterations {start} -> {end_step}; {len(devices)} devices "
                   f"{dict(mesh.shape)} on {jax.process_count()} process(es); workdir {dirs.workdir}")
    def start_backbone():
        """Where this run's backbone began: the init (same seed, same init_state) or the init_from bundle."""
        if cfg.init_from:
            return jax.device_get(encoder_meta.load_init_backbone(cfg.init_from, model.vit,
                                                                  built.abstract_state.params["backbone"]))
        return jax.device_get(jax.jit(lambda k: init_state(model, built.tx, k).params["backbone"])(root))

    run = Run(cfg, dirs, mesh, model, built.schedules, built.step, sanity_fn, experts, stream, checkpointer, writer,
              context, end_step, start_backbone)
    return run, state, start


def train(cfg: config_schema.TrainConfig, workdir: storage.PathLike, scratch: storage.PathLike | None = None
          ) -> RunResult:
    """The run for a typed config (`config_schema.parse(config_dict)`: gpfm-train parses its --config once, at the
    command line, and everything below takes the TrainConfig or its parts). `workdir` may be a gs:// URL; `scratch`
    is then the local folder for logs and caches (train/run_dirs.py)."""
    t_start = time.perf_counter()
    if not isinstance(cfg, config_schema.TrainConfig):
        raise TypeError(f"train() takes a TrainConfig (config_schema.parse(config_dict)), got {type(cfg).__name__}")
    d = cfg.deadline
    runtime.setup(cfg.runtime, heartbeat_interval_s=min(1.0, d.peer_s / 5) if d.peer_s else 1.0)
    context = faults.RunContext(process_index=jax.process_index(), process_count=jax.process_count())
    context.enter("setup", 0, d.first_step_s, "first_step_s")
    watchdog = faults.Watchdog(context, d.poll_s, d.grace_s, runtime.heartbeat(), d.peer_s)
    try:
        dirs = open_run_dirs(workdir, scratch, jax.process_index())  # a bad bucket: one line, nothing compiled
        run, state, start = build(cfg, dirs, context)
        result = RunResult("done", start, start)
        try:
            if start >= run.end_step:
                run.writer.message(f"nothing to do: the checkpoint is at iteration {start} >= {run.end_step}")
                result.status = "nothing_to_do"
            else:
                state = _iterate(run, state, start, watchdog, result)
                if result.status == "done" and cfg.probe.enabled:
                    result.probe = run_end_probe(run, state)
        finally:
            _close(run, result)
        result.wall_s = time.perf_counter() - t_start
        if result.status == "done":
            end_of_run(run, state, result)
        return result
    finally:
        watchdog.stop()


def end_of_run(run: Run, state: Any, result: RunResult) -> None:
    """Called once after a run that reached its last iteration (state = the final TrainState, checkpoint saved):
    the place for end-of-run reports. Today: the summary line, with the probe's result when it ran."""
    result.message = (f"done: iterations {result.start_step} -> {result.end_step} in {result.wall_s:.1f} s; loss "
                      f"{result.first_loss:.4f} -> {result.last_loss:.4f}; checkpoints in {run.checkpointer.directory}")
    if result.probe:
        p = result.probe
        result.message += (f"\nprobe (find a tile from an augmented view among {int(p['probe/tiles'])} tiles, chance "
                           f"{p['probe/chance']:.1%}): EMA teacher top-1 {p['probe/top1/pretrained']:.1%} / top-5 "
                           f"{p['probe/top5/pretrained']:.1%}; same network at its start top-1 "
                           f"{p['probe/top1/init']:.1%} / top-5 {p['probe/top5/init']:.1%}")
    run.writer.message(result.message)


def run_end_probe(run: Run, state: Any) -> dict[str, float] | None:
    """train/probe.py on the run's slides: EMA teacher vs the backbone the run started from. Written to the logs
    (JSONL row of kind "probe", TensorBoard) at the last iteration. Single-process runs on slides only."""
    from gpfm_jax.train import probe

    cfg = run.cfg
    if cfg.data.source != "slides" or jax.process_count() > 1:
        run.writer.message("probe skipped: it needs data.source = 'slides' and a single process")
        return None
    run.context.enter("probe", run.end_step, cfg.deadline.checkpoint_s, "checkpoint_s")
    tiles = probe.probe_tiles(config_lib.slide_paths(cfg.data.path), cfg.data.multicrop.global_size,
                              cfg.data.magnification, cfg.probe.max_tiles, cfg.data.min_tissue,
                              cfg.data.cache_dir or str(run.dirs.slide_cache))
    results = probe.run_probe(cfg.probe, run.model.backbone, jax.device_get(state.teacher["backbone"]),
                              run.start_backbone(), tiles, cfg.data.multicrop)
    run.writer.write_scalars(run.end_step - 1, results, kind="probe")
    return results


def _close(run: Run, result: RunResult) -> None:
    """Writers always; the checkpointer waits for an async save in flight unless a peer is gone (it would wait for
    that peer at orbax's barrier; the watchdog's grace period bounds the other cases)."""
    hung_save = result.status == "stalled" and run.context.phase == "checkpoint"  # waiting again would hang again
    try:
        if result.status not in ("peer_lost", "save_failed") and not hung_save:
            run.context.enter("checkpoint", result.end_step, run.cfg.deadline.checkpoint_s, "checkpoint_s")
            run.checkpointer.close()
    finally:
        run.writer.close()
        run.dirs.sync()


def _wait(get: Callable[[float], Any], watchdog: faults.Watchdog, poll_s: float) -> Any:
    """get(timeout) until it returns something; a report from the watchdog (deadline, lost peer) is raised here."""
    while True:
        item = get(poll_s)
        if item is not None:
            return item
        watchdog.raise_if_expired()


def _iterate(run: Run, state: Any, start: int, watchdog: faults.Watchdog, result: RunResult) -> Any:
    cfg, ctx, d = run.cfg, run.context, run.cfg.deadline
    inject = cfg.runtime.inject_nan_at_step
    first_deadline, step_deadline = (d.first_step_s, "first_step_s"), (d.step_s, "step_s")

    def transform(iteration: int, local: dict) -> dict:
        if iteration == inject:
            # float crops pass the step's normalisation unchanged (uint8 cannot hold a NaN); a second compile
            return {**local, GLOBAL_CROPS: np.full(local[GLOBAL_CROPS].shape, np.nan, np.float32)}
        return local

    prefetcher = Prefetcher(run.stream, run.mesh, start, transform=transform)
    reader, flags = StepReader(), HostFlags(run.mesh)
    stop = faults.StopFlag()
    stop.install()
    progress = _Progress(run, result)
    step, position = start, None
    try:
        while step < run.end_step and progress.status is None:
            ctx.enter("data", step, d.data_s, "data_s")
            t_wait = time.perf_counter()
            item = _wait(prefetcher.get, watchdog, d.poll_s)
            data_wait = time.perf_counter() - t_wait
            ctx.enter("step", step, *(first_deadline if step - start < FIRST_ITERATIONS else step_deadline))
            t_dispatch = time.perf_counter()
            state, metrics = run.step_fn(state, item.batch, run.experts)
            host_flags = flags.reduce([item.skipped, int(stop.signum is not None)])
            step += 1
            sanity = None
            if run.sanity_fn is not None and (step % cfg.log.sanity_every == 0 or step == run.end_step):
                sanity = run.sanity_fn(state, item.batch)
            reader.submit(step - 1, metrics, host_flags, sanity, t_dispatch, (item, data_wait))
            position = item.position
            while reader.pending > 1 and progress.status is None:  # step - 2's results: the devices run step - 1
                progress.take(_wait(reader.get, watchdog, d.poll_s))
            if progress.status is None and (progress.stop_requested or run.checkpointer.due(step)
                                             or step == run.end_step):
                while reader.pending and progress.status is None:  # every result in: no bad state is saved
                    progress.take(_wait(reader.get, watchdog, d.poll_s))
                if progress.status is not None:
                    break
                ctx.enter("checkpoint", step, d.checkpoint_s, "checkpoint_s")
                if run.checkpointer.save(step, state, position,
                                         force=progress.stop_requested or step == run.end_step):
                    run.dirs.sync()  # a URL workdir: the logs so far, next to the checkpoint
                if progress.stop_requested:
                    run.checkpointer.wait()
                    progress.stopped(step, run.checkpointer.directory)
            run.checkpointer.poll()
            if cfg.runtime.step_sleep_s:
                time.sleep(cfg.runtime.step_sleep_s)
        while reader.pending and progress.status is None:
            progress.take(_wait(reader.get, watchdog, d.poll_s))
        result.status = progress.status or "done"
        result.end_step = step if result.status in ("done", "preempted", "collapsed") else progress.last_good
    except (faults.Stalled, faults.PeerLost) as err:
        result.status = "stalled" if isinstance(err, faults.Stalled) else "peer_lost"
        result.message, result.end_step = str(err), progress.last_good
    except ckpt.CheckpointSaveError as err:
        lost = _peer_loss_behind(err, watchdog, d)  # a peer died during the save's collectives: that is the cause
        if lost is not None:
            result.status, result.message = "peer_lost", str(lost)
        elif watchdog.expired is not None:  # the save outlived its deadline first: that report stands, once
            result.status, result.message = "stalled", str(watchdog.expired)
        else:
            result.status, result.message = "save_failed", str(err)
            faults.report(result.message)
        result.end_step = progress.last_good
    except Exception as err:  # noqa: BLE001 - a collective failing because a peer died: say which, if known
        lost = _peer_loss_behind(err, watchdog, d)
        if lost is None:
            raise
        result.status, result.message, result.end_step = "peer_lost", str(lost), progress.last_good
    finally:
        stop.restore()
        prefetcher.close()
        reader.close()
    return state


def _peer_loss_behind(err: Exception, watchdog: faults.Watchdog, d: config_schema.DeadlineConfig):
    """In a multi-process run a failed step usually means a peer died (gloo: "Connection reset by peer"): give the
    heartbeat time to name it. None: not a peer loss (the error is re-raised).

    The peer died before the error arrived, and its last beat was seen at most one heartbeat interval after its
    last write, so the heartbeat calls it lost within peer_s + interval of the error and the watchdog notices within
    a poll; 2 s more for a loaded host (the wait was peer_s + 2 polls, and a killed-peer test run under the full
    suite's load missed it: the error was re-raised and JAX's shutdown barrier aborted the survivor)."""
    if jax.process_count() == 1 or not d.peer_s:
        return None
    interval = watchdog.heartbeat.interval_s if watchdog.heartbeat is not None else 0.0
    deadline = time.monotonic() + d.peer_s + interval + 2 * d.poll_s + 2.0
    while time.monotonic() < deadline and watchdog.expired is None:
        time.sleep(d.poll_s / 2)
    if isinstance(watchdog.expired, faults.PeerLost):
        log.error("the step failed with %s: %s", type(err).__name__, str(err)[:500])
        return watchdog.expired
    return None


class _Progress:
    """Takes the steps' outcomes in order: logs them, sums the flags, and decides to stop (non-finite loss, a
    signal on any process, a collapse verdict with config.sanity.on_collapse = "stop")."""

    def __init__(self, run: Run, result: RunResult):
        self.run, self.result = run, result
        self.status: str | None = None
        self.stop_requested = False
        self.collapse = collapse.detector_for(run.cfg)
        self.collapse_verdict: dict | None = None  # the verdict that stops the run
        self.last_good = result.start_step  # the iteration count whose state is known finite
        self.previous_ready: float | None = None

    def take(self, outcome: StepOutcome) -> None:
        item, data_wait = outcome.extra
        metrics = dict(outcome.metrics)
        metrics["data/num_skipped"] = float(outcome.flags["skipped"])
        metrics["perf/data_wait_s"] = data_wait
        metrics["perf/data_s"] = item.data_s
        metrics["perf/h2d_s"] = item.h2d_s
        began = outcome.dispatched if self.previous_ready is None else max(outcome.dispatched, self.previous_ready)
        metrics["perf/step_s"] = outcome.ready - began
        if self.previous_ready is not None:
            metrics["perf/iteration_s"] = outcome.ready - self.previous_ready
        self.previous_ready = outcome.ready
        writer, i = self.run.writer, outcome.iteration
        writer.write_step(i, metrics)
        if outcome.sanity is not None:
            writer.write_scalars(i, outcome.sanity)
        loss = metrics["loss/total"]
        if not math.isfinite(loss):
            self.status = "nonfinite"
            self.run.checkpointer.wait()  # an async save in flight holds an earlier, good state: let it commit
            self.result.message = (
                f"non-finite loss ({loss}) at iteration {i}: stopping without saving; the last good checkpoint is "
                + (f"step {s[-1]} in {self.run.checkpointer.directory}"
                   if (s := faults.committed_steps(self.run.checkpointer.directory)) else "none"))
            writer.message(self.result.message)
            return
        self.result.first_loss = loss if self.result.first_loss is None else self.result.first_loss
        self.result.last_loss = loss
        self.last_good = i + 1
        if outcome.flags["stop"]:
            self.stop_requested = True
        if self.collapse is not None:
            self._check_collapse(i, metrics)

    def _check_collapse(self, i: int, metrics: dict) -> None:
        """Verdicts (train/collapse.py) go to the log and to metrics.jsonl once per kind; "stop" saves and stops."""
        action = self.run.cfg.sanity.on_collapse
        for verdict in self.collapse.update(i, metrics):
            self.run.writer.message(f"gpfm-train: {verdict['message']}")
            self.run.writer.write_event(i, "collapse", collapse.verdict_row(verdict, action),
                                        {f"collapse/verdict/{verdict['kind']}": 1.0})
            if action == "stop" and self.collapse_verdict is None:
                self.collapse_verdict, self.stop_requested = verdict, True

    def stopped(self, step: int, directory: Any) -> None:
        """A requested stop has saved iteration `step`: a signal (pre-emption) or a collapse verdict."""
        if self.collapse_verdict is not None:
            v = self.collapse_verdict
            self.status = "collapsed"
            self.result.message = (f"collapse ({v['kind']}, since iteration {v['since']}; "
                                   f"config.sanity.on_collapse=stop): saved iteration {step} to {directory} and "
                                   "stopped")
        else:
            self.status = "preempted"
            self.result.message = f"signal received: saved iteration {step} to {directory} and stopped"
        self.run.writer.message(self.result.message)
