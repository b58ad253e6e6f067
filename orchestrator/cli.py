"""``forge``: the verbs follow the user's workflow (spec, train, checkpoints, eval, serve)."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from orchestrator.data.cli import data_app
from orchestrator.errors import ForgeError

app = typer.Typer(help="forge: fine-tune GPT-NeoX-family models on Ray + DeepSpeed and serve them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
spec_app = typer.Typer(help="Inspect job specs.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)
err = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set training.epochs=2")]


@spec_app.command("show")
def spec_show(
    path: Annotated[str, typer.Argument(help="Job YAML")],
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
) -> None:
    """Print the resolved spec with every default filled in."""
    import yaml

    from orchestrator.spec import load_spec, resolved_dict

    data = resolved_dict(load_spec(path, set_))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")


@app.command()
def train(
    path: Annotated[str, typer.Argument(help="Job YAML")],
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing job of the same name")] = False,
) -> None:
    """Check and tokenize the data, fine-tune with DeepSpeed on Ray Train, save checkpoints."""
    from orchestrator import checkpoints
    from orchestrator.report import checkpoint_tables
    from orchestrator.spec import load_spec
    from orchestrator.train.trainer import run_training

    spec = load_spec(path, set_)
    console.print(f"[bold]forge train[/bold] {spec.name}: model {spec.model.base}, "
                  f"{spec.resources.num_workers} workers, ZeRO-{spec.training.zero_stage}, storage {spec.storage}")
    record = run_training(spec, address=address, overwrite=overwrite, log=lambda m: console.print(f"[cyan]{m}[/cyan]"))
    checkpoint_tables(checkpoints.list_checkpoints(spec.job_uri), spec.checkpoints.best_metric, console)
    console.print(f"[green]job {spec.name} {record['status']}[/green]: best checkpoint {record['best']} "
                  f"in {spec.job_uri}")


@app.command("checkpoints")
def checkpoints_cmd(
    job: Annotated[str, typer.Argument(help="Job folder (<storage>/jobs/<name>), local or s3://")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The job's committed checkpoints with eval metrics and test-prompt completions side by side."""
    from orchestrator import checkpoints, storage
    from orchestrator.report import checkpoint_tables

    ckpts = checkpoints.list_checkpoints(storage.normalize(job))
    if not ckpts and not storage.is_dir(storage.normalize(job)):
        raise ForgeError(f"{job}: no such job folder")
    if as_json:
        print(json.dumps([{"index": c.index, "name": c.name, "uri": c.uri, **c.meta} for c in ckpts], indent=2))
        return
    checkpoint_tables(ckpts, checkpoints.job_best_metric(storage.normalize(job)), console)


@app.command("eval")
def eval_cmd(
    path: Annotated[str, typer.Argument(help="Job folder or checkpoint folder")],
    data: Annotated[str, typer.Option(help="JSONL of prompt/completion pairs to score")],
    checkpoint: Annotated[str, typer.Option(help="best, latest, a 1-based index or a checkpoint name")] = "best",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Exact-match accuracy of greedy completions on a held-out JSONL (for classification tasks)."""
    from orchestrator.checkpoints import resolve
    from orchestrator.evaluate import exact_match_accuracy

    ckpt = resolve(path, checkpoint)
    res = exact_match_accuracy(ckpt.model_uri, data)
    if as_json:
        print(json.dumps({"checkpoint": ckpt.uri, **res}))
        return
    console.print(f"{ckpt.name}: exact match {res['correct']}/{res['total']} = [bold]{res['accuracy']:.1%}[/bold] "
                  f"on {data}")


@app.command()
def serve(
    path: Annotated[str, typer.Argument(help="Job folder (serves its best checkpoint) or checkpoint folder")],
    name: Annotated[str | None, typer.Option(help="Model name in the URL (default: the job's name)")] = None,
    checkpoint: Annotated[str, typer.Option(help="best, latest, a 1-based index or a checkpoint name")] = "best",
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")] = None,
) -> None:
    """Serve a checkpoint on Ray Serve: POST /v1/models/<name>/complete (bearer tokens from FORGE_API_KEYS)."""
    from serve.app import resolve_target, run

    ckpt, name = resolve_target(path, checkpoint, name)
    console.print(f"serving {ckpt.uri} as [bold]{name}[/bold]")
    run(ckpt.uri, name=name, port=port, host=host, blocking=True, address=address)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        app()
    except ForgeError as e:
        err.print(f"error: {e}", style="red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        sys.exit(130)
