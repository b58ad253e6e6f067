"""``forge data``: validate, convert and split prompt/completion datasets (the user's first step)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:  # the verbs import their modules lazily: `forge --help` stays fast
    from orchestrator.data.report import Report

data_app = typer.Typer(help="Check, convert, split and prepare prompt/completion datasets.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True, markup=False)
PER_CODE = 5  # problems printed per code; --json lists up to 100 per code


def _unescape(s: str) -> str:
    """'\\n' typed on a shell becomes a newline; other characters pass through."""
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


def print_report(report: Report, per_code: int = PER_CODE) -> None:
    """The report for a person: problems grouped by code (errors first), each with its lines and
    its fix, then a summary to act on."""
    from orchestrator.data.report import CODES

    s = report.summary
    console.print(Text(f"{s['file']}: {_n(report.errors, 'error')}, {_n(report.warnings, 'warning')}",
                       style="bold" if report.ok else "bold red"))
    codes = sorted(report.counts, key=lambda c: (CODES[c][0] != "error", list(CODES).index(c)))
    for code in codes:
        shown = [p for p in report.problems if p.code == code]
        severity, count = CODES[code][0], report.counts[code]
        console.print(Text.assemble(("\n" + severity, "red" if severity == "error" else "yellow"),
                                    (f" {code}", "bold"), f": {_n(count, 'problem')}"))
        for p in shown[:per_code]:
            where = f"line {p.line}" if p.line is not None else "file"
            console.print(Text(f"  {where:<10} " + (f"[{p.field}] " if p.field else "") + p.message))
        if count > per_code:
            more = ", ".join(str(p.line) for p in shown[per_code : per_code + 10] if p.line)
            console.print(f"  ... and {count - per_code:,} more" + (f" (lines {more}, ...)" if more else ""))
        console.print(Text(f"  fix: {shown[0].fix}", style="dim"))
    unit = "tokens" if s["length_unit"] == "tokens" else "chars"
    ln, task = s["length"], s["task"] or "unknown"
    if s["classes"]:
        top = ", ".join(f"{k} {v}" for k, v in list(s["classes"].items())[:10])
        task += f": {_n(len(s['classes']), 'class')} ({top}{', ...' if len(s['classes']) > 10 else ''})"
    rows = [("examples", f"{s['examples']:,} in {_n(s['lines'], 'line')}, {_size(s['bytes'])}, {s['encoding']}"),
            ("task", task), ("separator", repr(s["separator"]) if s["separator"] else "none detected"),
            (f"length ({unit})", f"p50 {ln['p50']}, p90 {ln['p90']}, p99 {ln['p99']}, max {ln['max']}"
             + (f" (context {s['context']})" if s["context"] else "")
             + (f", measured on {ln['measured']:,} examples" if 0 < ln["measured"] < s["examples"] else "")),
            ("duplicates", f"{s['duplicates']:,}, conflicts {s['conflicts']:,}"),
            ("epochs", f"{s['recommended_epochs']} recommended for this file size")]
    console.print(Text("\nSummary", style="bold"))
    for k, v in rows:
        console.print(f"  {k:<16}{v}")
    f = report.fix
    if f is not None:
        changed = ", ".join(f"{c} {n:,}" for c, n in f.changes.items()) or "nothing"
        where = f"wrote {f.out}: {_n(f.written, 'example')}" if f.out else "wrote nothing: no example survived"
        console.print(Text(f"\n{where}; fixed or dropped: {changed}", style="bold"))
        if f.left_out_count:
            lines = ", ".join(map(str, f.left_out)) + (", ..." if f.left_out_count > len(f.left_out) else "")
            console.print(Text(f"left out {_n(f.left_out_count, 'line')} --fix cannot repair: {lines}", style="red"))
        ok, status = not report.unfixable_errors, "the fixed copy is clean" if f.out else "nothing to fix from"
        status = status if ok else "errors remain: fix the left-out lines by hand"
    else:
        ok, status = report.ok, "ok" if report.ok else "errors"
        fixable = report.errors - report.unfixable_errors
        if fixable:
            console.print(f"\n{_n(fixable, 'error')} can be fixed mechanically: "
                          f"forge data validate {s['file']} --fix OUT")
    console.print(Text(f"\nresult: {status}", style="green" if ok else "red"))


@data_app.command("validate")
def validate_cmd(
    file: Annotated[str, typer.Argument(help="JSONL file, local or s3://")],
    model: Annotated[str | None, typer.Option(help="HF model folder: check token lengths against its context")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="HF tokenizer folder (context 2048 unless its config says)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    fix: Annotated[str | None, typer.Option("--fix", metavar="OUT", help="Write a mechanically corrected copy to OUT")] = None,
) -> None:
    """Check every rule of the format; exit 0 when clean or only warnings, 1 on errors.

    With --fix OUT the exit code says whether OUT is clean: 1 when some line could not be repaired.
    """
    from orchestrator.data.validate import load_model, validate_file

    if model and tokenizer:
        raise typer.BadParameter("give --model or --tokenizer, not both")
    tok, context = load_model(model or tokenizer) if (model or tokenizer) else (None, None)
    report = validate_file(file, tok, context, fix_out=fix)
    if as_json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        print_report(report)
    raise typer.Exit(1 if (report.unfixable_errors if fix else report.errors) else 0)


@data_app.command("convert")
def convert_cmd(
    file: Annotated[str, typer.Argument(help="CSV file (quoted fields, embedded newlines and a BOM are fine)")],
    prompt_column: Annotated[str, typer.Option(help="Column holding the prompt")],
    completion_column: Annotated[str, typer.Option(help="Column holding the completion")],
    separator: Annotated[str | None, typer.Option(help="Appended to prompts that lack it, e.g. '\\n\\n###\\n\\n'")] = None,
    out: Annotated[str | None, typer.Option(help="Output JSONL (default: FILE with .jsonl)")] = None,
    delimiter: Annotated[str, typer.Option(help="Field delimiter")] = ",",
) -> None:
    """Convert CSV to prompt/completion JSONL, then validate the result."""
    from orchestrator.data.convert import convert_csv
    from orchestrator.data.validate import validate_file

    res = convert_csv(file, prompt_column, completion_column, _unescape(separator) if separator else None,
                      out, _unescape(delimiter))
    console.print(f"wrote {res.out}: {res.rows:,} examples" + (f" ({res.blank} blank rows skipped)" if res.blank else ""))
    report = validate_file(res.out)
    if report.ok:
        console.print(f"validate: ok ({report.warnings} warning(s); forge data validate {res.out} for details)")
        return
    print_report(report, per_code=3)
    raise typer.Exit(1)


@data_app.command("split")
def split_cmd(
    file: Annotated[str, typer.Argument(help="JSONL file")],
    test_fraction: Annotated[float, typer.Option(help="Share of examples for the test file, e.g. 0.1")],
    seed: Annotated[int, typer.Option(help="Same seed, same split")] = 0,
    out_dir: Annotated[str | None, typer.Option(help="Folder for FILE.train.jsonl and FILE.test.jsonl (default: beside FILE)")] = None,
) -> None:
    """Split into train and test JSONL; stratified by class for classification."""
    from orchestrator.data.split import split_file

    res = split_file(file, test_fraction, seed, out_dir)
    console.print(f"train: {res.train} ({_n(res.train_count, 'example')})\n"
                  f"test:  {res.test} ({_n(res.test_count, 'example')})")
    if res.classes:
        per = ", ".join(f"{k} {a}/{b}" for k, (a, b) in res.classes.items())
        console.print(f"stratified by class (train/test): {per}")


@data_app.command("prepare")
def prepare_cmd(
    path: Annotated[str, typer.Argument(help="Job YAML (its dataset, model, training and storage sections)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set dataset.packing=false")] = None,
) -> None:
    """Check, shuffle, tokenize and pack the job's data into Parquet shards on its storage.

    The same inputs again are a cache hit. `forge train` runs this first; run it alone to check
    and prepare a big dataset before any training machine starts.
    """
    import ray

    from orchestrator.data.prepare import prepare, sample_texts
    from orchestrator.models import context_length, load_tokenizer, prepare_base_model
    from orchestrator.spec import load_spec
    from orchestrator.train.trainer import init_ray

    spec = load_spec(path, set_)
    model_uri = prepare_base_model(spec, sample_texts(spec))  # a file that cannot be read stops here
    tokenizer = load_tokenizer(model_uri)
    max_len = min(spec.training.max_seq_length, context_length(model_uri))
    started = not ray.is_initialized()
    init_ray(spec, log=console.print)
    try:
        data = prepare(spec, tokenizer, max_len, log=console.print)
    finally:
        if started:
            ray.shutdown()
    m = data.manifest
    console.print(Text("\nPrepared dataset", style="bold"))
    for split in ("train", "validation"):
        s = m[split]
        kind = "packed rows" if split == "train" and m["packed"] else "rows"
        console.print(f"  {split:<11} {s['examples']:,} examples in {s['rows']:,} {kind}, {s['tokens']:,} tokens "
                      f"({s['loss_tokens']:,} with loss), {_n(len(s['shards']), 'shard')}, "
                      f"padding {s['padding_fraction']:.1%} at max_seq_length {m['max_seq_length']}")
    console.print(f"  {'uri':<11} {data.uri}")
