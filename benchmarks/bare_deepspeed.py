"""The baseline of benchmarks/train_overhead.py: the same model, data and DeepSpeed config as a
finished forge job, trained by a bare DeepSpeed script (no Ray), launched with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bare_deepspeed.py JOB_URI OUT.json

Each rank reads its own slice of the job's prepared rows with pyarrow (the slice forge's
RankSlices gives it), collates them as forge does, and times the steps after a warm-up.
"""

from __future__ import annotations

import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist

from orchestrator import storage
from orchestrator.spec import JobSpec
from orchestrator.train.data import COLUMNS, collate, read_shard, rows_per_rank, shards_of
from orchestrator.train.deepspeed_config import build_ds_config
from orchestrator.train.loop import load_model

WARMUP = 3


def my_rows(record: dict, rank: int, world: int) -> list[dict]:
    manifest = storage.read_json(storage.join(record["dataset"], "manifest.json"))
    shards = shards_of(record["dataset"], manifest, "train")
    n = rows_per_rank(shards, world)
    rows: list[dict] = []
    for s in shards:
        if s.first_row + s.rows <= rank * n or s.first_row >= (rank + 1) * n:
            continue
        rows += read_shard(s.uri, ["row", *COLUMNS]).to_pylist()
    return [r for r in rows if rank * n <= r["row"] < (rank + 1) * n]


def main(job_uri: str, out: str) -> None:
    record = storage.read_json(storage.join(job_uri, "job.json"))
    spec = JobSpec.model_validate(record["spec"])
    t = spec.training
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = record["plan"]["total_steps"]
    ds_config = build_ds_config(spec, steps, on_gpu=False)
    model, tok = load_model(record["model_uri"], ds_config, torch.float32, t.seed, t.gradient_checkpointing)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    rows = my_rows(record, rank, world)
    pad_id = tok.eos_token_id
    mbs = t.micro_batch_size
    timed_tokens, started = 0, None
    for step in range(min(steps, len(rows) // mbs)):
        if step == WARMUP:
            dist.barrier()
            started = time.time()
        chunk = rows[step * mbs : (step + 1) * mbs]
        batch = collate(*([r[k] for r in chunk] for k in ("input_ids", "labels", "position_ids")), pad_id)
        tokens = int(batch.pop("num_tokens"))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if started is not None:
            timed_tokens += tokens
    dist.barrier()
    elapsed = time.time() - started
    total = torch.tensor([timed_tokens], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"tokens_per_s": float(total) / elapsed, "steps": step + 1 - WARMUP}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
