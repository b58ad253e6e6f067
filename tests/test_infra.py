"""infra/: every manifest parses and carries what KubeRay and the Ray cluster launcher require, the
jobs it embeds pass forge's own spec validation, secrets are referenced and never inlined, token
auth stays on, one Ray version runs everywhere, and the local dev stack starts and stops."""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.spec import DeploymentSpec, JobSpec, parse_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
GUIDE = REPO / "docs" / "cluster.md"
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())[1]
TORCH_VERSION = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text())[1]
# KubeRay's limits (ray-operator utils/constant.go): a cluster's pods are named after it.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SENSITIVE = {"KEY", "KEYS", "SECRET", "TOKEN", "PASSWORD"}


@cache
def yaml_docs(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None)


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml_docs(p)]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of every cluster a manifest creates."""
    out = []
    for name, doc in kuberay_docs():
        spec = doc.get("spec", {})
        sub = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])
        if sub is not None:
            out.append((f"{name} {doc['kind']} {doc['metadata']['name']}", sub))
    return out


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_template.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def quantity(q: str | int | float) -> float:
    """A Kubernetes CPU/GPU quantity ("44", "500m", 2) as a number."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def per_pod(group: dict[str, Any], resource: str) -> float:
    """The Ray container's limit (KubeRay sizes the Ray node from the first container's limits)."""
    pod = group.get("template", {}).get("spec", {}).get("containers") or [{}]
    return quantity(pod[0].get("resources", {}).get("limits", {}).get(resource, 0))


def cluster_problems(where: str, spec: dict[str, Any]) -> list[str]:
    """What KubeRay (and forge's own rules: auth on, one Ray version) would reject in a cluster."""
    bad = []
    if spec.get("rayVersion") != RAY_VERSION:
        bad.append(f"{where}: rayVersion {spec.get('rayVersion')!r}, expected {RAY_VERSION!r}")
    if spec.get("authOptions", {}).get("mode") != "token":
        bad.append(f"{where}: authOptions.mode must be token (token auth stays on)")
    if spec.get("enableInTreeAutoscaling") is not True:
        bad.append(f"{where}: enableInTreeAutoscaling must be true (autoscaling GPU workers)")
    head = spec.get("headGroupSpec") or {}
    groups = [("headGroupSpec", head)] + [
        (f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs") or []
    ]
    for label, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
            bad.append(f"{where}: {label}.rayStartParams must be a mapping of strings, got {params!r}")
        pods = containers(group.get("template") or {})
        if not pods or not all(c.get("name") and c.get("image") for c in pods):
            bad.append(f"{where}: {label}.template needs containers with a name and an image")
    if per_pod(head, "nvidia.com/gpu"):
        bad.append(f"{where}: the head should be a CPU pod")
    workers = spec.get("workerGroupSpecs") or []
    for g in workers:
        label = f"{where}: workerGroupSpecs[{g.get('groupName')}]"
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(g.get("groupName", ""))):
            bad.append(f"{label}: groupName must be a DNS-1123 label")
        counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) and c >= 0 for c in counts) or not counts[0] <= counts[1] <= counts[2]:
            bad.append(f"{label}: need 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
    if not any(per_pod(g, "nvidia.com/gpu") > 0 for g in workers):
        bad.append(f"{where}: no worker group with nvidia.com/gpu in its limits")
    return bad


def test_every_manifest_parses_and_names_itself():
    files = [p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 4, files
    kinds = set()
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path}: no YAML documents"
        if path.parent != KUBERAY:
            continue
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {sorted(doc)}"
            name, kind = doc["metadata"].get("name", ""), doc["kind"]
            kinds.add(kind)
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{path}: bad name {name!r}"
            if kind in NAME_LIMITS:
                assert doc["apiVersion"] == "ray.io/v1", f"{path}: {kind} {doc['apiVersion']}"
                assert len(name) <= NAME_LIMITS[kind], f"{path}: {kind} name {name!r} too long"
    assert {"RayCluster", "RayJob", "RayService", "ConfigMap"} <= kinds


def test_every_ray_cluster_has_what_kuberay_requires():
    specs = cluster_specs()
    assert len(specs) == 3
    problems = [p for where, spec in specs for p in cluster_problems(where, spec)]
    assert problems == []


@pytest.mark.parametrize("path, value, expected", [
    (("rayVersion",), "2.9.0", "rayVersion"),
    (("authOptions",), None, "authOptions"),
    (("headGroupSpec", "rayStartParams", "num-cpus"), 0, "rayStartParams"),
    (("headGroupSpec", "template", "spec", "containers", 0, "image"), None, "image"),
    (("workerGroupSpecs", 0, "minReplicas"), 99, "minReplicas"),
    (("workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits",
      "nvidia.com/gpu"), None, "nvidia.com/gpu"),
])
def test_cluster_check_catches_what_kuberay_would_reject(path, value, expected):
    spec = copy.deepcopy(yaml_docs(KUBERAY / "raycluster.yaml")[0]["spec"])
    node = spec
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    assert any(expected in p for p in cluster_problems("mutated", spec))


def embedded_jobs() -> dict[str, JobSpec]:
    """Every job YAML shipped in a ConfigMap, validated by forge's own spec (name -> spec)."""
    jobs = {}
    for file, doc in kuberay_docs():
        if doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    spec = parse_spec(text, f"{file}: ConfigMap {doc['metadata']['name']}: {key}")
                    jobs[spec.name] = spec
    return jobs


def test_embedded_jobs_pass_forge_validation_and_live_on_s3():
    jobs = embedded_jobs()
    assert jobs
    for spec in jobs.values():
        uris = [spec.storage, spec.dataset.train, spec.dataset.validation]
        uris += [] if spec.model.is_preset else [spec.model.base]
        assert all(u.startswith("s3://") for u in uris if u), f"pods cannot read local paths: {uris}"
        assert spec.resources.use_gpu


def test_a_broken_embedded_job_is_reported_with_its_line():
    from orchestrator.errors import SpecError

    cm = next(d for _, d in kuberay_docs() if d["kind"] == "ConfigMap")
    text = cm["data"]["job.yaml"].replace("num_workers: 8", "num_workers: 0")
    with pytest.raises(SpecError) as err:
        parse_spec(text, "rayjob.yaml: job.yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "num_workers: 0" in t)
    assert f"line {line}: resources.num_workers" in str(err.value)


def test_rayjob_runs_forge_train_on_its_mounted_configmap():
    docs = kuberay_docs()
    maps = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "ConfigMap"}
    jobs = [d for _, d in docs if d["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        spec = job["spec"]
        m = re.fullmatch(r"forge train (/\S+)/([^/\s]+\.ya?ml)", spec["entrypoint"])
        assert m, f"entrypoint {spec['entrypoint']!r}: expected `forge train /<dir>/<job>.yaml`"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
        assert isinstance(spec.get("shutdownAfterJobFinishes"), bool)
        if "rayClusterSpec" in spec:
            assert spec["shutdownAfterJobFinishes"], "a RayJob's own cluster should go when it ends"
        if spec.get("ttlSecondsAfterFinished"):
            assert spec["shutdownAfterJobFinishes"], "KubeRay rejects a TTL without shutdown"
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
        volumes = {v["name"]: v for v in head["spec"].get("volumes", [])}
        mounts = [vm for c in containers(head) for vm in c.get("volumeMounts", [])
                  if vm["mountPath"] == m[1]]
        assert mounts, f"nothing mounted at {m[1]} on the head"
        source = volumes[mounts[0]["name"]]["configMap"]["name"]
        text = maps[source]["data"][m[2]]
        job_spec = parse_spec(text, m[2])
        capacity = sum(
            g["maxReplicas"] * min(per_pod(g, "nvidia.com/gpu"),
                                   per_pod(g, "cpu") // job_spec.resources.cpus_per_worker)
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
        assert job_spec.resources.num_workers <= capacity, "the GPU workers can never all be placed"


def serve_apps() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(application, RayService spec) for every Serve application in the manifests."""
    out = []
    for _, doc in kuberay_docs():
        if doc["kind"] == "RayService":
            config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            assert config["applications"], "serveConfigV2 has no applications"
            out += [(app, doc["spec"]) for app in config["applications"]]
    return out


def test_rayservice_runs_forges_serve_application():
    apps = serve_apps()
    assert apps
    prefixes = [app["route_prefix"] for app, _ in apps]
    assert len(set(prefixes)) == len(prefixes)
    for app, service in apps:
        assert {"name", "import_path", "route_prefix", "args"} <= app.keys()
        assert app["import_path"] == "serve.app:build"
        assert app["route_prefix"] == "/" if len(apps) == 1 else f"/{app['name']}"
        args = app["args"]
        assert args["models"] and all(
            re.fullmatch(r"s3://[^/]+/.+/jobs/[^/]+", uri) for uri in args["models"].values()
        ), args["models"]
        assert args.get("which", "best") in ("best", "latest") or re.fullmatch(r"checkpoint-\d+", args["which"])
        dep = DeploymentSpec.model_validate(args.get("deployment", {}))
        groups = service["rayClusterConfig"]["workerGroupSpecs"]
        per_replica = [min(per_pod(g, "nvidia.com/gpu") // dep.num_gpus if dep.num_gpus else 1e9,
                           per_pod(g, "cpu") // dep.num_cpus if dep.num_cpus else 1e9) for g in groups]
        assert dep.max_replicas <= sum(g["maxReplicas"] * n for g, n in zip(groups, per_replica, strict=True))


def test_rayservice_serves_the_job_the_rayjob_trains():
    jobs = embedded_jobs()
    served = {name: uri for app, _ in serve_apps() for name, uri in app["args"]["models"].items()}
    assert set(served) & set(jobs), "no served model is trained by the shipped RayJob"
    for name in set(served) & set(jobs):
        assert served[name] == jobs[name].job_uri


def env_problems(where: str, container: dict[str, Any]) -> list[str]:
    bad = []
    for var in container.get("env", []):
        sensitive = SENSITIVE & set(var["name"].split("_"))
        if sensitive and ("value" in var or "secretKeyRef" not in var.get("valueFrom", {})):
            bad.append(f"{where}: {var['name']} must come from a Secret (valueFrom.secretKeyRef)")
    return bad


def test_secrets_are_referenced_never_inlined():
    problems = []
    for file, doc in kuberay_docs():
        assert doc["kind"] != "Secret", f"{file}: create Secrets with kubectl, never in a manifest"
    for where, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in (c for g in groups for c in containers(g["template"])):
            problems += env_problems(f"{where} {c['name']}", c)
            refs = {v["name"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= refs, f"{where} {c['name']}: no S3 keys"
            if "RayService" in where:
                assert "FORGE_API_KEYS" in refs, f"{where} {c['name']}: replicas need FORGE_API_KEYS"
    assert problems == []
    assert env_problems("x", {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert not env_problems("x", {"env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}]})
    for path in INFRA.rglob("*"):
        if path.is_file():
            assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text(errors="replace")), path


def test_one_ray_and_torch_version_everywhere():
    import ray

    assert ray.__version__ == RAY_VERSION
    for where, cluster in cluster_specs():  # (rayVersion: in cluster_problems)
        for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for c in containers(g["template"]):
                assert f"ray{RAY_VERSION}" in c["image"], f"{where}: {c['image']} names no Ray version"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    assert f"ARG RAY_VERSION={RAY_VERSION}" in dockerfile
    assert f"ARG TORCH_VERSION={TORCH_VERSION}" in dockerfile
    aws = yaml_docs(INFRA / "aws" / "cluster.yaml")[0]
    for key in ("head_image", "worker_image"):
        assert aws["docker"][key].startswith(f"rayproject/ray:{RAY_VERSION}-py311"), aws["docker"][key]
    commands = " ".join(aws["setup_commands"] + aws["head_setup_commands"] + aws["worker_setup_commands"])
    assert f"=={RAY_VERSION}" in commands
    assert re.findall(r"torch==([0-9.]+)", commands) == [TORCH_VERSION] * 2


def test_dockerfile_installs_every_forge_package():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', re.search(r"include = \[([^\]]*)\]", pyproject)[1])
    assert packages
    for name in [*packages, "pyproject.toml", "README.md"]:
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", dockerfile, re.M), f"Dockerfile does not copy {name}"
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)


def test_aws_cluster_passes_ray_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml_docs(INFRA / "aws" / "cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert gpu_types and all("IamInstanceProfile" in t["node_config"] for t in gpu_types)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/forge"] == "."
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert "pip install -q /home/ray/forge" in config[key]
    with pytest.raises(Exception, match="node_confg"):
        broken = copy.deepcopy(config)
        broken["available_node_types"]["head"]["node_confg"] = {}
        validate_config(prepare_config(broken))


def test_cluster_guide_points_at_real_files_and_keeps_auth_on():
    text = GUIDE.read_text(encoding="utf-8")
    for ref in set(re.findall(r"\binfra/[\w./-]*\w", text)):
        assert (REPO / ref).exists(), f"docs/cluster.md names {ref}, which does not exist"
    for needed in ("CVE-2023-48022", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE=token", "infra/local/up.sh",
                   "infra/kuberay/rayjob.yaml", "infra/kuberay/rayservice.yaml", "infra/aws/cluster.yaml"):
        assert needed in text, f"docs/cluster.md does not mention {needed}"
    for path in [GUIDE, *INFRA.rglob("*")]:
        if path.is_file():
            body = path.read_text(errors="replace")
            assert not re.search(r"RAY_AUTH_MODE=disabled|mode:\s*disabled", body), path


# --- the local dev stack -----------------------------------------------------------------------

UP, DOWN = INFRA / "local" / "up.sh", INFRA / "local" / "down.sh"


def stack_env(state: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "AWS_"))}
    return {**env, "FORGE_DEV_DIR": str(state), "HOME": str(home), "FORGE_PYTHON": sys.executable}


def test_down_with_nothing_running_is_a_no_op(tmp_path):
    res = subprocess.run([DOWN], env=stack_env(tmp_path, tmp_path), capture_output=True, text=True)
    assert res.returncode == 0 and "nothing to stop" in res.stderr


def test_up_explains_a_missing_python(tmp_path):
    env = {**stack_env(tmp_path, tmp_path), "FORGE_PYTHON": str(tmp_path / "no-python")}
    res = subprocess.run([UP], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "make install" in res.stderr and res.stdout == ""


@pytest.mark.integration
def test_up_fails_cleanly_when_its_s3_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**stack_env(tmp_path, tmp_path), "FORGE_DEV_S3_PORT": str(taken.getsockname()[1])}
        res = subprocess.run([UP], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "moto's S3 server exited" in res.stderr, res.stderr
    assert "start failed" in res.stderr and res.stdout == ""
    assert not list(tmp_path.glob("*.pid")) and not (tmp_path / "env.sh").exists()


CLIENT = """
import json, os, urllib.error, urllib.request
import ray
from ray.job_submission import JobSubmissionClient
try:
    urllib.request.urlopen(os.environ["RAY_API_SERVER_ADDRESS"] + "/api/jobs/", timeout=10)
    raw = 200
except urllib.error.HTTPError as e:
    raw = e.code
jobs = JobSubmissionClient().list_jobs()
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
print(json.dumps({"raw": raw, "jobs": len(jobs), "cpus": ray.cluster_resources().get("CPU")}))
ray.shutdown()
"""


@pytest.mark.integration
def test_local_stack_up_serves_s3_and_ray_with_auth_then_down(tmp_path):
    import json

    import boto3

    state = Path(tempfile.mkdtemp(prefix="fdev", dir="/tmp"))  # short: Ray's sockets live under it
    home = tmp_path / "home"
    home.mkdir()
    env = {**stack_env(state, home), "FORGE_DEV_CPUS": "2", "FORGE_DEV_BUCKET": "forge-it"}
    pids: list[int] = []
    try:
        up = subprocess.run([UP], env=env, capture_output=True, text=True, timeout=150)
        assert up.returncode == 0, up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))
        assert exports["RAY_AUTH_MODE"] == "token"
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"} <= exports.keys()
        assert all(line.startswith(("export ", "#")) for line in up.stdout.splitlines())
        assert (home / ".ray" / "auth_token").read_text().strip(), "no token was created"

        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket="forge-it", Key="runs/hello.txt", Body=b"hello")
        assert s3.get_object(Bucket="forge-it", Key="runs/hello.txt")["Body"].read() == b"hello"

        client = subprocess.run([sys.executable, "-c", CLIENT], env={**env, **exports},
                                capture_output=True, text=True, timeout=90)
        assert client.returncode == 0, client.stderr[-3000:]
        seen = json.loads(client.stdout.strip().splitlines()[-1])
        assert seen == {"raw": 401, "jobs": 0, "cpus": 2.0}, seen  # raw HTTP without the token: 401

        again = subprocess.run([UP], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0 and "already up" in again.stderr
        assert dict(re.findall(r"^export (\w+)=(\S+)$", again.stdout, re.M)) == exports
        pids = [int((state / f).read_text()) for f in ("ray.pid", "moto.pid")]
    finally:
        down = subprocess.run([DOWN], env=env, capture_output=True, text=True, timeout=90)
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    host, port = exports["RAY_ADDRESS"].split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass
