"""Serving: the engine on its own, then the seed API over real HTTP on a real local Ray Serve.

One Ray cluster and one Serve application for the module; every request goes through the HTTP
proxy exactly as a client's would.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import make_checkpoint

from orchestrator.errors import ForgeError
from orchestrator.generation import Sampling
from serve.app import ApiKeys, build_app, resolve_target
from serve.engine import CompletionEngine
from serve.errors import ContextTooLong

JOB = "tiny-job"
KEYS = ["test-key-1", "test-key-2"]
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
GREEDY = {"top_k": 1, "length": 24}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("storage") / JOB
    make_checkpoint(job, step=10)
    return job


# --- the engine, no Ray ---------------------------------------------------------------------


def test_engine_completes_and_greedy_is_deterministic(job_dir: Path) -> None:
    engine = CompletionEngine.from_checkpoint(str(job_dir))
    assert engine.context_length == 512
    greedy = Sampling(top_k=1, length=16)
    first = engine.complete("The quick brown fox", greedy)
    assert len(first) == 1 and isinstance(first[0], str)
    assert engine.complete("The quick brown fox", greedy, n=2) == first * 2
    sampled = engine.complete("Stocks rose", Sampling(length=8), n=3)
    assert len(sampled) == 3 and all(isinstance(t, str) for t in sampled)
    assert isinstance(engine.complete("", Sampling(length=4))[0], str)  # open-ended: empty prompt
    with pytest.raises(ContextTooLong):
        engine.complete("hello " * 600, greedy)


def test_build_app_is_secure_by_default(job_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_API_KEYS", raising=False)
    with pytest.raises(ForgeError, match="FORGE_API_KEYS"):
        build_app(str(job_dir))
    monkeypatch.setenv("FORGE_API_KEYS", " , ")
    with pytest.raises(ForgeError, match="FORGE_API_KEYS"):
        build_app(str(job_dir))
    assert build_app(str(job_dir), allow_no_auth=True) is not None
    monkeypatch.setenv("FORGE_API_KEYS", "k1,k2")
    assert build_app(str(job_dir)) is not None
    assert KEYS[0] not in repr(ApiKeys(KEYS)) and KEYS[0] not in str(ApiKeys(KEYS))


def test_model_name_defaults_to_job_folder(job_dir: Path) -> None:
    assert resolve_target(str(job_dir))[1] == JOB
    assert resolve_target(str(job_dir / "checkpoint-000010"))[1] == JOB
    assert resolve_target(str(job_dir), name="mine")[1] == "mine"
    with pytest.raises(ForgeError, match="invalid model name"):
        resolve_target(str(job_dir), name="a b")


# --- the HTTP API on Ray Serve --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_port(requested: int) -> int:
    """The port Serve's proxies listen on: ours, unless Serve was already running in this session."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.port
    except Exception:
        return requested


@pytest.fixture(scope="module")
def client(ray_cluster, job_dir: Path):
    """Our application on the session's Ray cluster (tests/conftest.py), behind Serve's HTTP proxy."""
    from ray import serve

    requested = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": requested})
    port = _http_port(requested)
    serve.run(build_app(str(job_dir), api_keys=KEYS), name=JOB, route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            yield c
    finally:
        serve.delete(JOB)


def _complete(
    client: httpx.Client, body: dict | bytes, headers: dict | None = None, model: str = JOB
) -> httpx.Response:
    url = f"/v1/models/{model}/complete"
    headers = AUTH if headers is None else headers
    if isinstance(body, bytes):
        return client.post(
            url, content=body, headers={**headers, "Content-Type": "application/json"}
        )
    return client.post(url, json=body, headers=headers)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.integration
def test_complete_returns_the_seed_shape(client: httpx.Client) -> None:
    before = int(time.time())
    r = _complete(client, {"text": "The quick brown fox", "length": 8, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"result", "timestamp", "model"}
    assert body["model"] == JOB
    assert isinstance(body["timestamp"], int) and before <= body["timestamp"] <= time.time() + 1
    assert len(body["result"]) == 2
    assert all(
        set(item) == {"completion"} and isinstance(item["completion"], str)
        for item in body["result"]
    )


@pytest.mark.integration
def test_health_and_model_list(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == [JOB]
    _error(client.get("/v1/models"), 401)


@pytest.mark.integration
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEYS[0]}x"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "longer", "not-bearer", "empty"],
)
def test_bad_or_missing_token_is_401(client: httpx.Client, headers: dict) -> None:
    r = _complete(client, {"text": "hi"}, headers=headers)
    assert _error(r, 401)["type"] == "authentication_error"
    assert r.headers.get("www-authenticate") == "Bearer"


@pytest.mark.integration
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"text": "hi", "temperature": 0}, "temperature", ["0.01", "top_k 1"]),
        ({"text": "hi", "top_p": 2}, "top_p", ["top_p", "<= 1"]),
        ({"top_k": 3}, "text", ["text", "missing"]),
        ({"text": "hi", "top_k": 1.5}, "top_k", ["top_k", "integer"]),
        ({"text": "hi", "top_k": "40"}, "top_k", ["top_k", "integer"]),
        ({"text": "hi", "stop_sequences": ["\n", ""]}, "stop_sequences", ["empty"]),
        ({"text": "hi", "n": 17}, "n", ["1 to 16"]),
        ({"text": "hi", "length": 0}, "length", ["length"]),
        ({"text": "hi", "max_tokens": 5}, "max_tokens", ["unknown field"]),
        (b'{"text": "hi",', None, ["not valid JSON"]),
        (b"", None, ["empty"]),
        (b'["hi"]', None, ["JSON object"]),
    ],
    ids=[
        "temp0",
        "top_p2",
        "no-text",
        "top_k-float",
        "top_k-str",
        "empty-stop",
        "n17",
        "length0",
        "unknown",
        "bad-json",
        "no-body",
        "not-object",
    ],
)
def test_bad_input_is_400_naming_the_field(client: httpx.Client, body, param, words) -> None:
    err = _error(_complete(client, body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    for w in words:
        assert w in err["message"], err["message"]


@pytest.mark.integration
def test_unknown_model_and_route_are_404(client: httpx.Client) -> None:
    err = _error(_complete(client, {"text": "hi"}, model="other"), 404)
    assert "other" in err["message"]
    _error(client.get("/no/such/route", headers=AUTH), 404)


@pytest.mark.integration
def test_over_context_is_413(client: httpx.Client) -> None:
    err = _error(_complete(client, {"text": "hello " * 600, "length": 8}), 413)
    assert err["param"] == "text" and "512" in err["message"]
    err = _error(_complete(client, {"text": "hello", "length": 600}), 413)
    assert err["param"] == "length" and "512" in err["message"]


@pytest.mark.integration
def test_stop_sequence_is_cut_from_the_output(client: httpx.Client) -> None:
    prompt = {"text": "The team won", **GREEDY}
    full = _complete(client, prompt).json()["result"][0]["completion"]
    assert _complete(client, prompt).json()["result"][0]["completion"] == full  # greedy: stable
    stop = next((w for w in re.findall(r"[A-Za-z]{2,}", full) if full.find(w) > 0), None)
    assert stop is not None, f"no usable stop sequence in {full!r}"
    r = _complete(client, {**prompt, "stop_sequences": [stop]})
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["completion"] == full[: full.find(stop)]


@pytest.mark.integration
def test_keys_never_reach_the_logs(client: httpx.Client) -> None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        pytest.skip("not the driver of a local cluster; its logs are elsewhere")
    _complete(client, {"text": "hi", "length": 2})
    for path in Path(node.get_logs_dir_path()).rglob("*"):
        if path.is_file():
            assert KEYS[0].encode() not in path.read_bytes(), f"API key found in {path}"
