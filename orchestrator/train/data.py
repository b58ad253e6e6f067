"""The training side of a prepared dataset: each worker's rows, its batches, the validation set.

Every rank streams an equal, contiguous slice of the prepared rows (by the ``row`` column)
through Ray Train's dataset shards, with Ray Data's order preserved and a seeded local shuffle.
So the batches a rank sees are a function of the data, the world size, the seed and the epoch
alone: a restarted or resumed run replays them exactly, and a reference loop can too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from orchestrator import storage
from orchestrator.data.tokenize import IGNORE

COLUMNS = ["input_ids", "labels", "position_ids"]


@dataclass(frozen=True)
class Shard:
    uri: str
    first_row: int
    rows: int


def read_shard(uri: str, columns: list[str]) -> pa.Table:
    """Those columns of one prepared Parquet shard (one storage read, local or s3://)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def shards_of(prepared_uri: str, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The split's Parquet shards with the global index of each one's first row."""
    out, start = [], 0
    for s in manifest[split]["shards"]:
        out.append(Shard(storage.join(prepared_uri, s["path"]), start, int(s["rows"])))
        start += int(s["rows"])
    return out


def rows_per_rank(shards: list[Shard], world: int) -> int:
    return sum(s.rows for s in shards) // world


def rank_dataset(shards: list[Shard], rank: int, world: int, in_object_store: bool = False):
    """Rank ``rank``'s rows [rank*n, (rank+1)*n) as a Ray Dataset, in order.

    ``in_object_store``: read the slice here with pyarrow and hand it to Ray's object store
    (``from_blocks``: block metadata computed here, so no task needs a free CPU; fast for data
    that is small next to the cluster's memory). Otherwise a lazy ``read_parquet`` that streams the slice from storage each epoch.
    """
    import ray.data
    from ray.data.expressions import col

    n = rows_per_rank(shards, world)
    lo, hi = rank * n, (rank + 1) * n
    mine = [s for s in shards if s.first_row < hi and s.first_row + s.rows > lo]
    if in_object_store:
        tables = []
        for s in mine:
            table = read_shard(s.uri, ["row", *COLUMNS])
            start = max(lo - s.first_row, 0)
            tables.append(table.slice(start, min(hi - s.first_row, s.rows) - start))
        return ray.data.from_blocks(tables)
    fs, _ = storage.filesystem(mine[0].uri)
    paths = [storage.filesystem(s.uri)[1] for s in mine]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["row", *COLUMNS])
    return ds.filter(expr=(col("row") >= lo) & (col("row") < hi))


class RankSlices(DataConfig):
    """Ray Train's DataConfig for forge's prepared datasets: each worker gets its own slice
    (``rank_dataset``) instead of a dynamic streaming split, with Ray Data's order preserved."""

    def __init__(self, shards: list[Shard], in_object_store: bool = False) -> None:
        super().__init__(datasets_to_split="all", enable_shard_locality=False)
        self.shards = shards
        self.in_object_store = in_object_store

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out = []
        for rank in range(world_size):
            ds = rank_dataset(self.shards, rank, world_size, self.in_object_store)
            ds.context.execution_options = self._resolve_execution_options("train")
            ds.context.execution_options.preserve_order = True
            out.append({name: ds.iterator() for name in datasets})
        return out


def collate(input_ids: list, labels: list, position_ids: list, pad_id: int, multiple_of: int = 8) -> dict[str, Any]:
    """Right-pad rows to the batch's longest (rounded up to ``multiple_of``) as torch tensors.

    ``num_tokens`` counts the real (unpadded) tokens. No attention mask is returned on purpose: transformers builds a block-diagonal causal mask
    from position ids that restart at 0, so packed examples never see each other. Padding gets
    label IGNORE and its own run of positions (a separate block), so it changes nothing.
    """
    import torch

    longest = max(len(r) for r in input_ids)
    width = -(-longest // multiple_of) * multiple_of
    n = len(input_ids)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    lab = np.full((n, width), IGNORE, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for i, (a, b, c) in enumerate(zip(input_ids, labels, position_ids, strict=True)):
        k = len(a)
        ids[i, :k], lab[i, :k], pos[i, :k] = a, b, c
        pos[i, k:] = np.arange(width - k)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
            "position_ids": torch.from_numpy(pos), "num_tokens": torch.tensor(sum(len(r) for r in input_ids))}


class PackedCollate(NumpyBatchCollateFn):
    """Ray Data collate function for ``iter_torch_batches`` (see ``collate``)."""

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return collate(batch["input_ids"], batch["labels"], batch["position_ids"], self.pad_id)


def epoch_batches(shard, micro_batch_size: int, pad_id: int, seed: int, epoch: int, rank: int):
    """One epoch of a rank's micro-batches, in the order every run of the same job sees them."""
    return shard.iter_torch_batches(
        batch_size=micro_batch_size,
        collate_fn=PackedCollate(pad_id),
        drop_last=True,
        local_shuffle_buffer_size=max(64, 8 * micro_batch_size),
        local_shuffle_seed=(seed * 1_000_003 + epoch * 1009 + rank) % 2**31,
    )


def is_classification(rows: list[dict[str, Any]], max_classes: int = 50) -> bool:
    """Whether validation completions look like class labels: few distinct ones, each repeated."""
    labels = {tuple(t for t in r["labels"] if t != IGNORE) for r in rows}
    return 1 < len(labels) <= max_classes and 2 * len(labels) <= len(rows)


def read_validation(shards: list[Shard], rank: int, world: int, max_examples: int) -> list[dict[str, Any]]:
    """This rank's share (every world-th row) of the first ``max_examples`` validation rows."""
    rows: list[dict[str, Any]] = []
    for s in shards:
        if len(rows) >= max_examples:
            break
        table = read_shard(s.uri, COLUMNS)
        rows.extend(table.slice(0, max_examples - len(rows)).to_pylist())
    return rows[rank::world]
