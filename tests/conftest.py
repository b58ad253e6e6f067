"""Shared fixtures: one real local Ray cluster per test session, tiny datasets and jobs."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "examples"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


LAST_SERVED = pytest.StashKey[str | None]()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 is moto's server on loopback, reached over real HTTP exactly as AWS would be. The endpoint
# and test credentials are set before any Ray cluster starts so its workers inherit them.
S3_PORT = _free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="forge-test",
    AWS_SECRET_ACCESS_KEY="forge-test-secret",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
)


def pytest_collection_modifyitems(session, config, items):
    users = [item.nodeid for item in items if "served" in getattr(item, "fixturenames", ())]
    config.stash[LAST_SERVED] = users[-1] if users else None


def pytest_runtest_teardown(item, nextitem):
    """The Serve applications go as soon as no later test needs them (training tests follow)."""
    if item.nodeid == item.config.stash.get(LAST_SERVED, None):
        import serve_fixtures

        serve_fixtures.stop_served()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on loopback, shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint); yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = os.environ["AWS_ENDPOINT_URL"]
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", S3_PORT), timeout=1):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto S3 server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


_bucket_ids = itertools.count()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; yields its s3:// URI."""
    import re

    import boto3

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"forge-{slug}-{next(_bucket_ids)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


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


# --- one trained job, shared by the training tests -------------------------------------------

TRAIN_STEPS = 40  # the demo's own length: 8 epochs of 5 steps


def job_yaml(tmp: Path, name: str, store: Path | str,
             data: Path | str = EXAMPLES / "data" / "train.jsonl") -> Path:
    """The demo job, shortened: tiny GPT-NeoX on 2 workers, ZeRO-3, fp32, TRAIN_STEPS steps with
    a progress entry each, 3 checkpoints. Written out resolved, so runs of it are identical."""
    import yaml

    from orchestrator.spec import load_spec

    spec = load_spec(EXAMPLES / "ticket-router.yaml", overrides=[
        f"name={name}", f"storage={store}", f"dataset.train={data}",
        f"training.max_steps={TRAIN_STEPS}", "training.log_every_steps=1", "training.precision=fp32",
        "checkpoints.count=3", "resources.max_failures=2",
    ])
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def trained_job(ray_cluster, tmp_path_factory):
    """(spec, record) of the shortened demo job, trained once per test session."""
    from orchestrator.spec import load_spec
    from orchestrator.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("trained")
    spec = load_spec(job_yaml(tmp, "trained", tmp / "store"))
    record = run_training(spec)
    assert record["status"] == "succeeded", record.get("error")
    return spec, record
