"""Where a gpfm-train run writes, when its workdir may be a bucket.

`--workdir` names the run: a local folder, or a URL (gs://bucket/run) when the hosts of a pod share no disk. What
is written once or atomically goes there directly: the checkpoints (orbax, every host its own shards), the config
(config.json, config_resolved.json), the checkpoints' encoder.json. What grows line by line — metrics.jsonl, the
TensorBoard event files — cannot be appended to an object, so with a URL workdir it is written to a local scratch
folder and copied to the workdir whole at every checkpoint and when the run ends (the first log line says so); a
rerun on a fresh machine first fetches the workdir's metrics.jsonl, so the log stays one file. The slide tiling
cache is always local (the scratch folder). With a local workdir, scratch and workdir are the same folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile

from etils import epath

from gpfm_jax import storage
from gpfm_jax.convert.checkpoint_layout import CHECKPOINT_DIR
from gpfm_jax.train import checkpoint as ckpt
from gpfm_jax.train import faults
from gpfm_jax.train.config_schema import ConfigError
from gpfm_jax.train.metrics_writer import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"


def default_scratch(workdir: epath.Path, process_index: int) -> epath.Path:
    """$GPFM_SCRATCH or the system temp folder, one sub-folder per (workdir URL, process): a rerun on the same host
    finds its cache again, and two processes on one host never share one."""
    base = os.environ.get("GPFM_SCRATCH") or tempfile.gettempdir()
    tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:12]
    return storage.resolve(os.path.join(base, f"gpfm-run-{tag}-p{process_index}"))


@dataclasses.dataclass
class RunDirs:
    workdir: epath.Path  # what the user named: a local folder or a URL
    checkpoints: epath.Path  # <workdir>/checkpoints
    local: epath.Path  # metrics.jsonl, TensorBoard, slide cache: the workdir itself, or a scratch folder
    primary: bool = True

    @property
    def remote(self) -> bool:
        return storage.is_url(self.workdir)

    @property
    def slide_cache(self) -> epath.Path:
        return self.local / "slide_cache"

    def where(self) -> str:
        """The line that tells a user of a URL workdir where the logs are written meanwhile ('' when local)."""
        if not self.remote:
            return ""
        return (f"checkpoints and config in {self.workdir}; {METRICS_FILE} and TensorBoard written to {self.local} "
                f"and copied to {self.workdir} at every checkpoint and at the end")

    def sync(self) -> None:
        """Copies the growing logs to a URL workdir (primary process; whole objects: a reader never sees half)."""
        if not (self.remote and self.primary):
            return
        try:
            log = self.local / METRICS_FILE
            if log.exists():
                storage.upload_file(log, self.workdir / METRICS_FILE)
            events = self.local / TENSORBOARD_DIR
            if events.is_dir():
                storage.copy_tree(events, self.workdir / TENSORBOARD_DIR)
        except Exception as err:  # noqa: BLE001 - logs are not worth stopping a run for; the next sync retries
            faults.report(f"could not copy the logs to {self.workdir} ({type(err).__name__}: {str(err)[:200]}); "
                          f"they are in {self.local}")


def open_run_dirs(workdir: storage.PathLike, scratch: storage.PathLike | None = None, process_index: int = 0
                  ) -> RunDirs:
    """Checks and creates the run's folders. A bad URL (s3:// checkpoints, a missing bucket, no permission, no
    answer) is a ConfigError naming it, raised before anything is built or compiled."""
    root = storage.resolve(workdir)
    if storage.is_url(root):
        checkpoints = ckpt.check_directory(root / CHECKPOINT_DIR)
        if scratch is not None and storage.is_url(scratch):
            raise ConfigError(f"--scratch {scratch}: must be a local folder (logs are appended there)")
        local = storage.resolve(scratch) if scratch else default_scratch(root, process_index)
    else:
        checkpoints = root / CHECKPOINT_DIR
        local = root
    try:
        local.mkdir(parents=True, exist_ok=True)
        if not storage.is_url(root):
            root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--workdir {workdir}: cannot create {err.filename or local} ({err.strerror})") from None
    dirs = RunDirs(root, checkpoints, local, primary=process_index == 0)
    if dirs.remote and dirs.primary and not (local / METRICS_FILE).exists() and (root / METRICS_FILE).exists():
        storage.download_file(root / METRICS_FILE, local / METRICS_FILE)  # a rerun elsewhere: one log goes on
    return dirs
