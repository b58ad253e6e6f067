"""Saving and restoring a worker's whole training state: a checkpoint out, a resume in.

Out: rank 0 writes the consolidated HF model and ``meta.json``; every rank writes its ZeRO shard,
its RNG states (JSON: nothing on this path is pickled by forge) and an index of its files with
their hashes; Ray Train uploads each rank's folder into the checkpoint; rank 0 commits the
manifest once every rank's files are stored.

In: each rank fetches only its own ZeRO files of the latest committed checkpoint, checks them
against the manifest's sha256 before DeepSpeed unpickles anything, and loads model, optimizer,
LR scheduler, step, data position and RNG.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError

ZERO_DIR, ZERO_TAG, RNG_DIR = "zero", "state", "rng"


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the micro-batches of ``epoch`` consumed."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens_seen: int = 0


# --- RNG, as JSON ----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- out ------------------------------------------------------------------------------------


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model's weights on rank 0 (None elsewhere), gathered one parameter at a time."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return None


def save_checkpoint(engine, tokenizer, job_uri: str, pos: Position, meta: dict[str, Any]) -> str:
    """Write this rank's part of the checkpoint at ``pos``, report it to Ray Train (which uploads
    it), then commit it on rank 0 once every rank's files are stored. Returns its URI."""
    import ray.train

    rank, world = dist.get_rank(), dist.get_world_size()
    name = checkpoints.checkpoint_name(pos.step)
    started, model_bytes = time.time(), 0
    with tempfile.TemporaryDirectory(prefix="forge-ckpt-") as d:
        weights = consolidated_state_dict(engine)
        if rank == 0:
            model_dir = os.path.join(d, "model")
            engine.module.config.use_cache = True  # a served model caches keys and values
            engine.module.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
            engine.module.config.use_cache = False
            tokenizer.save_pretrained(model_dir)
            with open(os.path.join(d, checkpoints.META), "w") as f:
                json.dump(meta, f, indent=2)
            model_bytes = sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir))
        del weights
        engine.save_checkpoint(os.path.join(d, ZERO_DIR), tag=ZERO_TAG, client_state={"position": asdict(pos)})
        os.makedirs(os.path.join(d, RNG_DIR), exist_ok=True)
        with open(os.path.join(d, RNG_DIR, f"rank-{rank:05d}.json"), "w") as f:
            json.dump({"position": asdict(pos), "rng": rng_state()}, f)
        checkpoints.write_rank_index(d, rank)
        metrics = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mine = [os.path.relpath(os.path.join(root, f), d) for root, _, fs in os.walk(d) for f in fs]
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        except Exception as e:
            uri = storage.join(job_uri, name)
            with contextlib.suppress(Exception):  # leave no half-finished multipart upload behind
                storage.abort_multipart_uploads(uri, keys=[storage.join(uri, rel) for rel in mine])
            raise ForgeError(f"checkpoint at step {pos.step}: storing rank {rank}'s files under {uri} failed: "
                             f"{e}; the previous checkpoint stays the latest") from e
    uri = storage.join(job_uri, name)
    dist.barrier()  # every rank's files are in storage before the manifest says so
    if rank == 0:
        # What a checkpoint costs (consolidate, save, upload, commit), for docs/benchmarks.md.
        extra = {"save_seconds": round(time.time() - started, 3), "model_bytes": model_bytes,
                 "s3_requests": storage.retry_stats()}
        try:
            checkpoints.commit(uri, pos.step, world, extra=extra)
        except ForgeError as e:
            raise ForgeError(f"checkpoint at step {pos.step}: commit of {uri} failed: {e}; "
                             "the previous checkpoint stays the latest") from e
    dist.barrier()
    return uri


# --- in -------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mine(rel: str, rank: int) -> bool:
    """This rank's files of a checkpoint's ZeRO state and RNG (shared files belong to all)."""
    base = os.path.basename(rel)
    if rel.startswith(RNG_DIR + "/"):
        return base == f"rank-{rank:05d}.json"
    if not rel.startswith(ZERO_DIR + "/"):
        return False
    owner = re.search(r"zero_pp_rank_(\d+)_", base)  # also bf16_zero_pp_rank_<r>_... optimizer files
    return owner is None or int(owner.group(1)) == rank


def fetch_rank_state(ckpt_uri: str, rank: int, world: int, dest: str) -> None:
    """Download this rank's ZeRO and RNG files into ``dest`` and check each against the manifest."""
    manifest = storage.read_json(storage.join(ckpt_uri, checkpoints.MANIFEST))
    if manifest.get("world_size") != world:
        raise ForgeError(
            f"{ckpt_uri}: written by {manifest.get('world_size')} workers, but this run has {world}; "
            "resume with the same resources.num_workers (ZeRO partitions the optimizer by worker)"
        )
    files = [f for f in manifest["files"] if _mine(f["path"], rank)]
    if not any(f["path"].startswith(RNG_DIR + "/") for f in files):
        raise ForgeError(f"{ckpt_uri}: the manifest lists no RNG state for rank {rank}")
    fs, base = storage.filesystem(ckpt_uri)
    for f in files:
        local = os.path.join(dest, f["path"])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with fs.open_input_stream(f"{base}/{f['path']}") as src, open(local, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        if os.path.getsize(local) != f["size"] or _sha256(local) != f["sha256"]:
            raise ForgeError(f"{storage.join(ckpt_uri, f['path'])}: differs from the manifest "
                             "(truncated or corrupted); not resuming from it")


def restore(engine, ckpt_uri: str) -> Position:
    """Load model, optimizer, scheduler, RNG and data position from a committed checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory(prefix="forge-resume-") as d:
        fetch_rank_state(ckpt_uri, rank, world, d)
        path, client = engine.load_checkpoint(os.path.join(d, ZERO_DIR), tag=ZERO_TAG)
        if path is None:  # DeepSpeed's way of saying it found nothing: never a silent fresh start
            raise ForgeError(f"{ckpt_uri}: DeepSpeed could not load the ZeRO state of rank {rank}")
        with open(os.path.join(d, RNG_DIR, f"rank-{rank:05d}.json")) as f:
            saved = json.load(f)
    set_rng_state(saved["rng"])
    return Position(**saved["position"])
