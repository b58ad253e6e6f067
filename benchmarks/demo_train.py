"""Benchmark: the demo job's wall time, training tokens/s and held-out accuracy in one run.

    python benchmarks/demo_train.py [--epochs 8] [--storage /tmp/forge-bench]

Prints one JSON line; docs/benchmarks.md records the figures with this command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--storage", default=None)
    args = ap.parse_args()

    from orchestrator import checkpoints, storage
    from orchestrator.evaluate import exact_match_accuracy
    from orchestrator.spec import load_spec
    from orchestrator.train.trainer import run_training

    store = args.storage or tempfile.mkdtemp(prefix="forge-bench-")
    spec = load_spec(EXAMPLES / "ticket-router.yaml",
                     overrides=[f"storage={store}", f"training.epochs={args.epochs}", "name=bench"])
    start = time.time()
    record = run_training(spec, overwrite=True)
    wall = time.time() - start
    history = storage.read_json(storage.join(spec.job_uri, "metrics.json"))
    rates = [e["tokens_per_s"] for e in history[1:]] or [history[0]["tokens_per_s"]]
    best = checkpoints.resolve(spec.job_uri, "best")
    acc = exact_match_accuracy(best.model_uri, str(EXAMPLES / "data" / "test.jsonl"))
    print(json.dumps({
        "wall_s": round(wall, 1),
        "train_s": round(record["finished"] - record["started"], 1),
        "steps": record["plan"]["total_steps"],
        "tokens_per_s_median": round(statistics.median(rates)),
        "tokens_per_s_min": round(min(rates)),
        "tokens_per_s_max": round(max(rates)),
        "held_out_accuracy": acc["accuracy"],
        "best": best.name,
    }))


if __name__ == "__main__":
    main()
