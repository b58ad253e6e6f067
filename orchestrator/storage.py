"""One way to reach storage, keyed by URI: a local folder or ``s3://bucket/prefix``.

Nothing else in forge knows which one a URI is. S3-compatible endpoints (moto, MinIO) are
reached through ``AWS_ENDPOINT_URL`` exactly as boto3 and the AWS CLI read it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def normalize(uri: str | os.PathLike) -> str:
    """Absolute local path or the s3:// URI unchanged (trailing slashes removed)."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *(p.strip("/") for p in parts if p)])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        kwargs: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs["region"] = region or "us-east-1"
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def listdir(uri: str) -> list[str]:
    """Names of the entries directly under ``uri`` (sorted); empty if it does not exist."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos)


def walk_files(uri: str) -> list[tuple[str, int]]:
    """Every file under ``uri`` as (relative path, size), sorted."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = [
        (i.path[len(path) :].lstrip("/"), i.size)
        for i in infos
        if i.type == pafs.FileType.File
    ]
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files appear atomically (temp file, then rename)."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's contents to ``uri`` (local or S3)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | os.PathLike) -> str:
    """Copy ``uri``'s contents into a local folder; returns the local folder."""
    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(local_dir)


def local_copy(uri: str, cache_root: str | None = None) -> str:
    """A local folder holding ``uri``: the folder itself when local, else a cached download.

    The cache key covers the URI and every object's path, size and modification time, so a
    replaced object is fetched again. A download lands in a temp folder and is renamed into
    place, so a half-finished download is never taken for a whole one.
    """
    if not is_s3(uri):
        return normalize(uri)
    import hashlib
    import shutil

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{uri}: nothing stored there")
    key = hashlib.sha256("\n".join([uri, *listing]).encode()).hexdigest()[:24]
    root = Path(cache_root or os.environ.get("FORGE_CACHE", "~/.cache/forge")).expanduser()
    dest = root / "objects" / key
    if dest.is_dir():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
    download_dir(uri, tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process on this node won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        return path, fs
    return normalize(uri), None
