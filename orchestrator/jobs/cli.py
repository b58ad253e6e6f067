"""``forge submit``, ``forge jobs ...``, ``forge deploy``, ``forge deployments ...``: the verbs of a
platform team running many jobs on a Ray cluster. Tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

jobs_app = typer.Typer(help="Watch and steer submitted jobs: records in storage joined with the Ray Jobs API.",
                       no_args_is_help=True)
deployments_app = typer.Typer(help="Applications on a cluster's Ray Serve (see `forge deploy`).",
                              no_args_is_help=True)
console = Console(soft_wrap=True, highlight=False)
if not console.is_terminal:  # logs and CI: room for a table row per job
    console = Console(soft_wrap=True, highlight=False, width=max(console.width, 160))
err = Console(stderr=True, soft_wrap=True, highlight=False)

AddressOpt = Annotated[str | None, typer.Option(
    help="The cluster's Ray dashboard URL, http://<head>:8265 (default: RAY_ADDRESS, else the job's own "
         "record, else the local head forge started)")]
StorageOpt = Annotated[str | None, typer.Option(
    help="Where job records live: a folder or s3:// (default: FORGE_STORAGE, else ./forge-runs)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of tables")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.max_steps=100")]


def _log(message: str) -> None:
    err.print(message, markup=False)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(x: object, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "training": "cyan",
                "preparing": "cyan", "queued": "dim"}


# --- forge submit ---------------------------------------------------------------------------


def submit_cmd(
    paths: Annotated[list[str], typer.Argument(help="Job YAMLs, batch YAMLs (a list of jobs, or defaults + jobs) "
                                               "or folders of them")],
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(
        help="The cluster's Ray dashboard URL, http://<head>:8265 (default: RAY_ADDRESS, else the local head "
             "forge started, else a new local head)")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="At most N of these jobs run at once (a dispatcher "
                                                       "job on the cluster submits the rest as they finish)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete existing jobs of the same names and start again")] = False,
    strict: Annotated[bool, typer.Option(help="Submit nothing if any job is invalid")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate every job, then submit the valid ones as Ray Jobs (`forge train` on the cluster).

    Every problem of every job is reported before anything is submitted; invalid jobs are rejected and the valid ones go (with --strict, none go). Exit 2 if any job was rejected, 1 if a submission failed."""  # noqa: E501
    from orchestrator.jobs.submit import check_batch, submit_jobs

    jobs = check_batch(paths, set_, overwrite)
    rejected = [j for j in jobs if not j.ok]
    valid = [j.spec for j in jobs if j.ok]
    for j in rejected:
        err.print(f"rejected: {j.error_text()}", style="red", markup=False)
    if rejected and (strict or not valid):
        if as_json:
            print(json.dumps({"submitted": [], "rejected": [_rejected(j) for j in rejected]}, indent=2))
        raise typer.Exit(2) from None
    result = submit_jobs(valid, address, max_concurrent, overwrite, log=_log)
    if as_json:
        print(json.dumps({"address": result.address, "batch": result.batch, "dispatcher": result.dispatcher,
                          "submitted": [vars(s) for s in result.jobs],
                          "rejected": [_rejected(j) for j in rejected]}, indent=2))
    else:
        table = Table(title=f"batch {result.batch} on {result.address}", title_justify="left")
        for col in ("job", "status", "submission id", "job folder"):
            table.add_column(col)
        for s in result.jobs:
            table.add_row(s.name, s.status if s.status != "failed" else f"failed: {s.detail}", s.submission_id or "-",
                          s.job_uri)
        for j in rejected:
            table.add_row(j.name, "rejected", "-", j.source)
        console.print(table)
        console.print("watch them: forge jobs list | forge jobs logs JOB --follow | forge jobs wait JOB ...")
    if rejected:
        raise typer.Exit(2)
    if any(s.status == "failed" for s in result.jobs):
        raise typer.Exit(1)


def _rejected(job: Any) -> dict[str, Any]:
    return {"source": job.source, "name": job.raw_name, "line": job.line, "problems": job.problems}


# --- forge jobs -------------------------------------------------------------------------------


@jobs_app.command("list")
def list_cmd(storage: StorageOpt = None, address: AddressOpt = None, as_json: JsonOpt = False,
             status: Annotated[str | None, typer.Option(help="Only jobs with this status")] = None) -> None:
    """Every job under the storage: status, progress, best checkpoint, Ray's state."""
    from orchestrator.jobs import records, watch

    view = watch.RayView(address)
    rows = []
    for uri, record in records.list_records(storage):
        record, ray = watch.settle(uri, record, view)
        if status and record.get("status") != status:
            continue
        rows.append(records.job_view(uri, record, ray))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no jobs under {records.default_storage(storage)}/jobs")
        return
    table = Table(title=f"jobs in {records.default_storage(storage)}", title_justify="left")
    for col in ("job", "status", "progress", "loss", "best", "eval loss", "created", "took", "ray"):
        table.add_column(col)
    for v in rows:
        p = v["progress"] or {}
        best = next((c for c in v["checkpoints"] if c.get("name") == v["best"]), {})
        took = ((v["finished"] or time.time()) - v["started"]) if v["started"] else None
        table.add_row(v["name"], f"[{STATUS_STYLE.get(v['status'], '')}]{v['status']}[/]",
                      f"{p['step']}/{p['total_steps']}" if p.get("total_steps") else "-",
                      f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "-",
                      v["best"] or "-", f"{best['eval_loss']:.4f}" if best.get("eval_loss") is not None else "-",
                      _when(v["created"]), _duration(took), (v["ray"] or {}).get("status") or "?")
    console.print(table)
    for a, e in view.errors.items():
        err.print(f"ray: {a}: {e}", style="yellow", markup=False)


@jobs_app.command("status")
def status_cmd(job: Annotated[str, typer.Argument(help="Job name (under --storage) or job folder")],
               storage: StorageOpt = None, address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """One job: status with times, progress, metrics, checkpoints, best, test-prompt table, errors."""
    from orchestrator import checkpoints
    from orchestrator.jobs import records, watch
    from orchestrator.report import checkpoint_tables

    uri, record = records.require_record(job, storage)
    view = watch.RayView(address)
    record, ray = watch.settle(uri, record, view)
    v = records.job_view(uri, record, ray)
    if as_json:
        print(json.dumps(v, indent=2))
        return
    style = STATUS_STYLE.get(v["status"], "")
    console.print(f"[bold]{v['name']}[/bold]  [{style}]{v['status']}[/]  {uri}")
    ray_text = "unknown (cluster not reached)" if v["ray"] is None else \
        f"{v['ray']['status']}" + (f": {v['ray']['message'].splitlines()[0]}" if v["ray"]["message"] else "")
    console.print(f"  submission {v['submission_id'] or '-'}   ray {ray_text}", markup=False)
    for a, e in view.errors.items():
        err.print(f"ray: {a}: {e}", style="yellow", markup=False)
    took = ((v["finished"] or time.time()) - v["started"]) if v["started"] else None
    console.print(f"  created {_when(v['created'])}   started {_when(v['started'])}   "
                  f"finished {_when(v['finished'])}   took {_duration(took)}")
    if v["plan"]:
        pl = v["plan"]
        console.print(f"  plan {pl.get('epochs')} epochs x {pl.get('steps_per_epoch')} steps = "
                      f"{pl.get('total_steps')} steps, checkpoints at {pl.get('checkpoint_steps')}")
    p = v["progress"]
    if p:
        console.print(f"  progress step {p.get('step')}/{p.get('total_steps')}, epoch {p.get('epoch')}/"
                      f"{p.get('epochs')}, loss {_num(p.get('loss'), '.4f')}, lr {_num(p.get('lr'), '.2e')}, "
                      f"{p.get('tokens_per_s') or 0:,.0f} tokens/s, eta {_duration(p.get('eta_s'))}", markup=False)
    if v["metrics"]["entries"]:
        console.print(f"  metrics {v['metrics']['entries']} entries in {uri}/metrics.json"
                      + (f", loss curve {v['loss_curve']}" if v["loss_curve"] else ""), markup=False)
    if v["error"]:
        console.print(f"  error {v['error']}", style="red", markup=False)
    if v["log_tail"]:
        console.print("  last log lines:", style="red")
        for line in v["log_tail"]:
            console.print(f"    {line}", markup=False)
    ckpts = checkpoints.list_checkpoints(uri)
    if ckpts:
        metric = ((record.get("spec") or {}).get("checkpoints") or {}).get("best_metric", "eval_loss")
        checkpoint_tables(ckpts, metric, console)
    elif v["status"] not in records.ACTIVE:
        console.print("  no committed checkpoints")


@jobs_app.command("logs")
def logs_cmd(job: Annotated[str, typer.Argument(help="Job name or job folder")], storage: StorageOpt = None,
             address: AddressOpt = None,
             follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends")] = False,
             tail: Annotated[int | None, typer.Option(help="Only the last N lines")] = None) -> None:
    """The job's driver output on the cluster (forge train's progress lines and errors)."""
    from orchestrator.jobs import records, watch

    _, record = records.require_record(job, storage)
    watch.print_logs(record, watch.RayView(address), follow=follow, tail=tail)


@jobs_app.command("cancel")
def cancel_cmd(jobs: Annotated[list[str], typer.Argument(help="Job names or job folders")],
               storage: StorageOpt = None, address: AddressOpt = None,
               timeout: Annotated[float, typer.Option(help="Seconds to wait for each job to stop")] = 120.0) -> None:
    """Stop jobs cleanly (SIGTERM through Ray: training stops and records `cancelled`)."""
    from orchestrator.jobs import records, watch

    view = watch.RayView(address)
    for job in jobs:
        uri, record = records.require_record(job, storage)
        final = watch.cancel(uri, record, view, timeout_s=timeout, log=_log)
        console.print(f"{final.get('name')}: {final.get('status')}")


@jobs_app.command("wait")
def wait_cmd(jobs: Annotated[list[str], typer.Argument(help="Job names or job folders")],
             storage: StorageOpt = None, address: AddressOpt = None, as_json: JsonOpt = False,
             timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 124)")] = None) -> None:
    """Block until the jobs end; exit 0 if all succeeded, 1 if any failed or was cancelled."""
    from orchestrator.jobs import records, watch

    uris = [records.require_record(j, storage)[0] for j in jobs]
    try:
        done = watch.wait(uris, watch.RayView(address), timeout_s=timeout, log=_log)
    except TimeoutError as e:
        err.print(f"timeout: {e}", style="yellow", markup=False)
        raise typer.Exit(124) from None
    if as_json:
        print(json.dumps([{"name": r.get("name"), "status": r.get("status"), "best": r.get("best"),
                           "error": r.get("error"), "job_uri": u} for u, r in done.items()], indent=2))
    else:
        for u, r in done.items():
            extra = f"best {r.get('best')}" if r.get("status") == "succeeded" else (r.get("error") or "").split("\n")[0]
            console.print(f"{r.get('name')}: [{STATUS_STYLE.get(r.get('status'), '')}]{r.get('status')}[/] {extra}"
                          f"  {u}")
    if any(r.get("status") != "succeeded" for r in done.values()):
        raise typer.Exit(1)


@jobs_app.command("dispatch", hidden=True)
def dispatch_cmd(manifest: Annotated[str, typer.Argument(help="The batch manifest forge submit wrote")]) -> None:
    """Runs on the cluster: submit a batch's jobs at most max_concurrent at a time."""
    from orchestrator.jobs.submit import dispatch

    dispatch(manifest, log=lambda m: print(m, flush=True))


@jobs_app.command("stop-local")
def stop_local_cmd() -> None:
    """Stop the local Ray head `forge submit` started (jobs still running on it stop too)."""
    from orchestrator.jobs import cluster, watch

    head = cluster.remembered_head()
    if head is None:
        console.print("no local Ray head started by forge is running")
        return
    watch.stop_local(head, log=_log)
    console.print(f"stopped the local Ray head at {head.address} (pid {head.pid})")


# --- forge deploy / forge deployments ---------------------------------------------------------


def deploy_cmd(
    job: Annotated[str, typer.Argument(help="Job name (under --storage), job folder or checkpoint folder")],
    checkpoint: Annotated[str, typer.Option(help="best, latest, a 1-based index or a checkpoint name")] = "best",
    name: Annotated[str | None, typer.Option(help="Deployment name: the URL prefix /<name> (default: the job's)")] = None,
    address: AddressOpt = None,
    storage: StorageOpt = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a deployment setting: --set max_replicas=4")] = None,
    http_port: Annotated[int, typer.Option(help="Serve's HTTP port, if this starts Serve")] = 8000,
    http_host: Annotated[str | None, typer.Option(help="Serve's HTTP host, if this starts Serve (default: "
                                                  "127.0.0.1 on forge's local head, else 0.0.0.0)")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the application is RUNNING")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Serve a job's checkpoint on the cluster's Ray Serve, with the spec's autoscaling settings."""
    from orchestrator.jobs.deploy import deploy

    d = deploy(job, checkpoint, name, address, storage, set_, http_host, http_port, wait, timeout, log=_log)
    if as_json:
        print(json.dumps(vars(d), indent=2))
        return
    console.print(f"{d.name}: {d.status}  {d.checkpoint}", markup=False)
    console.print(f"  POST {d.url}/v1/models/{d.name}/complete   (Authorization: Bearer <a key from the "
                  "cluster's FORGE_API_KEYS>)", markup=False)


@deployments_app.command("list")
def deployments_list_cmd(address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """Every application on the cluster's Serve: status, replicas, checkpoint, URL."""
    from orchestrator.jobs.deploy import list_deployments

    apps = list_deployments(address)
    if as_json:
        print(json.dumps(apps, indent=2))
        return
    if not apps:
        console.print("no deployments")
        return
    table = Table(title="deployments", title_justify="left")
    for col in ("name", "status", "replicas", "autoscaling", "checkpoint", "url"):
        table.add_column(col, overflow="fold")
    for a in apps:
        scaling = f"{a['min_replicas']}-{a['max_replicas']}" if a["min_replicas"] is not None else "-"
        status = a["status"] + (f": {a['message']}" if a["message"] and a["status"] != "RUNNING" else "")
        replicas = ", ".join(f"{n} {r['running']}/{r['target']}" for n, r in a["replicas"].items()) or "-"
        table.add_row(a["name"], status, replicas, scaling,
                      a["checkpoint"] or ("(not forge's)" if not a["forge"] else "-"), a["url"] or "-")
    console.print(table)


@deployments_app.command("delete")
def deployments_delete_cmd(name: Annotated[str, typer.Argument(help="Deployment name")], address: AddressOpt = None,
                           wait: Annotated[bool, typer.Option(help="Wait until it is gone")] = True) -> None:
    """Remove one application from the cluster's Serve; the others keep serving."""
    from orchestrator.jobs.deploy import delete_deployment

    delete_deployment(name, address, wait=wait, log=_log)

