"""``forge submit``: validated jobs become Ray Jobs (``JobSubmissionClient.submit_job``).

For each job forge writes a queued record, then submits ``forge train <job folder>
--submission-id <id>``, which continues that record on the cluster. Ray Jobs has no limit on how
many jobs run at once, so ``--max-concurrent N`` submits one small dispatcher job instead, which
runs on the cluster and submits the batch's jobs N at a time (the submitting laptop may go away).
"""

from __future__ import annotations

import secrets
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError
from orchestrator.jobs import cluster, records
from orchestrator.jobs.batch import BatchJob, load_batch
from orchestrator.spec import JobSpec, resolved_dict

Log = Callable[[str], None]

# What every forge job needs from Ray; never secrets (Ray shows runtime envs and metadata to
# anyone with dashboard access): credentials come from the cluster's own environment.
RUNTIME_ENV: dict[str, Any] = {"env_vars": {
    "PYTHONUNBUFFERED": "1",               # log lines reach `forge jobs logs` as they are printed
    "RAY_JOB_STOP_WAIT_TIME_S": "60",      # SIGTERM grace before SIGKILL: training records `cancelled`
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",   # forge train's own ray.init(runtime_env=...) merges in
}}
SUBMIT_RETRY_S = 60.0  # a head that just started may have no job agent yet


@dataclass
class Submitted:
    name: str
    job_uri: str
    submission_id: str | None
    status: str            # queued (submitted or waiting for the dispatcher) | failed
    detail: str = ""


@dataclass
class SubmitResult:
    address: str
    batch: str
    jobs: list[Submitted] = field(default_factory=list)
    dispatcher: str | None = None
    local_head: cluster.LocalHead | None = None


def check_batch(paths: list[str], overrides: list[str] | None = None,
                overwrite: bool = False) -> list[BatchJob]:
    """Every job with its problems: the spec, local inputs, and the job folder's rule (an existing
    job is refused unless ``overwrite``, as ``forge train`` does). Nothing is written."""
    jobs = load_batch(paths, overrides)
    for job in jobs:
        if job.ok and not overwrite:
            try:
                if _job_exists(job.spec.job_uri):
                    job.reject(("name",), f"the job folder {job.spec.job_uri} already exists; pick another "
                               "name, or pass --overwrite to delete it and start again")
            except ForgeError as e:
                job.reject(("storage",), str(e))
    return jobs


def _job_exists(job_uri: str) -> bool:
    return records.read_record(job_uri) is not None or bool(checkpoints.list_checkpoints(job_uri))


def resolve_cluster(address: str | None, specs: list[JobSpec], log: Log) -> tuple[str, cluster.LocalHead | None]:
    """``--address`` / ``RAY_ADDRESS``, else the local head forge started before, else a new one."""
    explicit = cluster.explicit_address(address)
    if explicit:
        return explicit, None
    head = cluster.remembered_head()
    if head:
        log(f"ray: using the local Ray head forge started at {head.address} (pid {head.pid})")
        return head.address, None
    need = max((s.resources.num_workers * s.resources.cpus_per_worker for s in specs), default=0)
    head = cluster.start_local_head(num_cpus=cluster.local_cpus(need), log=log)
    log(f"ray: no --address or RAY_ADDRESS, so forge started a local Ray head at {head.address}; "
        "stop it with `forge jobs stop-local`")
    return head.address, head


def submit_jobs(specs: list[JobSpec], address: str | None = None, max_concurrent: int | None = None,
                overwrite: bool = False, log: Log = print) -> SubmitResult:
    """Write each job's queued record and submit it (or its batch's dispatcher). A job whose
    submission fails is recorded failed; the others go on."""
    if max_concurrent is not None and max_concurrent < 1:
        raise ForgeError(f"--max-concurrent {max_concurrent}: expected 1 or more")
    address, head = resolve_cluster(address, specs, log)
    client = cluster.job_client(address)
    _warn_local_paths(address, specs, log)
    batch = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    gated = max_concurrent is not None and len(specs) > max_concurrent
    dispatcher = f"forge-batch-{batch}" if gated else None
    result = SubmitResult(address=address, batch=batch, dispatcher=dispatcher, local_head=head)
    plans = []
    for spec in specs:
        sid = f"forge-{spec.name}-{secrets.token_hex(4)}"
        entry = f"forge train {shlex.quote(spec.job_uri)} --submission-id {shlex.quote(sid)}"
        if overwrite:
            storage.delete_dir(spec.job_uri)
        records.write_record(spec.job_uri, {
            "name": spec.name, "status": "queued", "created": time.time(), "submission_id": sid,
            "spec": resolved_dict(spec), "checkpoints": [], "best": None,
            "ray_address": address, "batch": batch, "dispatcher": dispatcher, "entrypoint": entry})
        plans.append({"name": spec.name, "job_uri": spec.job_uri, "submission_id": sid, "entrypoint": entry,
                      "metadata": {"forge": "train", "forge_job": spec.name, "forge_job_uri": spec.job_uri,
                                   "forge_batch": batch}})
    if gated:
        manifest = storage.join(specs[0].storage, "batches", f"{batch}.json")
        storage.write_json(manifest, {"batch": batch, "created": time.time(), "max_concurrent": max_concurrent,
                                      "runtime_env": RUNTIME_ENV, "jobs": plans})
        try:
            _submit(client, address, entrypoint=f"forge jobs dispatch {shlex.quote(manifest)}",
                    submission_id=dispatcher, metadata={"forge": "batch", "forge_batch": batch})
        except ForgeError as e:
            for p in plans:
                _record_submit_failure(p, e)
            raise
        log(f"batch {batch}: a dispatcher job ({dispatcher}) submits its {len(plans)} jobs "
            f"{max_concurrent} at a time")
        result.jobs = [Submitted(p["name"], p["job_uri"], p["submission_id"], "queued", "waits for the dispatcher")
                       for p in plans]
        return result
    for p in plans:
        try:
            _submit(client, address, p["entrypoint"], p["submission_id"], p["metadata"])
            result.jobs.append(Submitted(p["name"], p["job_uri"], p["submission_id"], "queued", "submitted"))
        except ForgeError as e:
            _record_submit_failure(p, e)
            result.jobs.append(Submitted(p["name"], p["job_uri"], p["submission_id"], "failed", str(e)))
    return result


def _submit(client: Any, address: str, entrypoint: str, submission_id: str, metadata: dict[str, str],
            runtime_env: dict[str, Any] | None = None) -> None:
    deadline = time.time() + SUBMIT_RETRY_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                              runtime_env=runtime_env or RUNTIME_ENV, metadata=metadata)
            return
        except Exception as e:
            if "try again later" in str(e) and time.time() < deadline:
                time.sleep(1.0)
                continue
            raise cluster.explain(address, e) from None


def _finished(client: Any, submission_id: str) -> bool:
    try:
        return client.get_job_status(submission_id).is_terminal()
    except Exception:  # a job the cluster forgot no longer holds a slot
        return True


def _record_submit_failure(plan: dict[str, Any], e: Exception) -> None:
    record = records.read_record(plan["job_uri"]) or {}
    record.update(status="failed", error=f"SubmitError: {e}", finished=time.time())
    records.write_record(plan["job_uri"], record)


def _warn_local_paths(address: str, specs: list[JobSpec], log: Log) -> None:
    host = urlparse(address).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return
    for s in specs:
        local = [p for p in (s.storage, s.dataset.train, s.dataset.validation) if p and "://" not in p]
        if local:
            log(f"warning: job {s.name}: {', '.join(local)} is a local path; the cluster at {address} "
                "must see the same path (use s3:// for a remote cluster)")


# --- the dispatcher: runs on the cluster as a Ray job of its own ------------------------------


def dispatch(manifest_uri: str, poll_s: float = 2.0, log: Log = print) -> None:
    """Submit the batch's jobs, at most ``max_concurrent`` unfinished at once; return when all are
    submitted. SIGTERM (``forge jobs cancel`` of the batch) records the rest as cancelled."""
    manifest = storage.read_json(manifest_uri)
    limit, queue = int(manifest["max_concurrent"]), list(manifest["jobs"])
    client = cluster.job_client(None)  # inside a Ray job: the cluster it runs on
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    active: set[str] = set()
    log(f"batch {manifest['batch']}: {len(queue)} jobs, at most {limit} at once")
    while queue and not stopped:
        active = {sid for sid in active if not _finished(client, sid)}
        while queue and len(active) < limit and not stopped:
            plan = queue.pop(0)
            record = records.read_record(plan["job_uri"])
            if not record or record.get("submission_id") != plan["submission_id"] or record.get("status") != "queued":
                log(f"{plan['name']}: skipped (its record is {record.get('status') if record else 'gone'})")
                continue
            try:
                _submit(client, "this cluster", plan["entrypoint"], plan["submission_id"], plan["metadata"],
                        manifest.get("runtime_env"))
                active.add(plan["submission_id"])
                log(f"{plan['name']}: submitted as {plan['submission_id']}")
            except ForgeError as e:
                _record_submit_failure(plan, e)
                log(f"{plan['name']}: submission failed: {e}")
        if queue:
            time.sleep(poll_s)
    for plan in queue:
        record = records.read_record(plan["job_uri"]) or {}
        if record.get("status") == "queued":
            record.update(status="cancelled", error="Cancelled: the batch was cancelled before this job started",
                          finished=time.time())
            records.write_record(plan["job_uri"], record)
            log(f"{plan['name']}: cancelled before it started")
    log(f"batch {manifest['batch']}: " + ("cancelled" if stopped else "every job submitted"))
