"""The OpenAI-compatible API through the official ``openai`` client, unchanged; streaming as
server-sent events; embeddings; several fine-tunes on one deployment by name (multiplexing)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from serve_fixtures import AUTH, JOB, KEYS, OTHER, Served

pytestmark = pytest.mark.integration
pytest_plugins = ["serve_fixtures"]


@pytest.fixture(scope="module")
def oa(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)


def _seed(served: Served, model: str, body: dict) -> list[str]:
    r = httpx.post(f"{served.url}/v1/models/{model}/complete", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return [x["completion"] for x in r.json()["result"]]


def test_models_list_and_retrieve(oa: openai.OpenAI) -> None:
    assert sorted(m.id for m in oa.models.list()) == [OTHER, JOB]
    assert oa.models.retrieve(JOB).id == JOB
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")


def test_completion_matches_the_seed_api_and_counts_tokens(oa: openai.OpenAI, served: Served) -> None:
    r = oa.completions.create(model=JOB, prompt="The quick brown fox", max_tokens=12, temperature=0)
    [choice] = r.choices
    assert r.object == "text_completion" and r.model == JOB and r.id.startswith("cmpl-")
    assert choice.text == _seed(served, JOB, {"text": "The quick brown fox", "top_k": 1, "length": 12})[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_prompts_stops_and_logprobs(oa: openai.OpenAI) -> None:
    r = oa.completions.create(model=JOB, prompt=["Stocks rose", "hi"], n=3, max_tokens=6,
                              logprobs=2, temperature=1.0)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    greedy = oa.completions.create(model=JOB, prompt="The team won", max_tokens=24, temperature=0)
    text = greedy.choices[0].text
    stop = text[3:6]
    cut = oa.completions.create(model=JOB, prompt="The team won", max_tokens=24, temperature=0,
                                stop=[stop, "never-there"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_streaming_as_server_sent_events(oa: openai.OpenAI) -> None:
    whole = oa.completions.create(model=JOB, prompt="Stocks rose", max_tokens=20, temperature=0)
    chunks = list(oa.completions.create(model=JOB, prompt="Stocks rose", max_tokens=20,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # streamed token by token, not in one piece
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # a stop sequence across pieces is never shown, even partly
    stop = whole.choices[0].text[4:8]
    shown = ""
    for c in oa.completions.create(model=JOB, prompt="Stocks rose", max_tokens=20, temperature=0,
                                   stop=stop, stream=True):
        shown += c.choices[0].text if c.choices else ""
        assert stop not in shown
    assert shown == whole.choices[0].text[: whole.choices[0].text.find(stop)]


def test_raw_stream_ends_with_done(served: Served) -> None:
    body = {"model": JOB, "prompt": "hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_embeddings_float_and_base64(oa: openai.OpenAI) -> None:
    r = oa.embeddings.create(model=JOB, input=["hello", "the team won", "x"])  # base64 by default
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    for d in r.data:
        assert len(d.embedding) == 128
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, abs_tol=1e-4)
    floats = oa.embeddings.create(model=JOB, input="hello", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, r.data[0].embedding,
                                          strict=True)) < 1e-4


def test_errors_reach_the_client_as_its_exception_types(served: Served, oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=JOB, prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"]
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as e:
        oa.completions.create(model=JOB, prompt="hello " * 600, max_tokens=4)
    assert e.value.status_code == 413


def test_accepted_edge_cases(oa: openai.OpenAI) -> None:
    """Inputs that crash other servers, answered normally here."""
    for kwargs in ({"prompt": ""}, {"prompt": "hi", "max_tokens": None},
                   {"prompt": "hi", "temperature": 1e-300}, {"prompt": [5, 6, 7]},
                   {"prompt": "hi", "top_p": 0}, {"prompt": "hi", "extra_body": {"top_k": 10**20}}):
        r = oa.completions.create(model=JOB, **{"max_tokens": 4, **kwargs})
        assert r.choices and isinstance(r.choices[0].text, str), kwargs
    assert oa.completions.create(model=JOB, prompt="hi", max_tokens=None).usage.completion_tokens <= 16


def test_two_fine_tunes_by_name_on_one_deployment_with_lru_bound(served: Served) -> None:
    """Both names are served by the same replicas; with max_models_per_replica 1, loading one
    evicts the other, and each name keeps giving its own model's output."""
    body = {"text": "The quick brown fox", "top_k": 1, "length": 16}
    first = {m: _seed(served, m, body)[0] for m in (JOB, OTHER)}
    assert first[JOB] != first[OTHER]  # different weights behind the two names
    handle = served.model_handle(served.main_app)
    assert list(handle.status.remote().result()["models"]) == [OTHER]  # LRU bound: the last one
    for m in (JOB, OTHER, JOB):
        assert _seed(served, m, body)[0] == first[m]
    assert list(handle.status.remote().result()["models"]) == [JOB]
