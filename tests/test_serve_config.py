"""Building the application (no Ray needed): the deployment spec as Serve options, the builder's
args, model names, API keys, and the response shapes."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from ray import serve
from serve_fixtures import JOB, KEYS, OTHER

from orchestrator import storage
from orchestrator.errors import ForgeError
from orchestrator.spec import DeploymentSpec
from serve import openai_api as api
from serve.app import build, build_app, deployment_plan, deployment_spec, resolve_target
from serve.auth import ApiKeys, keys_from_environment
from serve.errors import BadRequest, Unauthorized
from serve.schemas import OpenAICompletion, parse_json_object, validate

pytest_plugins = ["serve_fixtures"]


def test_deployment_plan_maps_every_field_onto_serve() -> None:
    plan = deployment_plan(DeploymentSpec(
        min_replicas=1, max_replicas=6, target_ongoing_requests=4, max_ongoing_requests=24,
        max_queued_requests=50, num_cpus=2, num_gpus=1, max_batch_size=12,
        batch_wait_timeout_s=0.02, max_models_per_replica=3, request_timeout_s=30))
    m = plan.model_options
    assert m["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "initial_replicas": 1,
                                       "target_ongoing_requests": 4}
    assert "num_replicas" not in m
    assert m["max_ongoing_requests"] == 24 and m["max_queued_requests"] == 50
    assert m["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert m["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert plan.engine.max_batch_size == 12 and plan.engine.batch_wait_timeout_s == 0.02
    assert plan.max_models_per_replica == 3 and plan.request_timeout_s == 30
    assert plan.gateway_options["ray_actor_options"] == {"num_cpus": 0}
    assert plan.gateway_options["max_ongoing_requests"] >= 6 * (24 + 50)
    fixed = deployment_plan(DeploymentSpec(min_replicas=2, max_replicas=2))
    assert fixed.model_options["num_replicas"] == 2 and "autoscaling_config" not in fixed.model_options
    # every option is one Serve accepts
    from serve.model_server import ModelServer

    serve.deployment(ModelServer).options(**plan.model_options)


def test_builder_args_are_checked(tiny_jobs: dict[str, Path], monkeypatch) -> None:
    monkeypatch.delenv("FORGE_API_KEYS", raising=False)
    job = str(tiny_jobs[JOB])
    assert isinstance(build({"models": {"a": job, "b": str(tiny_jobs[OTHER])}}), serve.Application)
    assert isinstance(build({"checkpoint": job, "name": "x", "which": "latest"}), serve.Application)
    with pytest.raises(ForgeError, match="unknown application args"):
        build({"models": {"a": job}, "replicas": 3})
    with pytest.raises(ForgeError, match='"models"'):
        build({})
    with pytest.raises(ForgeError, match="deployment.max_batch_size"):
        build({"models": {"a": job}, "deployment": {"max_batch_size": 0}})
    with pytest.raises(ForgeError, match="two models are named"):
        build_app([job, job], api_keys=KEYS)
    with pytest.raises(ForgeError, match="checkpoints 1 to 1"):
        build({"models": {"a": job}, "which": 5})


def test_deployment_defaults_to_the_job_record(tiny_jobs: dict[str, Path], tmp_path: Path) -> None:
    job = tmp_path / "with-record"
    ckpt = tiny_jobs[JOB] / "checkpoint-000010"
    storage.write_json(str(job / "job.json"), {"spec": {"deployment": {"max_batch_size": 7}}})
    info, _ = resolve_target(str(ckpt))
    assert deployment_spec(None, [(str(job), info)]).max_batch_size == 7
    assert deployment_spec(None, [(str(tiny_jobs[JOB]), info)]) == DeploymentSpec()
    assert deployment_spec({"max_batch_size": 3}, [(str(job), info)]).max_batch_size == 3


def test_build_app_is_secure_by_default(tiny_jobs: dict[str, Path], monkeypatch) -> None:
    job = str(tiny_jobs[JOB])
    monkeypatch.delenv("FORGE_API_KEYS", raising=False)
    monkeypatch.delenv("FORGE_API_KEYS_FILE", raising=False)
    with pytest.raises(ForgeError, match="FORGE_API_KEYS"):
        build_app(job)
    monkeypatch.setenv("FORGE_API_KEYS", " , ")
    with pytest.raises(ForgeError, match="FORGE_API_KEYS"):
        build_app(job)
    assert build_app(job, allow_no_auth=True) is not None
    monkeypatch.setenv("FORGE_API_KEYS", "k1,k2")
    assert build_app(job) is not None
    with pytest.raises(ForgeError, match="no commas or spaces"):
        build_app(job, api_keys=["a b"])


def test_model_names(tiny_jobs: dict[str, Path]) -> None:
    job = tiny_jobs[JOB]
    assert resolve_target(str(job))[1] == JOB
    assert resolve_target(str(job / "checkpoint-000010"))[1] == JOB
    assert resolve_target(str(job), name="mine")[1] == "mine"
    with pytest.raises(ForgeError, match="invalid model name"):
        resolve_target(str(job), name="a b")


def test_api_keys_from_env_and_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# rotated 2026-01\nfile-key-1\n\n  file-key-2  \n")
    assert keys_from_environment({"FORGE_API_KEYS": "a, b,", "FORGE_API_KEYS_FILE": str(f)}) == (
        "a", "b", "file-key-1", "file-key-2")
    with pytest.raises(ForgeError, match="cannot read"):
        keys_from_environment({"FORGE_API_KEYS_FILE": str(tmp_path / "missing")})
    keys = ApiKeys(KEYS)
    assert KEYS[0] not in repr(keys) and KEYS[0] not in str(keys) and KEYS[0] not in f"{keys!r}"
    keys.check(f"Bearer {KEYS[1]}")
    keys.check(f"bearer  {KEYS[0]} ")
    for bad in (None, "", KEYS[0], f"Bearer {KEYS[0]}x", "Bearer \udcff", f"Token {KEYS[0]}"):
        with pytest.raises(Unauthorized):
            keys.check(bad)


def test_cli_serve_refuses_bad_paths_clearly(tmp_path: Path) -> None:
    def forge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()",
                               "serve", *args], capture_output=True, text=True, timeout=120)

    r = forge(str(tmp_path / "nope"))
    assert r.returncode == 1 and "no such job or checkpoint folder" in r.stderr
    r = forge(str(tmp_path / "a"), str(tmp_path / "b"), "--name", "x")
    assert r.returncode == 1 and "--name applies to one PATH" in r.stderr
    assert "Traceback" not in r.stderr


def test_request_parsing_units() -> None:
    assert parse_json_object(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for body, words in [(b"", "empty"), (b"null", "JSON null"), (b"1e999", "too large"),
                        (b'{"a": -Infinity}', "Infinity"), (b'"\\udfff"', "surrogate")]:
        with pytest.raises(BadRequest, match=words):
            parse_json_object(body)
    req = validate(OpenAICompletion, {"model": "m", "prompt": [[1, 2], "x"], "stop": "\n"})
    assert req.prompt == [[1, 2], "x"] and req.stop == ["\n"]
    with pytest.raises(BadRequest) as e:
        validate(OpenAICompletion, {"model": "m", "prompt": "x", "n": 0, "top_p": 3})
    assert e.value.param == "top_p" and "n:" in e.value.message  # every bad field named


def test_response_shapes() -> None:
    vec = [0.6, -0.8]
    out = api.embedding_response("m", {"embeddings": [vec], "prompt_tokens": 3}, "base64")
    raw = base64.b64decode(out["data"][0]["embedding"])
    assert list(struct.unpack("<2f", raw)) == pytest.approx(vec)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    result = {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": [
        {"token": "hi", "logprob": -0.5, "top": {"hi": -0.5}, "offset": 0}]}],
        "prompt_tokens": 2, "completion_tokens": 1}
    r = api.completion_response("m", result, logprobs=True)
    assert r["choices"][0]["logprobs"]["text_offset"] == [0] and r["usage"]["total_tokens"] == 3
    assert json.loads(api.sse(r)[len(b"data: "):]) == r and api.sse("[DONE]") == b"data: [DONE]\n\n"
