"""One storage module for local folders and S3 (moto's server over real HTTP)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from orchestrator import storage
from orchestrator.errors import ForgeError


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


def test_create_exclusive_lets_one_writer_win(root):
    uri = storage.join(root, "c", "manifest.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    assert storage.walk_files(storage.join(root, "c")) == [("manifest.json", 5)]  # no temp left


def test_a_missing_bucket_is_a_clear_error_naming_it(s3_server, tmp_path):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/k: writing failed: .*bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket/k", b"x")
    with pytest.raises(ForgeError, match=r"s3://no-such-bucket/k: writing failed: bucket 'no-such-bucket' does not exist"):
        storage.create_exclusive("s3://no-such-bucket/k", b"x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/d/f: uploading failed: .*bucket does not exist") as e:
        storage.upload_dir(tmp_path, "s3://no-such-bucket/d")
    assert isinstance(e.value, OSError) and "--gc" not in str(e.value)


def test_s3_bounds_come_from_the_environment_and_survive_pickling(s3_server, monkeypatch):
    monkeypatch.setenv("FORGE_S3_TIMEOUT_S", "7.5")
    monkeypatch.setenv("FORGE_S3_MAX_ATTEMPTS", "4")
    fs, _ = storage.filesystem("s3://bucket/x")
    clone = pickle.loads(pickle.dumps(fs))  # as Ray ships it to the workers
    assert isinstance(clone, pafs.S3FileSystem)
    assert clone._forge_args == fs._forge_args
    assert fs._forge_args[1] == 4 and fs._forge_args[0]["request_timeout"] == 7.5
    cfg = storage.s3_client().meta.config
    assert (cfg.read_timeout, cfg.connect_timeout, cfg.retries["total_max_attempts"]) == (7.5, 7.5, 4)
    monkeypatch.setenv("FORGE_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ForgeError, match="FORGE_S3_MAX_ATTEMPTS='many': expected a positive whole number"):
        storage.filesystem("s3://bucket/x")
    monkeypatch.setenv("FORGE_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("FORGE_S3_TIMEOUT_S", "-1")
    with pytest.raises(ForgeError, match="FORGE_S3_TIMEOUT_S='-1': expected a positive number of seconds"):
        storage.s3_client()


def test_unfinished_multipart_uploads_are_listed_and_aborted(s3_bucket):
    s3, bucket = storage.s3_client(), s3_bucket[len("s3://"):]
    for key in ["job/ckpt/a.bin", "job/ckpt/b.bin", "jobx/c.bin"]:
        s3.create_multipart_upload(Bucket=bucket, Key=key)
    job = storage.join(s3_bucket, "job")
    assert [u["key"] for u in storage.list_multipart_uploads(job)] == ["job/ckpt/a.bin", "job/ckpt/b.bin"]
    assert storage.abort_multipart_uploads(job, keys=[storage.join(job, "ckpt", "a.bin")]) == 1
    assert [u["key"] for u in storage.list_multipart_uploads(job)] == ["job/ckpt/b.bin"]
    assert storage.abort_multipart_uploads(job) == 1
    assert storage.list_multipart_uploads(job) == []
    assert [u["key"] for u in storage.list_multipart_uploads(s3_bucket)] == ["jobx/c.bin"]
    assert storage.list_multipart_uploads("/local/folder") == []


def test_newest_change_is_the_newest_file(tmp_path):
    (tmp_path / "d").mkdir()
    for name, t in [("a", 1_000_000), ("b", 2_000_000)]:
        (tmp_path / "d" / name).write_text(name)
        os.utime(tmp_path / "d" / name, (t, t))
    assert storage.newest_change(str(tmp_path / "d")) == 2_000_000
    assert storage.newest_change(str(tmp_path / "empty")) is None


def test_an_upload_stopped_on_our_side_leaves_no_truncated_object(s3_bucket, tmp_path, monkeypatch):
    """pyarrow would complete a stream that is merely closed (apache/arrow#40502)."""
    (tmp_path / "w.bin").write_bytes(b"z" * 3000)

    class FailingRead:  # the local disk fails after the first chunk went up
        def __init__(self, path, mode):
            self.path, self.mode, self.reads = path, mode, 0

        def __enter__(self):
            self.f = open(self.path, self.mode)  # noqa: SIM115 (closed in __exit__)
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise OSError("Input/output error")
            return self.f.read(n)

    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 1000)
    monkeypatch.setattr(storage, "open", FailingRead, raising=False)
    uri = storage.join(s3_bucket, "m")
    with pytest.raises(storage.StorageError, match=r"/m/w\.bin: uploading failed: Input/output error"):
        storage.upload_dir(tmp_path, uri)
    monkeypatch.undo()
    assert storage.walk_files(uri) == [] and storage.list_multipart_uploads(uri) == []
    storage.upload_dir(tmp_path, uri)
    assert storage.walk_files(uri) == [("w.bin", 3000)]
