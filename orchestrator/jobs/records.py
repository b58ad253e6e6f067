"""Job records in storage, joined with what the Ray Jobs API knows about each job.

The record (``<storage>/jobs/<name>/job.json``) is the source of truth, written by ``forge submit``
(queued) and ``forge train`` (preparing, training, succeeded, failed, cancelled). Ray knows what
the record cannot: a driver killed before it could write. ``reconcile`` settles such a record from
Ray's terminal state (failed with Ray's reason and the last log lines, or cancelled), so a
record never stays "training" for a job that is gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import storage
from orchestrator.errors import ForgeError

RECORD = "job.json"
ACTIVE = ("queued", "preparing", "training")
TERMINAL = ("succeeded", "failed", "cancelled")
RAY_TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
LOG_TAIL_LINES = 40


def default_storage(value: str | None = None) -> str:
    """``--storage``, else ``FORGE_STORAGE``, else ./forge-runs (the job spec's default)."""
    return storage.normalize(value or os.environ.get("FORGE_STORAGE") or "./forge-runs")


def job_uri(ref: str, storage_uri: str | None = None) -> str:
    """A job named by its name (under ``<storage>/jobs/``) or by its folder (a path or URI)."""
    if "/" in ref or "://" in ref or ref in (".", ".."):
        return storage.normalize(ref)
    return storage.join(default_storage(storage_uri), "jobs", ref)


def read_record(uri: str) -> dict[str, Any] | None:
    path = storage.join(uri, RECORD)
    return storage.read_json(path) if storage.exists(path) else None


def write_record(uri: str, record: dict[str, Any]) -> None:
    storage.write_json(storage.join(uri, RECORD), record)


def require_record(ref: str, storage_uri: str | None = None) -> tuple[str, dict[str, Any]]:
    uri = job_uri(ref, storage_uri)
    record = read_record(uri)
    if record is None:
        where = f" under {default_storage(storage_uri)}/jobs" if "/" not in ref else ""
        raise ForgeError(f"no job {ref!r}{where}: {storage.join(uri, RECORD)} does not exist "
                         "(name a job by its name with --storage, or by its folder)")
    return uri, record


def list_records(storage_uri: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every job record under ``<storage>/jobs/``, oldest first."""
    root = storage.join(default_storage(storage_uri), "jobs")
    out = []
    for name in storage.listdir(root):
        uri = storage.join(root, name)
        record = read_record(uri)
        if record is not None:
            out.append((uri, record))
    out.sort(key=lambda x: x[1].get("created") or 0)
    return out


def read_optional_json(uri: str) -> Any:
    return storage.read_json(uri) if storage.exists(uri) else None


# --- Ray's side -------------------------------------------------------------------------------


@dataclass
class RayJob:
    """What the Ray Jobs API says about one submission (status None: Ray has no such job)."""

    submission_id: str
    status: str | None
    message: str = ""
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in RAY_TERMINAL

    @classmethod
    def from_details(cls, d: Any) -> RayJob:
        def secs(ms: int | None) -> float | None:
            return ms / 1000 if ms else None

        return cls(d.submission_id, str(d.status.value if hasattr(d.status, "value") else d.status),
                   d.message or "", secs(d.start_time), secs(d.end_time), getattr(d, "driver_exit_code", None))


def ray_jobs(client: Any) -> dict[str, RayJob]:
    """Every submission the cluster knows, by submission id (one request)."""
    return {d.submission_id: RayJob.from_details(d) for d in client.list_jobs() if d.submission_id}


def log_tail(client: Any, submission_id: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = client.get_job_logs(submission_id)
    except Exception:
        return []
    return text.rstrip("\n").splitlines()[-lines:]


# --- settling a record from Ray's state ------------------------------------------------------


def reconcile(record: dict[str, Any], ray: RayJob | None, dispatcher: RayJob | None = None,
              tail: Callable[[], list[str]] = lambda: []) -> bool:
    """Settle ``record`` in place from Ray's view; True when it changed (the caller writes it).

    ``ray``: the job's Ray state (None: unknown, the cluster was not asked or not reachable;
    status None: Ray has no such job). ``dispatcher``: the Ray state of the batch dispatcher that
    submits this job later (``forge submit --max-concurrent``). ``tail``: the job's last log lines.
    """
    status = record.get("status")
    if status == "failed" and ray is not None and ray.status == "STOPPED":
        # Stopped by a user while running: whatever the driver made of the SIGTERM, that is a cancel.
        _settle(record, "cancelled", f"Cancelled: the Ray job was stopped (forge train ended with "
                f"{record.get('error') or 'no error recorded'})")
        return True
    if status == "failed" and "log_tail" not in record and ray is not None and ray.terminal:
        record["log_tail"] = tail()
        return True
    if status not in ACTIVE or ray is None:
        return False
    if ray.status is None:
        if status != "queued" or dispatcher is None or not dispatcher.terminal:
            return False
        if dispatcher.status == "STOPPED":
            _settle(record, "cancelled", "Cancelled: the batch was cancelled before this job started")
        else:
            _settle(record, "failed", f"DispatchError: the batch dispatcher ended before submitting this "
                    f"job ({dispatcher.status}: {dispatcher.message})")
        return True
    if not ray.terminal:
        return False
    if ray.status == "STOPPED":
        _settle(record, "cancelled", "Cancelled: the Ray job was stopped", ray.end_time)
    elif ray.status == "FAILED":
        _settle(record, "failed", record.get("error") or f"RayJobError: {ray.message or 'the job failed'}",
                ray.end_time)
        record["log_tail"] = tail()
    else:  # SUCCEEDED, but the record never got there: forge train exited without finishing it
        _settle(record, "failed", "RecordError: the Ray job exited 0 but forge train did not finish "
                f"the job record (it was {status!r})", ray.end_time)
        record["log_tail"] = tail()
    return True


def _settle(record: dict[str, Any], status: str, error: str, when: float | None = None) -> None:
    record.update(status=status, error=error, finished=record.get("finished") or when or time.time())
    record.setdefault("settled_by", "forge jobs (from the Ray job's state)")


# --- one job's view, for status and list ------------------------------------------------------


def job_view(uri: str, record: dict[str, Any], ray: RayJob | None) -> dict[str, Any]:
    """Everything ``forge jobs status`` shows, as one JSON-able dict."""
    progress = read_optional_json(storage.join(uri, "progress.json"))
    metrics = read_optional_json(storage.join(uri, "metrics.json")) or []
    return {
        "name": record.get("name"),
        "status": record.get("status"),
        "job_uri": uri,
        "submission_id": record.get("submission_id"),
        "batch": record.get("batch"),
        "ray": None if ray is None else {
            "status": ray.status or ("NOT_SUBMITTED" if record.get("dispatcher") and record.get("status") == "queued"
                                     else "NOT_FOUND"),
            "message": ray.message,
            "start_time": ray.start_time, "end_time": ray.end_time},
        "created": record.get("created"),
        "started": record.get("started"),
        "finished": record.get("finished"),
        "plan": record.get("plan"),
        "progress": progress,
        "metrics": {"entries": len(metrics), "last": metrics[-1] if metrics else None},
        "checkpoints": record.get("checkpoints") or [],
        "best": record.get("best"),
        "model_uri": record.get("model_uri"),
        "error": record.get("error"),
        "log_tail": record.get("log_tail"),
        "loss_curve": storage.join(uri, "loss.png") if storage.exists(storage.join(uri, "loss.png")) else None,
    }
