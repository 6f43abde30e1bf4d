"""Slides on object storage: openslide needs a local file, so slides named by a URL are downloaded ahead, in the
order they will be tiled, into a local cache folder of bounded size, and each is deleted as soon as its last tile
has been read. A background thread keeps downloading while the next slide fits (a slide larger than the whole
bound is still fetched, alone), so download overlaps with tiling and encoding. Local slides pass through.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from gpfm_jax import storage

log = logging.getLogger("gpfm_jax.extract")


class SlideCache:
    """acquire(j) -> a local file for slide j (waits for its download); release(j) deletes it. Slides must be
    acquired in list order (the order they are downloaded in)."""

    def __init__(self, sources: Sequence[str], sizes: Sequence[int], folder: str | os.PathLike | None,
                 max_bytes: int):
        self.sources, self.sizes, self.max_bytes = list(map(str, sources)), list(sizes), int(max_bytes)
        self.folder = Path(tempfile.mkdtemp(prefix="gpfm-slides-", dir=folder))
        self.used = 0  # bytes of downloaded, not yet released slides
        self.local: dict[int, Path] = {}
        self.errors: dict[int, BaseException] = {}
        self.released: set[int] = set()
        self._cv = threading.Condition()
        self._stop = False
        remote = [j for j, s in enumerate(self.sources) if storage.is_url(s)]
        self._thread = threading.Thread(target=self._download_all, args=(remote,), daemon=True,
                                        name="gpfm-extract-download")
        self._thread.start()

    def _download_all(self, order: list[int]) -> None:
        for j in order:
            with self._cv:
                while not self._stop and self.used > 0 and self.used + self.sizes[j] > self.max_bytes:
                    self._cv.wait()
                if self._stop:
                    return
                if j in self.released:  # given up before it was needed
                    continue
                self.used += self.sizes[j]
            target = self.folder / f"{j:06d}-{storage.resolve(self.sources[j]).name}"
            try:
                storage.download_file(self.sources[j], target)
            except BaseException as e:  # noqa: BLE001 - handed to acquire()
                with self._cv:
                    self.errors[j] = e
                    self.used -= self.sizes[j]
                    self._cv.notify_all()
                continue
            with self._cv:
                self.local[j] = target
                if j in self.released or self._stop:
                    self._drop(j)
                self._cv.notify_all()

    def acquire(self, j: int) -> Path:
        if not storage.is_url(self.sources[j]):
            return Path(self.sources[j])
        with self._cv:
            while j not in self.local and j not in self.errors:
                self._cv.wait()
            if j in self.errors:
                e = self.errors[j]
                raise OSError(f"download of {self.sources[j]} failed: {type(e).__name__}: {e}") from e
            return self.local[j]

    def _drop(self, j: int) -> None:  # under the lock
        path = self.local.pop(j, None)
        if path is not None:
            path.unlink(missing_ok=True)
            self.used -= self.sizes[j]

    def release(self, j: int) -> None:
        """Slide j is no longer read: its file is deleted (openslide handles still open keep their data until
        closed) and the next download may start."""
        if not storage.is_url(self.sources[j]):
            return
        with self._cv:
            self.released.add(j)
            self._drop(j)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)
