"""gpfm-index pack: tiles packed into ArrayRecord shards hold the files' exact bytes (slides: lossless PNG), give
bitwise-equal batches to reading the files (local and from the GCS emulator), resume after a SIGKILL to the same
result, are checked by `verify`; the reader opens nothing it does not read and bounds its open shards."""

import contextlib
import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpfm_jax import storage
from gpfm_jax.data import MaskingConfig, MultiCropConfig, PipelineConfig, make_iterator
from gpfm_jax.data.index import cli
from gpfm_jax.data.index import (PackedSource, SlideIndexSource, TileIndexSource, build_from_folder,
                                 build_from_slides, pack, packed, resolve)
from gpfm_jax.data.testing import SLIDE, cut_tiles, write_bad_files

REPO = Path(__file__).resolve().parents[1]
SEED = 5
SMALL = PipelineConfig(global_batch_size=4, multicrop=MultiCropConfig(global_size=28, local_size=14,
                       num_local_crops=2), masking=MaskingConfig(grid=(2, 2)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """gpfm-index in this process (the killed pack below is a real subprocess)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _batches(source, n: int = 4) -> list[dict]:
    it = make_iterator(source, SMALL, seed=SEED)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A files index over 24 real tiles in 3 slide folders plus 5 undecodable files (one of them empty)."""
    t = tmp_path_factory.mktemp("pack")
    cut_tiles(t / "tiles", n=24, size=48, subdirs=3)
    write_bad_files(t / "tiles" / "slide_1")
    return build_from_folder(t / "tiles", t / "idx")


@pytest.fixture(scope="module")
def local_pack(index, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "p"
    return Path(pack.pack(index, out, shard_records=5, workers=3))


def test_records_are_the_tile_files_bytes_in_index_order(index, local_pack):
    files = TileIndexSource(index)
    src = PackedSource(local_pack)
    assert len(src) == len(files) == 29
    for i in range(len(src)):
        assert src.read_bytes(i) == Path(files.path(i)).read_bytes(), i
    m = json.loads((local_pack / "manifest.json").read_text())
    assert [s["records"] for s in m["shards"]] == [5, 5, 5, 5, 5, 4]
    assert (m["num_records"], m["encoding"], m["empty_records"]) == (29, "original", 1)  # bad_zero.jpg
    assert (local_pack / "index" / "manifest.json").is_file()  # provenance: record i = tile i of this index
    assert TileIndexSource(local_pack / "index", files.root).path(7) == files.path(7)
    for s in m["shards"]:
        assert packed._sha256(local_pack / s["file"]) == s["sha256"]
        assert (local_pack / s["file"]).stat().st_size == s["bytes"]
    assert not (local_pack / pack.PROGRESS).exists() and not list(local_pack.glob(".gpfm-pack-*"))


def test_packed_batches_are_bitwise_equal_to_the_files(index, local_pack):
    source = resolve.tile_source(local_pack)  # what gpfm-train's data.source=index, data.path=<packed> opens
    assert isinstance(source, PackedSource)
    batches = _batches(source)
    _assert_same_batches(batches, _batches(TileIndexSource(index)))
    assert sum(int(b["num_skipped"]) for b in batches) > 0  # the bad files were substituted the same way
    offloaded = PackedSource(local_pack, index_storage="offloaded")
    _assert_same_batches(_batches(offloaded, 2), batches[:2])


def test_packed_in_gcs_bucket_reads_the_same_batches_and_verify_names_a_damaged_shard(index, local_pack, gcs):
    url = gcs.bucket("packed") + "/tiles"
    assert pack.pack(index, url, shard_records=5, workers=2) == url
    m = packed.read_manifest(url)
    assert m["shards"] == json.loads((local_pack / "manifest.json").read_text())["shards"]  # same shards, same hashes
    source = resolve.tile_source(url)
    assert isinstance(source, PackedSource) and source.folder == url
    _assert_same_batches(_batches(source, 2), _batches(TileIndexSource(index), 2))
    # a spawned grain worker reads gs://
    it = make_iterator(source, dataclasses.replace(SMALL, worker_count=1), seed=SEED)
    try:
        _assert_same_batches([next(it) for _ in range(2)], _batches(TileIndexSource(index), 2))
    finally:
        it.close() if hasattr(it, "close") else None
    clone = pickle.loads(pickle.dumps(source))  # what a grain worker receives
    assert clone.num_open() == 0 and clone.read_bytes(28) == source.read_bytes(28)

    r = _cli("verify", url)
    assert r.returncode == 0, r.stderr
    info = _cli("info", url)
    assert info.returncode == 0 and "29 records in 6 shards" in info.stdout, info.stdout + info.stderr
    blob = gcs.path(f"{url}/shard-00003.array_record")
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = _cli("verify", url)
    assert r.returncode == 1
    assert r.stdout.strip() == f"shard {url}/shard-00003.array_record: content hash differs from the manifest's " \
                               "(damaged copy?)"


def test_verify_names_missing_and_truncated_shards(local_pack, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(local_pack, copy)
    (copy / "shard-00001.array_record").unlink()
    with open(copy / "shard-00004.array_record", "r+b") as f:
        f.truncate(100)
    r = _cli("verify", str(copy))
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"missing shard: {copy}/shard-00001.array_record",
                                     f"shard {copy}/shard-00004.array_record: 100 bytes, the manifest says "
                                     f"{(local_pack / 'shard-00004.array_record').stat().st_size}"]


def test_a_killed_pack_resumes_at_the_first_unfinished_shard(index, local_pack, tmp_path):
    """Tile 17 is turned into a FIFO: the pack blocks reading it, after shards 0-2 (tiles 0-14) are done; SIGKILL
    there, put the file back, run again: it resumes at shard 3 and ends with the uninterrupted pack's folder."""
    files = TileIndexSource(index)
    tile = Path(files.path(17))
    data = tile.read_bytes()
    out = tmp_path / "p"
    tile.unlink()
    os.mkfifo(tile)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gpfm_jax.data.index", "pack", str(index), "--out", str(out),
                                 "--shard-records", "5", "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            progress = out / pack.PROGRESS
            if progress.exists() and len(json.loads(progress.read_text())["shards"]) == 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)  # blocked on the FIFO: nothing more can happen
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        tile.unlink()
        tile.write_bytes(data)
    assert not (out / "manifest.json").exists()  # not a packed index yet
    assert len(json.loads((out / pack.PROGRESS).read_text())["shards"]) == 3
    assert list(out.glob(".gpfm-pack-*"))  # the killed pack's scratch, with its half-written shard
    r = _cli("pack", str(index), "--out", str(out), "--shard-records", "5", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming after 3 finished shards (15 records)" in r.stderr
    assert "shard 2:" not in r.stderr and "shard 3: 20 of 29 tiles" in r.stderr
    got, want = _files(out), _files(local_pack)
    got_m, want_m = (json.loads(d.pop("manifest.json")) for d in (got, want))
    assert got == want  # every shard and the index copy, byte for byte
    for m in (got_m, want_m):
        m.pop("build")
    assert got_m == want_m
    r = _cli("pack", str(index), "--out", str(out), "--shard-records", "5")
    assert r.returncode == 2 and "already holds a packed index" in r.stderr
    r = _cli("pack", str(index), "--out", str(out), "--shard-records", "10", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-{k:05d}.array_record" for k in range(3)]
    _assert_same_batches(_batches(PackedSource(out), 2), _batches(PackedSource(local_pack), 2))


def test_reader_opens_only_the_shards_it_reads_and_bounds_them(local_pack):
    src = PackedSource(local_pack, index_storage="offloaded", max_open=2)
    assert len(src) == 29 and src.num_open() == 0  # the length comes from the manifest: no shard opened
    assert src.read_bytes(0) == PackedSource(local_pack).read_bytes(0)
    assert src.num_open() == 1
    src.read_bytes(27)  # last shard
    assert src.num_open() == 2 and src.locate(27) == (5, 2)
    for i in (6, 11, 16, 0):
        src.read_bytes(i)
    assert src.num_open() == 2 and src.opened == 6  # least recently used closed; shard 0 opened again
    assert len(pickle.dumps(src)) < 8000  # pickles as folder + manifest: no readers, no offsets
    assert PackedSource(local_pack).index_storage == "in_memory"  # small packs keep array_record's fast index
    with pytest.raises(IndexError):
        src.read_bytes(29)


def test_slides_index_packs_lossless_png_of_the_slide_tiles(tmp_path):
    idx = build_from_slides([str(SLIDE)], tmp_path / "idx", workers=1)
    out = Path(pack.pack(idx, tmp_path / "p", shard_records=16, workers=2))
    slides, src = SlideIndexSource(idx), PackedSource(out)
    assert len(src) == len(slides) > 20
    assert packed.read_manifest(out)["encoding"] == "png"
    assert src.read_bytes(0)[:8] == b"\x89PNG\r\n\x1a\n"
    for i in (0, len(src) // 2, len(src) - 1):
        np.testing.assert_array_equal(src[i]["image"], slides[i]["image"])


def test_s3_packs_are_written_but_reading_them_is_refused_in_one_line(index, s3, capsys):
    url = s3.bucket("packs") + "/tiles"
    notes = []
    pack.pack(index, url, shard_records=10, report=notes.append)
    assert any("array_record cannot read s3://" in n for n in notes)
    assert packed.read_manifest(url)["num_records"] == 29  # written through s3fs
    for open_it in (lambda: PackedSource(url), lambda: resolve.tile_source(url)):
        with pytest.raises(storage.StorageError) as e:
            open_it()
        assert str(e.value).count("\n") == 0 and "aws s3 sync" in str(e.value)
    r = _cli("verify", url)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"gpfm-index: error: {url}: array_record cannot read")


def test_bad_arguments_are_one_line(index, tmp_path, gcs):
    r = _cli("pack", str(tmp_path / "nope"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr
    r = _cli("pack", str(index), "--out", "gs://no-such-bucket-here/p")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no-such-bucket-here" in r.stderr
    with pytest.raises(ValueError, match="no packed index there"):
        resolve.tile_source(gcs.bucket("empty") + "/nothing")


def test_gpfm_train_reads_a_packed_folder_as_its_index(local_pack, gcs, index):
    """data.source=index with data.path = a packed folder, local or gs://: validated and opened as PackedSource."""
    from gpfm_jax.train import config as config_lib
    from gpfm_jax.train.config_schema import TrainConfig

    base = TrainConfig()
    url = gcs.bucket("train-data") + "/tiles"
    pack.pack(index, url, shard_records=10)
    for path in (str(local_pack), url):
        c = dataclasses.replace(base, teachers={t: "standin" for t in ("uni", "phikon", "conch")},
                                data=dataclasses.replace(base.data, source="index", path=path))
        config_lib.validate(c, num_devices=1)
        src = config_lib.make_source(c)
        assert isinstance(src, PackedSource) and len(src) == 29 and src.folder == path


def test_open_shards_stay_under_the_file_descriptor_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert packed.default_max_open() == 256
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(20000, hard), hard))
        assert packed.default_max_open() == min(1024, min(20000, hard) // 4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
