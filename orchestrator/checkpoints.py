"""Checkpoint folders in storage: complete or absent.

Layout of one checkpoint, ``<storage>/jobs/<job>/checkpoint-<step>/``::

    model/          consolidated HF model (config, safetensors, tokenizer): from_pretrained opens it
    zero/           DeepSpeed ZeRO state of every rank, for resume
    meta.json       step, epoch, tokens seen, train/eval loss, the test prompts' completions
    .forge/files-rank-<r>.json   each rank's files with size and sha256, hashed before upload
    manifest.json   written last, by one committer: every file's path, size, sha256 and rank,
                    the step, the world size, the creation time

A checkpoint without ``manifest.json`` is not committed: it is never listed, chosen, resumed from
or served. S3 has no rename, so the manifest's conditional put is the commit: one writer wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.errors import ForgeError

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
META = "meta.json"
INDEX_DIR = ".forge"
FORMAT = 2  # manifests with per-rank indexes; format 1 had no rank field


class CommitConflict(ForgeError):
    """Another writer committed this checkpoint first; this attempt's manifest was refused."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def rank_index_path(rank: int) -> str:
    """Where rank ``rank``'s file index lives, relative to the checkpoint folder."""
    return f"{INDEX_DIR}/files-rank-{rank:05d}.json"


@dataclass
class CheckpointInfo:
    uri: str
    name: str
    step: int
    meta: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # 1-based position among the job's committed checkpoints

    @property
    def model_uri(self) -> str:
        return storage.join(self.uri, "model")


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 22):
        h.update(chunk)
    return h.hexdigest()


def _sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    with storage._store_errors(uri, "reading"), fs.open_input_stream(path) as f:
        return _sha256_stream(f)


def write_rank_index(local_dir: str | os.PathLike, rank: int) -> None:
    """Before upload: list every file of this rank's folder with its size and sha256, hashed
    here, so the commit never downloads a byte to check what was stored."""
    root = Path(local_dir)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(INDEX_DIR + "/"):
            with open(p, "rb") as f:
                files.append({"path": rel, "size": p.stat().st_size, "sha256": _sha256_stream(f)})
    out = root / rank_index_path(rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "files": files}, indent=1) + "\n")


def _read_rank_indexes(ckpt_uri: str, world_size: int) -> list[tuple[bytes, dict[str, Any]]]:
    keys = [storage.join(ckpt_uri, rank_index_path(r)) for r in range(world_size)]

    def read(key: str) -> bytes | None:
        try:
            return storage.read_bytes(key)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=min(16, world_size)) as pool:
        raws = list(pool.map(read, keys))
    missing = [k for k, raw in zip(keys, raws, strict=True) if raw is None]
    if missing:
        raise ForgeError(f"{ckpt_uri}: cannot commit: {len(missing)} of {world_size} ranks' file "
                         f"indexes are not in storage: {_some(missing)}")
    out = []
    for r, (key, raw) in enumerate(zip(keys, raws, strict=True)):
        try:
            index = json.loads(raw)
        except ValueError:
            index = None
        if not (isinstance(index, dict) and index.get("rank") == r
                and isinstance(index.get("files"), list)
                and all(isinstance(f, dict) and isinstance(f.get("path"), str)
                        and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
                        for f in index["files"])):
            raise ForgeError(f"{key}: not a rank index for rank {r} (expected JSON with "
                             '"rank" and "files": [{"path", "size", "sha256"}])')
        out.append((raw, index))
    return out


def _some(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def commit(ckpt_uri: str, step: int, world_size: int,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make ``ckpt_uri`` a checkpoint, once every rank's files are stored: check them against
    the ranks' indexes by listing (no downloads), then write the manifest. One committer wins:
    a second one gets ``CommitConflict``."""
    if world_size < 1:
        raise ForgeError(f"{ckpt_uri}: world size {world_size}: expected at least 1")
    files: dict[str, dict[str, Any]] = {}
    for r, (raw, index) in enumerate(_read_rank_indexes(ckpt_uri, world_size)):
        files[rank_index_path(r)] = {"path": rank_index_path(r), "size": len(raw),
                                     "sha256": hashlib.sha256(raw).hexdigest(), "rank": r}
        for f in index["files"]:
            seen = files.setdefault(f["path"], {**f, "rank": r})
            if seen["sha256"] != f["sha256"]:
                raise ForgeError(f"{storage.join(ckpt_uri, f['path'])}: written by ranks "
                                 f"{seen['rank']} and {r} with different contents")
    present = dict(storage.walk_files(ckpt_uri))
    missing = [storage.join(ckpt_uri, p) for p in files if p not in present]
    if missing:
        raise ForgeError(f"{ckpt_uri}: cannot commit: {len(missing)} indexed file(s) are not "
                         f"in storage: {_some(missing)}")
    wrong = [f"{storage.join(ckpt_uri, p)} ({present[p]} bytes, expected {f['size']})"
             for p, f in files.items() if present[p] != f["size"]]
    if wrong:
        raise ForgeError(f"{ckpt_uri}: cannot commit: stored size differs from the rank's "
                         f"index: {_some(wrong)}")
    manifest = {
        "format": FORMAT, "step": step, "world_size": world_size,
        "created": time.time(), "attempt": uuid.uuid4().hex, "extra": dict(extra or {}),
        "files": sorted(files.values(), key=lambda f: f["path"]),
    }
    key = storage.join(ckpt_uri, MANIFEST)
    if storage.create_exclusive(key, (json.dumps(manifest, indent=1) + "\n").encode()):
        return manifest
    theirs = storage.read_json(key)
    if theirs.get("attempt") == manifest["attempt"]:
        return theirs  # our own put landed and its reply was lost; the retry found it
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(theirs.get("created", 0)))
    raise CommitConflict(f"{key}: already committed (step {theirs.get('step')}, "
                         f"{when} UTC) by another attempt; this attempt's commit was refused")


def is_committed(ckpt_uri: str) -> bool:
    return storage.exists(storage.join(ckpt_uri, MANIFEST))


def _check_ranks(ckpt_uri: str, manifest: dict[str, Any]) -> None:
    world = manifest.get("world_size")
    expected = set(range(world)) if isinstance(world, int) and world > 0 else set()
    indexed = {f.get("rank") for f in manifest["files"]
               if f["path"].startswith(INDEX_DIR + "/files-rank-")}
    if indexed != expected:
        lacking = [storage.join(ckpt_uri, rank_index_path(r)) for r in sorted(expected - indexed)]
        raise ForgeError(
            f"{storage.join(ckpt_uri, MANIFEST)}: world size {world} but rank indexes for "
            f"{len(indexed)} rank(s)" + (f"; missing: {_some(lacking)}" if lacking else "")
        )
    zero = {f.get("rank") for f in manifest["files"] if f["path"].startswith("zero/")}
    if zero and zero != expected:
        lacking = sorted(expected - zero)
        raise ForgeError(f"{storage.join(ckpt_uri, 'zero')}: ZeRO state of {len(zero)} rank(s) "
                         f"for world size {world}; no files from rank(s) {lacking}")


def verify(ckpt_uri: str, hashes: bool = False, world_size: int | None = None) -> None:
    """Raise ForgeError naming the first missing, truncated or corrupted file of a checkpoint,
    or a rank count that is not its world size (or ``world_size``, when given)."""
    if not is_committed(ckpt_uri):
        raise ForgeError(f"{ckpt_uri}: not a committed checkpoint (no {MANIFEST})")
    manifest = storage.read_json(storage.join(ckpt_uri, MANIFEST))
    if world_size is not None and manifest.get("world_size") != world_size:
        raise ForgeError(f"{storage.join(ckpt_uri, MANIFEST)}: written by "
                         f"{manifest.get('world_size')} ranks, expected {world_size}")
    if manifest.get("format", 1) >= FORMAT:
        _check_ranks(ckpt_uri, manifest)
    present = dict(storage.walk_files(ckpt_uri))
    for f in manifest["files"]:
        key = storage.join(ckpt_uri, f["path"])
        if f["path"] not in present:
            raise ForgeError(f"{key}: listed in the manifest but missing")
        if present[f["path"]] != f["size"]:
            raise ForgeError(f"{key}: size {present[f['path']]} differs from the manifest's {f['size']}")
        if hashes and _sha256(key) != f["sha256"]:
            raise ForgeError(f"{key}: sha256 differs from the manifest")


def list_checkpoints(job_uri: str) -> list[CheckpointInfo]:
    """The job's committed checkpoints, oldest first."""
    out = []
    for name in storage.listdir(job_uri):
        if not name.startswith(PREFIX):
            continue
        uri = storage.join(job_uri, name)
        if not is_committed(uri):
            continue
        meta = storage.read_json(storage.join(uri, META)) if storage.exists(storage.join(uri, META)) else {}
        out.append(CheckpointInfo(uri=uri, name=name, step=int(name[len(PREFIX):]), meta=meta))
    out.sort(key=lambda c: c.step)
    for i, c in enumerate(out, 1):
        c.index = i
    return out


def best_checkpoint(ckpts: list[CheckpointInfo], metric: str = "eval_loss") -> CheckpointInfo:
    """Lowest eval loss, or highest eval_accuracy / test_accuracy (ties: lower eval loss, then the
    earlier checkpoint); falls back to eval loss, then the latest, where the metric is missing."""
    if not ckpts:
        raise ForgeError("no committed checkpoints")
    if metric in ("eval_accuracy", "test_accuracy"):
        scored = [c for c in ckpts if c.meta.get(metric) is not None]
        if scored:
            return max(scored, key=lambda c: (c.meta[metric], -(c.meta.get("eval_loss") or 0.0), -c.step))
    scored = [c for c in ckpts if c.meta.get("eval_loss") is not None]
    if not scored:
        return ckpts[-1]
    return min(scored, key=lambda c: (c.meta["eval_loss"], c.step))


def job_best_metric(job_uri: str) -> str:
    rec = storage.join(job_uri, "job.json")
    if storage.exists(rec):
        return storage.read_json(rec).get("spec", {}).get("checkpoints", {}).get("best_metric", "eval_loss")
    return "eval_loss"


def resolve(path: str, which: str = "best") -> CheckpointInfo:
    """A checkpoint from a job folder (``which``: best, latest, a 1-based index or a name) or a
    checkpoint folder itself."""
    uri = storage.normalize(path)
    if storage.exists(storage.join(uri, MANIFEST)):
        meta_uri = storage.join(uri, META)
        meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        step = int(meta.get("step", 0))
        return CheckpointInfo(uri=uri, name=name, step=step, meta=meta, index=0)
    if not storage.is_dir(uri):
        raise ForgeError(f"{path}: no such job or checkpoint folder")
    ckpts = list_checkpoints(uri)
    if not ckpts:
        pending = [n for n in storage.listdir(uri) if n.startswith(PREFIX)]
        hint = f" ({len(pending)} uncommitted)" if pending else ""
        raise ForgeError(f"{path}: no committed checkpoints{hint}")
    which = str(which)
    if which == "best":
        return best_checkpoint(ckpts, job_best_metric(uri))
    if which == "latest":
        return ckpts[-1]
    if which.isdigit():
        k = int(which)
        if not 1 <= k <= len(ckpts):
            raise ForgeError(f"--checkpoint {k}: the job has checkpoints 1 to {len(ckpts)}")
        return ckpts[k - 1]
    for c in ckpts:
        if c.name == which:
            return c
    names = ", ".join(c.name for c in ckpts)
    raise ForgeError(f"--checkpoint {which!r}: expected best, latest, 1-{len(ckpts)} or one of {names}")


def latest_committed(job_uri: str) -> CheckpointInfo | None:
    """The job's newest committed checkpoint (what a resume starts from), or None."""
    ckpts = list_checkpoints(job_uri)
    return ckpts[-1] if ckpts else None


def uncommitted(job_uri: str) -> list[str]:
    """Checkpoint folders without a manifest: abandoned attempts, or one being written now."""
    return [storage.join(job_uri, n) for n in storage.listdir(job_uri)
            if n.startswith(PREFIX) and not is_committed(storage.join(job_uri, n))]


def remove_uncommitted(job_uri: str, keep_newer_than_s: float = 3600.0) -> list[str]:
    """Delete uncommitted checkpoint folders whose newest file is older than
    ``keep_newer_than_s`` (so a checkpoint being uploaded now survives); returns their URIs."""
    removed = []
    for uri in uncommitted(job_uri):
        newest = storage.newest_change(uri)
        if newest is None or time.time() - newest >= keep_newer_than_s:
            storage.delete_dir(uri)
            removed.append(uri)
    return removed


def find_garbage(job_uri: str, keep_newer_than_s: float = 3600.0
                 ) -> tuple[list[tuple[str, float]], list[dict[str, Any]]]:
    """What ``remove_uncommitted`` and ``storage.abort_multipart_uploads`` would remove: the
    uncommitted attempts as (uri, seconds since last written) and the unfinished multipart
    uploads under the job, each older than ``keep_newer_than_s``."""
    now = time.time()
    attempts = [(u, now - (storage.newest_change(u) or 0.0)) for u in uncommitted(job_uri)]
    uploads = [u for u in storage.list_multipart_uploads(job_uri)
               if now - u["initiated"] >= keep_newer_than_s]
    return [(u, age) for u, age in attempts if age >= keep_newer_than_s], uploads
