"""The grain pipeline: source -> per-host shard -> shuffle/repeat -> multi-crop -> batch (sample-major) -> masks.

Every random draw is a pure function of (seed, shard, position in the repeated, shuffled stream), so the n-th batch is
the same whether the run started at step 0 or was restored from an iterator checkpoint, and with any worker count.

Batch (per host, B = global_batch_size / process_count; T = crop_dtype, uint8 pixels or normalised float32):
  global_crops T[B, 2, G, G, 3]    sample-major: the train step's layout, so all views of a sample stay on one
  local_crops  T[B, N, L, L, 3]    device and no host re-copy is needed (DINOv2's collate is view-major [2B, ...])
  masks        bool[B, 2, (G/patch)^2] iBOT masks, masks[b, v] belongs to global_crops[b, v]
  num_skipped  int32[]           unreadable records replaced while building this batch (a metric)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import grain
import numpy as np

from gpfm_jax.data.augment import CROP_DTYPES, MultiCropConfig, multi_crop
from gpfm_jax.data.masking import MaskingConfig, batch_masks
from gpfm_jax.data.sources import RobustSource, TileSource

_AUGMENT_STREAM = 0
_MASK_STREAM = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    global_batch_size: int = 1536
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    patch_size: int = 14
    worker_count: int = 0  # grain mp_prefetch processes; 0 = threads in this process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 2  # threads per process preparing records
    prefetch_records: int = 64  # records read ahead per process
    max_read_retries: int = 32  # consecutive bad records tolerated before the source is declared broken
    # "uint8": crops leave the host as pixels, normalised inside the jitted step (data.normalize); "float32": the
    # host normalises (the pre-uint8 behaviour, bit for bit)
    crop_dtype: str = "uint8"
    tune_worker_malloc: bool = True  # grain workers: glibc malloc thresholds for image work (see tune_malloc)
    multicrop: MultiCropConfig = MultiCropConfig()
    masking: MaskingConfig = MaskingConfig()

    def validate(self, process_count: int = 1) -> None:
        g, p = self.multicrop.global_size, self.patch_size
        if g % p:
            raise ValueError(f"global crop size {g} is not a multiple of patch size {p}")
        if tuple(self.masking.grid) != (g // p, g // p):
            raise ValueError(f"masking.grid {self.masking.grid} != global crop grid {(g // p, g // p)}")
        if self.crop_dtype not in CROP_DTYPES:
            raise ValueError(f"crop_dtype {self.crop_dtype!r}: expected one of {CROP_DTYPES}")
        if self.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} not divisible by {process_count} hosts")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclasses.dataclass(frozen=True)
class AugmentRecord(grain.transforms.MapWithIndex):
    """record -> multi-crop record, seeded by (seed, shard, index): deterministic and resumable."""

    cfg: MultiCropConfig
    seed: int
    shard: int
    dtype: str = "float32"

    def map_with_index(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        out = multi_crop(record["image"], _rng(self.seed, self.shard, _AUGMENT_STREAM, index), self.cfg, self.dtype)
        out["num_skipped"] = int(record.get("num_skipped", 0))
        return out


@dataclasses.dataclass(frozen=True)
class CollateSampleMajor:
    """Stack B multi-crop records into [B, V, ...] arrays: one copy, already in the train step's layout."""

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {key: np.stack([r[key] for r in records]) for key in ("global_crops", "local_crops")}
        out["num_skipped"] = np.int32(sum(r["num_skipped"] for r in records))
        return out


@dataclasses.dataclass(frozen=True)
class AddMasks(grain.transforms.MapWithIndex):
    """Batch-level iBOT masks (they need the whole batch: which crops are masked and the ratio bins)."""

    cfg: MaskingConfig
    seed: int
    shard: int

    def map_with_index(self, index: int, batch: dict[str, Any]) -> dict[str, Any]:
        b, v = batch["global_crops"].shape[:2]
        masks = batch_masks(b * v, _rng(self.seed, self.shard, _MASK_STREAM, index), self.cfg)  # crops shuffled
        batch["masks"] = masks.reshape(b, v, -1)
        return batch


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside an absl.app program they are unparsed and it raises
    UnparsedFlagAccessError. Marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """glibc malloc settings for a process that augments images: allocations below 32 MiB from the heap, and up to
    128 MiB of freed heap kept for reuse.

    Why: every sample allocates and frees arrays of 0.5-3 MB (the decoded tile, float32 crop planes). glibc's
    defaults serve those with fresh mmaps or trim them back to the kernel, so each one is zero-filled and
    page-faulted again: measured 4.7 ms of kernel time per sample, 35-36 samples per CPU-second for the bare
    augmentation against 43-49 with these settings (docs/data.md). Returns False where there is no glibc mallopt
    (nothing changes).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker process."""
    tune_malloc()


def host_shard() -> grain.sharding.ShardOptions:
    """This host's share of the data (jax.process_index() of jax.process_count())."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def make_dataset(
    source: TileSource,
    cfg: PipelineConfig,
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
    """The full per-host pipeline as a grain IterDataset; iterate it or call make_iterator()."""
    shard = shard if shard is not None else grain.sharding.NoSharding()
    cfg.validate(shard.shard_count)
    per_host = cfg.global_batch_size // shard.shard_count
    ds = grain.MapDataset.source(RobustSource(source, cfg.max_read_retries))
    ds = ds[shard.shard_index :: shard.shard_count]
    if len(ds) < per_host:
        raise ValueError(f"{source!r}: {len(ds)} records for this host, fewer than its batch of {per_host}")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds.map_with_index(AugmentRecord(cfg.multicrop, cfg.seed, shard.shard_index, cfg.crop_dtype))
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=CollateSampleMajor())
    ds = ds.map_with_index(AddMasks(cfg.masking, cfg.seed, shard.shard_index))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_records))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size),
            worker_init_fn=_init_worker if cfg.tune_worker_malloc else None,
        )
    return it


def make_iterator(source: TileSource, cfg: PipelineConfig, shard: grain.sharding.ShardOptions | None = None
                  ) -> grain.DatasetIterator:
    """A checkpointable iterator over batches (get_state()/set_state(), or orbax via checkpoint_args())."""
    return iter(make_dataset(source, cfg, shard))


def get_state(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (small: a few counters), to store next to a model checkpoint."""
    return json.dumps(iterator.get_state()).encode()


def set_state(iterator: grain.DatasetIterator, state: bytes | str | dict) -> None:
    """Restore a position saved by get_state(); the next batch is the one that followed the save."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    iterator.set_state(state)


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
    """orbax CheckpointArgs for the iterator, to put in ocp.args.Composite(..., data=checkpoint_args(it)).

    grain 0.2.18 ships its orbax handler as grain.checkpoint.CheckpointSave / CheckpointRestore (per-process JSON).
    """
    return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)
