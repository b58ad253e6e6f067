"""One storage module for local folders and S3 (moto's server over real HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_list_walk(root):
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"12345")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.exists(storage.join(root, "a", "b", "y.bin"))
    assert not storage.exists(storage.join(root, "a", "nope"))
    assert storage.listdir(storage.join(root, "a")) == ["b", "x.json"]
    size = len(storage.read_bytes(storage.join(root, "a", "x.json")))
    assert storage.walk_files(storage.join(root, "a")) == [("b/y.bin", 5), ("x.json", size)]
    assert storage.listdir(storage.join(root, "missing")) == []


def test_upload_download_and_cached_local_copy(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.txt").write_text("weights")
    uri = storage.join(root, "model")
    storage.upload_dir(src, uri)
    local = storage.local_copy(uri, cache_root=str(tmp_path / "cache"))
    assert (tmp_path / "cache").exists() == storage.is_s3(uri)
    assert (Path(local) / "sub" / "w.txt").read_text() == "weights"
    assert storage.local_copy(uri, cache_root=str(tmp_path / "cache")) == local  # cached


def test_delete_dir(root):
    storage.write_bytes(storage.join(root, "d", "f"), b"x")
    storage.delete_dir(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d", "f"))


def test_s3_uri_maps_to_bucket_path(s3_server):
    fs, path = storage.filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and fs.type_name == "s3"
