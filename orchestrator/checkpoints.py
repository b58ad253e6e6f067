"""Checkpoint folders in storage: complete or absent.

Layout of one checkpoint, ``<storage>/jobs/<job>/checkpoint-<step>/``::

    model/          consolidated HF model (config, safetensors, tokenizer): from_pretrained opens it
    zero/           DeepSpeed ZeRO state of every rank, for resume
    meta.json       step, epoch, tokens seen, train/eval loss, the test prompts' completions
    manifest.json   written last: every file's path, size and sha256, the step and world size

A checkpoint without ``manifest.json`` is not committed: it is never listed, chosen or served.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.errors import ForgeError

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


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


def _sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def commit(ckpt_uri: str, step: int, world_size: int) -> dict[str, Any]:
    """Write the manifest that makes ``ckpt_uri`` a checkpoint; call once every file is stored."""
    files = [
        {"path": rel, "size": size, "sha256": _sha256(storage.join(ckpt_uri, rel))}
        for rel, size in storage.walk_files(ckpt_uri)
        if rel != MANIFEST
    ]
    manifest = {"step": step, "world_size": world_size, "files": files}
    storage.write_json(storage.join(ckpt_uri, MANIFEST), manifest)
    return manifest


def is_committed(ckpt_uri: str) -> bool:
    return storage.exists(storage.join(ckpt_uri, MANIFEST))


def verify(ckpt_uri: str, hashes: bool = False) -> None:
    """Raise ForgeError naming the first missing, truncated or corrupted file of a checkpoint."""
    if not is_committed(ckpt_uri):
        raise ForgeError(f"{ckpt_uri}: not a committed checkpoint (no {MANIFEST})")
    manifest = storage.read_json(storage.join(ckpt_uri, MANIFEST))
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
