"""forge data validate: every file of the bad corpus is named by its code, words and line; --fix
repairs what is mechanical; memory stays bounded; the CLI's exit codes follow errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from conftest import write_jsonl
from orchestrator.data.format import detect_separator
from orchestrator.data.report import CODES
from orchestrator.data.validate import SAMPLE, validate_file
from orchestrator.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
sys.path.insert(0, str(BAD.parent))
from make_bad_corpus import write_huge_line  # noqa: E402

# file, code, line (None: the whole file), field, words the message must hold
CASES = [
    ("latin1.jsonl", "not-utf8", 3, "prompt", ["Latin-1", "0xe9", "byte offset 225", "café"]),
    ("macroman.jsonl", "not-utf8", 2, "prompt", ["MacRoman", "0x8f", "crème brûlée"]),
    ("utf16le_bom.jsonl", "not-utf8", 1, None, ["UTF-16", "byte-order mark FF FE"]),
    ("utf16le_nobom.jsonl", "not-utf8", 1, None, ["UTF-16", "every other byte is NUL"]),
    ("corrupt_utf8.jsonl", "not-utf8", 4, None, ["0xff", "stray bytes"]),
    ("utf8_bom.jsonl", "utf8-bom", 1, None, ["byte-order mark"]),
    ("truncated.jsonl", "truncated-line", 11, None, ["without a newline", "cut off"]),
    ("json_array.jsonl", "json-array", 1, None, ["JSON array", "not JSON Lines"]),
    ("numbers.jsonl", "not-string", 2, "completion", ["a number (5)", "not a string"]),
    ("numbers.jsonl", "not-string", 5, "completion", ["a number (1.0)"]),
    ("nulls.jsonl", "not-string", 3, "prompt", ["prompt is null"]),
    ("nulls.jsonl", "not-string", 7, "completion", ["completion is null"]),
    ("binary.bin", "binary-file", None, None, ["binary data", "NUL bytes"]),
    ("compressed.jsonl", "binary-file", None, None, ["gzip"]),
    ("empty.jsonl", "empty-file", None, None, ["empty"]),
    ("blank_only.jsonl", "no-examples", None, None, ["no usable example", "all blank"]),
    ("blank_only.jsonl", "blank-line", 2, None, ["blank line"]),
    ("missing_keys.jsonl", "missing-key", 4, "completion", ["no 'completion' key"]),
    ("missing_keys.jsonl", "missing-key", 8, "prompt", ["no 'prompt' key", "'text', 'label'"]),
    ("extra_keys.jsonl", "extra-key", 5, "id", ["'id', 'source'"]),
    ("trailing_whitespace.jsonl", "prompt-trailing-whitespace", 6, "prompt", ["ends with whitespace ' '"]),
    ("no_leading_space.jsonl", "completion-leading-space", 2, "completion", ["not a space"]),
    ("missing_eot.jsonl", "completion-missing-eot", 9, "completion", ["does not end with <|endoftext|>"]),
    ("inconsistent_separator.jsonl", "separator-inconsistent", 4, "prompt", ["'\\nLabel:'", "'\\nCategory:'"]),
    ("inconsistent_separator.jsonl", "separator-inconsistent", 7, "prompt", ["80% of prompts"]),
    ("missing_separator.jsonl", "separator-missing", 6, "prompt", ["does not end with the separator '\\nCategory:'"]),
    ("no_separator.jsonl", "no-separator", None, None, ["no fixed ending"]),
    ("separator_in_prompt.jsonl", "separator-in-prompt", 3, "prompt", ["'\\nCategory:' also appears inside"]),
    ("duplicates.jsonl", "duplicate", 7, None, ["same prompt and completion as line 2"]),
    ("conflicts.jsonl", "conflict", 8, "completion", ["same prompt as line 3", "different completion"]),
    ("invalid_json.jsonl", "invalid-json", 5, None, ["invalid JSON", "single quotes"]),
    ("lone_surrogate.jsonl", "invalid-json", 4, "prompt", ["\\ud83d", "half of a UTF-16 surrogate pair"]),
    ("not_object.jsonl", "not-object", 3, None, ["an array, not an object"]),
    ("empty_completion.jsonl", "empty-completion", 3, "completion", ["no text"]),
    ("eot_inside.jsonl", "eot-inside", 6, "completion", ["<|endoftext|> before its end"]),
    ("few_examples_generation.jsonl", "few-examples", None, None, ["12 examples", "conditional-generation", "200"]),
    ("open_ended_small.jsonl", "few-examples", None, None, ["20 examples", "open-ended", "500"]),
]
ADVICE = {"few-per-class", "few-examples"}  # small corpus files get these too


def find(report, code: str, line: int | None):
    hits = [p for p in report.problems if p.code == code and p.line == line]
    assert hits, f"no {code} at line {line}: {[(p.code, p.line) for p in report.problems]}"
    return hits[0]


@pytest.mark.parametrize(("name", "code", "line", "field", "words"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_bad_file_names_the_problem_and_line(name, code, line, field, words):
    report = validate_file(str(BAD / name))
    p = find(report, code, line)
    assert p.field == field
    for w in words:
        assert w in p.message, f"{w!r} not in {p.message!r}"
    assert p.fix and p.severity == CODES[code][0]
    # nothing but the planted problem (and small-data advice) is reported
    others = {c for c in report.counts if c not in ADVICE and c != code}
    planted = {c[1] for c in CASES if c[0] == name}
    assert others <= planted | {"blank-line", "extra-key", "missing-key"}, others
    assert report.ok == (CODES[code][0] == "warning" and report.errors == 0)


def test_huge_single_line_is_reported_without_holding_it(tmp_path):
    path = write_huge_line(tmp_path / "huge.jsonl")
    tracemalloc.start()
    report = validate_file(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    p = find(report, "line-too-long", 1)
    assert "50.0 MB" in p.message and p.severity == "error"
    assert peak < 8e6  # the 50 MB line is skipped to its end, never held whole


def test_a_clean_file_has_no_problems_and_a_summary(tmp_path, tiny_rows):
    rows = tiny_rows * 9  # 270 rows, 90 per class; make them distinct
    rows = [{**r, "prompt": r["prompt"].replace("Ticket", f"Ticket {i}")} for i, r in enumerate(rows)]
    report = validate_file(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert report.ok and report.problems == [] and report.counts == {}
    s = report.summary
    assert s["examples"] == 270 and s["task"] == "classification" and s["separator"] == "\nTeam:"
    assert s["classes"] == {"Billing": 90, "Shipping": 90, "Technical": 90}
    assert s["length_unit"] == "characters" and 0 < s["length"]["p50"] <= s["length"]["p99"] <= s["length"]["max"]
    assert s["recommended_epochs"] == 4
    json.dumps(report.to_dict())  # machine-readable as is


def test_separator_detection():
    cat = [f"Ticket {i}: {w}\nCategory:" for i, w in enumerate(["refund", "parcel late", "crash"] * 4)]
    assert detect_separator(cat)[0] == "\nCategory:"
    assert detect_separator([f"Text {i} here\n\n###\n\n" for i in range(5)])[0] == "\n\n###\n\n"
    assert detect_separator([f"{w} ->" for w in ["dog", "cat", "owl"]])[0] == " ->"
    sep, others, share = detect_separator(cat[:6] + [f"Ticket {i}: x\nLabel:" for i in range(4)])
    assert (sep, others, share) == ("\nCategory:", ["\nLabel:"], 0.6)
    assert detect_separator(["Write a poem", "Why is the sky blue?", "List three fruits!"])[0] is None


def test_late_problems_are_found_past_the_separator_sample(tmp_path, tiny_rows):
    rows = [{**r, "prompt": f"{i} {r['prompt']}"} for i, r in enumerate(tiny_rows * 100)]
    rows[SAMPLE + 500]["prompt"] = "no separator here"
    report = validate_file(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert [(p.code, p.line) for p in report.problems] == [("separator-missing", SAMPLE + 501)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A neox-tiny HF folder: a 300-token tokenizer and a 512-token context."""
    from orchestrator.models import build_preset, train_tokenizer

    texts = (BAD / "duplicates.jsonl").read_text().splitlines()
    out = tmp_path_factory.mktemp("model")
    build_preset("neox-tiny", train_tokenizer(texts, 300), 0, str(out))
    return str(out)


def test_too_long_for_the_context_needs_a_tokenizer(model_dir):
    from orchestrator.data.validate import load_model

    tok, context = load_model(model_dir)
    assert context == 512
    assert "too-long" not in validate_file(str(BAD / "too_long.jsonl")).counts
    report = validate_file(str(BAD / "too_long.jsonl"), tok, context)
    p = find(report, "too-long", 4)
    assert "over the model's context of 512" in p.message and p.field == "completion"
    assert report.summary["length_unit"] == "tokens" and report.summary["length"]["max"] > 512
    tok.save_pretrained(str(Path(model_dir) / "tokenizer-only"))  # --tokenizer: no config, 2048
    assert load_model(str(Path(model_dir) / "tokenizer-only"))[1] == 2048
    classes = validate_file(str(BAD / "many_token_classes.jsonl"), tok, context)
    p = find(classes, "class-many-tokens", None)
    assert "'Urgent billing dispute escalation' is" in p.message and "tokens" in p.message


FIXABLE = ["latin1.jsonl", "macroman.jsonl", "utf16le_bom.jsonl", "utf16le_nobom.jsonl", "utf8_bom.jsonl",
           "json_array.jsonl", "trailing_whitespace.jsonl", "no_leading_space.jsonl", "missing_eot.jsonl",
           "duplicates.jsonl", "extra_keys.jsonl"]


@pytest.mark.parametrize("name", FIXABLE)
def test_fix_output_passes_validate(tmp_path, name):
    out = tmp_path / "fixed.jsonl"
    report = validate_file(str(BAD / name), fix_out=str(out))
    assert report.unfixable_errors == 0 and report.fix.left_out_count == 0
    assert report.fix.changes, "the fix report says what changed"
    again = validate_file(str(out))
    assert again.ok and not set(again.counts) - ADVICE, again.counts
    text = out.read_text(encoding="utf-8")
    assert {"latin1.jsonl": "café au lait", "macroman.jsonl": "crème brûlée"}.get(name, "") in text


def test_fix_reports_lines_it_cannot_repair_and_never_writes_in_place(tmp_path):
    src = BAD / "invalid_json.jsonl"
    out = tmp_path / "fixed.jsonl"
    report = validate_file(str(src), fix_out=str(out))
    assert report.fix.left_out == [5] and report.fix.written == 9 and report.unfixable_errors == 1
    assert validate_file(str(out)).errors == 0
    with pytest.raises(DataError, match="overwrite the input"):
        validate_file(str(src), fix_out=str(src))


def test_fix_repairs_a_mix_of_mechanical_problems(tmp_path, tiny_rows):
    rows = [dict(r) for r in tiny_rows]
    rows[0]["prompt"] += "  "
    rows[1]["completion"] = "Shipping"
    rows[2]["extra"] = 1
    path = write_jsonl(tmp_path / "t.jsonl", rows + [rows[5]])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\n\n", 1))
    report = validate_file(str(path), fix_out=str(tmp_path / "out.jsonl"))
    assert report.fix.changes == {"blank-line": 1, "completion-leading-space": 1, "completion-missing-eot": 1,
                                  "duplicate": 1, "extra-key": 1, "prompt-trailing-whitespace": 1, "utf8-bom": 1}
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 30 and json.loads(lines[1]) == {**tiny_rows[1], "completion": " Shipping<|endoftext|>"}
    assert lines[3] == json.dumps(tiny_rows[3])  # valid rows are kept exactly
    assert validate_file(str(tmp_path / "out.jsonl")).ok


def test_one_line_array_and_crlf_are_read_and_fixed(tmp_path, tiny_rows):
    (tmp_path / "a.json").write_text(json.dumps(tiny_rows))
    report = validate_file(str(tmp_path / "a.json"), fix_out=str(tmp_path / "a.jsonl"))
    assert find(report, "json-array", 1).fixable and report.summary["examples"] == 30
    assert [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()] == tiny_rows
    (tmp_path / "crlf.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in tiny_rows))
    assert validate_file(str(tmp_path / "crlf.jsonl")).counts == {"few-per-class": 3}


def test_raise_for_errors_lists_file_line_and_code():
    validate_file(str(BAD / "duplicates.jsonl")).raise_for_errors()  # warnings only: no error
    with pytest.raises(DataError, match=r"(?s)2 error\(s\).*nulls.jsonl:3: not-string: prompt is null"):
        validate_file(str(BAD / "nulls.jsonl")).raise_for_errors()


def test_reports_are_deterministic():
    a = validate_file(str(BAD / "conflicts.jsonl")).to_dict()
    assert a == validate_file(str(BAD / "conflicts.jsonl")).to_dict()


def forge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", "data", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_json_and_fix(tmp_path):
    r = forge("validate", str(BAD / "latin1.jsonl"))
    assert r.returncode == 1 and "line 3" in r.stdout and "not-utf8" in r.stdout and "Traceback" not in r.stderr
    r = forge("validate", str(BAD / "duplicates.jsonl"), "--json")  # warnings only
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["ok"] and data["counts"]["duplicate"] == 1 and data["problems"][-1]["line"] == 7
    out = tmp_path / "fixed.jsonl"
    r = forge("validate", str(BAD / "latin1.jsonl"), "--fix", str(out))
    assert r.returncode == 0 and f"wrote {out}" in r.stdout and out.exists()
    r = forge("validate", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_validate_and_fix_on_s3(s3_bucket):
    from orchestrator import storage

    src = f"{s3_bucket}/data/train.jsonl"
    storage.write_bytes(src, (BAD / "trailing_whitespace.jsonl").read_bytes())
    report = validate_file(src, fix_out=f"{s3_bucket}/data/fixed.jsonl")
    assert find(report, "prompt-trailing-whitespace", 6).field == "prompt"
    assert report.fix.out == f"{s3_bucket}/data/fixed.jsonl" and report.fix.written == 10
    assert validate_file(report.fix.out).errors == 0
    empty = validate_file(str(BAD / "blank_only.jsonl"), fix_out=f"{s3_bucket}/data/none.jsonl")
    assert empty.fix.out is None and not storage.exists(f"{s3_bucket}/data/none.jsonl")
