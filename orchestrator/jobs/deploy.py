"""``forge deploy`` / ``forge deployments``: checkpoints as applications on a cluster's Ray Serve.

Through Serve's declarative REST API on the dashboard, the one ``serve deploy`` and KubeRay's
RayService use: read the running config, add or replace one application, write the whole config
back. Serve's controller then owns it (restarts replicas, autoscales, survives a lost driver), and
other teams' applications on the same Serve are carried over untouched. One application per
deployment, at ``route_prefix=/<name>``, built by ``serve.app:build`` from the job's checkpoint
and the spec's ``deployment`` section; bearer keys come from ``FORGE_API_KEYS`` in the replicas'
environment (the cluster's Secret), never from this config, which Ray shows to dashboard users.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError
from orchestrator.jobs import cluster, records
from orchestrator.spec import DeploymentSpec

Log = Callable[[str], None]
IMPORT_PATH = "serve.app:build"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Not secrets: only what the replicas need beyond the cluster's own environment.
APP_RUNTIME_ENV: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


@dataclass
class Deployed:
    name: str
    checkpoint: str
    status: str
    url: str
    message: str = ""


def deployment_settings(job_uri: str, record: dict[str, Any] | None, overrides: list[str] | None) -> dict[str, Any]:
    """The spec's ``deployment`` section (defaults for a bare checkpoint), with ``--set F=V``."""
    import yaml
    from pydantic import ValidationError

    raw = dict(((record or {}).get("spec") or {}).get("deployment") or {})
    for o in overrides or []:
        key, sep, value = o.partition("=")
        key = key.strip().removeprefix("deployment.")
        if not sep or not key:
            raise ForgeError(f"--set {o!r}: expected FIELD=VALUE, a field of the spec's deployment section")
        raw[key] = yaml.safe_load(value) if value.strip() else None
    try:
        return DeploymentSpec.model_validate(raw).model_dump(mode="json")
    except ValidationError as e:
        problems = "; ".join(f"deployment.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ForgeError(f"{storage.join(job_uri, records.RECORD)}: {problems}") from None


def app_config(name: str, checkpoint_uri: str, deployment: dict[str, Any]) -> dict[str, Any]:
    """One Serve application, as ``serve deploy`` takes it. The checkpoint is pinned (resolved
    here), so a Serve restart never silently picks a different "best"."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": IMPORT_PATH,
        "args": {"models": {name: checkpoint_uri}, "which": "latest", "deployment": deployment},
        "runtime_env": APP_RUNTIME_ENV,
    }


def _declarative(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The applications to write back: every declarative one, as deployed. Applications started
    with ``serve.run`` (``forge serve``) are not in Serve's config and a config write would remove
    them, so they are refused rather than lost."""
    apps = details.get("applications") or {}
    imperative = [n for n, a in apps.items() if a.get("source") == "imperative"]
    if imperative:
        raise ForgeError(f"Serve on this cluster runs applications started with serve.run ({', '.join(imperative)}), "
                         "e.g. by `forge serve`; writing Serve's config would remove them. Stop them first, or "
                         "deploy to a cluster where Serve is managed by config only")
    return [a["deployed_app_config"] for a in apps.values() if a.get("deployed_app_config")]


def _put(client: Any, address: str, details: dict[str, Any], apps: list[dict[str, Any]],
         http_host: str, http_port: int) -> None:
    config: dict[str, Any] = {"applications": apps}
    if details.get("controller_info"):  # Serve runs: keep its proxy and ports as they are
        for key in ("proxy_location", "http_options", "grpc_options"):
            if details.get(key) is not None:
                config[key] = details[key]
    else:
        config["http_options"] = {"host": http_host, "port": http_port}
    cluster.call(address, lambda: client.deploy_applications(config))


def app_url(address: str, details: dict[str, Any], name: str, http_port: int) -> str:
    """Where clients reach the application: the cluster's host, Serve's HTTP port, ``/<name>``."""
    host = urlparse(address).hostname or "127.0.0.1"
    port = (details.get("http_options") or {}).get("port") or http_port
    return f"http://{host}:{port}/{name}"


def deploy(job_ref: str, which: str = "best", name: str | None = None, address: str | None = None,
           storage_uri: str | None = None, overrides: list[str] | None = None, http_host: str | None = None,
           http_port: int = 8000, wait: bool = True, timeout_s: float = 600.0, log: Log = print) -> Deployed:
    """Resolve the job's checkpoint, add (or replace) its application in Serve's config, and wait
    until it is RUNNING (or report why it is not)."""
    uri = records.job_uri(job_ref, storage_uri)
    ckpt = checkpoints.resolve(uri, which)
    job_folder = uri if ckpt.uri != uri else uri.rsplit("/", 1)[0]
    record = records.read_record(job_folder)
    name = name or (record or {}).get("name") or job_folder.rsplit("/", 1)[-1]
    if not NAME_RE.fullmatch(name):
        raise ForgeError(f"invalid deployment name {name!r}: use 1-100 letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit (pass --name)")
    settings = deployment_settings(job_folder, record, overrides)
    address = _address(address)
    if http_host is None:  # forge's own local head serves on loopback; a cluster on every interface
        head = cluster.remembered_head()
        http_host = "127.0.0.1" if head and head.address == address else "0.0.0.0"
    client = cluster.serve_client(address)
    details = cluster.call(address, client.get_serve_details)
    apps = [a for a in _declarative(details) if a.get("name") != name]
    apps.append(app_config(name, ckpt.uri, settings))
    log(f"deploy: {ckpt.uri} as {name!r} on {address} ({settings['min_replicas']}-{settings['max_replicas']} "
        f"replicas, {settings['num_cpus']:g} CPU / {settings['num_gpus']:g} GPU each)")
    _put(client, address, details, apps, http_host, http_port)
    url = app_url(address, cluster.call(address, client.get_serve_details), name, http_port)
    result = Deployed(name, ckpt.uri, "DEPLOYING", url)
    if wait:
        result.status, result.message = wait_for_app(client, address, name, timeout_s, log)
        if result.status != "RUNNING":
            raise ForgeError(f"deployment {name!r} is {result.status}: {result.message}")
    return result


def wait_for_app(client: Any, address: str, name: str, timeout_s: float, log: Log) -> tuple[str, str]:
    """Poll Serve until the application is RUNNING, failed, or ``timeout_s`` passes."""
    deadline, last = time.time() + timeout_s, None
    while True:
        app = (cluster.call(address, client.get_serve_details).get("applications") or {}).get(name)
        status = app["status"] if app else "NOT_STARTED"
        message = _app_message(app) if app else ""
        if status != last:
            log(f"deploy: {name} {status}" + (f": {message}" if message and status != "RUNNING" else ""))
            last = status
        if status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
            return status, message
        if time.time() > deadline:
            return status, f"not RUNNING after {timeout_s:.0f} s" + (f" ({message})" if message else "")
        time.sleep(1.0)


def _app_message(app: dict[str, Any]) -> str:
    parts = [app.get("message") or ""]
    parts += [d.get("message") or "" for d in (app.get("deployments") or {}).values()]
    return " | ".join(p.strip() for p in parts if p and p.strip())


def list_deployments(address: str | None = None, http_port: int = 8000) -> list[dict[str, Any]]:
    """Every application on the cluster's Serve, with forge's checkpoint where it is one of forge's."""
    address = _address(address)
    details = cluster.call(address, cluster.serve_client(address).get_serve_details)
    out = []
    for name, app in sorted((details.get("applications") or {}).items()):
        config = app.get("deployed_app_config") or {}
        args = config.get("args") or {}
        deps = app.get("deployments") or {}
        replicas = {n: {"running": sum(1 for r in d.get("replicas") or [] if r.get("state") == "RUNNING"),
                        "target": d.get("target_num_replicas") or 0} for n, d in deps.items()}
        dep = args.get("deployment") or {}
        out.append({
            "name": name, "status": app.get("status"), "route_prefix": app.get("route_prefix"),
            "url": app_url(address, details, name, http_port) if app.get("route_prefix") else None,
            "forge": config.get("import_path") == IMPORT_PATH,
            "checkpoint": next(iter((args.get("models") or {}).values()), None),
            "replicas": replicas,
            "min_replicas": dep.get("min_replicas"), "max_replicas": dep.get("max_replicas"),
            "message": _app_message(app), "source": app.get("source"),
        })
    return out


def delete_deployment(name: str, address: str | None = None, wait: bool = True, timeout_s: float = 300.0,
                      log: Log = print) -> None:
    """Remove one application from Serve's config; the others keep running."""
    address = _address(address)
    client = cluster.serve_client(address)
    details = cluster.call(address, client.get_serve_details)
    if name not in (details.get("applications") or {}):
        known = ", ".join(sorted(details.get("applications") or {})) or "none"
        raise ForgeError(f"no deployment {name!r} on {address} (deployments: {known})")
    apps = [a for a in _declarative(details) if a.get("name") != name]
    _put(client, address, details, apps, "0.0.0.0", 8000)
    deadline = time.time() + timeout_s
    while wait and name in (cluster.call(address, client.get_serve_details).get("applications") or {}):
        if time.time() > deadline:
            raise ForgeError(f"deployment {name!r} is still shutting down after {timeout_s:.0f} s")
        time.sleep(1.0)
    log(f"deleted deployment {name!r}")


def _address(address: str | None) -> str:
    explicit = cluster.explicit_address(address)
    if explicit:
        return explicit
    head = cluster.remembered_head()
    if head:
        return head.address
    raise ForgeError("no cluster: pass --address http://<head>:8265 (or set RAY_ADDRESS); "
                     "`forge submit` without an address starts a local head that this then uses")
