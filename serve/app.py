"""Building the Serve application: checkpoints and a deployment spec in, ``serve.Application`` out.

Two entry points build the same application:

* ``serve.app:build`` takes one ``args`` dict, for Ray Serve config files (``serve run`` /
  ``serve deploy``, a KubeRay RayService) and ``forge deploy``::

      {"models": {"<name>": "<job folder | checkpoint folder, local or s3://>", ...},
       # or "checkpoint": "<uri>" with an optional "name"
       "which": "best",            # best | latest | K | a checkpoint name, for job folders
       "deployment": {...},        # DeploymentSpec fields; default: the job record's, else defaults
       "allow_no_auth": false}

  API keys come from the replicas' own environment (``FORGE_API_KEYS`` or
  ``FORGE_API_KEYS_FILE``, a cluster Secret), never from ``args``.
* :func:`build_app` / :func:`run` are the Python entry points behind ``forge serve``; they may pass
  keys as an init argument (never through runtime_env env vars, which Ray logs).

The application is two deployments: the gateway (``serve.gateway``: routes, auth, validation)
and the model deployment (``serve.model_server``: multiplexed engines). :func:`deployment_plan` is
the one place the deployment spec becomes Ray Serve options.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from ray import serve

from orchestrator import checkpoints, storage
from orchestrator.checkpoints import CheckpointInfo
from orchestrator.errors import ForgeError
from orchestrator.spec import DeploymentSpec
from serve.auth import ApiKeys, check_keys_usable, keys_from_environment, resolve_api_keys
from serve.gateway import Gateway
from serve.protocol import EngineSettings

logger = logging.getLogger("forge.serve")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BUILD_ARGS = ("models", "checkpoint", "name", "which", "deployment", "allow_no_auth")


# --- the deployment spec as Ray Serve options ----------------------------------------------


@dataclass
class DeploymentPlan:
    model_options: dict[str, Any]  # ModelServer.options(...)
    gateway_options: dict[str, Any]  # Gateway.options(...)
    engine: EngineSettings
    max_models_per_replica: int
    request_timeout_s: float | None


def deployment_plan(spec: DeploymentSpec) -> DeploymentPlan:
    """Map ``deployment:`` onto Serve: replicas or autoscaling, per-replica resources, the
    ongoing/queued request limits (a full queue is a quick 503 with Retry-After), batching,
    the multiplexing LRU bound and the request time limit."""
    if spec.min_replicas == spec.max_replicas:
        replicas: dict[str, Any] = {"num_replicas": spec.max_replicas}
    else:
        replicas = {"autoscaling_config": {
            "min_replicas": spec.min_replicas,
            "max_replicas": spec.max_replicas,
            "initial_replicas": max(spec.min_replicas, 1),
            "target_ongoing_requests": spec.target_ongoing_requests,
        }}
    model_options = {
        **replicas,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "health_check_period_s": 10,
        # The gateway logs each request; the internal call would only repeat it.
        "logging_config": {"enable_access_log": False},
    }
    # The gateway only parses and forwards: no CPU reserved, and enough concurrency that the
    # model deployment's own limits are what clients meet first.
    queued = spec.max_queued_requests if spec.max_queued_requests >= 0 else 1000
    gateway_options: dict[str, Any] = {
        "max_ongoing_requests": max(100, 2 * spec.max_replicas * (spec.max_ongoing_requests + queued)),
        "ray_actor_options": {"num_cpus": 0},
    }
    if spec.max_replicas > 1:
        gateway_options["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": spec.max_replicas, "target_ongoing_requests": 64}
    else:
        gateway_options["num_replicas"] = 1
    engine = EngineSettings(max_batch_size=spec.max_batch_size,
                            batch_wait_timeout_s=spec.batch_wait_timeout_s)
    return DeploymentPlan(model_options, gateway_options, engine, spec.max_models_per_replica,
                          spec.request_timeout_s)


# --- what to serve -------------------------------------------------------------------------


def default_name(path: str, info: CheckpointInfo) -> str:
    """The job folder's name: ``path`` itself, or the parent when ``path`` is a checkpoint folder."""
    uri = storage.normalize(path)
    job_uri = uri.rsplit("/", 1)[0] if info.uri == uri else uri
    return job_uri.rstrip("/").rsplit("/", 1)[-1]


def resolve_target(path: str, which: str = "best", name: str | None = None
                   ) -> tuple[CheckpointInfo, str]:
    """The checkpoint to serve and the model name clients will use in the URL."""
    info = checkpoints.resolve(path, str(which))
    name = name or default_name(path, info)
    if not NAME_RE.fullmatch(name):
        raise ForgeError(
            f"invalid model name {name!r}: use 1-100 letters, digits, '-', '_' or '.', starting "
            "with a letter or digit (pass --name)")
    return info, name


def model_card(name: str, info: CheckpointInfo, created: int) -> dict[str, Any]:
    """The model's entry in GET /v1/models (read from its config.json, no weights loaded)."""
    cfg = storage.read_json(storage.join(info.model_uri, "config.json"))
    return {
        "id": name, "object": "model", "created": created, "owned_by": "forge",
        "context_length": cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048,
        "embedding_dimensions": cfg.get("hidden_size") or cfg.get("n_embd"),
        "checkpoint": info.name, "step": info.step,
    }


def job_deployment(path: str, info: CheckpointInfo) -> dict[str, Any] | None:
    """The ``deployment`` section of the job record ``<job>/job.json``, if there is one."""
    uri = storage.normalize(path)
    job_uri = uri.rsplit("/", 1)[0] if info.uri == uri else uri
    record = storage.join(job_uri, "job.json")
    if not storage.exists(record):
        return None
    return (storage.read_json(record).get("spec") or {}).get("deployment")


def deployment_spec(given: DeploymentSpec | Mapping[str, Any] | None,
                    targets: Sequence[tuple[str, CheckpointInfo]]) -> DeploymentSpec:
    """``given``, else the first job record's deployment section, else the defaults."""
    if given is None:
        given = next((d for p, i in targets if (d := job_deployment(p, i))), None) or {}
    if isinstance(given, DeploymentSpec):
        return given
    try:
        return DeploymentSpec.model_validate(dict(given))
    except ValidationError as e:
        problems = "; ".join(f"deployment.{'.'.join(map(str, x['loc']))}: {x['msg']}"
                             for x in e.errors())
        raise ForgeError(f"invalid deployment settings: {problems}") from None


def _targets(models: str | Sequence[str] | Mapping[str, str], name: str | None, which: str
             ) -> dict[str, tuple[str, CheckpointInfo]]:
    if isinstance(models, Mapping):
        named = [(p, n) for n, p in models.items()]
    else:
        paths = [models] if isinstance(models, str) else list(models)
        if name and len(paths) != 1:
            raise ForgeError("a model name (--name) applies to one path only")
        named = [(p, name) for p in paths]
    if not named:
        raise ForgeError("no models to serve: give at least one job or checkpoint folder")
    out: dict[str, tuple[str, CheckpointInfo]] = {}
    for path, n in named:
        info, n = resolve_target(str(path), which, n)
        if n in out:
            raise ForgeError(f"two models are named {n!r}; give each a distinct name")
        out[n] = (str(path), info)
    return out


def build_app(models: str | Sequence[str] | Mapping[str, str], name: str | None = None, *,
              which: str = "best", api_keys: Sequence[str] | None = None,
              allow_no_auth: bool = False,
              deployment: DeploymentSpec | Mapping[str, Any] | None = None,
              keys_from_replica_env: bool = False) -> serve.Application:
    """The application serving ``models`` (job or checkpoint folders, or ``{name: folder}``).

    ``api_keys`` default to this process's ``FORGE_API_KEYS`` / ``FORGE_API_KEYS_FILE`` and are
    handed to the gateway as an init argument; with none, raises ForgeError unless
    ``allow_no_auth``. ``keys_from_replica_env`` leaves them to the replicas' environment instead
    (the cluster path). Nothing starts here; pass the result to ``serve.run``.
    """
    targets = _targets(models, name, which)
    spec = deployment_spec(deployment, list(targets.values()))
    plan = deployment_plan(spec)
    keys: ApiKeys | None = None
    if not keys_from_replica_env:
        given = tuple(api_keys) if api_keys is not None else keys_from_environment()
        check_keys_usable(given)
        keys = resolve_api_keys(ApiKeys(given), allow_no_auth)
    created = int(time.time())
    catalog = {n: model_card(n, info, created) for n, (_, info) in targets.items()}
    uris = {n: info.model_uri for n, (_, info) in targets.items()}
    from serve.model_server import ModelServer  # torch and transformers: only when building

    model = serve.deployment(ModelServer, name="ModelServer").options(**plan.model_options).bind(
        uris, plan.engine, plan.max_models_per_replica)
    return Gateway.options(**plan.gateway_options).bind(
        model, catalog, keys, allow_no_auth, plan.request_timeout_s)


def build(args: dict) -> serve.Application:
    """The builder Serve config files name (``import_path: serve.app:build``); see the module doc."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ForgeError(f"unknown application args {unknown}; expected {', '.join(BUILD_ARGS)}")
    models = args.get("models")
    if models is None and args.get("checkpoint"):
        models = {args["name"]: args["checkpoint"]} if args.get("name") else args["checkpoint"]
    if not models or not isinstance(models, (str, Mapping)):
        raise ForgeError('args need "models": {"<name>": "<job or checkpoint folder>"} or '
                         '"checkpoint": "<folder>"')
    return build_app(models, which=str(args.get("which", "best")),
                     deployment=args.get("deployment"),
                     allow_no_auth=bool(args.get("allow_no_auth", False)),
                     keys_from_replica_env=True)


# --- running locally -----------------------------------------------------------------------


def run(models: str | Sequence[str] | Mapping[str, str], name: str | None = None,
        port: int = 8000, host: str = "127.0.0.1", blocking: bool = True, *,
        which: str = "best", address: str | None = None, app_name: str | None = None,
        route_prefix: str = "/", **build_kwargs: Any) -> str:
    """Start Serve on ``host:port`` and deploy ``models``; returns the base URL.

    Connects to Ray at ``address`` (or ``RAY_ADDRESS``, else a new local cluster) unless Ray is
    already initialised. ``blocking`` keeps serving until SIGINT or SIGTERM, then shuts down
    Serve (and the Ray cluster, if this call started it).
    """
    import ray

    targets = _targets(models, name, which)
    application = build_app({n: p for n, (p, _) in targets.items()}, which=which, **build_kwargs)
    app_name = app_name or (next(iter(targets)) if len(targets) == 1 else "forge")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=app_name, route_prefix=route_prefix)
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    if blocking:
        for n, (_, info) in targets.items():
            print(f"forge: {n} ({info.name}) is ready at {base}/v1/models/{n}/complete "
                  f"and {base}/v1/completions", flush=True)
        print("forge: Ctrl-C to stop", flush=True)
        wait_for_stop_signal()
        serve.delete(app_name)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return base


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM. Both are handled explicitly: a background process started by
    a non-interactive shell inherits SIGINT as ignored, and SIGTERM would otherwise kill the
    process without shutting down the Ray cluster it started."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
