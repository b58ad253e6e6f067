"""Preparing a job's data: check it, then shuffle, tokenize and pack it on Ray Data into Parquet
shards under ``<storage>/datasets/<hash>/`` (the layout is in docs/data.md).

The hash covers the data (its bytes, or for big and remote files their path, size and
modification time), the tokenizer, every setting that changes the output and the layout version,
so the same inputs are a cache hit. The files are checked before anything is written; the
manifest is written last, with a create-if-absent, and is the only proof of a whole dataset: a
run that fails removes what it wrote, and a leftover without a manifest (a killed run) is removed
by the next run before it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.data.pipeline import (
    BY_HASH,
    MAX_TASK,
    MIN_TASK,
    PROBLEM,
    TRAIN,
    VALIDATION,
    Settings,
    build_dataset,
    plan_reads,
    split_hash,
)
from orchestrator.data.shards import ShardWriter
from orchestrator.data.sources import (
    MIN_PIECE,
    PROGRESS_S,
    Scan,
    Source,
    fingerprint,
    iter_examples,
    scan,
)
from orchestrator.errors import DataError, ForgeError
from orchestrator.spec import JobSpec

LAYOUT = 2
SPLITS = ("train", "validation")


@dataclass
class PreparedData:
    uri: str  # <storage>/datasets/<hash>
    manifest: dict

    def shard_uris(self, split: str) -> list[str]:
        """The split's shards ("train" or "validation"), in manifest (row) order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [storage.join(self.uri, s["path"]) for s in self.manifest[split]["shards"]]


def sources_of(spec: JobSpec) -> tuple[Source, Source | None]:
    d = spec.dataset
    train = Source.of(d.train, d.format, d.prompt_column, d.completion_column)
    val = Source.of(d.validation, d.format, d.prompt_column, d.completion_column) if d.validation else None
    return train, val


def sample_texts(spec: JobSpec, max_examples: int = 50_000) -> Iterator[str]:
    """Prompt + completion texts from the start of the training data (any format, local or
    s3://), streamed: for training a preset's tokenizer without reading a huge file whole."""
    for i, e in enumerate(iter_examples(sources_of(spec)[0])):
        if i >= max_examples:
            return
        yield e.prompt + e.completion


def dataset_key(spec: JobSpec, tokenizer_json: str, max_len: int) -> tuple[str, dict[str, Any], list[dict]]:
    """(hash, settings, sources) of the prepared dataset these inputs make."""
    train, val = sources_of(spec)
    d, t = spec.dataset, spec.training
    settings = {
        "format": train.format, "prompt_column": train.prompt_column, "completion_column": train.completion_column,
        "packing": d.packing, "rows_per_shard": d.rows_per_shard, "max_seq_length": max_len, "seed": t.seed,
        "validation": "file" if val else {"fraction": d.validation_fraction},
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        "shuffle": {"piece_bytes_min": MIN_PIECE, "task_bytes": [MIN_TASK, MAX_TASK]},
    }
    sources = [{"split": "train", **fingerprint(train.uri)}]
    if val:
        sources.append({"split": "validation", **fingerprint(val.uri)})
    keyed = [{k: v for k, v in s.items() if k != "uri" or "sha256" not in s} for s in sources]
    blob = json.dumps({"layout": LAYOUT, "settings": settings, "sources": keyed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], settings, sources


def prepare(spec: JobSpec, tokenizer, max_len: int, log=print) -> PreparedData:
    """The job's tokenized training and validation sets in storage; a cache hit if already there.

    Ray must be initialised (a local cluster or the user's). Bad data is a DataError listing the
    problems with file, line, field and code, and nothing is written.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise ForgeError(f"{type(tokenizer).__name__}: prepare needs a fast (Rust `tokenizers`) tokenizer, as "
                         "every GPT-NeoX-family model has; save the model's tokenizer.json with it")
    tokenizer_json = backend.to_str()
    digest, settings, sources = dataset_key(spec, tokenizer_json, max_len)
    uri = storage.join(storage.normalize(spec.storage), "datasets", digest)
    manifest_uri = storage.join(uri, "manifest.json")
    if storage.exists(manifest_uri):
        log(f"data: cache hit {uri}")
        return PreparedData(uri, storage.read_json(manifest_uri))

    started = time.time()
    train_src, val_src = sources_of(spec)
    scans = [(_checked(train_src, log), TRAIN if val_src else BY_HASH)]
    if val_src:
        scans.append((_checked(val_src, log), VALIDATION))
    threshold = 0 if val_src else _validation_threshold(scans[0][0], spec)
    if storage.is_dir(uri):
        log(f"data: removing an uncommitted leftover (no manifest) at {uri}")
        _remove(uri)
    plans = plan_reads(scans, spec.training.seed)
    key = settings["tokenizer_sha256"]
    run = Settings(tokenizer_json, key, max_len, spec.dataset.packing, spec.training.seed, threshold)
    log(f"data: tokenizing {sum(s.size for s, _ in scans) / 1e6:,.1f} MB on Ray Data ({len(plans)} tasks)")
    splits = _write(build_dataset(plans, run), uri, spec, max_len, plans, log)

    for entry in splits.values():
        missing = [s["path"] for s in entry["shards"] if not s["bytes"]]
        if missing:
            raise DataError(f"{uri}: shard {missing[0]} vanished before the manifest was written (another "
                            "prepare of the same data removed it?); run again")
    manifest = {"version": LAYOUT, "hash": digest, "created": time.time(), "packed": spec.dataset.packing,
                "max_seq_length": max_len, "settings": settings,
                "sources": [{**s, "examples": sc.report.summary["examples"]} for s, (sc, _) in zip(sources, scans, strict=True)],
                **splits}
    if not storage.create_exclusive(manifest_uri, (json.dumps(manifest, indent=2) + "\n").encode()):
        log(f"data: another prepare committed {uri} first; using it")
        return PreparedData(uri, storage.read_json(manifest_uri))
    log(summary(manifest, uri, time.time() - started))
    return PreparedData(uri, manifest)


def summary(manifest: dict[str, Any], uri: str, seconds: float | None = None) -> str:
    t, v = manifest["train"], manifest["validation"]
    rows = f"{'packed ' if manifest['packed'] else ''}rows of <= {manifest['max_seq_length']} tokens"
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    return (f"data: prepared {t['examples']:,} train examples as {t['rows']:,} {rows} ({t['tokens']:,} tokens, "
            f"padding {t['padding_fraction']:.1%} at full length, {len(t['shards'])} shard(s)) and "
            f"{v['examples']:,} validation examples{took} -> {uri}")


def _checked(source: Source, log) -> Scan:
    """The scan of a file without errors (else a DataError before anything is written)."""
    log(f"data: checking {source.uri}")
    s = scan(source, log)
    s.raise_for_errors()
    r = s.report
    if r.warnings:
        codes = ", ".join(f"{c} {n:,}" for c, n in sorted(r.counts.items()))
        log(f"data: {r.summary['examples']:,} examples, {r.warnings:,} warning(s) ({codes}); "
            f"forge data validate {source.uri} explains them")
    return s


def _validation_threshold(s: Scan, spec: JobSpec) -> int:
    """The hash threshold that puts ``validation_fraction`` of the examples in validation: exact
    (at least one) when every example's line was kept, else expected."""
    fraction = spec.dataset.validation_fraction
    if s.example_lines is None:
        return int(fraction * 2**64)
    n = len(s.example_lines)
    if n < 2:
        raise DataError(f"{s.source.uri}: {n} example(s): at least 2 are needed to split off a validation "
                        "set; add examples or give dataset.validation")
    hashes = split_hash(np.frombuffer(s.example_lines, dtype=np.int64), spec.training.seed)
    k = max(1, round(n * fraction))
    return int(np.partition(hashes, k - 1)[k - 1])


def _write(ds: Any, uri: str, spec: JobSpec, max_len: int, plans: list, log) -> dict[str, Any]:
    """Stream the dataset's blocks into the two splits' shards; on any failure, remove them."""
    per_shard = spec.dataset.rows_per_shard
    writers = {TRAIN: ShardWriter(uri, "train", per_shard, max_len, with_line=False),
               VALIDATION: ShardWriter(uri, "validation", per_shard, max_len, with_line=True)}
    progress = _Progress({p.index: p.size for p in plans}, writers, log)
    with _quiet_ray_data():
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
        try:
            for block in batches:
                split = block.column("split").to_numpy()
                if (split == PROBLEM).any():
                    raise DataError(_problem_message(block.column("problem").drop_null().to_pylist()))
                for code, w in writers.items():
                    w.write(_rows_of(block, split, code))
                progress.update(block.column("task").to_pylist())
            return {"train": writers[TRAIN].close(), "validation": writers[VALIDATION].close()}
        except BaseException:
            for w in writers.values():
                w.abort()
            _stop(batches)
            with contextlib.suppress(Exception):  # the first error is the one to report
                _remove(uri)
            raise
        finally:
            _stop(batches)


def _rows_of(block: Any, split: np.ndarray, code: int) -> Any:
    """The block's rows of one split: a zero-copy slice when they are contiguous (a task's
    training rows come before its validation rows), else a filtered copy."""
    at = np.flatnonzero(split == code)
    if len(at) and at[-1] - at[0] + 1 == len(at):
        return block.slice(int(at[0]), len(at))
    return block.filter(split == code)


def _problem_message(msgs: list[str]) -> str:
    if any("over max_seq_length" in m for m in msgs):
        return (f"{len(msgs)} example(s) do not fit:\n  " + "\n  ".join(msgs[:20]) +
                "\n  shorten them or raise training.max_seq_length (up to the model's context)")
    return "the data could not be read:\n  " + "\n  ".join(msgs[:20])


class _Progress:
    """A progress line every PROGRESS_S seconds: share of the input read, examples, rate."""

    def __init__(self, sizes: dict[int, int], writers: dict[int, ShardWriter], log) -> None:
        self.sizes, self.writers, self.log = sizes, writers, log
        self.total, self.done, self.seen = sum(sizes.values()), 0, set()
        self.start = self.last = time.time()

    def update(self, tasks: list[int]) -> None:
        for t in set(tasks) - self.seen:
            self.seen.add(t)
            self.done += self.sizes[t]
        now = time.time()
        if now - self.last < PROGRESS_S:
            return
        self.last = now
        n = sum(w.examples for w in self.writers.values())
        took = now - self.start
        self.log(f"data: {self.done / max(self.total, 1):.0%} of {self.total / 1e6:,.1f} MB read "
                 f"({self.done / 1e6 / took:,.1f} MB/s), {n:,} examples ({n / took:,.0f}/s), "
                 f"{self.writers[TRAIN].rows:,} train rows written")


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's own progress and execution logs off while forge prints its own (errors stay)."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stop(batches: Any) -> None:
    """End Ray Data's execution behind an iterator we stop reading early."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _remove(uri: str) -> None:
    """Delete a dataset folder that has no manifest, and any upload left unfinished in it."""
    storage.delete_dir(uri)
    if storage.is_s3(uri):
        storage.abort_multipart_uploads(uri)
