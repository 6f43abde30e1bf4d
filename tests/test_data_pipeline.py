"""The grain pipeline: batch layout, determinism, resume mid-epoch, bad files, per-host shards, workers."""

import dataclasses
import json

import grain
import numpy as np
import pytest
from PIL import Image

from gpfm_jax.data import FolderSource, MaskingConfig, MultiCropConfig, PipelineConfig
from gpfm_jax.data import make_iterator as _make_iterator
from gpfm_jax.data.testing import cut_tiles, write_bad_files

SEED = 3


def make_iterator(source, cfg, shard=None, seed=SEED):
    return _make_iterator(source, cfg, shard, seed=seed)


def saved_state(it) -> dict:
    """The iterator's state as the run stores it (train/checkpoint.DataStateHandler: JSON per shard)."""
    return json.loads(json.dumps(it.get_state()))


# Small crops keep the suite fast; the geometry is the recipe's (global 4x4 patches of 14 px).
SMALL = PipelineConfig(
    global_batch_size=4,
    multicrop=MultiCropConfig(global_size=56, local_size=28, num_local_crops=3),
    masking=MaskingConfig(grid=(4, 4)),
)
NO_COLOUR = dataclasses.replace(
    SMALL.multicrop, jitter_p=0.0, grayscale_p=0.0, blur_p_global2=0.0, blur_p_local=0.0, solarize_p_global2=0.0
)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    cut_tiles(d, n=12, size=64, subdirs=3)
    return d


def test_full_size_batch_layout(tiles):
    it = make_iterator(FolderSource(tiles), PipelineConfig(global_batch_size=2))
    b = next(it)
    assert b["global_crops"].shape == (2, 2, 224, 224, 3) and b["global_crops"].dtype == np.uint8
    assert b["local_crops"].shape == (2, 8, 98, 98, 3) and b["local_crops"].dtype == np.uint8
    assert b["global_crops"].nbytes + b["local_crops"].nbytes == 2 * (2 * 224 * 224 * 3 + 8 * 98 * 98 * 3)
    assert b["masks"].shape == (2, 2, 256) and b["masks"].dtype == bool
    assert (b["masks"].sum(-1) > 0).sum() == 2  # int(2B * 0.5) masked crops
    assert b["num_skipped"] == 0


def test_sample_major_order(tmp_path):
    """Flat-colour tiles and no colour ops: crop i of sample b must carry sample b's colour."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, c in enumerate(colours):
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = dataclasses.replace(SMALL, shuffle=False, multicrop=NO_COLOUR)
    b = next(make_iterator(FolderSource(tmp_path), cfg))
    rgb = lambda x: np.round(x.mean(axis=(-3, -2))).astype(int)  # noqa: E731
    B, N = 4, 3
    want = np.array(colours)
    g, loc = rgb(b["global_crops"]), rgb(b["local_crops"])
    assert g.shape == (B, 2, 3) and loc.shape == (B, N, 3)
    for v in range(2):
        assert np.array_equal(g[:, v], want)
    for v in range(N):
        assert np.array_equal(loc[:, v], want)


def test_deterministic_for_a_seed(tiles):
    src = FolderSource(tiles)
    a = make_iterator(src, SMALL)
    b = make_iterator(src, SMALL)
    c = make_iterator(src, SMALL, seed=4)
    ba, bb, bc = next(a), next(b), next(c)
    assert _equal(ba, bb)
    assert not np.array_equal(ba["global_crops"], bc["global_crops"])
    # epochs differ (reshuffled, re-augmented): 12 tiles / batch 4 = 3 batches per epoch
    batches = [next(a) for _ in range(5)]
    assert not np.array_equal(batches[2]["global_crops"], ba["global_crops"])


def test_restore_mid_epoch_gives_the_same_next_batch(tiles):
    src = FolderSource(tiles)
    it = make_iterator(src, SMALL)
    next(it)
    state = saved_state(it)  # mid-epoch: 1 of 3 batches consumed
    expected = [next(it) for _ in range(3)]  # crosses into the next epoch
    fresh = make_iterator(src, SMALL)
    fresh.set_state(state)
    assert all(_equal(next(fresh), e) for e in expected)


def test_bad_files_are_skipped_and_counted(tmp_path):
    cut_tiles(tmp_path, n=11, size=64)
    bad = write_bad_files(tmp_path / "slide_0")  # 5 bad among 16 files
    cfg = dataclasses.replace(SMALL, shuffle=False)
    it = make_iterator(FolderSource(tmp_path), cfg)
    batches = [next(it) for _ in range(4)]  # one epoch
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert skipped >= len(bad)
    assert all(np.isfinite(b["global_crops"]).all() for b in batches)


def test_all_bad_folder_is_a_clear_error(tmp_path):
    write_bad_files(tmp_path / "only_bad")
    it = make_iterator(FolderSource(tmp_path / "only_bad"), dataclasses.replace(SMALL, max_read_retries=8))
    with pytest.raises(Exception, match="only_bad"):
        next(it)


def test_per_host_shards(tiles):
    src = FolderSource(tiles)
    cfg = dataclasses.replace(SMALL, shuffle=False, global_batch_size=4)
    shards = [make_iterator(src, cfg, grain.sharding.ShardOptions(i, 2)) for i in range(2)]
    b0, b1 = next(shards[0]), next(shards[1])
    assert b0["global_crops"].shape[:2] == (2, 2) and b0["masks"].shape == (2, 2, 16)  # per-host batch 2
    assert not np.array_equal(b0["global_crops"], b1["global_crops"])
    with pytest.raises(ValueError, match="divisible"):
        make_iterator(src, dataclasses.replace(cfg, global_batch_size=5), grain.sharding.ShardOptions(0, 2))


def test_config_validation(tiles):
    with pytest.raises(ValueError, match="grid"):
        make_iterator(FolderSource(tiles), dataclasses.replace(SMALL, masking=MaskingConfig()))


def test_worker_processes_give_the_same_batches(tiles):
    from gpfm_jax.data.pipeline import tune_malloc

    assert tune_malloc()  # glibc here: the workers' malloc settings (run in each worker below) take
    src = FolderSource(tiles)
    ref = make_iterator(src, SMALL)
    expected = [next(ref) for _ in range(3)]
    it = make_iterator(src, dataclasses.replace(SMALL, worker_count=1))
    assert _equal(next(it), expected[0])
    state = saved_state(it)
    assert _equal(next(it), expected[1])
    again = make_iterator(src, dataclasses.replace(SMALL, worker_count=1))
    again.set_state(state)
    assert _equal(next(again), expected[1])
    for x in (it, again):
        x.close() if hasattr(x, "close") else None


def test_uint8_batches_are_the_float_batches_rounded(tiles):
    """The same pipeline with crop_dtype uint8 and float32: the same draws; normalised as the step does, the uint8
    batch is within half a grey level of the host-normalised one (0.5 / 255 / min(std) plus float rounding), and
    4x smaller."""
    import jax.numpy as jnp

    from gpfm_jax.data.normalize import normalize_batch

    src = FolderSource(tiles)
    u8 = make_iterator(src, SMALL)
    f32 = make_iterator(src, dataclasses.replace(SMALL, crop_dtype="float32"))
    bound = 0.5 / 255 / min(SMALL.multicrop.std) + 2e-6
    for _ in range(3):
        a, b = next(u8), next(f32)
        assert a["global_crops"].dtype == np.uint8 and b["global_crops"].dtype == np.float32
        assert np.array_equal(a["masks"], b["masks"]) and a["num_skipped"] == b["num_skipped"]
        dev = normalize_batch({k: jnp.asarray(v) for k, v in a.items()})
        for k in ("global_crops", "local_crops"):
            assert 4 * a[k].nbytes == b[k].nbytes
            diff = np.abs(np.asarray(dev[k]) - b[k])
            assert diff.max() <= bound, (k, diff.max())
            assert diff.max() > 1e-3  # colour ops fired: the rounding is visible, the bound is not vacuous
