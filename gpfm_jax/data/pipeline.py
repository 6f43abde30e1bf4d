"""The grain pipeline: source -> per-host shard -> shuffle/repeat -> multi-crop -> batch (sample-major) -> masks.

Every random draw is a pure function of (seed, shard, position in the repeated, shuffled stream), so the n-th batch is
the same whether the run started at step 0 or was restored from the iterator's state (`get_state()` /
`set_state()`, grain's), and with any worker count. The batch's keys and layout: `data/batch.py`.

`PipelineConfig` holds the pipeline's own settings; the run's `DataConfig` (train/config_schema.py) extends it with
where the data lives, and the run hands that (its masking grid resolved) to `make_iterator` with its seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS, MASKS, NUM_SKIPPED
from gpfm_jax.data.augment import CROP_DTYPES, MultiCropConfig, multi_crop
from gpfm_jax.data.masking import MaskingConfig, batch_masks
from gpfm_jax.data.sources import RobustSource, TileSource

_AUGMENT_STREAM = 0
_MASK_STREAM = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The pipeline's own settings. Field meanings for users: docs/training.md (they are `config.data.*`)."""

    global_batch_size: int = 1536  # 96 per GPU x 16 GPUs
    shuffle: bool = True
    worker_count: int = 0  # grain worker processes per host (0 = threads in this process)
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 2  # threads per process preparing records
    prefetch_records: int = 64  # records read ahead per process
    max_read_retries: int = 32  # consecutive bad records tolerated before the source is declared broken
    # "uint8": crops leave the host as pixels, normalised inside the jitted step (data.normalize); "float32": the
    # host normalises (the pre-uint8 behaviour, bit for bit)
    crop_dtype: str = "uint8"
    multicrop: MultiCropConfig = MultiCropConfig()
    # the grid is the global crop in patches: set by the run (train/config.masking_config); max_num_patches None =
    # half the grid (128 for 16x16)
    masking: MaskingConfig = MaskingConfig()

    def validate(self, shard_count: int = 1) -> None:
        """What the pipeline needs to run for `shard_count` shards; ValueError naming the field (the run's config
        check prefixes it with `config.data.`)."""
        b, g, grid = self.global_batch_size, self.multicrop.global_size, tuple(self.masking.grid)
        if b <= 0:
            raise ValueError(f"global_batch_size={b} must be positive")
        if b % shard_count:
            raise ValueError(f"global_batch_size={b} is not divisible by the data shards ({shard_count})")
        if grid[0] != grid[1] or g % grid[0]:
            raise ValueError(f"masking.grid={grid} does not cut multicrop.global_size={g} into square patches")
        if self.crop_dtype not in CROP_DTYPES:
            raise ValueError(f"crop_dtype={self.crop_dtype!r}: expected one of {CROP_DTYPES}")


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
        out[NUM_SKIPPED] = int(record.get(NUM_SKIPPED, 0))
        return out


@dataclasses.dataclass(frozen=True)
class CollateSampleMajor:
    """Stack B multi-crop records into [B, V, ...] arrays: one copy, already in the train step's layout."""

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {key: np.stack([r[key] for r in records]) for key in (GLOBAL_CROPS, LOCAL_CROPS)}
        out[NUM_SKIPPED] = np.int32(sum(r[NUM_SKIPPED] for r in records))
        return out


@dataclasses.dataclass(frozen=True)
class AddMasks(grain.transforms.MapWithIndex):
    """Batch-level iBOT masks (they need the whole batch: which crops are masked and the ratio bins)."""

    cfg: MaskingConfig
    seed: int
    shard: int

    def map_with_index(self, index: int, batch: dict[str, Any]) -> dict[str, Any]:
        b, v = batch[GLOBAL_CROPS].shape[:2]
        masks = batch_masks(b * v, _rng(self.seed, self.shard, _MASK_STREAM, index), self.cfg)  # crops shuffled
        batch[MASKS] = masks.reshape(b, v, -1)
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
    *,
    seed: int = 0,
    num_epochs: int | None = None,
    tune_worker_malloc: bool = True,
) -> grain.IterDataset:
    """The full per-host pipeline as a grain IterDataset; iterate it or call make_iterator(). `seed` seeds every
    draw (the run's config.seed), `num_epochs` None repeats forever, `tune_worker_malloc` runs `tune_malloc` in each
    grain worker."""
    shard = shard if shard is not None else grain.sharding.NoSharding()
    cfg.validate(shard.shard_count)
    per_host = cfg.global_batch_size // shard.shard_count
    ds = grain.MapDataset.source(RobustSource(source, cfg.max_read_retries))
    ds = ds[shard.shard_index :: shard.shard_count]
    if len(ds) < per_host:
        raise ValueError(f"{source!r}: {len(ds)} records for this host, fewer than its batch of {per_host}")
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(AugmentRecord(cfg.multicrop, seed, shard.shard_index, cfg.crop_dtype))
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=CollateSampleMajor())
    ds = ds.map_with_index(AddMasks(cfg.masking, seed, shard.shard_index))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_records))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size),
            worker_init_fn=_init_worker if tune_worker_malloc else None,
        )
    return it


def make_iterator(source: TileSource, cfg: PipelineConfig, shard: grain.sharding.ShardOptions | None = None,
                  **run: Any) -> grain.DatasetIterator:
    """A checkpointable iterator over batches (grain's `get_state()` / `set_state()`; the run saves them through
    train/checkpoint.DataStateHandler). `run`: make_dataset's keyword arguments (seed, num_epochs, ...)."""
    return iter(make_dataset(source, cfg, shard, **run))
