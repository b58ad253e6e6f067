"""issue 6 end to end on a real local Ray head (`ray start --head` on loopback, free ports, token
auth on): submit a batch of three jobs (one invalid: rejected before submission; one that fails at
run time: recorded failed with the reason and the last log lines; one that succeeds), list,
status, logs, cancel a running job, wait; deploy the succeeded job's best checkpoint on Ray Serve,
call it over HTTP with a bearer token, delete the deployment.

Every verb runs as the real CLI in a subprocess. The head is the one `forge submit` would start
(orchestrator.jobs.cluster.start_local_head), remembered under a private FORGE_HOME, so `forge
submit` without --address uses it; `forge jobs stop-local` stops it at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import EXAMPLES
from orchestrator.jobs import cluster

pytestmark = pytest.mark.integration

KEY = "test-key-jobs-1"
JOB = """\
  model: {{base: neox-tiny, tokenizer_vocab_size: 512}}
  dataset: {{train: {train}}}
  training: {{max_steps: {steps}, warmup_ratio: 0.25, micro_batch_size: 8, max_seq_length: 64, learning_rate: 0.002}}
  checkpoints: {{count: 1, eval_max_examples: 16}}
  resources: {{num_workers: 1}}
  storage: {runs}
  test_prompts:
    - {{prompt: "Please help, my payment was declined.\\n\\n###\\n\\nTeam:", top_k: 1, length: 3, expected: " Billing"}}
"""


def forge(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def record(runs: Path, name: str) -> dict:
    return json.loads((runs / "jobs" / name / "job.json").read_text())


def poll(fn, timeout_s: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A local head with FORGE_API_KEYS in its environment (the replicas' keys) and the CLI's env."""
    work = tmp_path_factory.mktemp("jobs")
    env = {**os.environ, "FORGE_HOME": str(work / "home"), "FORGE_STORAGE": str(work / "runs"),
           "PYTHONUNBUFFERED": "1"}
    for k in cluster.ADDRESS_ENVS:
        env.pop(k, None)
    temp_dir = tempfile.mkdtemp(prefix="fj-", dir="/tmp")  # short: Ray's socket paths live under it
    saved = os.environ.get("FORGE_HOME")
    os.environ["FORGE_HOME"] = env["FORGE_HOME"]
    head = cluster.start_local_head(num_cpus=4, env={**env, "FORGE_API_KEYS": KEY}, temp_dir=temp_dir,
                                    log=lambda m: None, timeout_s=300)
    try:
        yield {"work": work, "runs": work / "runs", "env": env, "head": head}
    finally:  # the last test stops it with `forge jobs stop-local`; this is the fallback
        if head.alive():
            cluster.stop_local_head(head)
        if saved is None:
            os.environ.pop("FORGE_HOME", None)
        else:
            os.environ["FORGE_HOME"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(stack):
    """The batch (three jobs, at most one running at a time) and a long job to cancel."""
    work, env = stack["work"], stack["env"]
    (work / "bad.jsonl").write_text('not json at all\n{"prompt": "x"\n', encoding="utf-8")
    train = EXAMPLES / "data" / "train.jsonl"
    (work / "batch.yaml").write_text(
        "defaults:\n" + JOB.format(train=train, steps=4, runs=stack["runs"]) +
        "jobs:\n"
        "  - name: ok\n"
        "  - name: broken-data\n"
        "    dataset: {train: bad.jsonl}\n"
        "  - name: invalid\n"
        "    test_prompts:\n"
        "      - {prompt: hi, temperature: 0}\n")
    slow = JOB.format(train=train, steps=100000, runs=stack["runs"]).replace("\n  ", "\n")[2:]
    (work / "slow.yaml").write_text("name: slow\n" + slow.replace("max_steps:", "epochs: 100, log_every_steps: 1, max_steps:"))
    batch = forge("submit", str(work / "batch.yaml"), "--max-concurrent", "1", "--json", env=env)
    r = forge("submit", str(work / "slow.yaml"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return {**stack, "batch": batch}


def test_submit_rejects_the_invalid_job_before_submission_and_queues_the_rest(submitted):
    batch, runs, head = submitted["batch"], submitted["runs"], submitted["head"]
    assert batch.returncode == 2, batch.stdout + batch.stderr  # 2: a job was rejected
    assert "batch.yaml jobs[2]: 1 problem(s)" in batch.stderr
    assert "line 16: test_prompts.0.temperature: temperature 0 is not allowed" in batch.stderr
    assert "using the local Ray head forge started" in batch.stderr and "Traceback" not in batch.stderr
    out = json.loads(batch.stdout)
    assert out["address"] == head.address and out["dispatcher"].startswith("forge-batch-")
    assert [(s["name"], s["status"]) for s in out["submitted"]] == [("ok", "queued"), ("broken-data", "queued")]
    assert [r["name"] for r in out["rejected"]] == ["invalid"]
    assert not (runs / "jobs" / "invalid").exists()
    for name in ("ok", "broken-data"):
        r = record(runs, name)
        assert r["submission_id"].startswith(f"forge-{name}-") and r["ray_address"] == head.address
        assert r["spec"]["name"] == name and r["dispatcher"] == out["dispatcher"]
        assert not any(k in json.dumps(r) for k in (KEY, "AWS_SECRET_ACCESS_KEY"))


def test_cancel_a_running_job_records_cancelled(submitted):
    runs, env = submitted["runs"], submitted["env"]
    # Cancel once steps are running: not while DeepSpeed JIT-builds its ops, where a killed build
    # leaves torch's extension lock behind and every later job on the machine waits on it.
    progress = runs / "jobs" / "slow" / "progress.json"
    poll(lambda: progress.exists() and json.loads(progress.read_text())["step"] >= 1, 600, "the slow job's first step")
    r = forge("jobs", "cancel", "slow", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "slow: cancelled" in r.stdout
    rec = record(runs, "slow")
    assert rec["status"] == "cancelled" and rec["error"].startswith("Cancelled") and rec["finished"]
    status = json.loads(forge("jobs", "status", "slow", "--json", env=env).stdout)
    assert status["ray"]["status"] == "STOPPED"


def test_wait_then_list_status_and_logs(submitted):
    runs, env = submitted["runs"], submitted["env"]
    r = forge("jobs", "wait", "ok", "broken-data", "--timeout", "900", env=env, timeout=960)
    assert r.returncode == 1, r.stdout + r.stderr  # one of them failed
    assert "ok: succeeded best checkpoint-" in r.stdout and "broken-data: failed DataError" in r.stdout

    broken = record(runs, "broken-data")  # failed at run time: the reason and the last log lines
    assert broken["error"].startswith("DataError") and "bad.jsonl:1: invalid-json" in broken["error"]
    assert any("invalid-json" in line for line in broken["log_tail"])

    jobs = {v["name"]: v for v in json.loads(forge("jobs", "list", "--json", env=env).stdout)}
    assert {n: v["status"] for n, v in jobs.items()} == {"ok": "succeeded", "broken-data": "failed",
                                                         "slow": "cancelled"}
    assert jobs["ok"]["ray"]["status"] == "SUCCEEDED" and jobs["broken-data"]["ray"]["status"] == "FAILED"
    assert jobs["ok"]["progress"]["step"] == 4 and jobs["ok"]["best"] == "checkpoint-000004"

    table = forge("jobs", "list", env=env).stdout
    assert all(n in table for n in ("ok", "broken-data", "slow", "succeeded", "checkpoint-000004"))
    status = forge("jobs", "status", "ok", env=env)
    assert status.returncode == 0, status.stderr
    for text in ("succeeded", "ray SUCCEEDED", "plan 1 epochs", "Test prompts at each checkpoint", "best", "Billing"):
        assert text in status.stdout, text
    logs = forge("jobs", "logs", "ok", env=env)
    assert "forge train ok" in logs.stdout and "job ok succeeded" in logs.stdout
    follow = forge("jobs", "logs", "broken-data", "--follow", env=env, timeout=120)  # ends with the job
    assert follow.returncode == 0 and "invalid-json" in follow.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}") if "json" in (e.headers.get("content-type") or "") else {}


def test_deploy_the_best_checkpoint_call_it_and_delete_it(submitted):
    env, head = submitted["env"], submitted["head"]
    port = _free_port()
    r = forge("deploy", "ok", "--http-port", str(port), "--timeout", "400",  # host: loopback on the local head
              "--json", env=env, timeout=460)
    assert r.returncode == 0, r.stdout + r.stderr
    deployed = json.loads(r.stdout)
    assert deployed["status"] == "RUNNING" and deployed["checkpoint"].endswith("/jobs/ok/checkpoint-000004")
    url = f"http://127.0.0.1:{port}/ok/v1/models/ok/complete"
    assert deployed["url"] == f"http://127.0.0.1:{port}/ok"
    prompt = {"text": "Please help, my payment was declined.\n\n###\n\nTeam:", "top_k": 1, "length": 3}
    code, body = _post(url, prompt, KEY)
    assert code == 200 and body["model"] == "ok" and isinstance(body["result"][0]["completion"], str)
    assert _post(url, prompt, None)[0] == 401 and _post(url, prompt, "wrong-key")[0] == 401

    apps = json.loads(forge("deployments", "list", "--json", env=env).stdout)
    assert [(a["name"], a["status"], a["forge"], a["route_prefix"]) for a in apps] == [("ok", "RUNNING", True, "/ok")]
    assert apps[0]["min_replicas"] == 1 and apps[0]["checkpoint"] == deployed["checkpoint"]

    r = forge("deployments", "delete", "ok", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(forge("deployments", "list", "--json", env=env).stdout) == []
    assert poll(lambda: _post(url, prompt, KEY)[0] == 404, 60, "the route to go away")
    assert head.alive()


def test_stop_local_cancels_what_still_runs_then_stops_the_head(submitted):
    """A job still running when the local head is stopped is stopped first and recorded cancelled."""
    env, head, runs = submitted["env"], submitted["head"], submitted["runs"]
    job = runs / "jobs" / "sleeper"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"name": "sleeper", "status": "training", "created": time.time(),
                                              "submission_id": "forge-sleeper-1", "ray_address": head.address}))
    client = cluster.job_client(head.address)
    client.submit_job(entrypoint="sleep 600", submission_id="forge-sleeper-1",
                      metadata={"forge_job_uri": str(job)})
    poll(lambda: str(client.get_job_status("forge-sleeper-1")) == "RUNNING", 120, "the sleeper to run")
    r = forge("jobs", "stop-local", env=env, timeout=300)
    assert r.returncode == 0 and f"stopped the local Ray head at {head.address} (pid {head.pid})" in r.stdout, \
        r.stdout + r.stderr
    assert record(runs, "sleeper")["status"] == "cancelled"
    assert not head.alive() and "no local Ray head" in forge("jobs", "stop-local", env=env).stdout
