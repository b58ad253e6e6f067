"""Shared fixtures: one real local Ray cluster per test session, tiny datasets and jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "examples"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on loopback, shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_rows() -> list[dict]:
    labels = ["Billing", "Shipping", "Technical"]
    words = {"Billing": "refund invoice charge", "Shipping": "parcel courier late", "Technical": "app crash error"}
    return [
        {"prompt": f"Ticket {i}: {words[lab]}\nTeam:", "completion": f" {lab}<|endoftext|>"}
        for i in range(30)
        for lab in [labels[i % 3]]
    ]
