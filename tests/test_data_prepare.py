"""forge data prepare on a real local Ray cluster: the shard layout and manifest, labels and
positions, the validation split, the cache, byte-identical re-runs, JSONL/CSV/Parquet, local and
s3://, and failures that leave nothing a later run could take for whole."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from orchestrator import storage
from orchestrator.data.prepare import prepare, sample_texts
from orchestrator.data.tokenize import IGNORE, tokenize_pair
from orchestrator.errors import DataError
from orchestrator.models import train_tokenizer
from orchestrator.spec import JobSpec

pytestmark = pytest.mark.integration
LABELS = ["Billing", "Shipping", "Technical"]
WORDS = ["refund", "invoice", "parcel", "courier", "crash", "error", "login", "café", "naïve", "late", "broken", "again", "please"]


def make_rows(n: int, seed: int = 0, sorted_by_class: bool = False) -> list[dict]:
    """Classification tickets, a few conditional generations and open-ended texts (empty prompts)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        kind = i % 10
        if kind < 7:
            label = LABELS[i * 3 // n] if sorted_by_class else rng.choice(LABELS)
            rows.append({"prompt": f"Ticket {i}: {words}\n\n###\n\n", "completion": f" {label}<|endoftext|>"})
        elif kind < 9:
            rows.append({"prompt": f"Summarize {i}: {words}\n\n###\n\n", "completion": f" {words[:20]}<|endoftext|>"})
        else:
            rows.append({"prompt": "", "completion": f" {words} {i}<|endoftext|>"})
    return rows


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([r["prompt"] + r["completion"] for r in make_rows(300, 1)], 400)


def make_spec(train: str, store: str, validation: str | None = None, **dataset) -> JobSpec:
    raw = {"name": "prep", "dataset": {"train": train, "validation": validation, **dataset},
           "training": {"max_seq_length": 64, "seed": 7}, "test_prompts": [{"prompt": "x"}], "storage": store}
    return JobSpec.model_validate(raw)


def read_split(uri: str, manifest: dict, split: str) -> pa.Table:
    tables = []
    for s in manifest[split]["shards"]:
        fs, path = storage.filesystem(storage.join(uri, s["path"]))
        t = pq.read_table(path, filesystem=fs)
        assert t.num_rows == s["rows"]  # the manifest's counts are exact
        tables.append(t)
    return pa.concat_tables(tables)


def segments(row: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """A packed row's examples: (input_ids, labels, position_ids), cut where positions restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [tuple(row[k][a:b] for k in ("input_ids", "labels", "position_ids"))
            for a, b in zip(starts, starts[1:], strict=False)]


def check_dataset(data, rows: list[dict], tok, max_len: int, packed: bool, lines: list[int]) -> None:
    """Every example exactly once, with tokenize_pair's labels (the first forced to IGNORE when
    packed), positions 0..n-1 per example, rows within max_len, global row indices in order."""
    m = data.manifest
    expected = Counter()
    for r in rows:
        ref = tokenize_pair(tok, r["prompt"], r["completion"])
        expected[tuple(ref["input_ids"]), tuple(ref["labels"])] += 1
    train = read_split(data.uri, m, "train").to_pylist()
    val = read_split(data.uri, m, "validation").to_pylist()
    assert [r["row"] for r in train] == list(range(m["train"]["rows"]))
    assert [r["row"] for r in val] == list(range(m["validation"]["rows"]))
    seen = Counter()
    for r in train:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= max_len
        for ids, labels, pos in segments(r):
            assert pos == list(range(len(ids)))
            if packed:
                assert labels[0] == IGNORE
                ref = next(k for k in expected if k[0] == tuple(ids) and k[1][1:] == tuple(labels[1:]))
                seen[ref] += 1
            else:
                seen[tuple(ids), tuple(labels)] += 1
    assert sum(seen.values()) == m["train"]["examples"]
    for r in val:
        src = rows[lines.index(r["line"])]
        ref = tokenize_pair(tok, src["prompt"], src["completion"])
        assert (r["input_ids"], r["labels"]) == (ref["input_ids"], ref["labels"])
        assert r["position_ids"] == list(range(len(r["input_ids"])))
        seen[tuple(r["input_ids"]), tuple(r["labels"])] += 1
    assert seen == expected
    tokens = sum(len(r["input_ids"]) for r in train)
    assert m["train"]["tokens"] == tokens
    assert m["train"]["loss_tokens"] == sum(t != IGNORE for r in train for t in r["labels"])
    assert m["train"]["padding_fraction"] == pytest.approx(1 - tokens / (len(train) * max_len), abs=1e-6)


def shard_digests(data) -> dict[str, str]:
    out = {}
    for split in ("train", "validation"):
        for uri in data.shard_uris(split):
            out[uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[-1]] = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    return out


def mtimes(data) -> list[int]:
    return [Path(u).stat().st_mtime_ns for split in ("train", "validation") for u in data.shard_uris(split)]


def test_packed_jsonl_layout_labels_split_and_cache(ray_cluster, tmp_path, tok):
    rows = make_rows(240)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(str(src), str(tmp_path / "store"), rows_per_shard=7)
    logs: list[str] = []
    data = prepare(spec, tok, 64, log=logs.append)
    m = data.manifest
    assert data.uri == storage.join(str(tmp_path / "store"), "datasets", m["hash"])
    assert m["version"] == 2 and m["packed"] and m["max_seq_length"] == 64
    assert m["validation"]["examples"] == m["validation"]["rows"] == 24  # exactly 10%, decided by line
    assert m["train"]["examples"] == 216 and m["train"]["rows"] < 216
    assert m["train"]["padding_fraction"] < 0.05
    assert [s["rows"] for s in m["train"]["shards"]][:-1] == [7] * (len(m["train"]["shards"]) - 1)
    assert [s["path"] for s in m["train"]["shards"]][:2] == ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert m["sources"][0]["examples"] == 240 and m["settings"]["seed"] == 7
    check_dataset(data, rows, tok, 64, packed=True, lines=list(range(1, 241)))
    assert any("prepared 216 train examples" in line for line in logs)

    before = mtimes(data)
    logs.clear()
    again = prepare(spec, tok, 64, log=logs.append)
    assert logs == [f"data: cache hit {data.uri}"] and again.manifest == m
    assert mtimes(again) == before  # nothing rewritten
    other = prepare(make_spec(str(src), str(tmp_path / "store"), rows_per_shard=7, packing=False), tok, 64, log=logs.append)
    assert other.uri != data.uri  # a setting that changes the output changes the hash


def test_unpacked_rows_are_one_example_each_with_exact_labels(ray_cluster, tmp_path, tok):
    rows = make_rows(120, seed=2)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare(make_spec(str(src), str(tmp_path / "store"), packing=False), tok, 64, log=lambda m: None)
    m = data.manifest
    assert not m["packed"] and m["train"]["rows"] == m["train"]["examples"] == 108
    check_dataset(data, rows, tok, 64, packed=False, lines=list(range(1, 121)))


def test_reruns_are_byte_identical_and_a_sorted_file_trains_mixed(ray_cluster, tmp_path, tok):
    """Over 1 MiB: several pieces and read tasks, so Ray's scheduling could reorder work."""
    rows = make_rows(16_000, seed=3, sorted_by_class=True)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    assert src.stat().st_size > 1.2e6
    a = prepare(make_spec(str(src), str(tmp_path / "a"), rows_per_shard=500), tok, 64, log=lambda m: None)
    b = prepare(make_spec(str(src), str(tmp_path / "b"), rows_per_shard=500), tok, 64, log=lambda m: None)
    assert a.manifest["hash"] == b.manifest["hash"] and len(a.shard_uris("train")) > 3
    assert shard_digests(a) == shard_digests(b)
    first = read_split(a.uri, a.manifest, "train").slice(0, 200).to_pylist()
    names = {lab: tok(f" {lab}", add_special_tokens=False)["input_ids"] for lab in LABELS}
    found = {lab for r in first for lab, ids in names.items() if ids[0] in r["labels"]}
    assert found == set(LABELS)  # the first rows already hold every class


def test_csv_and_parquet_inputs_give_the_same_examples(ray_cluster, tmp_path, tok):
    rows = make_rows(90, seed=4)
    rows[5]["prompt"] = "Ticket, with a comma\nand a \"quote\"\n\n###\n\n"  # a quoted field over lines
    csv_text = "text,label\n" + "".join(
        ",".join('"' + v.replace('"', '""') + '"' for v in (r["prompt"], r["completion"])) + "\n" for r in rows)
    (tmp_path / "t.csv").write_text(csv_text, encoding="utf-8")
    pq.write_table(pa.table({"q": [r["prompt"] for r in rows], "a": [r["completion"] for r in rows]}),
                   tmp_path / "t.parquet", row_group_size=20)
    csv_lines, line = [], 2
    for r in rows:  # each record's first line in the CSV
        csv_lines.append(line)
        line += (r["prompt"] + r["completion"]).count("\n") + 1
    store = str(tmp_path / "store")
    c = prepare(make_spec(str(tmp_path / "t.csv"), store, prompt_column="text", completion_column="label"),
                tok, 64, log=lambda m: None)
    check_dataset(c, rows, tok, 64, packed=True, lines=csv_lines)
    p = prepare(make_spec(str(tmp_path / "t.parquet"), store, prompt_column="q", completion_column="a"),
                tok, 64, log=lambda m: None)
    check_dataset(p, rows, tok, 64, packed=True, lines=list(range(1, 91)))
    assert c.manifest["settings"]["format"] == "csv" and p.manifest["settings"]["format"] == "parquet"


def test_validation_file_and_s3_input_and_storage(ray_cluster, s3_bucket, tok):
    rows, val = make_rows(60, seed=5), make_rows(12, seed=6)
    storage.write_bytes(f"{s3_bucket}/in/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    storage.write_bytes(f"{s3_bucket}/in/val.jsonl", "".join(json.dumps(r) + "\n" for r in val).encode())
    spec = make_spec(f"{s3_bucket}/in/train.jsonl", f"{s3_bucket}/store", validation=f"{s3_bucket}/in/val.jsonl")
    data = prepare(spec, tok, 64, log=lambda m: None)
    assert data.uri.startswith(f"{s3_bucket}/store/datasets/")
    assert all(u.startswith(data.uri + "/train/part-") for u in data.shard_uris("train"))
    m = data.manifest
    assert m["train"]["examples"] == 60 and m["validation"]["examples"] == 12
    assert storage.read_json(f"{data.uri}/manifest.json") == m
    val_rows = read_split(data.uri, m, "validation").to_pylist()
    assert sorted(r["line"] for r in val_rows) == list(range(1, 13))
    logs: list[str] = []
    assert prepare(spec, tok, 64, log=logs.append).uri == data.uri and "cache hit" in logs[0]
    assert [t for t in sample_texts(spec, max_examples=3)] == [r["prompt"] + r["completion"] for r in rows[:3]]


def test_bad_lines_fail_before_anything_is_written(ray_cluster, tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "x\\n\\n###\\n\\n", "completion": 5}'
    lines[6] = "{'prompt': 'single quotes'}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        prepare(make_spec(str(path), str(tmp_path / "store")), tok, 64)
    assert f"{path}:3: not-string: completion is a number (5)" in str(e.value)
    assert f"{path}:7: invalid-json" in str(e.value)
    assert not (tmp_path / "store").exists()


def test_too_long_example_names_its_line_and_leaves_no_dataset(ray_cluster, tmp_path, tok):
    rows = make_rows(40)
    rows[17] = {"prompt": "Summarize: " + " ".join(WORDS * 6) + "\n\n###\n\n", "completion": " ok<|endoftext|>"}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:18: prompt \+ completion is \d+ tokens, over max_seq_length 64"):
        prepare(make_spec(str(path), str(tmp_path / "store")), tok, 64, log=lambda m: None)
    assert not list((tmp_path / "store").rglob("*.*"))  # nothing written is left


def test_a_pipeline_error_mid_write_and_a_killed_run_leave_nothing_taken_for_whole(ray_cluster, tmp_path, tok):
    """The file changes under a running prepare (a real fault: the read tasks find a line that is
    no longer what was checked), in the last read task, after earlier tasks' shards are written:
    the error names the line and the folder is removed. Then a killed run's leftover (shards, no
    manifest) is removed by the next run, which writes the same bytes as a clean run."""
    from orchestrator.data.pipeline import BY_HASH, plan_reads
    from orchestrator.data.sources import Source, scan

    rows = make_rows(16_000, seed=8)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    original = path.read_bytes()
    spec = make_spec(str(path), str(tmp_path / "store"), rows_per_shard=50)
    plans = plan_reads([(scan(Source.of(str(path))), BY_HASH)], spec.training.seed)
    assert len(plans) >= 2
    piece = plans[-1].pieces[0]
    end = original.index(b"\n", piece.start)

    def corrupt(message: str) -> None:
        if message.startswith("data: tokenizing"):
            with open(path, "r+b") as f:
                f.seek(piece.start)
                f.write(b"#" * (end - piece.start))

    with pytest.raises(DataError, match=rf"{path}:{piece.first_line}: not a prompt/completion object"):
        prepare(spec, tok, 64, log=corrupt)
    assert not list((tmp_path / "store").rglob("*.*"))  # the shards written before the error are gone

    path.write_bytes(original)
    clean = prepare(spec, tok, 64, log=lambda m: None)
    digests = shard_digests(clean)
    Path(clean.uri, "manifest.json").unlink()  # killed before the commit:
    Path(clean.shard_uris("train")[-1]).write_bytes(b"PAR1 cut short")  # a shard half written
    logs: list[str] = []
    again = prepare(spec, tok, 64, log=logs.append)
    assert any("removing an uncommitted leftover" in line for line in logs)
    assert shard_digests(again) == digests and Path(again.uri, "manifest.json").exists()


def test_cli_prepare_prints_a_summary_then_hits_the_cache(ray_cluster, tmp_path):
    """`forge data prepare JOB.yaml`: a preset's tokenizer trained on the data, then prepare."""
    import yaml
    from typer.testing import CliRunner

    from orchestrator.data.cli import data_app

    write_jsonl(tmp_path / "train.jsonl", make_rows(150, seed=9))
    job = {"name": "cli-prep", "model": {"base": "neox-tiny", "tokenizer_vocab_size": 300},
           "dataset": {"train": "train.jsonl", "rows_per_shard": 50}, "training": {"max_seq_length": 128},
           "test_prompts": [{"prompt": "Ticket 1: refund\n\n###\n\n"}], "storage": str(tmp_path / "store")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    runner = CliRunner()
    r = runner.invoke(data_app, ["prepare", str(tmp_path / "job.yaml"), "--set", "dataset.packing=false"])
    assert r.exit_code == 0, r.output
    assert "Prepared dataset" in r.output and "135 examples in 135 rows" in r.output
    assert "15 examples in 15 rows" in r.output and "3 shards" in r.output
    r = runner.invoke(data_app, ["prepare", str(tmp_path / "job.yaml"), "--set", "dataset.packing=false"])
    assert r.exit_code == 0 and "data: cache hit" in r.output


def test_cli_prepare_bad_data_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    import yaml

    bad = Path(__file__).parent / "data" / "bad" / "latin1.jsonl"
    job = {"name": "bad", "dataset": {"train": str(bad)}, "test_prompts": [{"prompt": "x"}],
           "storage": str(tmp_path / "store")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    r = subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", "data", "prepare",
                        str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{bad}:3: not-utf8: not UTF-8" in r.stderr and "Latin-1" in r.stderr
    assert not (tmp_path / "store" / "datasets").exists()


def test_a_worker_killed_mid_prepare_changes_nothing(ray_cluster, tmp_path, tok):
    """SIGKILL a Ray Data worker while it tokenizes: Ray runs its task again and the shards are
    byte for byte those of an undisturbed run (the output depends on the inputs alone)."""
    import os
    import signal
    import threading
    import time

    import psutil

    path = write_jsonl(tmp_path / "train.jsonl", make_rows(16_000, seed=10))
    clean = prepare(make_spec(str(path), str(tmp_path / "a"), rows_per_shard=300), tok, 64, log=lambda m: None)
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            for p in psutil.Process().children(recursive=True):  # this session's cluster only
                try:
                    busy = "MapBatches(process_block)" in " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if busy:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            time.sleep(0.01)

    def start_killer(message: str) -> None:
        if message.startswith("data: tokenizing"):
            threading.Thread(target=kill_a_worker, daemon=True).start()

    again = prepare(make_spec(str(path), str(tmp_path / "b"), rows_per_shard=300), tok, 64, log=start_killer)
    assert killed, "no worker was running a task to kill"
    assert shard_digests(again) == shard_digests(clean)
