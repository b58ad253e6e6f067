"""forge data convert (CSV to JSONL that passes validate) and split (stratified, deterministic)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from orchestrator.data.cli import data_app
from orchestrator.data.convert import convert_csv
from orchestrator.data.format import fix_completion, fix_prompt
from orchestrator.data.split import split_file
from orchestrator.data.validate import validate_file
from orchestrator.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
SEP = "\n\n###\n\n"


def test_fix_prompt_and_completion():
    assert fix_prompt("Ticket: late  \n", "\nTeam:") == "Ticket: late"
    assert fix_prompt("Ticket: late\nTeam: ", "\nTeam:") == "Ticket: late\nTeam:"
    assert fix_prompt("Text\n\n###\n\n \n", SEP) == "Text" + SEP  # the separator's own newlines stay
    assert fix_prompt("Text ", SEP, append=True) == "Text" + SEP
    assert fix_prompt("", SEP, append=True) == ""  # open-ended prompts stay empty
    assert fix_completion("Billing") == fix_completion(" Billing<|endoftext|>") == " Billing<|endoftext|>"


def test_convert_csv_with_quotes_newlines_and_bom_passes_validate(tmp_path):
    src = tmp_path / "tickets.csv"
    rows = ['"Ticket {i}: my card, sadly, was ""charged"" twice\nand again",Billing',
            "Ticket {i}: the parcel never arrived  ,Shipping", '"Ticket {i}: app crashes",  Technical']
    body = "".join(rows[i % 3].format(i=i) + "\r\n" for i in range(30))
    src.write_bytes(b"\xef\xbb\xbf" + ("text,label\r\n" + body).encode())
    res = convert_csv(str(src), "text", "label", separator=SEP)
    assert res.out == str(tmp_path / "tickets.jsonl") and res.rows == 30
    first = json.loads(Path(res.out).read_text().splitlines()[0])
    assert first == {"prompt": 'Ticket 0: my card, sadly, was "charged" twice\nand again' + SEP,
                     "completion": " Billing<|endoftext|>"}
    report = validate_file(res.out)
    assert report.errors == 0 and report.summary["separator"] == SEP, report.problems
    assert report.summary["classes"] == {"Billing": 10, "Shipping": 10, "Technical": 10}


@pytest.mark.parametrize(("name", "words"), [
    ("unbalanced_quotes.csv", [":3: unbalanced quote in column 'text'", "starts on line 3 never closes"]),
    ("missing_column.csv", [":1: no column 'label' in the header", "text, category"]),
    ("short_row.csv", [":3: row has 1 field(s), the header 2: column 'label' is missing"]),
])
def test_convert_errors_name_line_and_column(tmp_path, name, words):
    with pytest.raises(DataError) as e:
        convert_csv(str(BAD / name), "text", "label", out=str(tmp_path / "out.jsonl"))
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()  # all or nothing


def test_convert_names_a_non_utf8_byte_and_refuses_to_overwrite(tmp_path):
    src = tmp_path / "t.csv"
    src.write_bytes("text,label\nok,Billing\ncafé,Billing\n".encode("latin-1"))
    with pytest.raises(DataError, match=r":3: not UTF-8 \(byte 0xe9 at byte offset 25\).*Latin-1"):
        convert_csv(str(src), "text", "label")
    with pytest.raises(DataError, match="overwrite the input"):
        convert_csv(str(src), "text", "label", out=str(src))


def test_convert_cli_reads_escaped_separators(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("q,a\n" + "".join(f"question {i},answer {i}\n" for i in range(5)))
    r = CliRunner().invoke(data_app, ["convert", str(src), "--prompt-column", "q", "--completion-column", "a",
                                      "--separator", "\\n\\n###\\n\\n"])
    assert r.exit_code == 0, r.output
    assert "validate: ok" in r.output
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[2])["prompt"] == "question 2" + SEP


def labelled(n_per_class: dict[str, int]) -> list[dict]:
    return [{"prompt": f"Ticket {label} {i}\nTeam:", "completion": f" {label}<|endoftext|>"}
            for label, n in n_per_class.items() for i in range(n)]


def read(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_split_is_stratified_and_keeps_every_line(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", labelled({"Billing": 40, "Shipping": 30, "Technical": 5, "Rare": 1}))
    res = split_file(str(src), 0.2, seed=1)
    assert res.stratified and res.classes == {"Billing": (32, 8), "Rare": (1, 0), "Shipping": (24, 6),
                                              "Technical": (4, 1)}
    train, test = read(res.train), read(res.test)
    assert Counter(r["completion"] for r in test) == {" Billing<|endoftext|>": 8, " Shipping<|endoftext|>": 6,
                                                      " Technical<|endoftext|>": 1}
    lines = sorted(Path(res.train).read_text().splitlines() + Path(res.test).read_text().splitlines())
    assert lines == sorted(src.read_text().splitlines())  # byte for byte, nothing lost or doubled
    assert len(train) == res.train_count == 61


def test_split_is_deterministic_by_seed(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", labelled({"A": 30, "B": 30}))
    a = split_file(str(src), 0.25, seed=7, out_dir=str(tmp_path / "a"))
    b = split_file(str(src), 0.25, seed=7, out_dir=str(tmp_path / "b"))
    c = split_file(str(src), 0.25, seed=8, out_dir=str(tmp_path / "c"))
    assert Path(a.test).read_bytes() == Path(b.test).read_bytes()
    assert Path(a.train).read_bytes() == Path(b.train).read_bytes()
    assert Path(a.test).read_bytes() != Path(c.test).read_bytes()


def test_split_generation_data_by_fraction(tmp_path):
    rows = [{"prompt": f"Article {i}{SEP}", "completion": f" Summary {i}.<|endoftext|>"} for i in range(50)]
    res = split_file(str(write_jsonl(tmp_path / "g.jsonl", rows)), 0.1)
    assert not res.stratified and (res.train_count, res.test_count) == (45, 5)


def test_split_refuses_bad_input(tmp_path):
    with pytest.raises(DataError, match="between 0 and 1"):
        split_file(str(BAD / "duplicates.jsonl"), 1.0)
    with pytest.raises(DataError, match=r"invalid_json.jsonl:5: not a JSON object"):
        split_file(str(BAD / "invalid_json.jsonl"), 0.2, out_dir=str(tmp_path))


def test_split_cli(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", labelled({"A": 10, "B": 10}))
    r = CliRunner().invoke(data_app, ["split", str(src), "--test-fraction", "0.2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "stratified by class (train/test): A 8/2, B 8/2" in r.output
    assert len(read(str(tmp_path / "d.test.jsonl"))) == 4


def test_convert_and_split_on_s3(s3_bucket, tmp_path):
    from orchestrator import storage

    csv = f"{s3_bucket}/raw/t.csv"
    storage.write_bytes(csv, ("q,a\n" + "".join(f"question {i},{'AB'[i % 2]}\n" for i in range(20))).encode())
    res = convert_csv(csv, "q", "a", separator=SEP)
    assert res.out == f"{s3_bucket}/raw/t.jsonl" and validate_file(res.out).errors == 0
    split = split_file(res.out, 0.2, out_dir=f"{s3_bucket}/split")
    assert split.classes == {"A": (8, 2), "B": (8, 2)}
    assert len(storage.read_bytes(split.test).splitlines()) == 4
