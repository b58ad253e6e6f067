"""Writing a split's rows as Parquet shards of exactly ``rows_per_shard`` rows (the last: fewer).

Rows arrive in training order; each gets its global ``row`` index. Shards and their row groups
are cut by row count alone, never by how the rows arrived, so the same rows give byte-identical
files. Memory holds at most one row group and the block being written.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.tokenize import IGNORE

ROW_GROUP = 1024  # rows per Parquet row group
LISTS = pa.list_(pa.int32())


def split_schema(with_line: bool) -> pa.Schema:
    fields = [("row", pa.int64()), ("input_ids", LISTS), ("labels", LISTS), ("position_ids", LISTS)]
    return pa.schema(fields + ([("line", pa.int64())] if with_line else []))


class ShardWriter:
    """``<dataset>/<split>/part-NNNNN.parquet`` files, counted as they are written."""

    def __init__(self, dataset_uri: str, split: str, rows_per_shard: int, max_len: int, with_line: bool):
        self.uri, self.split, self.per_shard, self.max_len = dataset_uri, split, rows_per_shard, max_len
        self.schema = split_schema(with_line)
        self.fs, _ = storage.filesystem(dataset_uri)
        self.pending: pa.Table | None = None  # rows not yet written (zero-copy slices of blocks)
        self.rows = self.examples = self.tokens = self.loss_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.sink: Any = None
        self.in_shard = 0

    def write(self, rows: pa.Table) -> None:
        """Append rows (columns input_ids, labels, position_ids, examples and, for validation, line)."""
        if not rows.num_rows:
            return
        self.examples += int(pc.sum(rows.column("examples")).as_py())
        rows = rows.select([n for n in self.schema.names if n != "row"])
        self.pending = rows if self.pending is None else pa.concat_tables([self.pending, rows])
        while self.pending.num_rows >= self._next_group():
            self._write_group(self._next_group())

    def _next_group(self) -> int:
        return min(ROW_GROUP, self.per_shard - self.in_shard)

    def _write_group(self, n: int) -> None:
        assert self.pending is not None
        group, self.pending = self.pending.slice(0, n), self.pending.slice(n)
        ids = group.column("input_ids")
        self.tokens += int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
        flat = pc.list_flatten(group.column("labels"))
        self.loss_tokens += int(pc.sum(pc.not_equal(flat, IGNORE)).as_py() or 0) if len(flat) else 0
        row = pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64))
        group = pa.Table.from_arrays([row, *group.columns], schema=self.schema)
        if self.writer is None:
            path = f"{self.split}/part-{len(self.shards):05d}.parquet"
            full = storage.filesystem(storage.join(self.uri, path))[1]
            if not storage.is_s3(self.uri):
                self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
            self.sink = self.fs.open_output_stream(full)
            self.writer = pq.ParquetWriter(self.sink, self.schema, compression="snappy",
                                           use_dictionary=["input_ids", "labels", "position_ids"])
            self.shards.append({"path": path, "rows": 0})
        self.writer.write_table(group, row_group_size=n)
        self.rows += n
        self.in_shard += n
        self.shards[-1]["rows"] += n
        if self.in_shard == self.per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.sink.close()
        self.writer = self.sink = None
        self.in_shard = 0

    def close(self) -> dict[str, Any]:
        """Flush the last rows; the split's manifest entry (shard byte sizes checked in storage)."""
        while self.pending is not None and self.pending.num_rows:
            self._write_group(min(self.pending.num_rows, self._next_group()))
        if self.writer is not None:
            self._close_shard()
        for s in self.shards:
            s["bytes"] = self.fs.get_file_info(storage.filesystem(storage.join(self.uri, s["path"]))[1]).size
        capacity = self.rows * self.max_len
        return {"rows": self.rows, "examples": self.examples, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens,
                "padding_fraction": round(1 - self.tokens / capacity, 6) if capacity else 0.0,
                "shards": self.shards}

    def abort(self) -> None:
        """Close what is open without finishing it (the dataset has no manifest: it is not used)."""
        for closer in (self.writer, self.sink):
            if closer is not None:  # already failing: the first error is the one to report
                with contextlib.suppress(Exception):
                    closer.close()
        self.writer = self.sink = None
