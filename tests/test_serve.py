"""The seed API over real HTTP on a real local Ray Serve: shape, auth, a table of bad requests,
64 concurrent clients, overload and time limits.

Every request goes through Serve's HTTP proxy exactly as a client's would; the applications are
shared by the session (``serve_fixtures.served``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import AUTH, JOB, KEYS, Served

pytestmark = pytest.mark.integration
pytest_plugins = ["serve_fixtures"]

GREEDY = {"top_k": 1, "length": 24}


@pytest.fixture(scope="module")
def client(served: Served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _complete(client: httpx.Client, body: dict | bytes, headers: dict | None = None,
              model: str = JOB) -> httpx.Response:
    url = f"/v1/models/{model}/complete"
    headers = AUTH if headers is None else headers
    if isinstance(body, bytes):
        return client.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    return client.post(url, json=body, headers=headers)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_complete_returns_the_seed_shape(client: httpx.Client) -> None:
    before = int(time.time())
    r = _complete(client, {"text": "The quick brown fox", "length": 8, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"result", "timestamp", "model"} and body["model"] == JOB
    assert isinstance(body["timestamp"], int) and before <= body["timestamp"] <= time.time() + 1
    assert len(body["result"]) == 2
    assert all(set(x) == {"completion"} and isinstance(x["completion"], str) for x in body["result"])


def test_health_and_model_list(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert r.status_code == 200, r.text
    cards = r.json()["data"]
    assert [m["id"] for m in cards] == ["other-job", JOB]
    assert all(m["object"] == "model" and m["context_length"] == 512 for m in cards)
    _error(client.get("/v1/models"), 401)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEYS[0]}x"},
    {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"},
    {"Authorization": f"bearer {KEYS[0][:-1]}"},
], ids=["none", "wrong", "longer", "not-bearer", "empty", "shorter"])
def test_bad_or_missing_token_is_401_on_every_route(client: httpx.Client, headers: dict) -> None:
    for method, url in [("POST", f"/v1/models/{JOB}/complete"), ("POST", f"/v1/models/{JOB}/embed"),
                        ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                        ("GET", "/v1/models"), ("GET", f"/v1/models/{JOB}")]:
        r = client.request(method, url, json={"text": "hi"}, headers=headers)
        assert _error(r, 401)["type"] == "authentication_error"
        assert r.headers.get("www-authenticate") == "Bearer"


def test_stop_sequence_is_cut_from_the_output(client: httpx.Client) -> None:
    prompt = {"text": "The team won", **GREEDY}
    full = _complete(client, prompt).json()["result"][0]["completion"]
    assert _complete(client, prompt).json()["result"][0]["completion"] == full  # greedy: stable
    stop = next((w for w in re.findall(r"[A-Za-z]{2,}", full) if full.find(w) > 0), None)
    assert stop is not None, f"no usable stop sequence in {full!r}"
    r = _complete(client, {**prompt, "stop_sequences": [stop]})
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["completion"] == full[: full.find(stop)]


def test_embed_shape_and_normalisation(client: httpx.Client) -> None:
    r = client.post(f"/v1/models/{JOB}/embed", json={"text": ["hello", "the team won"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"result", "timestamp", "model"} and len(body["result"]) == 2
    for item in body["result"]:
        vec = item["embedding"]
        assert len(vec) == 128 and abs(sum(x * x for x in vec) - 1) < 1e-4
    one = client.post(f"/v1/models/{JOB}/embed", json={"text": "hello"}, headers=AUTH).json()
    assert len(one["result"]) == 1
    assert max(abs(a - b) for a, b in zip(one["result"][0]["embedding"],
                                          body["result"][0]["embedding"], strict=True)) < 1e-4


# --- a table of bad requests: each with its status, the field it names and its message ------

MB = 1 << 20
C, E = f"/v1/models/{JOB}/complete", f"/v1/models/{JOB}/embed"
OC, OE = "/v1/completions", "/v1/embeddings"
M = {"model": JOB}

BAD = [  # (id, url, body, status, param, words in the message)
    ("temp0", C, {"text": "hi", "temperature": 0}, 400, "temperature", ["0.01", "top_k 1"]),
    ("top_p-2", C, {"text": "hi", "top_p": 2}, 400, "top_p", ["top_p", "<= 1"]),
    ("no-text", C, {"top_k": 3}, 400, "text", ["text", "missing"]),
    ("top_k-float", C, {"text": "hi", "top_k": 1.5}, 400, "top_k", ["integer"]),
    ("top_k-str", C, {"text": "hi", "top_k": "40"}, 400, "top_k", ["integer"]),
    ("top_k-neg", C, {"text": "hi", "top_k": -1}, 400, "top_k", [">= 0"]),
    ("empty-stop", C, {"text": "hi", "stop_sequences": ["\n", ""]}, 400, "stop_sequences", ["empty"]),
    ("1000-stops", C, {"text": "hi", "stop_sequences": ["x"] * 1000}, 400, "stop_sequences", ["at most 16"]),
    ("long-stop", C, {"text": "hi", "stop_sequences": ["x" * 5000]}, 400, "stop_sequences", ["at most 200"]),
    ("n17", C, {"text": "hi", "n": 17}, 400, "n", ["1 to 16"]),
    ("n0", C, {"text": "hi", "n": 0}, 400, "n", ["1 to 16"]),
    ("length0", C, {"text": "hi", "length": 0}, 400, "length", ["length"]),
    ("length-null", C, {"text": "hi", "length": None}, 400, "length", ["integer"]),
    ("rep0", C, {"text": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", ["greater than 0"]),
    ("temp-bool", C, {"text": "hi", "temperature": True}, 400, "temperature", ["number"]),
    ("text-number", C, {"text": 123}, 400, "text", ["string"]),
    ("unknown-field", C, {"text": "hi", "max_tokens": 5}, 400, "max_tokens", ["unknown field"]),
    ("bad-json", C, b'{"text": "hi",', 400, None, ["not valid JSON"]),
    ("no-body", C, b"", 400, None, ["empty"]),
    ("array", C, b'["hi"]', 400, None, ["JSON object", "array"]),
    ("NaN", C, b'{"text": "hi", "top_p": NaN}', 400, None, ["NaN", "not a JSON number"]),
    ("Infinity", C, b'{"text": "hi", "temperature": Infinity}', 400, None, ["Infinity"]),
    ("1e400", C, b'{"text": "hi", "temperature": 1e400}', 400, None, ["too large"]),
    ("not-utf8", C, b'{"text": "caf\xe9"}', 400, None, ["UTF-8"]),
    ("surrogate", C, b'{"text": "\\ud800"}', 400, None, ["surrogate"]),
    ("deep", C, b"[" * 100000 + b"]" * 100000, 400, None, ["nested too deeply"]),
    ("huge-int", C, {"text": "hi", "length": 10**30}, 413, "length", ["512"]),
    ("over-context", C, {"text": "hello", "length": 600}, 413, "length", ["512", "at most"]),
    ("1MB-prompt", C, {"text": "x" * MB}, 413, "text", ["context"]),
    ("5MB-body", C, {"text": "x" * (5 * MB)}, 413, None, ["over the limit"]),
    ("embed-empty", E, {"text": ""}, 400, "text", ["empty"]),
    ("embed-none", E, {"text": []}, 400, "text", ["1 to 256"]),
    ("oa-no-model", OC, {"prompt": "hi"}, 400, "model", ["missing"]),
    ("oa-model-number", OC, {"model": 5, "prompt": "hi"}, 400, "model", ["string"]),
    ("oa-unknown-model", OC, {"model": "nope", "prompt": "hi"}, 404, "model", ["nope", JOB]),
    ("oa-max_tokens0", OC, {**M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
    ("oa-max_tokens-float", OC, {**M, "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", ["integer"]),
    ("oa-n0", OC, {**M, "prompt": "hi", "n": 0}, 400, "n", ["1 to 16"]),
    ("oa-temp3", OC, {**M, "prompt": "hi", "temperature": 3}, 400, "temperature", ["0 to 2"]),
    ("oa-logprobs6", OC, {**M, "prompt": "hi", "logprobs": 6}, 400, "logprobs", ["0 to 5"]),
    ("oa-echo", OC, {**M, "prompt": "hi", "echo": True}, 400, "echo", ["not supported"]),
    ("oa-best_of", OC, {**M, "prompt": "hi", "best_of": 3}, 400, "best_of", ["n"]),
    ("oa-empty-list", OC, {**M, "prompt": []}, 400, "prompt", ["non-empty"]),
    ("oa-mixed-list", OC, {**M, "prompt": ["a", 1]}, 400, "prompt", ["entry 1"]),
    ("oa-bad-token", OC, {**M, "prompt": [999999]}, 400, "prompt", ["vocabulary"]),
    ("oa-empty-stop", OC, {**M, "prompt": "hi", "stop": ""}, 400, "stop", ["empty"]),
    ("oa-stream-str", OC, {**M, "prompt": "hi", "stream": "yes"}, 400, "stream", ["boolean"]),
    ("oa-logit_bias", OC, {**M, "prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias", ["not supported"]),
    ("oa-seed-neg", OC, {**M, "prompt": "hi", "seed": -1}, 400, "seed", ["0 to 2**63"]),
    ("oa-too-many", OC, {**M, "prompt": ["a"] * 8, "n": 16}, 400, "n", ["at most 64"]),
    ("oa-1MB", OC, {**M, "prompt": "hello " * (MB // 6)}, 413, "prompt", ["context"]),
    ("oe-empty", OE, {**M, "input": ""}, 400, "input", ["empty"]),
    ("oe-dims", OE, {**M, "input": "hi", "dimensions": 7}, 400, "dimensions", ["128"]),
    ("oe-format", OE, {**M, "input": "hi", "encoding_format": "hex"}, 400, "encoding_format", ["base64"]),
    ("unknown-model", "/v1/models/nope/complete", {"text": "hi"}, 404, None, ["nope"]),
    ("unknown-route", "/v2/complete", {"text": "hi"}, 404, None, ["no route"]),
    ("wrong-method", "/v1/completions", None, 405, None, ["not allowed"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_table(client: httpx.Client, case: tuple) -> None:
    _, url, body, status, param, words = case
    if body is None:
        r = client.get(url, headers=AUTH)
    elif isinstance(body, bytes):
        r = client.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = client.post(url, json=body, headers=AUTH)
    err = _error(r, status)
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"


def test_bad_requests_leave_the_server_serving(client: httpx.Client) -> None:
    """After the whole table (and the known crashers that must succeed), a normal request works."""
    for body in ({"text": ""}, {"text": "hi", "temperature": 1e-300, "length": 4},
                 {"text": "hi", "top_k": 10**20, "length": 4}):
        r = _complete(client, body)
        assert r.status_code == 200, (body, r.text)
    assert _complete(client, {"text": "hi", **GREEDY}).status_code == 200


def test_64_concurrent_requests_are_all_answered_in_batches(client: httpx.Client,
                                                            served: Served) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as c:
            return await asyncio.gather(*[
                c.post(f"/v1/models/{JOB}/complete", headers=AUTH,
                       json={"text": f"Ticket {i}: my parcel is late.\nCategory:", "length": 16})
                for i in range(64)])

    start = time.perf_counter()
    responses = asyncio.run(main())
    took = time.perf_counter() - start
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 64, statuses
    assert all(len(r.json()["result"]) == 1 for r in responses)
    load = served.model_handle(served.main_app).status.remote().result()["models"]
    print(f"\n64 concurrent requests in {took:.2f} s; engine: {load}")
    assert load[JOB]["max_rows"] > 1  # decoded together, not one by one


def test_overload_is_a_quick_503_with_retry_after(served: Served) -> None:
    async def one(c: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        t = time.perf_counter()
        r = await c.post("/v1/completions", json={"model": JOB, "prompt": "hi", "max_tokens": 40,
                                                  "temperature": 0})
        return r.status_code, time.perf_counter() - t, r

    async def main() -> list:
        async with httpx.AsyncClient(base_url=served.small_url, timeout=60,
                                     headers=served.small_headers) as c:
            return await asyncio.gather(*[one(c) for _ in range(12)])

    results = asyncio.run(main())
    rejected = [(dt, r) for status, dt, r in results if status == 503]
    served_ok = [dt for status, dt, _ in results if status == 200]
    assert sorted({status for status, _, _ in results}) == [200, 503], [x[:2] for x in results]
    print(f"\noverload: {len(served_ok)} answered, {len(rejected)} got 503; 503 latency "
          f"max {max(dt for dt, _ in rejected):.3f} s; answers took up to {max(served_ok):.2f} s")
    assert len(rejected) >= 6
    for dt, r in rejected:
        assert _error(r, 503)["code"] == "overloaded" and r.headers["retry-after"] == "1"
        assert dt < 5.0


def test_time_limit_is_408_and_frees_the_replica(served: Served) -> None:
    with httpx.Client(base_url=served.small_url, timeout=60, headers=served.small_headers) as c:
        assert c.get("/healthz").json() == {"status": "ok"}  # under its route_prefix
        t = time.perf_counter()
        # 64 rows of 480 tokens, 2 at a time: far past the app's 3 s limit
        r = c.post("/v1/completions", json={"model": JOB, "prompt": ["hi", "yo", "a", "b"],
                                            "n": 16, "max_tokens": 480, "temperature": 0})
        took = time.perf_counter() - t
        assert _error(r, 408)["code"] == "request_timeout"
        assert took < 10, took
        handle = served.model_handle(served.small_app)
        deadline = time.time() + 10
        while time.time() < deadline:
            load = handle.status.remote().result()["models"][JOB]
            if load["active"] == 0 and load["pending"] == 0:
                break
            time.sleep(0.2)
        assert load["active"] == 0 and load["pending"] == 0, load
        ok = c.post(f"/v1/models/{JOB}/complete", json={"text": "hi", "length": 4})
        assert ok.status_code == 200, ok.text


def test_a_killed_replica_is_replaced_and_no_request_gets_a_500(served: Served) -> None:
    """SIGKILL the small application's model replica, as Ray's chaos tests do: while Serve
    replaces it, clients get 503 (or 408 when the wait outlasts the time limit), never a 500."""
    handle = served.model_handle(served.small_app)
    pid = handle.status.remote().result()["pid"]
    os.kill(pid, signal.SIGKILL)
    start, statuses = time.perf_counter(), []
    with httpx.Client(base_url=served.small_url, timeout=30, headers=served.small_headers) as c:
        while time.perf_counter() - start < 120:
            r = c.post(f"/v1/models/{JOB}/complete", json={"text": "hi", "length": 2})
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (503, 408), r.text
            _error(r, r.status_code)
            time.sleep(0.3)
    took = time.perf_counter() - start
    print(f"\nreplica killed: answered again after {took:.1f} s; statuses meanwhile {statuses}")
    assert statuses[-1] == 200
    assert handle.status.remote().result()["pid"] != pid


def test_keys_never_reach_the_logs(client: httpx.Client) -> None:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        pytest.skip("not the driver of a local cluster; its logs are elsewhere")
    _complete(client, {"text": "hi", "length": 2})
    for path in Path(node.get_logs_dir_path()).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for key in KEYS:
                assert key.encode() not in data, f"API key found in {path}"
    assert json.dumps(KEYS)  # the keys were real strings
