"""Test-only fault injection for gpfm-train runs (in this process, or in a `helpers_train.py` subprocess through
`inject.<name>=<value>` arguments). Nothing here is imported by the package.

- `block_data_at=N`: the data stream's N-th batch (0-based, counted in this process) never comes.
- `slow_data_s=X`: every batch takes X s longer to read (a slow filesystem).
- `slow_step_s=X`: every step takes X s longer (a host callback inside a jitted function that the step's outputs
  depend on; on the CPU backend XLA may run it inside the dispatch, so the dispatching thread waits too, like a
  busy device whose queue is full). `slow_step_from=N`: only from iteration N on (e.g. a hang after good steps).
- `enospc_at_save=N`: the N-th checkpoint save (0-based) fails with OSError(ENOSPC) while writing the data position.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any


def install(setattr_=setattr, **options: Any) -> threading.Event:
    """Patches the package for the given options (`setattr_`: e.g. pytest's monkeypatch.setattr, undone after the
    test). Returns an Event whose set() lets blocked data reads and slow steps finish."""
    from gpfm_jax.train import assembly, checkpoint, data_stream

    release = threading.Event()

    block_at = options.get("block_data_at")
    slow_data = float(options.get("slow_data_s", 0) or 0)
    if block_at is not None or slow_data:
        original_next = data_stream.DataStream.__next__
        count = {"n": 0}

        def __next__(self):
            n = count["n"]
            count["n"] += 1
            if block_at is not None and n >= int(block_at):
                release.wait()
            if slow_data:
                time.sleep(slow_data)
            return original_next(self)

        setattr_(data_stream.DataStream, "__next__", __next__)

    slow_step = float(options.get("slow_step_s", 0) or 0)
    if slow_step:
        setattr_(assembly, "jit_train_step", _slow_step_factory(assembly.jit_train_step, slow_step,
                                                            int(options.get("slow_step_from", 0)), release))

    enospc_at = options.get("enospc_at_save")
    if enospc_at is not None:
        original_save = checkpoint.DataStateHandler.save
        saves = {"n": 0}

        def save(self, directory, args=None):
            n = saves["n"]
            saves["n"] += 1
            if n == int(enospc_at):
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return original_save(self, directory, args)

        setattr_(checkpoint.DataStateHandler, "save", save)
    return release


def _slow_step_factory(real_factory, seconds: float, first: int, release: threading.Event):
    import jax
    import jax.numpy as jnp
    import numpy as np

    def delay(step):
        if int(step) >= first + 1:  # step counts iterations done: the n-th dispatched step outputs n + 1
            release.wait(seconds)
        return np.zeros((), np.int32)

    @jax.jit
    def slow(state, metrics):
        z = jax.pure_callback(delay, jax.ShapeDtypeStruct((), jnp.int32), state.step)
        return state._replace(step=state.step + z), {**metrics, "loss/total": metrics["loss/total"] + z}

    def factory(*args, **kwargs):
        step = real_factory(*args, **kwargs)

        def wrapped(state, batch, experts):
            state, metrics = step(state, batch, experts)
            return slow(state, metrics)

        return wrapped

    return factory
