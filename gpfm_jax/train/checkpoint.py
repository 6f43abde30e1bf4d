"""Training checkpoints: an orbax CheckpointManager folder `<workdir>/checkpoints` holding, per saved step,

  <step>/state   the TrainState as a plain tree (`state_to_tree`): step, params, teacher (EMA: backbone + DINO head),
                 opt_state, centers, rng (raw key data); written with ocp.args.StandardSave, sharded arrays from
                 every host, restorable onto any mesh (restore targets carry the new shardings)
  <step>/data    the data stream's position: one JSON file per data shard (`DataStateHandler`), so a run restores
                 onto another host count as long as `config.data.shards` stays the same

and at its root `encoder.json`, the student's bundle meta, so `tools/convert_to_pytorch.py --checkpoint
<workdir>/checkpoints` exports the EMA teacher backbone (what the official release ships).

A latest step that cannot be restored (truncated or missing files) is renamed to `<step>.corrupt-<n>`, a warning
names it, and the previous step is tried.

The folder may be a bucket URL (gs://): every process writes its own array shards there, so a multi-host run needs
no shared disk. A bucket has no atomic rename: orbax marks a finished step with `commit_success.txt`, and a step
folder without it (a save cut short) is never restored or counted (`faults.committed_steps`); orbax removes it when
the manager opens. s3:// is refused here: orbax-checkpoint does not support it yet (docs/storage.md).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import warnings
from typing import Any, Callable, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, EveryNSteps, LatestN

from gpfm_jax import storage
from gpfm_jax.convert.checkpoint_layout import DATA, STATE  # the layout's names, shared with its readers (convert)
from gpfm_jax.train.config_schema import CheckpointConfig, ConfigError
from gpfm_jax.train.faults import committed_steps
from gpfm_jax.step.train_step import TrainState

log = logging.getLogger("gpfm_jax.train")


# ---------------------------------------------------------------------------------------------------------------
# Train state <-> a plain tree orbax can save and restore without a target (for tools/convert_to_pytorch.py)


def _key_data(rng: Any) -> Any:
    if isinstance(rng, jax.ShapeDtypeStruct):
        kd = jax.eval_shape(jax.random.key_data, rng)
        return jax.ShapeDtypeStruct(kd.shape, kd.dtype, sharding=getattr(rng, "sharding", None))
    return jax.random.key_data(rng)


def state_to_tree(state: TrainState) -> dict[str, Any]:
    """TrainState (arrays or ShapeDtypeStructs) -> nested dicts of arrays; the PRNG key as its uint32 data."""
    return {
        "step": state.step,
        "params": state.params,
        "teacher": state.teacher,  # its "backbone" is what convert reads (checkpoint_layout.TEACHER_BACKBONE)
        "opt_state": serialization.to_state_dict(state.opt_state),
        "centers": state.centers,
        "rng": _key_data(state.rng),
    }


def tree_to_state(template: TrainState, tree: dict[str, Any]) -> TrainState:
    return TrainState(
        step=tree["step"],
        params=tree["params"],
        teacher=tree["teacher"],
        opt_state=serialization.from_state_dict(template.opt_state, tree["opt_state"]),
        centers=tree["centers"],
        rng=jax.random.wrap_key_data(tree["rng"]),
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---------------------------------------------------------------------------------------------------------------
# The data stream's position, one JSON per data shard


class ShardedStream(Protocol):
    def get_shard_states(self) -> dict[int, Any]: ...  # this process's shards: index -> JSON-able state
    def set_shard_states(self, states: dict[int, Any]) -> None: ...
    @property
    def shard_indices(self) -> list[int]: ...
    @property
    def shard_count(self) -> int: ...


class DataShardsMismatch(ConfigError):
    """The checkpoint's data position is for another number of data shards: a config error, not a corrupt step."""


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes (and reads back) `shard_<i>-of-<n>.json` for the data shards it feeds."""

    def save(self, directory, args: "DataStateSave" = None):
        stream = args.stream
        for i, state in stream.get_shard_states().items():
            (epath.Path(directory) / f"shard_{i}-of-{stream.shard_count}.json").write_text(json.dumps(state))

    def restore(self, directory, args: "DataStateRestore" = None):
        stream = args.stream
        states = {}
        for i in stream.shard_indices:
            path = epath.Path(directory) / f"shard_{i}-of-{stream.shard_count}.json"
            if not path.is_file():
                other = sorted({p.name.rsplit("-of-", 1)[-1][: -len(".json")]
                                for p in epath.Path(directory).glob("shard_*-of-*.json")})
                if other and other != [str(stream.shard_count)]:
                    raise DataShardsMismatch(
                        f"{directory}: the data position was saved for {'/'.join(other)} data shards, this run has "
                        f"{stream.shard_count} (config.data.shards, 0 = one per process): set "
                        f"--config.data.shards={other[0]} (it must be divisible by the number of processes)")
                raise FileNotFoundError(f"{path}: no data state for shard {i} of {stream.shard_count}")
            states[i] = json.loads(path.read_text())
        stream.set_shard_states(states)
        return stream

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    stream: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    stream: Any


# ---------------------------------------------------------------------------------------------------------------
# The manager


def _find(err: BaseException | None, kind: type) -> BaseException | None:
    """`err` or an exception it was raised from / wraps (orbax re-raises handler errors), if of type `kind`."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, kind):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _all_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
    return bool(np.all(flags))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (disk full, I/O error) and config.checkpoint.on_save_error is "stop"."""


def disk_report(path: epath.Path) -> str:
    """'<free> free of <total> on the filesystem of <path>' (the nearest existing parent); for a bucket, says so."""
    if storage.is_url(path):
        return f"object storage ({storage.scheme(path)}://: no free-space figure)"
    try:
        usage, probe = storage.disk_usage(path)
    except OSError as err:
        return f"free space unknown ({err})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {probe}"


def check_directory(directory: storage.PathLike) -> epath.Path:
    """The checkpoint folder as an epath.Path, or a ConfigError (one line) before anything is written or compiled:
    s3:// (orbax cannot commit there yet), a missing bucket, no permission, an endpoint that does not answer."""
    path = storage.resolve(directory)
    if storage.scheme(path) == "s3":
        raise ConfigError(f"{path}: checkpoints on s3:// are not supported: orbax-checkpoint refuses s3:// paths "
                          "(its S3 support is not released); use gs://, a local or shared disk, or a mounted bucket")
    try:
        storage.check_reachable(path)
    except storage.StorageError as err:
        raise ConfigError(str(err)) from None
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class Checkpointer:
    """orbax CheckpointManager: saves every `config.every` iterations (async), keeps the last `config.keep` plus every
    multiple of `config.keep_period`, restores the newest restorable step (a corrupt one is set aside), and handles a
    failed save per `config.on_save_error`."""

    def __init__(self, directory: storage.PathLike, config: CheckpointConfig,
                 announce: Callable[[str], None] = print):
        self.directory = check_directory(directory)
        self.config = config
        self.announce = announce
        self._in_flight: int | None = None
        self.failed_saves: list[int] = []
        self.stop_on_error = config.on_save_error == "stop"
        policies = [LatestN(n=config.keep)]
        if config.keep_period:
            policies.append(EveryNSteps(interval_steps=config.keep_period))
        self.options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied in save() (orbax would also save the first step)
            preservation_policy=AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save, create=True,
            cleanup_tmp_directories=True)  # a save cut short (killed, disk full) leaves a temporary folder: removed
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        storage.refresh(self.directory)  # a bucket: what the other hosts wrote since this process last listed
        return ocp.CheckpointManager(self.directory, options=self.options,
                                     item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataStateHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.config.every == 0 and step not in self.manager.all_steps()

    def save(self, step: int, state: TrainState, data: ShardedStream, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); async: returns once the arrays are copied off the devices.
        `data` gives the data position that goes with `state` (`get_shard_states`). A failure of this save or of the
        previous async one is handled by `_failed` (raises CheckpointSaveError in "stop" mode)."""
        if step in self.manager.all_steps() or not (force or step % self.config.every == 0):
            return False
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state_to_tree(state)), DATA: DataStateSave(data)})
        try:
            self._check_previous()
            self._in_flight = step
            started = self.manager.save(step, args=args, force=True)
        except CheckpointSaveError:
            raise
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types; reported with the path
            self._failed(step, err)
            return False
        if not self.config.async_save:
            self._in_flight = None
        return started

    def _check_previous(self) -> None:
        """Surfaces the error of an async save still in flight (orbax raises it on the next wait)."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._failed(step, err)

    def _failed(self, step: int, err: BaseException) -> None:
        """Reports a failed save (path, reason, free space, the intact checkpoints); "stop": raises
        CheckpointSaveError, "retry": goes on (the next interval saves again)."""
        self._in_flight = None
        self.failed_saves.append(step)
        nospace = _find(err, OSError)
        if (nospace is not None and nospace.errno == errno.ENOSPC) or "No space left" in str(err):
            reason = "no space left on the device"
        else:
            reason = f"{type(err).__name__}: {str(err)[:300]}"
        disk = disk_report(self.directory)  # as the write found it
        try:  # a fresh manager; it removes the failed save's temporary folder (frees what it had written)
            self.manager.close()
        except Exception:  # noqa: BLE001 - the old manager is broken anyway
            pass
        try:
            self.manager = self._open()
            good = committed_steps(self.directory)
            intact = "steps " + ", ".join(map(str, good)) if good else "none"
        except Exception as list_err:  # noqa: BLE001 - the store itself is gone (a bucket's endpoint)
            intact = f"cannot be listed now ({str(list_err)[:200]}); none is overwritten or restored unfinished"
        message = (f"checkpoint save of step {step} to {self.directory / str(step)} failed: {reason}; {disk}; "
                   f"earlier checkpoints intact: {intact}")
        if self.stop_on_error:
            raise CheckpointSaveError(message + "; stopping (config.checkpoint.on_save_error=stop): free space and "
                                      "rerun the same command to resume from the last checkpoint") from err
        message += ("; training goes on and saves again at the next interval "
                    "(config.checkpoint.on_save_error=retry)")
        log.warning(message)
        self.announce(message)

    def poll(self) -> None:
        """Surfaces the error of an async save that has finished, without waiting (each iteration, single-process
        runs; multi-process runs find it at the next save, at the same iteration on every process)."""
        if self._in_flight is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self._check_previous()

    def wait(self) -> None:
        self._check_previous()

    def close(self) -> None:
        try:
            self._check_previous()
        finally:
            self.manager.close()

    def restore_latest(self, abstract_state: TrainState, stream: ShardedStream | None
                       ) -> tuple[TrainState | None, int | None]:
        """The newest restorable step onto `abstract_state`'s shardings (ShapeDtypeStructs with .sharding), data
        stream repositioned. Steps that fail to restore are renamed aside with a warning; (None, None) if none."""
        while True:
            steps = self.all_steps()
            if not steps:
                return None, None
            step = steps[-1]
            error = None
            try:
                target = state_to_tree(abstract_state)
                items = {STATE: ocp.args.StandardRestore(target)}
                if stream is not None:
                    items[DATA] = DataStateRestore(stream)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                state = tree_to_state(abstract_state, restored[STATE])
                jax.block_until_ready(state)
            except DataShardsMismatch:
                raise
            except Exception as err:  # orbax/tensorstore raise many types for damaged folders
                if _find(err, DataShardsMismatch):
                    raise _find(err, DataShardsMismatch) from err
                error = err
            if _all_ok(error is None):
                return state, step
            self._set_aside(step, error)

    def _set_aside(self, step: int, error: BaseException | None) -> None:
        path = self.directory / str(step)
        n = 0
        while (aside := self.directory / f"{step}.corrupt-{n}").exists():
            n += 1
        reason = f"{type(error).__name__}: {str(error)[:300]}" if error is not None else "failed on another host"
        message = (f"checkpoint {path} cannot be restored ({reason}); moved it to {aside.name} and trying the "
                   f"previous checkpoint")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        _sync(f"gpfm_ckpt_aside_{step}_a")
        if jax.process_index() == 0 and path.exists():
            path.rename(aside)
        _sync(f"gpfm_ckpt_aside_{step}_b")
        self.manager.close()
        self.manager = self._open()
