"""Tiny committed checkpoints built with forge's own code, and the Serve applications the
serving tests share (one deployment per session: starting Serve is the slow part).

Checkpoints are built the way training writes one (preset model + trained tokenizer under
``model/``, then ``meta.json``, the rank's file index, then the manifest), so the tests exercise
the real ``from_pretrained`` path. Test modules load the fixtures with
``pytest_plugins = ["serve_fixtures"]``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import checkpoints, models, storage

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\nCategory: animals<|endoftext|>",
    "Stocks rose sharply today as markets rallied.\nCategory: finance<|endoftext|>",
    "A new telescope saw light from the early universe.\nCategory: science<|endoftext|>",
    "The team won the final match in extra time.\nCategory: sports<|endoftext|>",
] * 25

JOB = "tiny-job"
OTHER = "other-job"
KEYS = ["test-key-1", "test-key-2"]
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
SMALL_PREFIX = "/small"


def make_checkpoint(job_dir: Path, step: int = 10, seed: int = 0) -> str:
    """Write and commit ``<job_dir>/checkpoint-<step>`` holding a neox-tiny model; returns its URI."""
    ckpt = storage.join(str(job_dir), checkpoints.checkpoint_name(step))
    tok = models.train_tokenizer(TEXTS, 512)
    models.build_preset("neox-tiny", tok, seed, storage.join(ckpt, "model"))
    storage.write_json(
        storage.join(ckpt, checkpoints.META), {"step": step, "epoch": 1, "eval_loss": 1.0}
    )
    checkpoints.write_rank_index(ckpt, 0)
    checkpoints.commit(ckpt, step, 1)
    return ckpt


@pytest.fixture(scope="session")
def tiny_jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two jobs with one checkpoint each (different random weights), by model name."""
    root = tmp_path_factory.mktemp("serve-storage")
    make_checkpoint(root / JOB, step=10, seed=0)
    make_checkpoint(root / OTHER, step=20, seed=1)
    return {JOB: root / JOB, OTHER: root / OTHER}


@dataclass
class Served:
    url: str  # the main application: both models, API keys, route_prefix "/"
    small_url: str  # built by serve.app:build: tight limits, no auth, route_prefix SMALL_PREFIX
    # allow_no_auth allows, it does not force: keys in the cluster's environment still apply
    small_headers: dict[str, str] = field(default_factory=dict)
    main_app: str = "forge-test"
    small_app: str = "forge-small"

    def model_handle(self, app: str):
        from ray import serve

        return serve.get_deployment_handle("ModelServer", app)


def warm_up(out: Served) -> None:
    """Load the model on both applications' replicas once, so no test pays for loading."""
    from serve.protocol import GenerateCall, SamplingParams

    call = GenerateCall(["hi"], SamplingParams(max_tokens=1))
    for app in (out.main_app, out.small_app):
        handle = out.model_handle(app).options(multiplexed_model_id=JOB)
        assert "choices" in handle.complete.remote(call).result(timeout_s=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_port(requested: int) -> int:
    """The port Serve's proxies listen on: ours, unless Serve was already running in this session."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.port
    except Exception:
        return requested


_LIVE: list[str] = []  # the applications `served` deployed and nobody has deleted yet


def stop_served() -> None:
    """Delete the applications of `served` (once): conftest calls it after the last test that
    uses them, so idle replicas do not load the machine during the tests that follow."""
    from ray import serve

    while _LIVE:
        serve.delete(_LIVE.pop())


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_jobs: dict[str, Path]):
    """Both applications on the session's Ray cluster, behind Serve's HTTP proxy, deployed
    together. The small one has one running and one queued request at most, batches of 2 and a
    3 s time limit, so overload and timeouts are quick to provoke."""
    from ray import serve

    from serve.app import build, build_app
    from serve.auth import keys_from_environment

    main = build_app({JOB: str(tiny_jobs[JOB]), OTHER: str(tiny_jobs[OTHER])}, api_keys=KEYS,
                     deployment={"max_models_per_replica": 1, "max_batch_size": 16})
    small = build({
        "checkpoint": str(tiny_jobs[JOB]), "which": "latest", "allow_no_auth": True,
        "deployment": {"max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 2,
                       "request_timeout_s": 3, "num_cpus": 0.5},
    })
    started = time.perf_counter()
    requested = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": requested})
    base = f"http://127.0.0.1:{_http_port(requested)}"
    env_keys = keys_from_environment()
    out = Served(url=base, small_url=base + SMALL_PREFIX,
                 small_headers={"Authorization": f"Bearer {env_keys[0]}"} if env_keys else {})
    serve.run_many([serve.RunTarget(main, name=out.main_app, route_prefix="/"),
                    serve.RunTarget(small, name=out.small_app, route_prefix=SMALL_PREFIX)])
    _LIVE.extend([out.main_app, out.small_app])
    deployed = time.perf_counter()
    warm_up(out)
    print(f"\nserve_fixtures: deployed in {deployed - started:.1f} s, models loaded in "
          f"{time.perf_counter() - deployed:.1f} s")
    try:
        yield out
    finally:
        stop_served()
