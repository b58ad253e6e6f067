"""Benchmark: what Ray costs forge's training, and what a checkpoint costs.

    python benchmarks/train_overhead.py [--model pythia-70m] [--seq 256] [--steps 30]

In one run, on the same machine: ``forge train`` on a synthetic dataset (2 workers, ZeRO-3,
fp32, CPU), then the bare DeepSpeed script (benchmarks/bare_deepspeed.py, torchrun, no Ray) on
the same model, prepared rows and DeepSpeed config. Prints one JSON line: steady-state tokens/s
of both and their ratio (goal: forge >= 0.95x), the time from `forge train` to its first step,
and each checkpoint's save-and-commit seconds per GB of weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "parcel", "invoice", "refund", "courier", "account", "password", "screen", "crash", "late", "charged", "twice", "sync", "feature", "tracking", "number", "email", "reset", "blank", "error", "payment", "declined", "shipment", "team", "please", "help"]


def synthetic_dataset(path: Path, n: int, max_words: int, seed: int = 0) -> None:
    """Prompt/completion pairs of a realistic spread of lengths (20 to ``max_words`` words)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            body = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(4, 0.6)) % (max_words - 20) + 20))
            f.write(json.dumps({"prompt": f"{body}\n\n###\n\n", "completion": f" {rng.choice(WORDS)}<|endoftext|>"}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pythia-70m")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=2000)
    args = ap.parse_args()
    from orchestrator import checkpoints, storage

    work = Path(tempfile.mkdtemp(prefix="forge-overhead-"))
    synthetic_dataset(work / "train.jsonl", args.examples, max_words=args.seq // 2)
    job = work / "job.yaml"
    job.write_text(json.dumps({
        "name": "overhead", "storage": str(work / "store"), "model": {"base": args.model},
        "dataset": {"train": str(work / "train.jsonl")},
        "training": {"epochs": 1, "max_steps": args.steps, "micro_batch_size": 2, "max_seq_length": args.seq,
                     "precision": "fp32", "log_every_steps": 1, "learning_rate": 1e-4},
        "checkpoints": {"count": 2, "eval_max_examples": 8},
        "test_prompts": [{"prompt": "the parcel is late\n\n###\n\n", "length": 2, "top_k": 1}],
    }))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    forge = subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", "train", str(job)],
                           cwd=work, env=env, capture_output=True, text=True)
    if forge.returncode:
        sys.exit(f"forge train failed:\n{forge.stdout[-3000:]}\n{forge.stderr[-3000:]}")
    job_uri = str(work / "store" / "jobs" / "overhead")
    history = storage.read_json(storage.join(job_uri, "metrics.json"))
    steady = [e["tokens_per_s"] for e in history[3:]]
    first_step = history[0]
    record = storage.read_json(storage.join(job_uri, "job.json"))
    out = work / "bare.json"
    bare = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(REPO / "benchmarks" / "bare_deepspeed.py"),
                           job_uri, str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    if bare.returncode:
        sys.exit(f"bare deepspeed failed:\n{bare.stdout[-3000:]}\n{bare.stderr[-3000:]}")
    bare_rate = json.loads(out.read_text())["tokens_per_s"]
    ckpts = []
    for c in checkpoints.list_checkpoints(job_uri):
        extra = storage.read_json(storage.join(c.uri, "manifest.json")).get("extra", {})
        if extra.get("model_bytes"):
            ckpts.append(round(extra["save_seconds"] / (extra["model_bytes"] / 1e9), 1))
    forge_rate = statistics.median(steady)
    print(json.dumps({
        "model": args.model, "params": record.get("params"), "seq": args.seq, "steps": len(history),
        "forge_tokens_per_s": round(forge_rate), "bare_deepspeed_tokens_per_s": round(bare_rate),
        "ratio_forge_over_bare": round(forge_rate / bare_rate, 3),
        "time_to_first_step_s": round(first_step["time"] - started, 1) if "time" in first_step else None,
        "forge_train_wall_s": round(record["finished"] - record["created"], 1),
        "checkpoint_s_per_gb": ckpts,
    }))


if __name__ == "__main__":
    main()
