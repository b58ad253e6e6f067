"""The batched engine on its own (no Ray): same answers as training's generation, batching,
stop sequences across token boundaries, streaming hold-back, sampling filters, embeddings."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from serve_fixtures import JOB

from orchestrator.generation import Sampling, complete
from serve.engine import EngineSettings, ModelEngine, Update
from serve.errors import ContextTooLong
from serve.sampling import SamplingParams, apply_penalties, choose_tokens
from serve.text import IncrementalText, StopMatcher

pytest_plugins = ["serve_fixtures"]

PROMPTS = [
    "The quick brown fox",
    "Stocks rose",
    "A new telescope saw light from the early universe.\nCategory:",
    "hi",
    "",
]


@pytest.fixture(scope="module")
def engine(tiny_jobs: dict[str, Path]):
    eng = ModelEngine.from_checkpoint(str(tiny_jobs[JOB]), settings=EngineSettings(max_batch_size=8))
    yield eng
    eng.close()


def _concurrently(fn, args: list) -> list:
    out = [None] * len(args)

    def run(i: int) -> None:
        out[i] = fn(*args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_greedy_matches_training_generation_alone_and_batched(engine: ModelEngine) -> None:
    for sampling in (Sampling(top_k=1, length=24), Sampling(top_k=1, length=24,
                                                            repetition_penalty=1.3)):
        want = [complete(engine.model, engine.tokenizer, p, sampling) for p in PROMPTS]
        assert [engine.complete(p, sampling)[0] for p in PROMPTS] == want
        before = engine.load()["max_rows"]
        got = _concurrently(lambda p, s=sampling: engine.complete(p, s)[0], [(p,) for p in PROMPTS])
        assert got == want
        assert engine.load()["max_rows"] >= 2 or before >= 2  # rows really shared a batch


def _spanning_stop(engine: ModelEngine, prompt: str) -> tuple[str, str]:
    """A stop string made of the end of one generated token and the start of the next."""
    ids = engine.encode(prompt)
    [c] = engine.generate(ids, SamplingParams(max_tokens=32, top_k=1))
    with torch.no_grad():  # the same greedy tokens, from transformers itself
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    pad_token_id=engine.eos_id)
    pieces = [engine.tokenizer.decode([t]) for t in out[0, len(ids) :].tolist()]
    for a, b in zip(pieces, pieces[1:], strict=False):
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in a + b:
            stop = a[-2:] + b[:2]
            if c.text.find(stop) > 0:
                return c.text, stop
    pytest.skip("no two clean neighbouring tokens in this output")


def test_stop_sequence_across_token_boundary_is_cut(engine: ModelEngine) -> None:
    for prompt in PROMPTS[:3]:
        full, stop = _spanning_stop(engine, prompt)
        sampling = Sampling(top_k=1, length=32, stop_sequences=[stop])
        got = engine.complete(prompt, sampling)[0]
        assert got == full[: full.find(stop)]
        assert got == complete(engine.model, engine.tokenizer, prompt, sampling)


def test_streamed_pieces_add_up_and_never_show_a_stop(engine: ModelEngine) -> None:
    full, stop = _spanning_stop(engine, PROMPTS[0])
    updates: list[Update] = []
    done = threading.Event()

    def sink(u: Update) -> None:
        updates.append(u)
        if u.finish_reason:
            done.set()

    params = SamplingParams(max_tokens=32, top_k=1, stop=(stop,), logprobs=2)
    engine.submit(engine.encode(PROMPTS[0]), params, sink, stream=True)
    assert done.wait(30)
    text = "".join(u.text for u in updates)
    assert text == full[: full.find(stop)] and updates[-1].finish_reason == "stop"
    assert len(updates) > 2  # really streamed, not one final piece
    shown = ""
    for u in updates:
        shown += u.text
        assert stop not in shown
    lps = [lp for u in updates for lp in u.logprobs]
    assert lps and all(lp.offset < len(text) for lp in lps)
    assert all(len(lp.top) <= 2 and lp.logprob <= 0 for lp in lps)


def test_n_sampled_completions_and_seeds(engine: ModelEngine) -> None:
    ids = engine.encode("Stocks rose")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    first = engine.generate(ids, params, n=4)
    assert len(first) == 4 and all(c.completion_tokens >= 1 for c in first)
    assert len({c.text for c in first}) == 1  # one seed, identical draws
    assert [c.text for c in engine.generate(ids, params)] == [first[0].text]
    unseeded = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.5), n=4)
    assert len({c.text for c in unseeded}) > 1
    assert all(c.finish_reason in ("stop", "length") for c in unseeded)


def test_length_caps_new_tokens_and_context_is_checked(engine: ModelEngine) -> None:
    [c] = engine.generate(engine.encode("hi"), SamplingParams(max_tokens=5, top_k=1))
    assert c.completion_tokens <= 5
    with pytest.raises(ContextTooLong) as e:
        engine.complete("hello " * 600, Sampling(top_k=1))
    assert e.value.param == "text" and "512" in e.value.message
    with pytest.raises(ContextTooLong) as e:
        engine.complete("hello", Sampling(top_k=1, length=600))
    assert e.value.param == "length"
    with pytest.raises(ContextTooLong):  # a megabyte is refused before tokenizing
        engine.encode("x" * (1 << 20))


def test_cancel_and_deadline_free_the_batch(engine: ModelEngine) -> None:
    ids = engine.encode("hi")
    seen: list[Update] = []
    rid = engine.submit(ids, SamplingParams(max_tokens=400, top_k=1), seen.append)
    time.sleep(0.05)
    engine.cancel([rid])
    expired: list[Update] = []
    engine.submit(ids, SamplingParams(max_tokens=400, top_k=1), expired.append,
                  deadline=time.monotonic() + 0.05)
    deadline = time.time() + 20
    while time.time() < deadline and not (seen and seen[-1].finish_reason
                                          and expired and expired[-1].finish_reason):
        time.sleep(0.02)
    assert seen[-1].finish_reason == "cancelled"
    assert expired[-1].finish_reason == "timeout"
    assert engine.load()["active"] == 0 and engine.load()["pending"] == 0


def test_embeddings_are_normalised_and_padding_free(engine: ModelEngine) -> None:
    texts = ["hello", "the team won the final match in extra time", "x"]
    vecs = engine.embed(texts)
    assert len(vecs) == 3 and all(len(v) == engine.model.config.hidden_size for v in vecs)
    for v in vecs:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4
    alone = engine.embed(["hello"])[0]  # no padding when alone: same vector
    assert max(abs(a - b) for a, b in zip(alone, vecs[0], strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(vecs[0], vecs[1], strict=True)) > 1e-3


# --- pieces -------------------------------------------------------------------------------


def test_incremental_text_equals_decode_of_all_tokens(engine: ModelEngine) -> None:
    rng = random.Random(0)
    vocab = len(engine.tokenizer)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        text = IncrementalText(engine.tokenizer)
        pieces = [text.add(t) for t in ids] + [text.flush()]
        assert "".join(pieces) == text.text == engine.tokenizer.decode(ids)


def test_stop_matcher_finds_earliest_and_holds_back_prefixes() -> None:
    m = StopMatcher(["###", "\nEnd"])
    assert m.find("abc###x\nEnd") == 3
    assert m.find("no stop here") is None
    assert m.find("x<|endoftext|>y") == 1  # <|endoftext|> always stops
    assert m.safe_end("hello #") == 6 and m.safe_end("hello ##") == 6
    assert m.safe_end("hello\nE") == 5 and m.safe_end("hello") == 5
    assert m.safe_end("a <|endof") == 2


def test_sampling_filters_follow_transformers() -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    seen = torch.zeros(4, 50, dtype=torch.bool)
    seen[:, :5] = True
    params = [SamplingParams(repetition_penalty=1.4)] * 4
    ours = apply_penalties(logits, params, seen, torch.zeros(4, 50, dtype=torch.int32))
    theirs = RepetitionPenaltyLogitsProcessor(1.4)(torch.arange(5).repeat(4, 1), logits.clone())
    assert torch.allclose(ours, theirs)
    none = [None] * 4
    # top-k 3: every draw among transformers' 3 survivors
    allowed = TopKLogitsWarper(3)(None, logits.clone()).isfinite()
    for _ in range(50):
        picks = choose_tokens(logits, [SamplingParams(top_k=3)] * 4, none)
        assert allowed[torch.arange(4), picks].all()
    # top-p 0.5 at temperature 0.7: draws only among TopPLogitsWarper's survivors
    allowed = TopPLogitsWarper(0.5)(None, logits.clone() / 0.7).isfinite()
    for _ in range(50):
        picks = choose_tokens(logits, [SamplingParams(top_p=0.5, temperature=0.7)] * 4, none)
        assert allowed[torch.arange(4), picks].all()
    # greedy: top_k 1, and tiny temperatures (no overflow, no NaN)
    for p in (SamplingParams(top_k=1), SamplingParams(temperature=1e-300), SamplingParams(top_p=0.0)):
        assert torch.equal(choose_tokens(logits, [p] * 4, none), logits.argmax(-1))
