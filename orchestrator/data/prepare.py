"""Preparing a job's data: read, split, tokenize, and store as Parquet with a manifest.

``<storage>/datasets/<hash>/`` holds ``train.parquet``, ``validation.parquet`` and
``manifest.json``, written last; the hash covers the data, the tokenizer and the settings, so the
same inputs are a cache hit and a half-written dataset (no manifest) is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.jsonl import Example, read_examples
from orchestrator.data.tokenize import tokenize_batch
from orchestrator.errors import DataError
from orchestrator.spec import JobSpec

BATCH = 1000


@dataclass
class PreparedData:
    uri: str
    manifest: dict

    @property
    def train_uri(self) -> str:
        return storage.join(self.uri, "train.parquet")

    @property
    def validation_uri(self) -> str:
        return storage.join(self.uri, "validation.parquet")


def split_examples(spec: JobSpec) -> tuple[list[Example], list[Example]]:
    """Training and validation examples: the validation file, or a seeded split of train."""
    train = read_examples(spec.dataset.train)
    if spec.dataset.validation:
        return train, read_examples(spec.dataset.validation)
    if len(train) < 2:
        raise DataError(f"{spec.dataset.train}: need at least 2 examples to split off a validation set")
    order = list(range(len(train)))
    random.Random(spec.training.seed).shuffle(order)
    n_val = max(1, round(len(train) * spec.dataset.validation_fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]


def _table(tokenizer, examples: list[Example], max_len: int, source: str) -> tuple[pa.Table, int]:
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    too_long = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        enc = tokenize_batch(tokenizer, [e.prompt for e in chunk], [e.completion for e in chunk])
        for e, i, lab in zip(chunk, enc["input_ids"], enc["labels"], strict=True):
            if len(i) > max_len:
                too_long.append(f"{source}:{e.line}: prompt + completion is {len(i)} tokens, over max_seq_length {max_len}")
            ids.append(i)
            labels.append(lab)
    if too_long:
        shown = "\n  ".join(too_long[:20])
        raise DataError(f"{len(too_long)} example(s) do not fit:\n  {shown}\n  shorten them or raise training.max_seq_length (up to the model's context)")
    tokens = sum(len(i) for i in ids)
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(labels, pa.list_(pa.int32()))})
    return table, tokens


def _write_parquet(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def dataset_hash(spec: JobSpec, tokenizer_json: str, max_len: int) -> str:
    h = hashlib.sha256()
    for uri in (spec.dataset.train, spec.dataset.validation):
        h.update(storage.read_bytes(uri) if uri else b"-")
    h.update(tokenizer_json.encode())
    settings = {"max_len": max_len, "seed": spec.training.seed, "fraction": spec.dataset.validation_fraction, "v": 1}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare(spec: JobSpec, tokenizer, max_len: int, log=print,
            split: tuple[list[Example], list[Example]] | None = None) -> PreparedData:
    """Tokenized training and validation sets in storage (a cache hit if already prepared).

    ``split`` is ``split_examples(spec)`` when the caller already has it (read once, not twice).
    """
    digest = dataset_hash(spec, tokenizer.backend_tokenizer.to_str(), max_len)
    uri = storage.join(storage.normalize(spec.storage), "datasets", digest)
    manifest_uri = storage.join(uri, "manifest.json")
    if storage.exists(manifest_uri):
        log(f"data: cache hit {uri}")
        return PreparedData(uri, storage.read_json(manifest_uri))
    train, val = split or split_examples(spec)
    train_t, train_tokens = _table(tokenizer, train, max_len, spec.dataset.train)
    val_t, val_tokens = _table(tokenizer, val, max_len, spec.dataset.validation or spec.dataset.train)
    _write_parquet(train_t, storage.join(uri, "train.parquet"))
    _write_parquet(val_t, storage.join(uri, "validation.parquet"))
    manifest = {
        "hash": digest,
        "train": {"rows": train_t.num_rows, "tokens": train_tokens},
        "validation": {"rows": val_t.num_rows, "tokens": val_tokens},
        "max_seq_length": max_len,
    }
    storage.write_json(manifest_uri, manifest)
    log(f"data: {train_t.num_rows} train / {val_t.num_rows} validation examples, {train_tokens} train tokens -> {uri}")
    return PreparedData(uri, manifest)


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
