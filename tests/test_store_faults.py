"""A store that stalls, dies or answers 5xx: bounded waits, clear errors, no half checkpoints.

Each test runs its own moto S3 server (the session's is shared with other tests), stalls it with
SIGSTOP, kills it with SIGKILL, or injects 503/500 answers with botocore ``before-send`` hooks on
forge's own boto3 client. Figures (seconds, retries) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from typer.testing import CliRunner

from orchestrator import checkpoints, storage
from orchestrator.cli import app
from orchestrator.errors import ForgeError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S, ATTEMPTS = 2, 1  # the store's bounds while a fault is on: a stall fails in seconds


class MotoServer:
    """A moto S3 server process of this file's own (the session's is shared with others)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("moto S3 server did not start") from None
                time.sleep(0.1)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)


_buckets = itertools.count()


class Store:
    """A fresh bucket on a moto server, with forge pointed at it."""

    def __init__(self, server: MotoServer, monkeypatch) -> None:
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        monkeypatch.delenv("FORGE_S3_TIMEOUT_S", raising=False)  # forge's defaults until a fault
        monkeypatch.delenv("FORGE_S3_MAX_ATTEMPTS", raising=False)
        name = f"faults-{next(_buckets)}"
        storage.s3_client().create_bucket(Bucket=name)  # moto's first answer can take seconds
        self.server, self.url, self.proc = server, server.url, server.proc
        self.bucket, self.job = f"s3://{name}", f"s3://{name}/jobs/j"

    def signal(self, sig: int) -> None:
        self.server.signal(sig)

    def settle(self) -> None:
        """After SIGCONT, let the server finish the requests queued while it was stopped."""
        last = None
        while (now := storage.list_multipart_uploads(self.bucket)) != last:
            last = now
            time.sleep(0.5)


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(moto, monkeypatch):
    """A bucket on this file's moto server: stalls (SIGSTOP) end with the test."""
    yield Store(moto, monkeypatch)
    moto.signal(signal.SIGCONT)


@pytest.fixture
def s3_alone(monkeypatch):
    """A bucket on a moto server of the test's own, which the test may kill."""
    server = MotoServer()
    yield Store(server, monkeypatch)
    server.stop()


def tighten(monkeypatch, timeout_s: float = TIMEOUT_S, attempts: int = ATTEMPTS) -> None:
    """The bounds while a fault is on (staging runs with forge's defaults: a loaded machine)."""
    monkeypatch.setenv("FORGE_S3_TIMEOUT_S", str(timeout_s))
    monkeypatch.setenv("FORGE_S3_MAX_ATTEMPTS", str(attempts))


def stage(job: str, step: int, tmp: Path, big: int = 0) -> str:
    """One rank's checkpoint folder, indexed and uploaded; ``big`` bytes of ZeRO state."""
    d = tmp / f"rank0-{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(b"w" * 100)
    (d / "meta.json").write_text(f'{{"step": {step}}}')
    if big:
        (d / "zero").mkdir()
        (d / "zero" / "shard.pt").write_bytes(os.urandom(big))
    checkpoints.write_rank_index(d, 0)
    uri = storage.join(job, checkpoints.checkpoint_name(step))
    storage.upload_dir(d, uri)
    return uri


def committed(job: str, step: int, tmp: Path) -> str:
    uri = stage(job, step, tmp)
    checkpoints.commit(uri, step, 1)
    return uri


def wait_for(pred, what: str, limit: float = 20.0) -> None:
    deadline = time.time() + limit
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_stalled_upload_fails_in_bounded_time_and_leaves_no_checkpoint(s3, tmp_path, monkeypatch):
    committed(s3.job, 10, tmp_path)
    ckpt = storage.join(s3.job, checkpoints.checkpoint_name(20))
    shard = tmp_path / "big"
    shard.mkdir()
    (shard / "shard.pt").write_bytes(os.urandom(24 << 20))  # over 10 MB: a multipart upload
    result: dict = {}
    tighten(monkeypatch)

    def upload() -> None:
        try:
            storage.upload_dir(shard, ckpt)
        except Exception as e:
            result["error"] = e
        result["end"] = time.time()

    t = threading.Thread(target=upload)
    t.start()
    wait_for(lambda: storage.list_multipart_uploads(s3.job), "the multipart upload to start")
    s3.signal(signal.SIGSTOP)
    stopped = time.time()
    t.join(timeout=120)
    assert not t.is_alive(), "the upload hung on a stalled store"
    failed_after = result["end"] - stopped
    s3.signal(signal.SIGCONT)
    resumed = time.time()
    wait_for(lambda: storage.exists(s3.job), "the store to answer again")
    recovery = time.time() - resumed

    err = result.get("error")
    assert isinstance(err, storage.StorageError), err
    assert f"{ckpt}/shard.pt: uploading failed" in str(err) and "FORGE_S3_TIMEOUT_S" in str(err)
    assert "forge checkpoints JOB --gc" in str(err)  # the abort could not reach the store either
    assert failed_after < 90  # bounded, not hung (see the printed figure)
    assert not checkpoints.is_committed(ckpt)
    assert checkpoints.latest_committed(s3.job).step == 10
    s3.settle()
    orphans = storage.list_multipart_uploads(s3.job)
    print(f"\nstall during a multipart upload: error after {failed_after:.1f} s (timeout {TIMEOUT_S} s"
          f", {ATTEMPTS} attempt(s)), store answering {recovery:.2f} s after SIGCONT, "
          f"{len(orphans)} unfinished multipart upload(s) left for --gc")
    monkeypatch.delenv("FORGE_S3_TIMEOUT_S")
    r = CliRunner().invoke(app, ["checkpoints", s3.job, "--gc", "--yes", "--keep-newer-than", "0"])
    assert r.exit_code == 0, r.output
    assert storage.list_multipart_uploads(s3.job) == []
    assert checkpoints.uncommitted(s3.job) == []
    assert checkpoints.latest_committed(s3.job).step == 10


def test_a_commit_on_a_stalled_store_fails_then_succeeds_when_it_returns(s3, tmp_path, monkeypatch):
    committed(s3.job, 10, tmp_path)
    ckpt = stage(s3.job, 20, tmp_path)
    tighten(monkeypatch)
    s3.signal(signal.SIGSTOP)
    start = time.time()
    try:
        with pytest.raises(storage.StorageError, match=r"checkpoint-000020/\.forge/files-rank-00000\.json: reading failed"):
            checkpoints.commit(ckpt, 20, 1)
        failed_after = time.time() - start
    finally:
        s3.signal(signal.SIGCONT)
    s3.settle()
    assert failed_after < 60
    assert not checkpoints.is_committed(ckpt)
    assert checkpoints.latest_committed(s3.job).step == 10
    checkpoints.commit(ckpt, 20, 1)  # the store is back: the same attempt commits
    assert checkpoints.latest_committed(s3.job).step == 20
    print(f"\nstall during commit: error after {failed_after:.1f} s; committed once the store returned")


def test_a_store_outage_is_a_clear_error(s3_alone, tmp_path, monkeypatch):
    s3 = s3_alone
    committed(s3.job, 10, tmp_path)
    ckpt = stage(s3.job, 20, tmp_path)
    tighten(monkeypatch)
    s3.signal(signal.SIGKILL)
    s3.proc.wait(timeout=10)
    start = time.time()
    with pytest.raises(storage.StorageError, match=rf"{ckpt}.*failed: .*nothing listens at {s3.url}"):
        checkpoints.commit(ckpt, 20, 1)
    with pytest.raises(ForgeError, match=rf"{ckpt}/manifest.json: writing failed: no answer from {s3.url}"):
        storage.create_exclusive(storage.join(ckpt, "manifest.json"), b"{}")
    print(f"\noutage: both errors within {time.time() - start:.1f} s")


class Injected:
    """A before-send hook: answer ``status`` instead of the store for the first ``times``
    requests whose URL ends with ``key`` (the rest go through)."""

    def __init__(self, key: str, status: int, code: str, times: int, forward: bool = False):
        self.key, self.status, self.code, self.times, self.forward = key, status, code, times, forward
        self.sent = 0

    def __call__(self, request, **_):
        if not request.url.split("?")[0].endswith(self.key) or self.sent >= self.times:
            return None
        self.sent += 1
        if self.forward:  # the store does the work, but its reply is lost
            body = request.body.read() if hasattr(request.body, "read") else request.body
            urllib3.PoolManager().request(request.method, request.url, body=body,
                                          headers=dict(request.headers))
        xml = f"<Error><Code>{self.code}</Code><Message>injected</Message></Error>".encode()

        class Raw:
            def stream(self, **_):
                yield xml

        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"}, Raw())


@pytest.fixture
def hook():
    """Register ``Injected`` hooks on forge's client for the bounds then in force."""
    added = []

    def add(h: Injected) -> Injected:
        client = storage.s3_client()
        client.meta.events.register("before-send.s3.PutObject", h)
        added.append((client, h))
        return h

    yield add
    for client, h in added:
        client.meta.events.unregister("before-send.s3.PutObject", h)


def test_slowdown_is_retried_counted_and_the_commit_lands(s3, tmp_path, monkeypatch, hook):
    ckpt = stage(s3.job, 10, tmp_path)
    tighten(monkeypatch, timeout_s=10, attempts=4)
    h = hook(Injected(f"{checkpoints.checkpoint_name(10)}/manifest.json", 503, "SlowDown", times=2))
    before, start = storage.retry_stats(), time.time()
    checkpoints.commit(ckpt, 10, 1)
    after = storage.retry_stats()
    assert h.sent == 2 and checkpoints.latest_committed(s3.job).step == 10
    assert after["retries"] - before["retries"] == 2
    assert after["by_status"].get("503", 0) - before["by_status"].get("503", 0) == 2
    assert after["failures"] == before["failures"]
    print(f"\n503 SlowDown x2: {after['retries'] - before['retries']} retries counted, "
          f"committed in {time.time() - start:.2f} s")


def test_500_past_the_attempts_fails_clearly_and_keeps_the_previous_checkpoint(s3, tmp_path, hook,
                                                                              monkeypatch):
    committed(s3.job, 10, tmp_path)
    ckpt = stage(s3.job, 20, tmp_path)
    tighten(monkeypatch, timeout_s=10, attempts=3)
    manifest = f"{checkpoints.checkpoint_name(20)}/manifest.json"
    h = hook(Injected(manifest, 500, "InternalError", times=100))
    before = storage.retry_stats()
    with pytest.raises(storage.StorageError,
                       match=rf"{ckpt}/manifest.json: writing failed: the store answered 500 InternalError "
                             r"\(injected\) on 3 attempt\(s\)"):
        checkpoints.commit(ckpt, 20, 1)
    after = storage.retry_stats()
    assert h.sent == 3 and after["failures"] - before["failures"] == 1
    assert after["retries"] - before["retries"] == 2
    assert not checkpoints.is_committed(ckpt)
    assert checkpoints.latest_committed(s3.job).step == 10


def test_access_denied_is_not_retried_and_says_what_to_check(s3, tmp_path, hook, monkeypatch):
    ckpt = stage(s3.job, 10, tmp_path)
    tighten(monkeypatch, timeout_s=10, attempts=3)
    h = hook(Injected(f"{checkpoints.checkpoint_name(10)}/manifest.json", 403, "AccessDenied", times=100))
    with pytest.raises(storage.StorageError, match=rf"{ckpt}/manifest.json: writing failed: access "
                                                   r"denied \(AccessDenied\): check the AWS credentials"):
        checkpoints.commit(ckpt, 10, 1)
    assert h.sent == 1 and not checkpoints.is_committed(ckpt)


def test_a_commit_whose_reply_was_lost_is_not_a_conflict(s3, tmp_path, hook):
    ckpt = stage(s3.job, 10, tmp_path)
    h = hook(Injected(f"{checkpoints.checkpoint_name(10)}/manifest.json", 500, "InternalError",
                      times=1, forward=True))
    manifest = checkpoints.commit(ckpt, 10, 1)  # 500 (but stored), retried: 412, and it is ours
    assert h.sent == 1
    assert storage.read_json(storage.join(ckpt, "manifest.json"))["attempt"] == manifest["attempt"]
    with pytest.raises(checkpoints.CommitConflict):
        checkpoints.commit(ckpt, 10, 1)  # another attempt's commit is still refused


def test_an_abandoned_upload_is_garbage_that_gc_lists_and_removes(s3, tmp_path):
    committed(s3.job, 10, tmp_path)
    ckpt = storage.join(s3.job, checkpoints.checkpoint_name(20))
    storage.write_bytes(storage.join(ckpt, "meta.json"), b"{}")  # the attempt got this far
    shard = storage.join(ckpt, "zero", "shard.pt")
    writer = subprocess.Popen(  # a worker killed mid-upload never aborts its multipart upload
        [sys.executable, "-c", "import os, sys; from orchestrator import storage; "
                               "storage.write_bytes(sys.argv[1], os.urandom(64 << 20))", shard],
        cwd=REPO,
    )
    try:
        wait_for(lambda: storage.list_multipart_uploads(s3.job), "the multipart upload to start", 60)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    s3.settle()
    dry = CliRunner().invoke(app, ["checkpoints", s3.job, "--gc", "--keep-newer-than", "0"])
    assert dry.exit_code == 0, dry.output
    assert f"would remove uncommitted checkpoint {ckpt}" in dry.output
    assert f"would remove unfinished multipart upload of {shard}" in dry.output
    assert storage.list_multipart_uploads(s3.job) and checkpoints.uncommitted(s3.job) == [ckpt]
    done = CliRunner().invoke(app, ["checkpoints", s3.job, "--gc", "--yes", "--keep-newer-than", "0"])
    assert done.exit_code == 0, done.output
    assert "removed 1 uncommitted checkpoint(s)" in done.output
    assert storage.list_multipart_uploads(s3.job) == [] and checkpoints.uncommitted(s3.job) == []
    assert [c.step for c in checkpoints.list_checkpoints(s3.job)] == [10]
