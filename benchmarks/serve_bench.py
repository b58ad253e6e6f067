"""Benchmark: serving throughput and latency, batched vs unbatched vs a plain transformers loop.

    python benchmarks/serve_bench.py [--models tiny,70m] [--concurrency 1,8,32] [--tokens 16]
                                     [--repeats 3] [--http-requests 200] [--out results.json]

For each model shape (``neox-tiny``; ``pythia-70m`` with random weights) and each concurrency c,
c client threads send max(4, c) requests (each a ~16-token prompt, greedy, ``--tokens`` new
tokens) to three servers in the same run, in ``--repeats`` rounds that alternate the servers:

* forge batched: ``serve.engine.ModelEngine`` with continuous batching (max_batch_size 32,
  batch_wait_timeout_s 0);
* forge unbatched: the same engine with max_batch_size 1;
* transformers: ``model.generate`` per request, one at a time (what a naive server does).

Greedy decoding makes all three generate the same tokens, so tokens/s compare like for like.
Then the HTTP + Ray Serve overhead per request: the tiny model behind the real application
(gateway + model deployment, via Serve's HTTP proxy) against the same engine called directly,
both asked for one token at concurrency 1, alternated; ``GET /healthz`` (proxy and gateway, no
model call) is timed alongside to show Serve's own ingress hop. Prints a Markdown table and writes JSON to ``--out``.
CPU only here; on a GPU machine the engine runs bf16 on the GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = "Ticket {i}: the courier left my parcel at the wrong address again.\nCategory:"
SHAPES = {"tiny": "neox-tiny", "70m": "pythia-70m", "410m": "pythia-410m", "1.4b": "pythia-1.4b"}


def build_checkpoint(preset: str, root: Path) -> Path:
    """A committed checkpoint (``<root>/<preset>/checkpoint-000001``) with random weights."""
    from orchestrator import checkpoints, models, storage

    texts = [PROMPT.format(i=i) + " Shipping<|endoftext|>" for i in range(200)]
    ckpt = root / preset / checkpoints.checkpoint_name(1)
    models.build_preset(preset, models.train_tokenizer(texts, 512), 0, str(ckpt / "model"),
                        weights=True)
    storage.write_json(str(ckpt / checkpoints.META), {"step": 1})
    checkpoints.write_rank_index(str(ckpt), 0)
    checkpoints.commit(str(ckpt), 1, 1)
    return ckpt


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def drive(call, concurrency: int, requests: int) -> dict[str, Any]:
    """Run ``requests`` calls from ``concurrency`` threads; wall time, tokens, latencies."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            n = call(i)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - start, "tokens": tokens[0], "latencies": latencies}


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s over all rounds and latency percentiles over all requests."""
    lat = [x for r in runs for x in r["latencies"]]
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(lat, 50),
            "p99_s": percentile(lat, 99), "tokens": tokens, "requests": len(lat)}


def engine_caller(engine, new_tokens: int):
    from serve.protocol import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, top_k=1)
    prompts = [engine.encode(PROMPT.format(i=i)) for i in range(64)]
    return lambda i: engine.generate(prompts[i % 64], params)[0].completion_tokens


def transformers_caller(engine, new_tokens: int):
    """model.generate per request, serialised by a lock: a plain one-at-a-time server."""
    import torch

    lock = threading.Lock()
    model, eos = engine.model, engine.eos_id
    prompts = [torch.tensor([engine.encode(PROMPT.format(i=i))]) for i in range(64)]

    def call(i: int) -> int:
        ids = prompts[i % 64]
        with lock, torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        new = out[0, ids.shape[1]:].tolist()
        return new.index(eos) + 1 if eos in new else len(new)

    return call


def bench_engines(path: str, levels: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from serve.engine import EngineSettings, ModelEngine

    # No idle wait: continuous batching admits late arrivals between steps anyway, and a timed
    # wait oversleeps on a busy machine (see docs/benchmarks.md).
    batched = ModelEngine(path, EngineSettings(max_batch_size=32, batch_wait_timeout_s=0))
    single = ModelEngine(path, EngineSettings(max_batch_size=1, batch_wait_timeout_s=0))
    variants = {"forge batched": engine_caller(batched, new_tokens),
                "forge unbatched": engine_caller(single, new_tokens),
                "transformers generate": transformers_caller(batched, new_tokens)}
    for call in variants.values():  # warm up every path once
        call(0)
    rows = []
    for c in levels:
        runs: dict[str, list] = {name: [] for name in variants}
        for _ in range(repeats):  # rounds alternate the servers, so load spikes hit all three
            for name, call in variants.items():
                runs[name].append(drive(call, c, max(4, c)))
        for name in variants:
            r = summarise(runs[name])
            rows.append({"concurrency": c, "server": name, **r})
            print(f"  c={c:<3} {name:<22} {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']:.3f} s"
                  f"  p99 {r['p99_s']:.3f} s", flush=True)
    batched.close()
    single.close()
    return rows


def bench_http_overhead(ckpt: Path, requests: int) -> dict[str, float]:
    """Per-request cost of HTTP + Serve: a 1-token request over HTTP (proxy, gateway, model
    replica) against the same request to an engine in this process, alternated one for one so
    both see the same machine load; the figure is the median of the pairwise differences."""
    import socket

    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.engine import ModelEngine
    from serve.protocol import EngineSettings, SamplingParams

    engine = ModelEngine(str(ckpt / "model"), EngineSettings(batch_wait_timeout_s=0))
    ids, params = engine.encode("hi"), SamplingParams(max_tokens=1, top_k=1)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"bench": str(ckpt)}, api_keys=["bench"],
                        deployment={"batch_wait_timeout_s": 0})  # the same engine as direct
        serve.run(app, name="bench", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                              headers={"Authorization": "Bearer bench"})
        body = {"text": "hi", "top_k": 1, "length": 1}
        direct, http, health = [], [], []
        for i in range(requests + 10):
            t = time.perf_counter()
            engine.generate(ids, params)
            d = time.perf_counter() - t
            t = time.perf_counter()
            r = client.post("/v1/models/bench/complete", json=body)
            h = time.perf_counter() - t
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            client.get("/healthz")  # proxy and gateway only: Serve's own ingress hop
            g = time.perf_counter() - t
            if i >= 10:  # the first few warm every path up
                direct.append(d)
                http.append(h)
                health.append(g)
    finally:
        engine.close()
        serve.shutdown()
        ray.shutdown()
    diffs = [h - d for h, d in zip(http, direct, strict=True)]
    ms = lambda v: round(1000 * v, 2)  # noqa: E731
    return {"requests": requests, "direct_p50_ms": ms(percentile(direct, 50)),
            "direct_p99_ms": ms(percentile(direct, 99)), "http_p50_ms": ms(percentile(http, 50)),
            "http_p99_ms": ms(percentile(http, 99)), "overhead_p50_ms": ms(percentile(diffs, 50)),
            "healthz_p50_ms": ms(percentile(health, 50))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,70m")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--http-requests", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hbm-gbps", type=float, default=None,
                    help="GPU memory bandwidth in GB/s, to print each shape's decode bound")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    root = Path(tempfile.mkdtemp(prefix="forge-serve-bench-"))
    import os

    results: dict = {"torch_threads": torch.get_num_threads(), "new_tokens": args.tokens,
                     "load_average_before": os.getloadavg()[0], "engines": {}}
    for key in filter(None, args.models.split(",")):
        ckpt = build_checkpoint(SHAPES[key], root)
        print(f"{key} ({SHAPES[key]}):", flush=True)
        results["engines"][key] = bench_engines(str(ckpt / "model"), levels, args.tokens,
                                                args.repeats)
        if args.hbm_gbps:  # each decode step reads every weight once: bf16, 2 bytes each
            from transformers import AutoConfig

            from orchestrator.models import count_params

            params = count_params(AutoConfig.from_pretrained(str(ckpt / "model")))
            bound = args.hbm_gbps * 1e9 / (2 * params)
            results.setdefault("decode_bound_steps_per_s", {})[key] = bound
            print(f"  memory-bandwidth bound: {bound:.0f} decode steps/s "
                  f"({params / 1e6:.0f}M params, {args.hbm_gbps:.0f} GB/s)", flush=True)
    if args.http_requests:
        tiny = build_checkpoint("neox-tiny", root / "http")
        results["http_overhead"] = bench_http_overhead(tiny, args.http_requests)
        print("http overhead:", json.dumps(results["http_overhead"]), flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def markdown(results: dict) -> str:
    lines = ["| model | c | server | tokens/s | p50 s | p99 s | vs unbatched |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, rows in results["engines"].items():
        for c in sorted({r["concurrency"] for r in rows}):
            at = [r for r in rows if r["concurrency"] == c]
            base = next(r["tokens_per_s"] for r in at if r["server"] == "forge unbatched")
            for r in at:
                lines.append(f"| {key} | {c} | {r['server']} | {r['tokens_per_s']:.0f} | "
                             f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | "
                             f"{r['tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
