"""Watching and steering submitted jobs: records joined with Ray, wait, cancel, logs.

Which cluster a job is on: ``--address`` / ``RAY_ADDRESS`` if given, else the address its record
was submitted to, else the local head forge started. Without a reachable cluster the records are
still shown (Ray's side as unknown), so ``forge jobs`` works from any machine that reads storage.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

from orchestrator.errors import ForgeError
from orchestrator.jobs import cluster, records
from orchestrator.jobs.records import RayJob

Log = Callable[[str], None]


class RayView:
    """Ray's side for many records, one ``list_jobs`` per cluster, clients cached by address."""

    def __init__(self, address: str | None = None) -> None:
        self.forced = cluster.explicit_address(address)
        self._clients: dict[str, Any] = {}
        self._jobs: dict[str, dict[str, RayJob]] = {}
        self.errors: dict[str, str] = {}

    def address_of(self, record: dict[str, Any]) -> str | None:
        if self.forced:
            return self.forced
        if record.get("ray_address"):
            return record["ray_address"]
        head = cluster.remembered_head()
        return head.address if head else None

    def client(self, address: str | None, strict: bool = False) -> Any | None:
        if address is None:
            if strict:
                raise ForgeError("no cluster for this job: pass --address http://<head>:8265 (or set RAY_ADDRESS)")
            return None
        if address not in self._clients and (strict or address not in self.errors):
            try:
                self._clients[address] = cluster.job_client(address)
            except ForgeError as e:
                self.errors[address] = str(e)
                if strict:
                    raise
        return self._clients.get(address)

    def refresh(self) -> None:
        self._jobs.clear()

    def job(self, record: dict[str, Any], submission_id: str | None = None) -> RayJob | None:
        """The Ray state of the record's job (or ``submission_id``); None when unknown."""
        address = self.address_of(record)
        client = self.client(address)
        sid = submission_id or record.get("submission_id")
        if client is None or not sid:
            return None
        if address not in self._jobs:
            try:
                self._jobs[address] = records.ray_jobs(client)
            except Exception as e:
                self.errors[address] = f"{type(e).__name__}: {e}"
                return None
        return self._jobs[address].get(sid) or RayJob(sid, None)


def settle(uri: str, record: dict[str, Any], view: RayView) -> tuple[dict[str, Any], RayJob | None]:
    """The record joined with Ray; settled and written back when Ray knows more (see reconcile).

    Ray's terminal state comes after the driver's last write, so the record is read again before
    it is settled: what ``forge train`` wrote last (its error, checkpoints) is kept."""
    ray = view.job(record)
    dispatcher = view.job(record, record["dispatcher"]) if record.get("dispatcher") else None
    if not records.reconcile(copy.deepcopy(record), ray, dispatcher):
        return record, ray
    latest = records.read_record(uri) or record
    client = view.client(view.address_of(record))
    sid = record.get("submission_id")

    def tail() -> list[str]:
        return records.log_tail(client, sid) if client is not None and sid else []

    if records.reconcile(latest, ray, dispatcher, tail):
        records.write_record(uri, latest)
    return latest, ray


def wait(uris: list[str], view: RayView, timeout_s: float | None = None, poll_s: float = 2.0,
         log: Log = print) -> dict[str, dict[str, Any]]:
    """Block until every job is succeeded, failed or cancelled; returns the final records.
    Raises TimeoutError naming the jobs still running after ``timeout_s``."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    done: dict[str, dict[str, Any]] = {}
    last: dict[str, str] = {}
    while True:
        view.refresh()
        for uri in uris:
            if uri in done:
                continue
            record = records.read_record(uri) or {}
            record, ray = settle(uri, record, view)
            status = record.get("status", "?")
            if last.get(uri) != status and (uri in last or status not in records.TERMINAL):
                log(f"{record.get('name', uri)}: {status}")
            last[uri] = status
            # The driver writes its final record just before it exits: wait for Ray to see the
            # exit too, so a stop that the driver recorded as a failure settles as a cancel.
            if status in records.TERMINAL and (ray is None or ray.status is None or ray.terminal):
                done[uri] = record
        if len(done) == len(uris):
            return done
        if deadline is not None and time.time() > deadline:
            left = ", ".join(f"{(records.read_record(u) or {}).get('name', u)} ({last.get(u)})"
                             for u in uris if u not in done)
            raise TimeoutError(f"still running after {timeout_s:g} s: {left}")
        time.sleep(poll_s)


def cancel(uri: str, record: dict[str, Any], view: RayView, timeout_s: float = 120.0, log: Log = print) -> dict[str, Any]:
    """Stop the job: Ray sends its driver SIGTERM, ``forge train`` records ``cancelled`` and exits;
    a job the batch dispatcher has not submitted yet is recorded cancelled at once."""
    name = record.get("name", uri)
    if record.get("status") in records.TERMINAL:
        log(f"{name}: already {record['status']}")
        return record
    sid, address, client, ray = _on_cluster(
        record, view, f"{name}: not submitted with `forge submit` (no submission id): stop the `forge train` "
                      "process that runs it (Ctrl-C or SIGTERM records it cancelled)")
    if ray is not None and ray.status is None:  # not submitted yet (waiting for its dispatcher)
        record.update(status="cancelled", error="Cancelled: cancelled before it started", finished=time.time())
        records.write_record(uri, record)
        if client is not None and _submitted_meanwhile(client, sid):
            cluster.call(address, lambda: client.stop_job(sid))
        log(f"{name}: cancelled before it started")
        return record
    cluster.call(address, lambda: client.stop_job(sid))
    log(f"{name}: stop requested ({sid}); waiting for it to stop")
    deadline = time.time() + timeout_s
    # Ray's state, not the record: the driver writes its record before it has exited.
    while not cluster.call(address, lambda: client.get_job_status(sid)).is_terminal():
        if time.time() > deadline:
            raise ForgeError(f"{name}: still not stopped after {timeout_s:g} s; Ray kills the driver after "
                             "RAY_JOB_STOP_WAIT_TIME_S, then `forge jobs status` records it")
        time.sleep(1.0)
    view.refresh()
    return settle(uri, records.read_record(uri) or record, view)[0]


def _on_cluster(record: dict[str, Any], view: RayView, not_submitted: str) -> tuple[str, str, Any, Any]:
    """(submission id, cluster address, Jobs API client, Ray's view of the job) of a job that
    `forge submit` submitted; ``not_submitted`` is the error for one it did not."""
    sid = record.get("submission_id")
    if not sid:
        raise ForgeError(not_submitted)
    address = view.address_of(record)
    return sid, address, view.client(address, strict=True), view.job(record)


def _submitted_meanwhile(client: Any, sid: str) -> bool:
    try:
        client.get_job_status(sid)
        return True
    except Exception:
        return False


def print_logs(record: dict[str, Any], view: RayView, follow: bool = False, tail: int | None = None,
               out: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush())) -> None:
    """The Ray job's driver output (``forge train``'s progress lines); ``follow`` streams it until
    the job ends."""
    sid, address, client, ray = _on_cluster(
        record, view, f"{record.get('name')}: not submitted with `forge submit`, so Ray has no logs of it; "
                      "its output went to the terminal that ran `forge train`")
    if ray is not None and ray.status is None:
        raise ForgeError(f"{record.get('name')}: no logs on {address}: the job is {record.get('status')} and "
                         "Ray has no such job (not submitted yet, or the cluster was restarted)")
    if not follow:
        text = cluster.call(address, lambda: client.get_job_logs(sid))
        if tail:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        out(text)
        return

    import logging

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"

    async def stream() -> None:
        async for chunk in client.tail_job_logs(sid):
            out(chunk)

    cluster.call(address, lambda: asyncio.run(stream()))


def stop_local(head: cluster.LocalHead, timeout_s: float = 90.0, log: Log = print) -> None:
    """Stop forge's local head, after stopping the jobs still running on it (each records
    ``cancelled``), so no record is left saying "training" for a job that is gone."""
    try:
        client = cluster.job_client(head.address)
        running = [d for d in client.list_jobs() if not d.status.is_terminal()]
    except ForgeError as e:
        log(f"ray: {e}; stopping the head without stopping its jobs first")
        running = []
    for d in running:
        log(f"stopping {d.submission_id}")
        cluster.call(head.address, lambda d=d: client.stop_job(d.submission_id))
    deadline = time.time() + timeout_s
    while running and time.time() < deadline and not all(
            client.get_job_status(d.submission_id).is_terminal() for d in running):
        time.sleep(1.0)
    view = RayView(head.address)
    for d in running:
        uri = (d.metadata or {}).get("forge_job_uri")
        record = records.read_record(uri) if uri else None
        if record:
            settle(uri, record, view)
    cluster.stop_local_head(head)
