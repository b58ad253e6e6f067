"""One way to reach storage, keyed by URI: a local folder or ``s3://bucket/prefix``.

Nothing else in forge knows which one a URI is. S3-compatible endpoints (moto, MinIO) are
reached through ``AWS_ENDPOINT_URL`` exactly as boto3 and the AWS CLI read it.

A failing store is bounded: every S3 request has a timeout (``FORGE_S3_TIMEOUT_S``) and a
bounded number of attempts (``FORGE_S3_MAX_ATTEMPTS``), after which a ``StorageError`` names the
key and the cause. pyarrow does the bulk I/O; boto3 (``s3_client``) does what pyarrow cannot:
conditional puts and multipart-upload cleanup, with its retries counted in ``retry_stats``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from orchestrator.errors import ForgeError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 5
UPLOAD_CHUNK = 8 << 20


class StorageError(ForgeError, OSError):
    """The store failed or refused a request; the message names the key and the cause. Also an
    ``OSError``, so callers that already handle I/O errors keep doing so."""


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


# --- S3 settings and clients ------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None
    region: str
    timeout_s: float
    connect_timeout_s: float
    max_attempts: int


def _env_number(name: str, default: float, kind: type) -> Any:
    raw = os.environ.get(name, "").strip() or str(default)
    with contextlib.suppress(ValueError):
        if (value := kind(raw)) > 0:
            return value
    what = "a positive whole number" if kind is int else "a positive number of seconds"
    raise ForgeError(f"{name}={raw!r}: expected {what}")


def s3_settings() -> S3Settings:
    """Endpoint, region, timeout and attempts for S3, read from the environment on each call."""
    timeout = _env_number("FORGE_S3_TIMEOUT_S", DEFAULT_TIMEOUT_S, float)
    return S3Settings(
        endpoint=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        timeout_s=timeout, connect_timeout_s=min(timeout, 10.0),
        max_attempts=_env_number("FORGE_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int),
    )


def _rebuild_s3fs(kwargs: dict[str, Any], max_attempts: int) -> BoundedS3FileSystem:
    return BoundedS3FileSystem(kwargs, max_attempts)


class BoundedS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry bound when pickled (Ray ships it to workers;
    pyarrow's own pickling drops ``retry_strategy``). Credentials are never pickled."""

    def __init__(self, kwargs: dict[str, Any], max_attempts: int) -> None:
        strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
        super().__init__(**kwargs, retry_strategy=strategy)
        self._forge_args = (dict(kwargs), max_attempts)

    def __reduce__(self):
        return (_rebuild_s3fs, self._forge_args)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(s: S3Settings) -> BoundedS3FileSystem:
    """One per settings: building one costs ~10 ms; pyarrow filesystems are thread-safe."""
    kwargs: dict[str, Any] = {
        "region": s.region,
        # On Linux the AWS SDK applies this as "less than 1 byte/s for this long": a stall.
        "request_timeout": s.timeout_s,
        "connect_timeout": s.connect_timeout_s,
        # Small objects go up in one PutObject instead of a multipart upload that can be orphaned.
        "allow_delayed_open": True,
    }
    if s.endpoint:
        kwargs["endpoint_override"] = s.endpoint
        if s.endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    return BoundedS3FileSystem(kwargs, s.max_attempts)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(s3_settings()), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


_stats_lock = threading.Lock()
_stats: Counter[str] = Counter()


def _count(*names: str) -> None:
    with _stats_lock:
        _stats.update(names)


def _count_attempt(context: dict[str, Any], response_dict: dict | None, exception: Exception | None,
                   **_: Any) -> None:
    status = str(response_dict["status_code"]) if response_dict else type(exception).__name__
    retry = ("retries",) if context.get("retries", {}).get("attempt", 1) > 1 else ()
    _count("attempts", f"status:{status}", *retry)


def retry_stats() -> dict[str, Any]:
    """This process's S3 requests so far: boto3 attempts, retries and attempts by HTTP status (or
    exception name), and storage calls that failed for good. pyarrow's own retries (the bulk
    I/O) are bounded but happen inside Arrow, out of sight: not counted."""
    with _stats_lock:
        out: dict[str, Any] = {k: _stats[k] for k in ("attempts", "retries", "failures")}
        out["by_status"] = {k[7:]: n for k, n in _stats.items() if k.startswith("status:")}
    return out


@functools.lru_cache(maxsize=8)
def _client_for(s: S3Settings):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=s.region,
        connect_timeout=s.connect_timeout_s,
        read_timeout=s.timeout_s,
        # total_max_attempts counts the first try, as pyarrow's max_attempts does.
        retries={"mode": "standard", "total_max_attempts": s.max_attempts},
    )
    client = boto3.session.Session().client("s3", endpoint_url=s.endpoint, config=config)
    client.meta.events.register("response-received.s3", _count_attempt)
    return client


def s3_client():
    """The shared boto3 S3 client for the current settings (bounded timeouts and retries)."""
    return _client_for(s3_settings())


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    return bucket, key.strip("/")


# --- errors a user can act on -----------------------------------------------------------------


def _boto_error(uri: str, action: str, e: Exception) -> StorageError:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    s = s3_settings()
    _count("failures")
    if isinstance(e, ClientError):
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        status, code = meta.get("HTTPStatusCode"), err.get("Code", "")
        tries = meta.get("RetryAttempts", 0) + 1
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            why = f"access denied ({code}): check the AWS credentials and the bucket's policy"
        elif code == "NoSuchBucket":
            why = f"bucket {_bucket_key(uri)[0]!r} does not exist at {s.endpoint or 'AWS S3'}"
        else:
            why = f"the store answered {status} {code} ({err.get('Message', '')}) on {tries} attempt(s)"
        return StorageError(f"{uri}: {action} failed: {why}")
    if not isinstance(e, (BotoConnectionError, HTTPClientError)):  # e.g. no credentials
        return StorageError(f"{uri}: {action} failed: {e}")
    return StorageError(
        f"{uri}: {action} failed: no answer from {s.endpoint or 'S3'} within {s.timeout_s:g} s "
        f"on {s.max_attempts} attempt(s) ({e}); FORGE_S3_TIMEOUT_S and FORGE_S3_MAX_ATTEMPTS "
        "set the bounds"
    )


@contextlib.contextmanager
def _store_errors(uri: str, action: str) -> Iterator[None]:
    """Turn an S3 failure inside the block into a StorageError naming ``uri`` and the cause."""
    if not is_s3(uri):
        yield
        return
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except (ClientError, BotoCoreError) as e:
        raise _boto_error(uri, action, e) from e
    except OSError as e:  # pyarrow: its own retries are spent
        s, hint = s3_settings(), ""
        _count("failures")
        if "curlCode: 28" in str(e):
            hint = (f" (no answer within {s.timeout_s:g} s on {s.max_attempts} attempt(s); "
                    "FORGE_S3_TIMEOUT_S and FORGE_S3_MAX_ATTEMPTS set the bounds)")
        elif "curlCode: 7" in str(e):
            hint = f" (nothing listens at {s.endpoint or 'the S3 endpoint'})"
        raise StorageError(f"{uri}: {action} failed: {e}{hint}") from e


# --- reading and writing ----------------------------------------------------------------------


def _type(uri: str) -> pafs.FileType:
    with _store_errors(uri, "checking"):
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type


def exists(uri: str) -> bool:
    return _type(uri) != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _type(uri) == pafs.FileType.Directory


def listdir(uri: str) -> list[str]:
    """Names of the entries directly under ``uri`` (sorted); empty if it does not exist."""
    if not is_dir(uri):
        return []
    with _store_errors(uri, "listing"):
        fs, path = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos)


def _file_infos(uri: str) -> tuple[str, list[pafs.FileInfo]]:
    with _store_errors(uri, "listing"):
        fs, path = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return path, [i for i in infos if i.type == pafs.FileType.File]


def walk_files(uri: str) -> list[tuple[str, int]]:
    """Every file under ``uri`` as (relative path, size), sorted."""
    path, infos = _file_infos(uri)
    return sorted((i.path[len(path) :].lstrip("/"), i.size) for i in infos)


def newest_change(uri: str) -> float | None:
    """Unix time of the newest file under ``uri``; None when there is none."""
    _, infos = _file_infos(uri)
    times = [i.mtime_ns / 1e9 for i in infos if i.mtime_ns is not None]
    return max(times) if times else None


def read_bytes(uri: str) -> bytes:
    with _store_errors(uri, "reading"):
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files appear atomically (temp file, then rename); an S3 object
    appears whole or not at all, and a failed upload is aborted where the store still answers."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with (_aborting_on_failure(uri.rsplit("/", 1)[0], [uri]), _store_errors(uri, "writing"),
              fs.open_output_stream(path) as f):
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``uri`` only if nothing is there yet; False if something is (one writer wins).

    S3: a conditional ``PutObject`` with ``If-None-Match: *`` (412 for the loser). Local: a
    complete temp file hard-linked into place, which fails if the name exists.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        with _store_errors(uri, "writing"):
            for _ in range(s3_settings().max_attempts):
                try:
                    s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                    return True
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status == 412:
                        return False
                    if status != 409:  # 409: a concurrent conditional write; S3 asks to retry
                        raise _boto_error(uri, "writing", e) from e
        raise StorageError(f"{uri}: writing failed: concurrent writers kept conflicting (409)")
    path = normalize(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def makedirs(uri: str) -> None:
    with _store_errors(uri, "creating"):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)


def delete_dir(uri: str) -> None:
    with _store_errors(uri, "deleting"):
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def _upload_file(fs: pafs.FileSystem, src: Path, path: str) -> None:
    out = fs.open_output_stream(path)
    writing = False
    try:
        with open(src, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                writing = True
                out.write(chunk)
                writing = False
    except OSError:
        if not writing:
            _discard(fs, out, path)
        raise  # else the store failed: pyarrow's stream is broken and will not complete
    except BaseException:
        _discard(fs, out, path)
        raise
    out.close()


def _discard(fs: pafs.FileSystem, out: Any, path: str) -> None:
    """Stopped on our side: pyarrow cannot abort a stream, and closing it (as its destructor
    would) stores what was written so far (apache/arrow#40502), so close it and delete that."""
    with contextlib.suppress(OSError):
        out.close()
        fs.delete_file(path)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder's contents to ``uri`` (local or S3); a failure raises, never passes
    silently, and a failed S3 upload leaves no object behind it and is aborted where the store
    still answers."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        return
    # Not pafs.copy_files: on S3 it can drop a failed part upload's error and return as if the
    # file were stored (pyarrow 26, seen with a stalled store).
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    keys = [join(uri, p.relative_to(local_dir).as_posix()) for p in files]
    with _aborting_on_failure(uri, keys):
        for src, key in zip(files, keys, strict=True):
            with _store_errors(key, "uploading"):
                _upload_file(fs, src, f"{path}/{src.relative_to(local_dir).as_posix()}")


def download_dir(uri: str, local_dir: str | os.PathLike) -> str:
    """Copy ``uri``'s contents into a local folder; returns the local folder."""
    with _store_errors(uri, "downloading"):
        fs, path = filesystem(uri)
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(path, str(local_dir), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
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

    _, infos = _file_infos(uri)
    listing = sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos)
    if not listing:
        raise FileNotFoundError(f"{uri}: nothing stored there")
    key = hashlib.sha256("\n".join([uri, *listing]).encode()).hexdigest()[:24]
    root = Path(cache_root or os.environ.get("FORGE_CACHE", "~/.cache/forge")).expanduser()
    dest = root / "objects" / key
    if dest.is_dir():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
    try:
        download_dir(uri, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


# --- multipart uploads: never left behind -----------------------------------------------------


def list_multipart_uploads(uri_prefix: str) -> list[dict[str, Any]]:
    """In-progress multipart uploads under ``uri_prefix``: uri, key, upload_id, initiated (Unix
    time). Always empty for local storage."""
    if not is_s3(uri_prefix):
        return []
    from botocore.exceptions import ClientError

    bucket, prefix = _bucket_key(uri_prefix)
    out = []
    with _store_errors(uri_prefix, "listing multipart uploads"):
        pages = s3_client().get_paginator("list_multipart_uploads")
        try:
            for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
                for u in page.get("Uploads", []):
                    out.append({"uri": f"s3://{bucket}/{u['Key']}", "key": u["Key"],
                                "upload_id": u["UploadId"], "initiated": u["Initiated"].timestamp()})
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise
    return sorted(out, key=lambda u: (u["key"], u["initiated"]))


def abort_multipart_uploads(uri_prefix: str, keys: Iterable[str] | None = None,
                            older_than_s: float | None = None) -> int:
    """Abort in-progress multipart uploads under ``uri_prefix`` (only those of ``keys``, given
    as URIs, and only those started over ``older_than_s`` ago, when given); returns how many."""
    wanted = None if keys is None else {_bucket_key(k)[1] for k in keys}
    bucket, now, n = _bucket_key(uri_prefix)[0], time.time(), 0
    for u in list_multipart_uploads(uri_prefix):
        if wanted is not None and u["key"] not in wanted:
            continue
        if older_than_s is not None and now - u["initiated"] < older_than_s:
            continue
        with _store_errors(u["uri"], "aborting a multipart upload"):
            try:
                s3_client().abort_multipart_upload(Bucket=bucket, Key=u["key"], UploadId=u["upload_id"])
            except Exception as e:
                if getattr(e, "response", {}).get("Error", {}).get("Code") != "NoSuchUpload":
                    raise
        n += 1
    return n


@contextlib.contextmanager
def _aborting_on_failure(uri_prefix: str, keys: list[str]) -> Iterator[None]:
    """On failure, abort the multipart uploads of ``keys`` under ``uri_prefix``; if the store does
    not answer, say how to remove them later instead of hiding the first error."""
    try:
        yield
    except Exception as e:
        try:
            abort_multipart_uploads(uri_prefix, keys)
        except ForgeError:
            note = (" An unfinished upload may remain in the store: `forge checkpoints JOB --gc` "
                    "lists and removes it.")
            if isinstance(e, StorageError):
                raise StorageError(str(e) + note) from e.__cause__
        raise
