"""gpfm_jax/storage.py against real object stores (the GCS and S3 emulators of tests/emulators.py) and the local
disk: the same calls give the same bytes everywhere, a missing bucket is one line before anything else runs."""

from __future__ import annotations

import pytest

from gpfm_jax import storage


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.resolve("gs://b/run/")) == "gs://b/run"
    assert str(storage.resolve("s3://b/x/y")) == "s3://b/x/y"
    assert str(storage.resolve("runs/demo")) == str(tmp_path / "runs/demo")
    assert storage.scheme("gs://b/x") == "gs" and storage.scheme("/x") == "file"
    assert storage.bucket_of("gs://bkt/a/b") == "bkt"
    assert storage.free_bytes("gs://b/x") is None and storage.free_bytes(tmp_path / "not/yet") > 0


@pytest.mark.parametrize("store", ["gcs", "s3", "local"])
def test_atomic_write_upload_download_and_copy_tree_round_trip(store, request, tmp_path):
    if store == "local":
        root = str(tmp_path / "store")
    else:
        server = request.getfixturevalue(store)
        root = server.bucket(f"rt-{store}") + "/area"
    storage.check_reachable(root)
    storage.write_text_atomic(f"{root}/a/meta.json", '{"k": 1}')
    assert storage.resolve(f"{root}/a/meta.json").read_text() == '{"k": 1}'
    payload = bytes(range(256)) * 4099  # > 1 MiB, not a multiple of any chunk size
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    storage.upload_file(src, f"{root}/a/blob.bin")
    storage.download_file(f"{root}/a/blob.bin", tmp_path / "back/blob.bin")
    assert (tmp_path / "back/blob.bin").read_bytes() == payload
    assert not list((tmp_path / "back").glob(".*tmp"))
    with storage.local_copy(f"{root}/a/blob.bin") as local:
        assert local.read_bytes() == payload
        kept = local
    assert kept.exists() == (store == "local")
    storage.copy_tree(f"{root}/a", tmp_path / "tree")
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == ["blob.bin", "meta.json"]
    assert (tmp_path / "tree/blob.bin").read_bytes() == payload


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_a_missing_bucket_is_one_line_naming_the_url(store, request):
    request.getfixturevalue(store)
    url = f"{'gs' if store == 'gcs' else 's3'}://no-such-bucket-here/run"
    with pytest.raises(storage.StorageError) as err:
        storage.check_reachable(url)
    assert url in str(err.value) and "no-such-bucket-here" in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_endpoint_is_one_line(gcs, monkeypatch):
    from emulators import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    import fsspec

    fsspec.filesystem("gs").clear_instance_cache()
    try:
        with pytest.raises(storage.StorageError) as err:
            storage.check_reachable("gs://anything/run", timeout_s=3)
        assert "gs://anything/run" in str(err.value) and "within 3 s" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        fsspec.filesystem("gs").clear_instance_cache()
