"""prepare's Ray Data pipeline: read pieces -> shuffle -> split -> tokenize -> pack, in parallel.

The shuffle is global in what it mixes and bounded in memory: the file's pieces (``sources.Piece``,
64 KiB or more) are permuted with the seed and dealt out to read tasks of a few MiB, so each task
holds pieces from all over the file; a task then shuffles its own examples (seeded by the task's
index) before it splits off validation examples, tokenizes and packs. No all-to-all exchange and
no task holds more than its own few MiB, yet a class-sorted file trains mixed. The output depends
only on the inputs and settings (never on the cluster's size or timing): tasks are planned from
the file alone, and Ray Data's order is preserved.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data.pack import best_fit, gather_rows
from orchestrator.data.sources import EXAMPLES, Piece, Scan, Source, read_piece_table
from orchestrator.data.tokenize import encode_examples
from orchestrator.errors import DataError

TRAIN, VALIDATION, PROBLEM, BY_HASH = 0, 1, -1, -2
MIN_TASK, MAX_TASK = 1 << 20, 8 << 20  # bytes of input per read task
TASK_CPUS = 0.5  # two tasks per core: one tokenizes while the other is between tasks
LISTS = pa.list_(pa.int32())
SCHEMA = pa.schema([("task", pa.int32()), ("split", pa.int8()), ("line", pa.int64()), ("examples", pa.int32()),
                    ("input_ids", LISTS), ("labels", LISTS), ("position_ids", LISTS), ("problem", pa.string())])


@dataclass(frozen=True)
class ReadPlan:
    """One read task: its pieces of one source, and which split their examples go to."""

    index: int
    source: Source
    split: int  # TRAIN, VALIDATION, or BY_HASH (validation_fraction of train)
    pieces: tuple[Piece, ...]
    columns: tuple[int, int] | None

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


@dataclass(frozen=True)
class Settings:
    """What every block is processed with (shipped to the workers once)."""

    tokenizer_json: str
    tokenizer_key: str
    max_len: int
    packing: bool
    seed: int
    threshold: int  # BY_HASH: a line's hash at or below it goes to validation


def task_bytes(size: int) -> int:
    """Input bytes per read task: about 32 tasks for a small file, at most MAX_TASK each."""
    return min(MAX_TASK, max(MIN_TASK, size // 32))


def plan_reads(scans: list[tuple[Scan, int]], seed: int) -> list[ReadPlan]:
    """Read tasks for each (scan, split): its pieces in a seeded order, dealt into tasks."""
    plans: list[ReadPlan] = []
    for k, (s, split) in enumerate(scans):
        order = np.random.default_rng([seed, k]).permutation(len(s.pieces)).tolist()
        limit, group, size = task_bytes(s.size), [], 0
        for i in order:
            group.append(s.pieces[i])
            size += s.pieces[i].size
            if size >= limit:
                plans.append(ReadPlan(len(plans), s.source, split, tuple(group), s.columns))
                group, size = [], 0
        if group:
            plans.append(ReadPlan(len(plans), s.source, split, tuple(group), s.columns))
    return plans


def split_hash(lines: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit hash of each line number with the seed (splitmix64): which lines are validation."""
    with np.errstate(over="ignore"):
        x = lines.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & (2**64 - 1))
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        return x ^ (x >> np.uint64(31))


def read_task(plan: ReadPlan) -> list[pa.Table]:
    """The examples of one task's pieces: line, prompt, completion (one open file for all). A
    piece that no longer reads as checked (the file changed) gives a problem row instead."""
    fs, path = storage.filesystem(plan.source.uri)
    try:
        with fs.open_input_file(path) as f:
            table = pa.concat_tables([read_piece_table(plan.source, p, plan.columns, f) for p in plan.pieces])
        split, problem = plan.split, None
    except (DataError, OSError, pa.ArrowException) as e:
        table = pa.table([pa.array([-1], pa.int64()), pa.array([""]), pa.array([""])], schema=EXAMPLES)
        split, problem = PROBLEM, str(e)
    n = table.num_rows
    return [table.append_column("task", pa.array(np.full(n, plan.index, np.int32)))
            .append_column("split", pa.array(np.full(n, split, np.int8)))
            .append_column("problem", pa.array([problem] * n, pa.string()))]


@functools.lru_cache(maxsize=4)
def _tokenizer(key: str, tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def process_block(block: pa.Table, settings: Settings, uris: dict[int, str]) -> pa.Table:
    """Tokenized rows of a block of read examples (each task's examples processed on their own)."""
    tasks = block.column("task").to_numpy()
    out = [_process_task(block.filter(pa.array(tasks == t)), int(t), settings, uris[int(t)])
           for t in np.unique(tasks)]
    return pa.concat_tables(out) if out else SCHEMA.empty_table()


def _process_task(block: pa.Table, task: int, s: Settings, uri: str) -> pa.Table:
    if (block.column("split").to_numpy() == PROBLEM).any():
        return _problems(task, block.column("problem").drop_null().unique().to_pylist())
    rng = np.random.default_rng([s.seed, task, 1])
    order = rng.permutation(block.num_rows)
    lines = block.column("line").to_numpy()[order]
    split = block.column("split").to_numpy()[order].copy()
    by_hash = split == BY_HASH
    split[by_hash] = np.where(split_hash(lines[by_hash], s.seed) <= np.uint64(s.threshold), VALIDATION, TRAIN)
    prompts = block.column("prompt").take(order).to_pylist()
    completions = block.column("completion").take(order).to_pylist()
    tokenizer = _tokenizer(s.tokenizer_key, s.tokenizer_json)
    try:
        enc = encode_examples(tokenizer, prompts, completions)
    except Exception as e:  # name the example(s) the tokenizer refuses, not a traceback
        return _problems(task, _untokenizable(tokenizer, prompts, completions, lines, uri, e))
    too_long = np.flatnonzero(enc.lengths > s.max_len)
    if len(too_long):
        msgs = [f"{uri}:{lines[i]}: prompt + completion is {enc.lengths[i]} tokens, over max_seq_length "
                f"{s.max_len}" for i in too_long]
        return _problems(task, msgs)
    labels = enc.labels()
    train, val = np.flatnonzero(split == TRAIN).tolist(), np.flatnonzero(split == VALIDATION).tolist()
    if s.packing and train:
        bins = best_fit(enc.lengths[train], s.max_len)
        rows = [[train[i] for i in b] for b in bins]
        rows = [rows[i] for i in rng.permutation(len(rows))]  # long and short rows mixed again
    else:
        rows = [[i] for i in train]
    parts = [_rows(enc, labels, rows, task, TRAIN, np.full(len(rows), -1, np.int64), s.packing)]
    if val:
        parts.append(_rows(enc, labels, [[i] for i in val], task, VALIDATION, lines[val], False))
    return pa.concat_tables(parts)


def _untokenizable(tokenizer, prompts: list[str], completions: list[str], lines: np.ndarray, uri: str,
                   error: Exception) -> list[str]:
    """The lines whose example the tokenizer refuses, each with its error (tried one by one)."""
    out = []
    for p, c, line in zip(prompts, completions, lines, strict=True):
        try:
            encode_examples(tokenizer, [p], [c])
        except Exception as e:
            out.append(f"{uri}:{line}: the tokenizer cannot encode this example ({type(e).__name__}: {e})")
    return out or [f"{uri}: the tokenizer failed on a batch ({type(error).__name__}: {error})"]


def _rows(enc, labels, rows: list[list[int]], task: int, split: int, lines: np.ndarray, packed: bool) -> pa.Table:
    cols = gather_rows(enc, labels, rows, packed)
    n = len(rows)
    return pa.table({
        "task": pa.array(np.full(n, task, np.int32)), "split": pa.array(np.full(n, split, np.int8)),
        "line": pa.array(lines.astype(np.int64)), "examples": cols["examples"],
        "input_ids": cols["input_ids"], "labels": cols["labels"], "position_ids": cols["position_ids"],
        "problem": pa.nulls(n, pa.string()),
    }, schema=SCHEMA)


def _problems(task: int, msgs: list[str]) -> pa.Table:
    n = len(msgs)
    empty = pa.array([[]] * n, LISTS)
    return pa.table({"task": pa.array(np.full(n, task, np.int32)), "split": pa.array(np.full(n, PROBLEM, np.int8)),
                     "line": pa.array(np.full(n, -1, np.int64)), "examples": pa.array(np.zeros(n, np.int32)),
                     "input_ids": empty, "labels": empty, "position_ids": empty, "problem": pa.array(msgs)},
                    schema=SCHEMA)


def build_dataset(plans: list[ReadPlan], settings: Settings, cpus_per_task: float = TASK_CPUS) -> Any:
    """The lazy Ray Dataset of tokenized rows, one block per read task, in plan order."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ExamplesDatasource(Datasource):
        """forge's planned pieces as Ray Data read tasks (their count fixed by the plan)."""

        def estimate_inmemory_data_size(self) -> int:
            return sum(p.size for p in plans)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(functools.partial(read_task, p),
                             BlockMetadata(num_rows=None, size_bytes=p.size, exec_stats=None, input_files=None))
                    for p in plans]

    uris = {p.index: p.source.uri for p in plans}
    ds = ray.data.read_datasource(ExamplesDatasource(), override_num_blocks=len(plans), num_cpus=cpus_per_task)
    ds = ds.map_batches(process_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, num_cpus=cpus_per_task,
                        fn_args=(settings, uris))
    ctx = ds.context
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ds
