"""What prepare reads: every bad-corpus file stops it with the problem and the line; pieces of a
checked file read back every example exactly once, with its line, in any format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_validate import CASES

from orchestrator.data.jsonl import read_examples
from orchestrator.data.report import CODES
from orchestrator.data.sources import Source, iter_examples, read_piece, scan
from orchestrator.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
sys.path.insert(0, str(BAD.parent))
from make_bad_corpus import write_huge_line  # noqa: E402

ERRORS = [c for c in CASES if CODES[c[1]][0] == "error"]
UNREADABLE = {"not-utf8", "invalid-json", "not-object", "missing-key", "not-string", "truncated-line",
              "json-array", "binary-file", "empty-file", "no-examples", "line-too-long"}
WARNINGS_ONLY = sorted({c[0] for c in CASES} - {c[0] for c in ERRORS})


def check_error(source: Source) -> str:
    s = scan(source)
    with pytest.raises(DataError) as e:
        s.raise_for_errors()
    return str(e.value)


@pytest.mark.parametrize(("name", "code", "line"), [c[:3] for c in ERRORS], ids=[f"{c[0]}-{c[1]}" for c in ERRORS])
def test_every_bad_file_stops_prepare_naming_the_problem_and_line(name, code, line):
    path = str(BAD / name)
    msg = check_error(Source.of(path, "jsonl"))
    assert f"{path}:{line or '-'}: {code}: " in msg, msg
    if code in UNREADABLE:  # tokenizer training (sample_texts) stops on it the same way
        with pytest.raises(DataError, match=code):
            list(iter_examples(Source.of(path, "jsonl")))


@pytest.mark.parametrize("name", WARNINGS_ONLY)
def test_warnings_do_not_stop_prepare(name):
    s = scan(Source.of(str(BAD / name), "jsonl"))
    s.raise_for_errors()
    assert s.report.warnings and sum(1 for p in s.pieces for _ in read_piece(s.source, p)) == s.report.summary["examples"]


def test_a_50_mb_line_is_named_without_being_read(tmp_path):
    path = write_huge_line(tmp_path / "huge.jsonl")
    msg = check_error(Source.of(str(path)))
    assert f"{path}:1: line-too-long: line is 50.0 MB" in msg


@pytest.mark.parametrize(("name", "words"), [
    ("unbalanced_quotes.csv", [":3: unbalanced quote in column 'text'"]),
    ("missing_column.csv", [":1: no column 'label' in the header (columns: text, category)"]),
    ("short_row.csv", [":3: row has 1 field(s), the header 2: column 'label' is missing"]),
])
def test_bad_csv_files_name_the_line(name, words):
    source = Source.of(str(BAD / name), "auto", "text", "label")
    with pytest.raises(DataError) as e:
        scan(source).raise_for_errors()
    for w in words:
        assert w in str(e.value)


def test_csv_and_parquet_records_follow_the_jsonl_rules(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f'"Ticket {i}\nTeam:",{"Billing" if i != 3 else ""}\n'
                                                             for i in range(6)), encoding="latin-1")
    msg = check_error(Source.of(str(tmp_path / "t.csv"), "auto", "text", "label"))
    assert ":2: completion-leading-space" in msg and ":8: empty-completion" in msg
    assert "numbers after the file name are the lines (prompt: column 'text', completion: column 'label')" in msg
    table = pa.table({"p": ["a\nTeam:", None, "c\nTeam:"], "c": [" x<|endoftext|>"] * 3})
    pq.write_table(table, tmp_path / "nulls.parquet")
    assert ":2: not-string: prompt is null" in check_error(Source.of(str(tmp_path / "nulls.parquet"), "auto", "p", "c"))
    pq.write_table(pa.table({"p": ["a"], "c": [1]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="column 'c' holds int64, not text"):
        scan(Source.of(str(tmp_path / "ints.parquet"), "auto", "p", "c"))
    with pytest.raises(DataError, match=r"no column 'prompt' \(columns: p, c\)"):
        scan(Source.of(str(tmp_path / "ints.parquet")))
    with pytest.raises(DataError, match="set dataset.format"):
        Source.of(str(tmp_path / "data.txt"))


def rows(n: int) -> list[dict]:
    return [{"prompt": f"Ticket {i}: {'naïve ' * (i % 7)}\nTeam:", "completion": f" Billing {i}<|endoftext|>"}
            for i in range(n)]


def test_pieces_read_back_every_example_once_with_its_line(tmp_path):
    data = rows(6000)
    body = "".join(json.dumps(r, ensure_ascii=False) + ("\r\n" if i % 5 else "\n\n") for i, r in enumerate(data))
    body = body.replace("\n", "\n\u00a0 \n", 1)  # a line of Unicode spaces is blank too
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + body.rstrip("\n").encode())  # a BOM, no final newline
    csv_body = "".join(f'"{r["prompt"]}",{r["completion"]}\r\n' + ("\r\n" if i % 9 == 0 else "")
                       for i, r in enumerate(data))
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + ("prompt,completion\r\n" + csv_body).encode())
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in data], "completion": [r["completion"] for r in data]}),
                   tmp_path / "t.parquet", row_group_size=700)
    for name in ("t.jsonl", "t.csv", "t.parquet"):
        source = Source.of(str(tmp_path / name))
        s = scan(source)
        s.raise_for_errors()
        assert len(s.pieces) > 3, name
        whole = list(iter_examples(source))
        assert [(e.prompt, e.completion) for e in whole] == [(r["prompt"], r["completion"]) for r in data]
        pieces = [e for p in s.pieces for e in read_piece(source, p, s.columns)]
        assert pieces == whole, name  # pieces in file order: the same examples and lines
        assert len(set(e.line for e in whole)) == 6000 and list(s.example_lines) == [e.line for e in whole]
    assert whole[1].line == 2  # Parquet: the row
    assert read_examples(str(tmp_path / "t.csv"))[1].line == 5  # CSV: the record's first line (2-3, blank 4)
