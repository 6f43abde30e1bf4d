"""What a gpfm-train process does when something goes wrong that is not a bad value: a signal (pre-emption), a phase
that never ends (a blocked data read, a hung step or checkpoint), a peer process that dies. Each is reported on one
line that names the iteration, the process, the phase and the last committed checkpoint, and the run stops with its
own exit status instead of hanging (docs/training.md, "Failures").

- `RunContext`: what the process is doing now (iteration, phase, since when, under which deadline); every report
  reads it, so a report written from a watchdog thread says where the main thread was.
- `StopFlag`: SIGTERM / SIGINT set a flag; the loop saves and stops at an iteration all processes agree on.
- `Watchdog`: a thread that checks the current phase against its deadline, and in multi-process runs the peers'
  heartbeats. When a deadline passes it reports, asks the main thread to stop (`expired`), and if the main thread
  is stuck in a call that never returns (a collective, a compile) exits the process after `grace_s` (after
  3 polls for a lost peer: whatever the main thread is waiting for needs that peer).
- `PeerHeartbeat`: each process writes a counter into the JAX coordination service's key-value store every
  `interval_s`; a peer whose counter stops for `deadline.peer_s` is reported lost. That is quicker than, and comes
  before, JAX's own heartbeat timeout (`runtime.heartbeat_timeout_s`), whose abort prints a C++ stack trace instead.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

# Exit statuses of gpfm-train (main.py): 0 finished or stopped by a signal after saving.
EXIT_NONFINITE = 1
EXIT_CONFIG = 2
EXIT_SAVE_FAILED = 3
EXIT_STALLED = 4
EXIT_PEER_LOST = 5
EXIT_COLLAPSED = 6  # config.sanity.on_collapse = "stop": collapse reported, checkpoint saved


class Stalled(RuntimeError):
    """A phase exceeded its deadline; the message is the report line."""


class PeerLost(RuntimeError):
    """Another process of the run is gone; the message is the report line."""


COMMIT_MARKER = "commit_success.txt"  # orbax's mark of a finished step on object storage


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Finished checkpoints, read off the folder alone (no orbax call, no collective: safe in a failing run).
    On a disk orbax writes a step under a temporary name and renames it when every process is done: a numbered
    folder is finished. A bucket has no rename: orbax writes into `<step>/` and adds `commit_success.txt` last, so
    there a numbered folder without the marker is a save that never finished (killed, store gone) and is no
    checkpoint."""
    from gpfm_jax import storage

    directory = storage.resolve(directory)
    if storage.is_url(directory):
        storage.check_reachable(directory, timeout_s=20)  # a client says "no folder" when the store is gone
        storage.refresh(directory)  # listings cached by this process are stale: other hosts write there too
    if not directory.is_dir():
        return []
    steps = [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    if storage.is_url(directory):
        steps = [p for p in steps if (p / COMMIT_MARKER).exists()]
    return sorted(int(p.name) for p in steps)


@dataclasses.dataclass
class RunContext:
    """The process's current iteration and phase ("setup", "restore", "data", "step", "checkpoint", ...)."""

    checkpoint_dir: Any = None  # an epath.Path: a local folder or a bucket URL
    process_index: int = 0
    process_count: int = 1
    iteration: int = 0
    phase: str = "setup"
    since: float = dataclasses.field(default_factory=time.monotonic)
    deadline_s: float = 0.0
    deadline_field: str = ""

    def enter(self, phase: str, iteration: int, deadline_s: float, deadline_field: str) -> None:
        # one assignment per field; the watchdog thread only reads them
        self.iteration, self.deadline_s, self.deadline_field = iteration, deadline_s, deadline_field
        self.since = time.monotonic()
        self.phase = phase

    def where(self) -> str:
        return (f"process {self.process_index} of {self.process_count}, iteration {self.iteration}, "
                f"phase {self.phase!r}")

    def last_checkpoint(self) -> str:
        if self.checkpoint_dir is None:
            return "no checkpoint folder yet"
        try:
            steps = committed_steps(self.checkpoint_dir)
        except Exception as err:  # noqa: BLE001 - a report must not fail: say what is known
            return (f"the checkpoints in {self.checkpoint_dir} cannot be listed now ({str(err)[:200]}); a rerun "
                    "resumes from the last committed one")
        if not steps:
            return f"no committed checkpoint in {self.checkpoint_dir} (a rerun starts from scratch)"
        return f"the last committed checkpoint is step {steps[-1]} in {self.checkpoint_dir}"


class StopFlag:
    """SIGTERM / SIGINT set `signum`; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def report(line: str) -> None:
    """The one line a failure prints, on stderr (every process: the job log of a pod shows each host's). One write
    call, newline included: print() writes the text and the newline separately, and orbax's threads log tracebacks
    in between when a save fails."""
    sys.stderr.write(f"gpfm-train: {line}\n")
    sys.stderr.flush()


def hard_exit(code: int) -> None:
    """Leaves now: the main thread is stuck in a call that does not return (a collective waiting for a dead peer,
    a hung device), and a normal exit would wait at jax.distributed's shutdown barrier for the same peer."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if _notice is not None:
            _notice.clean()
    finally:
        os._exit(code)


_WATCHER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C / SIGTERM to the group is the trainer's to handle
signal.signal(signal.SIGTERM, signal.SIG_IGN)
folder = ""
for line in sys.stdin:
    line = line.rstrip("\n")
    if line == "clean":
        sys.exit(0)
    if line.startswith("dir "):
        folder = line[4:]
if "://" in folder:  # a bucket: no listing from a dying process's watcher
    last = f"the checkpoints are in {folder} (committed steps hold commit_success.txt)"
else:
    steps = sorted(int(n) for n in (os.listdir(folder) if folder and os.path.isdir(folder) else []) if n.isdigit())
    last = (f"the last committed checkpoint is step {steps[-1]} in {folder}" if steps else
            f"no committed checkpoint in {folder or 'the workdir'} (a rerun starts from scratch)")
sys.stderr.write(f"gpfm-train: {sys.argv[1]} ended without a clean exit (killed, or aborted by JAX's coordination "
                 f"service after losing a peer; 'leader task' in JAX's message above means the coordinator, process "
                 f"0); {last}; rerun the same command on every host to resume from it\n")
"""


class DeathNotice:
    """A tiny watcher process (no jax) that prints the report line when this process dies without a clean exit:
    JAX's coordination service aborts every process at once when the coordinator (process 0) is lost, leaving no
    chance to report from here. The watcher reads this process's checkpoint folder name through a pipe and sees
    the pipe close when the process dies."""

    def __init__(self, process_index: int, process_count: int):
        import atexit
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHER, f"process {process_index} of {process_count}"],
                                      stdin=subprocess.PIPE, text=True, start_new_session=False)
        atexit.register(self.clean)

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the watcher is gone
            pass

    def checkpoint_dir(self, path: Any) -> None:
        self._send(f"dir {path}")

    def clean(self) -> None:
        """This process stops on its own terms (its own report, if any, is printed)."""
        self._send("clean")


_notice: DeathNotice | None = None


def start_death_notice(process_index: int, process_count: int) -> DeathNotice:
    global _notice
    if _notice is None:
        _notice = DeathNotice(process_index, process_count)
    return _notice


def death_notice() -> DeathNotice | None:
    return _notice


class PeerHeartbeat:
    """Writes this process's counter into the coordination service's key-value store every `interval_s`, and keeps
    when each peer's counter last moved. `client` is jax's distributed runtime client."""

    PREFIX = "gpfm_train/heartbeat/"

    def __init__(self, client: Any, process_index: int, process_count: int, interval_s: float = 1.0):
        self.client = client
        self.me = process_index
        self.count = process_count
        self.interval_s = interval_s
        now = time.monotonic()
        self.last_seen = {p: now for p in range(process_count)}  # a peer gets the whole deadline after we start
        self._values: dict[int, str] = {}
        self.last_ok = now  # last successful exchange with the coordination service
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpfm-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), allow_overwrite=True)
                now = time.monotonic()
                for p in range(self.count):
                    if p == self.me:
                        continue
                    try:
                        value = self.client.key_value_try_get(f"{self.PREFIX}{p}")
                    except Exception:  # noqa: BLE001 - not written yet
                        continue
                    if value != self._values.get(p):
                        self._values[p], self.last_seen[p] = value, now
                self.last_ok = now
            except Exception as err:  # noqa: BLE001 - the service (on process 0) is unreachable
                self.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            self._stop.wait(self.interval_s)

    def lost(self, deadline_s: float) -> list[tuple[int, float]]:
        """[(process, seconds silent)] for peers silent longer than `deadline_s`; process 0 if the coordination
        service itself (hosted by process 0) has not answered for that long."""
        now = time.monotonic()
        if now - self.last_ok > deadline_s and self.me != 0:
            return [(0, now - self.last_ok)]
        return [(p, now - t) for p, t in sorted(self.last_seen.items()) if p != self.me and now - t > deadline_s]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the thread and waits for it. Called at exit (runtime.setup registers it, so it runs before
        jax.distributed's shutdown): a daemon thread still inside a client call when the interpreter finalises is
        ended by pthread_exit, whose unwinding C++ code swallows ("FATAL: exception not rethrown", abort): seen
        once in the full suite's two-process test (the likely cause; not reproduced on demand)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)


class Watchdog:
    """Checks `context` every `poll_s`. A phase past its deadline, or a lost peer: report once, set `expired` (the
    main thread polls it in its waits and unwinds cleanly), and exit with `code` if the main thread has not finished
    within `grace_s` (it is stuck in a call that does not return)."""

    def __init__(self, context: RunContext, poll_s: float = 1.0, grace_s: float = 30.0,
                 heartbeat: PeerHeartbeat | None = None, peer_deadline_s: float = 0.0,
                 exit_fn: Callable[[int], None] = hard_exit):
        self.context = context
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.heartbeat = heartbeat
        self.peer_deadline_s = peer_deadline_s
        self.exit_fn = exit_fn
        self.expired: Stalled | PeerLost | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpfm-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.expired is None:
                self.expired = self._check()
                if self.expired is not None:
                    report(str(self.expired))
                    # a lost peer: nothing left to finish cleanly needs it, and the main thread is most likely in a
                    # collective that waits for it; leave before JAX's heartbeat timeout aborts with a stack trace
                    grace = 3 * self.poll_s if isinstance(self.expired, PeerLost) else self.grace_s
                    deadline = time.monotonic() + grace
            elif time.monotonic() > deadline:
                code = EXIT_PEER_LOST if isinstance(self.expired, PeerLost) else EXIT_STALLED
                report(f"the main thread did not return after the report above (it is blocked in phase "
                       f"{self.context.phase!r}); exiting with status {code}")
                self.exit_fn(code)
                return

    def _check(self) -> Stalled | PeerLost | None:
        c = self.context
        if self.heartbeat is not None and self.peer_deadline_s > 0:
            lost = self.heartbeat.lost(self.peer_deadline_s)
            if lost:
                who = ", ".join(f"process {p}" + (" (the coordinator)" if p == 0 else "") + f" silent {s:.1f} s"
                                for p, s in lost)
                extra = f"; last error: {self.heartbeat.error}" if self.heartbeat.error else ""
                return PeerLost(f"lost {who} (no heartbeat for more than config.deadline.peer_s="
                                f"{self.peer_deadline_s:g} s{extra}) at {c.where()}; {c.last_checkpoint()}; stopping: "
                                f"rerun the same command on every host to resume from it")
        elapsed = time.monotonic() - c.since
        if c.deadline_s > 0 and elapsed > c.deadline_s:
            return Stalled(f"stalled: {c.where()} has run {elapsed:.1f} s, past its deadline "
                           f"config.deadline.{c.deadline_field}={c.deadline_s:g}; {c.last_checkpoint()}; stopping: "
                           f"rerun the same command to resume from it")
        return None

    def raise_if_expired(self) -> None:
        if self.expired is not None:
            raise self.expired

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
