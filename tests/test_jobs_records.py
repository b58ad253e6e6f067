"""Job records joined with Ray's view: how a record is settled from Ray's terminal state, and the
`forge jobs` verbs on records alone (no cluster reachable). Fast: no Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.jobs import records
from orchestrator.jobs.records import RayJob, reconcile


def rec(status: str, **kw) -> dict:
    return {"name": "j", "status": status, "created": 1.0, "submission_id": "forge-j-1", **kw}


TAIL = ["line 1", "ValueError: boom"]


@pytest.mark.parametrize("status", ["queued", "preparing", "training"])
def test_an_active_record_whose_ray_job_failed_is_recorded_failed_with_the_log_tail(status):
    r = rec(status)
    assert reconcile(r, RayJob("forge-j-1", "FAILED", "exit code 1", end_time=50.0), tail=lambda: TAIL)
    assert r["status"] == "failed" and r["error"] == "RayJobError: exit code 1"
    assert r["log_tail"] == TAIL and r["finished"] == 50.0


def test_a_stopped_ray_job_is_a_cancel_even_if_the_driver_recorded_a_failure():
    r = rec("training")
    assert reconcile(r, RayJob("forge-j-1", "STOPPED", "stopped"))
    assert r["status"] == "cancelled" and r["error"].startswith("Cancelled")
    r = rec("failed", error="SystemExit: 1")  # what a driver killed by Ray's SIGTERM handler writes
    assert reconcile(r, RayJob("forge-j-1", "STOPPED"))
    assert r["status"] == "cancelled" and "SystemExit: 1" in r["error"]


def test_a_failure_the_trainer_recorded_keeps_its_error_and_gains_the_log_tail_once():
    r = rec("failed", error="DataError: line 3", traceback="...")
    assert reconcile(r, RayJob("forge-j-1", "FAILED"), tail=lambda: TAIL)
    assert r["error"] == "DataError: line 3" and r["log_tail"] == TAIL
    assert not reconcile(r, RayJob("forge-j-1", "FAILED"), tail=lambda: ["other"])
    assert not reconcile(rec("failed"), RayJob("forge-j-1", "RUNNING"))  # driver still exiting: wait


def test_records_that_ray_cannot_settle_are_left_alone():
    assert not reconcile(rec("training"), None)  # cluster not reached
    assert not reconcile(rec("training"), RayJob("forge-j-1", "RUNNING"))
    assert not reconcile(rec("succeeded"), RayJob("forge-j-1", "SUCCEEDED"))
    assert not reconcile(rec("queued"), RayJob("forge-j-1", None))  # not submitted, no dispatcher
    r = rec("succeeded")
    assert not reconcile(r, RayJob("forge-j-1", "STOPPED")) and r["status"] == "succeeded"


def test_a_driver_that_exited_0_without_finishing_the_record_is_a_failure():
    r = rec("training")
    assert reconcile(r, RayJob("forge-j-1", "SUCCEEDED"), tail=lambda: TAIL)
    assert r["status"] == "failed" and r["error"].startswith("RecordError")


def test_jobs_a_dispatcher_never_submitted_follow_its_end():
    r = rec("queued", dispatcher="forge-batch-x")
    assert not reconcile(r, RayJob("forge-j-1", None), RayJob("forge-batch-x", "RUNNING"))
    assert reconcile(r, RayJob("forge-j-1", None), RayJob("forge-batch-x", "STOPPED"))
    assert r["status"] == "cancelled"
    r = rec("queued", dispatcher="forge-batch-x")
    assert reconcile(r, RayJob("forge-j-1", None), RayJob("forge-batch-x", "FAILED", "OOM"))
    assert r["status"] == "failed" and "OOM" in r["error"]


def test_job_names_resolve_under_the_storage_and_folders_as_themselves(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STORAGE", str(tmp_path / "runs"))
    assert records.job_uri("abc") == f"{tmp_path}/runs/jobs/abc"
    assert records.job_uri("abc", "s3://b/p") == "s3://b/p/jobs/abc"
    assert records.job_uri("s3://b/p/jobs/abc/") == "s3://b/p/jobs/abc"
    assert records.job_uri(f"{tmp_path}/x/jobs/abc") == f"{tmp_path}/x/jobs/abc"


# --- the verbs on records alone ---------------------------------------------------------------


def forge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two records as forge train leaves them, submitted to a cluster that is gone."""
    now = time.time()
    for name, status, extra in [
        ("alpha", "succeeded", {"best": "checkpoint-000004", "started": now - 90, "finished": now - 10,
                                "checkpoints": [{"name": "checkpoint-000004", "step": 4, "eval_loss": 1.25}]}),
        ("beta", "failed", {"error": "DataError: train.jsonl:3: invalid JSON", "started": now - 50, "finished": now - 40}),
    ]:
        job = tmp_path / "runs" / "jobs" / name
        job.mkdir(parents=True)
        (job / "job.json").write_text(json.dumps(rec(status, name=name, created=now - 100,
                                                     submission_id=f"forge-{name}-1",
                                                     ray_address="http://127.0.0.1:9", **extra)))
    (tmp_path / "runs" / "jobs" / "alpha" / "progress.json").write_text(json.dumps(
        {"step": 4, "total_steps": 4, "epoch": 1, "epochs": 1, "loss": 1.5, "lr": 0.001, "tokens_per_s": 900.0,
         "eta_s": 0}))
    return tmp_path / "runs"


def test_list_and_status_from_records_when_the_cluster_is_unreachable(runs: Path, tmp_path: Path):
    env = {"FORGE_STORAGE": str(runs), "FORGE_HOME": str(tmp_path / "home")}
    r = forge("jobs", "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(v["name"], v["status"], v["ray"]) for v in rows] == [("alpha", "succeeded", None), ("beta", "failed", None)]
    assert rows[0]["progress"]["step"] == 4 and rows[0]["best"] == "checkpoint-000004"
    r = forge("jobs", "list", env=env)
    assert r.returncode == 0 and "alpha" in r.stdout and "checkpoint-000004" in r.stdout and "1.2500" in r.stdout
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in r.stderr
    r = forge("jobs", "status", "beta", env=env)
    assert r.returncode == 0, r.stderr
    assert "failed" in r.stdout and "DataError: train.jsonl:3: invalid JSON" in r.stdout
    assert "unknown (cluster not reached)" in r.stdout


def test_verbs_name_a_missing_job_and_an_unreachable_cluster_clearly(runs: Path, tmp_path: Path):
    env = {"FORGE_STORAGE": str(runs), "FORGE_HOME": str(tmp_path / "home")}
    r = forge("jobs", "status", "gamma", env=env)
    assert r.returncode == 1 and f"no job 'gamma' under {runs}/jobs" in r.stderr and "Traceback" not in r.stderr
    r = forge("jobs", "logs", "alpha", env=env)
    assert r.returncode == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:9" in r.stderr
    r = forge("jobs", "cancel", "alpha", env=env)  # already finished: nothing to stop, no cluster needed
    assert r.returncode == 0 and "alpha: succeeded" in r.stdout
    r = forge("deployments", "list", env=env)
    assert r.returncode == 1 and "no cluster: pass --address" in r.stderr
    r = forge("jobs", "wait", "alpha", "beta", "--json", env=env)
    assert r.returncode == 1 and [j["status"] for j in json.loads(r.stdout)] == ["succeeded", "failed"]
    r = forge("jobs", "list", "--address", "ray://head:10001", env=env)
    assert r.returncode == 1 and "a Ray Client address" in r.stderr


def test_records_on_s3_are_listed_and_read_like_local_ones(s3_bucket, tmp_path: Path):
    from orchestrator import storage

    runs = f"{s3_bucket}/team/runs"
    storage.write_json(f"{runs}/jobs/gamma/job.json", rec("training", name="gamma", submission_id="forge-gamma-1"))
    storage.write_json(f"{runs}/jobs/gamma/progress.json", {"step": 7, "total_steps": 70, "loss": 2.5})
    env = {"FORGE_HOME": str(tmp_path / "home")}
    rows = json.loads(forge("jobs", "list", "--storage", runs, "--json", env=env).stdout)
    assert [(v["name"], v["status"], v["job_uri"], v["progress"]["step"]) for v in rows] == [
        ("gamma", "training", f"{runs}/jobs/gamma", 7)]
    r = forge("jobs", "status", f"{runs}/jobs/gamma", env=env)
    assert r.returncode == 0 and "progress step 7/70" in r.stdout, r.stdout + r.stderr
