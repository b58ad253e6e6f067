"""Data benchmarks (issue 3): prepare throughput against raw `tokenizers`, padding with and without
packing, validate speed, and the peak memory of every process while preparing a big file.

    python benchmarks/data_bench.py [--size-mb 1024] [--padding-mb 64] [--work /tmp/forge-data-bench]

Every figure that compares is a ratio measured in the same run on the same cores: the machine is
shared, so absolute rates drift from run to run. Files are generated under --work (never in the
repository) and kept for re-runs; results go to --work/results.json and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the baseline uses every core

SEP, EOT = "\n\n###\n\n", "<|endoftext|>"
RAY_WORKER_NICENESS = 15  # Ray's default for worker processes (RAY_worker_niceness)
CLASSES = ["billing", "shipping", "technical", "account", "refund", "other"]


def words(seed: int, n: int = 30_000) -> tuple[list[str], list[float]]:
    """A Zipf-distributed vocabulary of made-up words (realistic BPE behaviour, no downloads)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "er", "in", "or", "st", "th",
                 "ing", "ed", "re", "co", "de", "ma", "qu", "ex", "ly", "tion", "al", "ous"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    return vocab, [1 / (i + 1) for i in range(n)]


def generate(path: Path, size_mb: int, seed: int = 0) -> Path:
    """JSONL with the hosted workflow's spread of tasks and lengths: half classification (short
    prompts, one-word classes), a third conditional generation, the rest open-ended (empty
    prompts, long completions); lengths log-normal, every example under 2048 tokens."""
    if path.exists() and path.stat().st_size >= size_mb * 1e6:
        return path
    rng = random.Random(seed)
    vocab, weights = words(seed)
    cum = list(__import__("itertools").accumulate(weights))

    def text(n: int) -> str:
        return " ".join(rng.choices(vocab, cum_weights=cum, k=max(1, n)))

    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < size_mb * 1e6:
            lines = []
            for _ in range(2000):
                r = rng.random()
                if r < 0.5:
                    p, c = f"{i} " + text(int(rng.lognormvariate(3.6, 0.7))) + SEP, " " + rng.choice(CLASSES)
                elif r < 0.85:
                    p = f"{i} " + text(min(500, int(rng.lognormvariate(4.6, 0.7)))) + SEP
                    c = " " + text(min(300, int(rng.lognormvariate(3.8, 0.9))))
                else:
                    p, c = "", " " + text(min(700, int(rng.lognormvariate(5.3, 0.6))))
                lines.append(json.dumps({"prompt": p, "completion": c + EOT}))
                i += 1
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode())
    tmp.rename(path)
    return path


def tokenizer_for(path: Path, work: Path, vocab_size: int = 8192) -> Path:
    """A tokenizer trained on the file's first examples, saved under ``work``."""
    from orchestrator.data.prepare import sample_texts
    from orchestrator.models import train_tokenizer
    from orchestrator.spec import JobSpec

    out = work / f"tokenizer-{vocab_size}"
    if not out.exists():
        spec = JobSpec.model_validate({"name": "b", "dataset": {"train": str(path)}, "test_prompts": [{"prompt": "x"}]})
        train_tokenizer(sample_texts(spec, 20_000), vocab_size).save_pretrained(out)
    return out


def raw_tokenizers(path: Path, tokenizer_dir: Path) -> dict[str, float]:
    """The baseline, in a fresh process at Ray workers' niceness (Ray runs its workers at nice
    15, which matters on a shared machine): see ``_raw_tokenizers``."""
    import subprocess

    code = (f"import os, json, sys; os.nice({RAY_WORKER_NICENESS}); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from data_bench import _raw_tokenizers; print(json.dumps(_raw_tokenizers({str(path)!r}, {str(tokenizer_dir)!r})))")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raw_tokenizers(path: str, tokenizer_dir: str, batch: int = 8192) -> dict[str, float]:
    """`tokenizers` batch encoding of the same texts (prompt + completion, as prepare tokenizes
    them) with its own threads on every core; reading and JSON parsing not timed."""
    from transformers import AutoTokenizer

    from orchestrator.generation import prompt_text

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds, cpu, tokens, texts = 0.0, 0.0, 0, []

    def encode() -> None:
        nonlocal seconds, cpu, tokens
        start, start_cpu = time.perf_counter(), time.process_time()
        encs = backend.encode_batch(texts, add_special_tokens=False)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu  # every thread of this process
        tokens += sum(len(e.ids) for e in encs)
        texts.clear()

    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            texts.append(prompt_text(obj["prompt"]) + obj["completion"])
            if len(texts) == batch:
                encode()
    if texts:
        encode()
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu}


class ClusterSampler(threading.Thread):
    """Peak RSS and USS, and CPU time used, of this process and every descendant (the local Ray
    cluster: GCS, raylet with its object store, Ray Data workers), sampled every ``interval``
    seconds. CPU time counts from the sampler's creation (work before it is not counted)."""

    def __init__(self, interval: float = 0.5, uss_every: int = 20) -> None:
        import psutil

        super().__init__(daemon=True)
        self.interval, self.uss_every, self.stop = interval, uss_every, threading.Event()
        self.peaks: dict[str, dict[str, float]] = {}
        self.cpu: dict[int, list[float]] = {}  # pid -> [cpu seconds at first sight, latest]
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            t = p.cpu_times()
            self.cpu[p.pid] = [t.user + t.system] * 2

    def cpu_seconds(self) -> float:
        return sum(last - first for first, last in self.cpu.values())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds by kind of process (driver, Ray Data task workers, raylet, ...)."""
        out: dict[str, float] = {}
        for pid, (first, last) in self.cpu.items():
            name = self.peaks.get(str(pid), {}).get("name", "?")
            kind = "driver" if name == "driver" else name.split("/")[-1].split("(")[0].strip()[:40]
            out[kind] = round(out.get(kind, 0.0) + last - first, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def run(self) -> None:
        import psutil

        me, tick = psutil.Process(), 0
        while not self.stop.is_set():
            tick += 1
            for p in [me, *me.children(recursive=True)]:
                try:  # USS (reading smaps) costs CPU: only every uss_every samples
                    name = " ".join(p.cmdline()[:2])[-60:] if p.pid != me.pid else "driver"
                    rss = p.memory_info().rss
                    uss = p.memory_full_info().uss if tick % self.uss_every == 1 else 0
                    t = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.cpu.setdefault(p.pid, [0.0, 0.0])[1] = t.user + t.system
                peak = self.peaks.setdefault(str(p.pid), {"rss": 0, "uss": 0})
                peak["rss"], peak["uss"] = max(peak["rss"], rss), max(peak["uss"], uss)
                if "IDLE" not in name:
                    peak["name"] = name
            self.stop.wait(self.interval)


def prepare_file(path: Path, tokenizer, store: Path, packing: bool = True) -> tuple[Any, float]:
    from orchestrator.data.prepare import prepare
    from orchestrator.spec import JobSpec

    spec = JobSpec.model_validate({"name": "bench", "dataset": {"train": str(path), "packing": packing},
                                   "test_prompts": [{"prompt": "x"}], "storage": str(store)})
    start = time.perf_counter()
    data = prepare(spec, tokenizer, 2048, log=lambda m: print("  " + m, flush=True))
    return data, time.perf_counter() - start


def batch_padding(data, micro_batch: int = 8) -> float:
    """Pad share of micro-batches of consecutive rows padded to their longest (rounded up to 8),
    as the training collator pads them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    real = padded = 0
    for uri in data.shard_uris("train"):
        lengths = pc.list_value_length(pq.read_table(uri, columns=["input_ids"]).column("input_ids")).to_pylist()
        for i in range(0, len(lengths) - micro_batch + 1, micro_batch):
            chunk = lengths[i : i + micro_batch]
            real += sum(chunk)
            padded += micro_batch * (-(-max(chunk) // 8) * 8)
    return 1 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="the big file: throughput, memory, validate")
    ap.add_argument("--padding-mb", type=int, default=64, help="the file prepared packed and unpacked")
    ap.add_argument("--work", default="/tmp/forge-data-bench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "size_mb": args.size_mb}

    big = generate(work / f"data-{args.size_mb}mb.jsonl", args.size_mb)
    small = generate(work / f"data-{args.padding_mb}mb.jsonl", args.padding_mb, seed=1)
    tok_dir = tokenizer_for(small, work)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)

    from orchestrator.data.validate import validate_file

    start = time.perf_counter()
    report = validate_file(str(big))
    took = time.perf_counter() - start
    results["validate"] = {"seconds": took, "mb_per_s": big.stat().st_size / 1e6 / took, "errors": report.errors}
    print(f"validate: {results['validate']['mb_per_s']:.1f} MB/s", flush=True)

    before = raw_tokenizers(big, tok_dir)  # before and after prepare: the machine is shared
    results["load_average"] = {"after_baseline": os.getloadavg()[0]}
    print(f"raw tokenizers: {before['tokens_per_s']:,.0f} tokens/s", flush=True)

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        store = work / f"store-{time.time_ns()}"  # never a cache hit
        sampler = ClusterSampler()
        sampler.start()
        data, took = prepare_file(big, tok, store)
        sampler.stop.set()
        sampler.join()
        results["load_average"]["after_prepare"] = os.getloadavg()[0]
        m = data.manifest
        tokens = m["train"]["tokens"] + m["validation"]["tokens"]
        after = raw_tokenizers(big, tok_dir)
        results["load_average"]["after_second_baseline"] = os.getloadavg()[0]
        raw = results["raw_tokenizers"] = {
            "runs": [before, after], "tokens": before["tokens"],
            "tokens_per_s": 2 / (1 / before["tokens_per_s"] + 1 / after["tokens_per_s"]),  # mean time
            "tokens_per_cpu_s": 2 / (1 / before["tokens_per_cpu_s"] + 1 / after["tokens_per_cpu_s"])}
        cpu = sampler.cpu_seconds()
        results["prepare"] = {"seconds": took, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / took,
                              "ratio_to_raw": tokens / took / raw["tokens_per_s"],
                              "tokens_per_cpu_s": tokens / cpu, "cpu_ratio_to_raw": tokens / cpu / raw["tokens_per_cpu_s"],
                              "cpu_by_process": sampler.cpu_by_process()}
        top = sorted(sampler.peaks.items(), key=lambda kv: -kv[1]["rss"])
        results["memory"] = {"max_rss_gb": top[0][1]["rss"] / 2**30, "max_uss_gb": max(v["uss"] for _, v in top) / 2**30,
                             "processes": len(top),
                             "top_mb": [{"pid": k, "name": v.get("name", "?"), "rss": round(v["rss"] / 2**20),
                                         "uss": round(v["uss"] / 2**20)} for k, v in top[:8]]}
        print(json.dumps(results["prepare"]), json.dumps(results["memory"], indent=1), flush=True)

        packed, _ = prepare_file(small, tok, store)
        unpacked, _ = prepare_file(small, tok, store, packing=False)
        results["padding"] = {
            "packed": {"vs_max_seq_length": packed.manifest["train"]["padding_fraction"], "per_batch": batch_padding(packed)},
            "unpacked": {"vs_max_seq_length": unpacked.manifest["train"]["padding_fraction"],
                         "per_batch": batch_padding(unpacked)},
        }
    finally:
        ray.shutdown()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    p, r = results["prepare"], results["raw_tokenizers"]
    print("\n| measure | figure |\n| --- | --- |")
    print(f"| prepare throughput (wall) | {p['tokens_per_s']:,.0f} tokens/s = {p['ratio_to_raw']:.2f}x raw `tokenizers` "
          f"({r['tokens_per_s']:,.0f} tokens/s) |")
    print(f"| prepare per CPU-second | {p['tokens_per_cpu_s']:,.0f} tokens = {p['cpu_ratio_to_raw']:.2f}x raw "
          f"`tokenizers` ({r['tokens_per_cpu_s']:,.0f}) |")
    print(f"| validate | {results['validate']['mb_per_s']:.1f} MB/s |")
    print(f"| peak RSS, any process | {results['memory']['max_rss_gb']:.2f} GiB (USS {results['memory']['max_uss_gb']:.2f} GiB) |")
    for k in ("packed", "unpacked"):
        v = results["padding"][k]
        print(f"| padding, {k} | {v['per_batch']:.1%} per micro-batch of 8, {v['vs_max_seq_length']:.1%} at full length |")


if __name__ == "__main__":
    main()
