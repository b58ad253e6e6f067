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
from orchestrator.jobs.cli import deploy_cmd, deployments_app, jobs_app, submit_cmd

app = typer.Typer(help="forge: fine-tune GPT-NeoX-family models on Ray + DeepSpeed and serve them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
spec_app = typer.Typer(help="Inspect job specs.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(deployments_app, name="deployments")
app.command("submit")(submit_cmd)
app.command("deploy")(deploy_cmd)
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
    path: Annotated[str, typer.Argument(help="Job YAML, or a job folder (local or s3://) to --resume")],
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing job of the same name")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the job from its latest committed checkpoint")] = False,
    submission_id: Annotated[str | None, typer.Option(help="Run the record `forge submit` queued (set by forge)")] = None,
) -> None:
    """Check and tokenize the data, fine-tune with DeepSpeed on Ray Train, save checkpoints."""
    from orchestrator import checkpoints
    from orchestrator.report import checkpoint_tables
    from orchestrator.train.trainer import load_job_spec, run_training

    spec = load_job_spec(path, set_)
    console.print(f"[bold]forge train[/bold] {spec.name}: model {spec.model.base}, "
                  f"{spec.resources.num_workers} workers, ZeRO-{spec.training.zero_stage}, storage {spec.storage}")
    record = run_training(spec, address=address, overwrite=overwrite, resume=resume, submission_id=submission_id,
                          log=lambda m: console.print(f"[cyan]{m}[/cyan]"))
    checkpoint_tables(checkpoints.list_checkpoints(spec.job_uri), spec.checkpoints.best_metric, console)
    console.print(f"[green]job {spec.name} {record['status']}[/green]: best checkpoint {record['best']} "
                  f"in {spec.job_uri}")


@app.command("checkpoints")
def checkpoints_cmd(
    job: Annotated[str, typer.Argument(help="Job folder (<storage>/jobs/<name>), local or s3://")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    gc: Annotated[bool, typer.Option("--gc", help="List garbage: uncommitted checkpoint attempts "
                                     "and unfinished multipart uploads")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="With --gc: remove the garbage listed")] = False,
    keep_newer_than: Annotated[float, typer.Option(help="With --gc: seconds; spare anything newer "
                                                   "(a checkpoint being uploaded now)")] = 3600.0,
) -> None:
    """The job's committed checkpoints with eval metrics and test-prompt completions side by side."""
    from orchestrator import checkpoints, storage
    from orchestrator.report import checkpoint_tables

    job_uri = storage.normalize(job)
    ckpts = checkpoints.list_checkpoints(job_uri)
    if not ckpts and not storage.is_dir(job_uri):
        raise ForgeError(f"{job}: no such job folder")
    if yes and not gc:
        raise ForgeError("--yes removes what --gc lists: pass both")
    if gc:
        attempts, uploads = checkpoints.find_garbage(job_uri, keep_newer_than_s=keep_newer_than)
        if yes:
            removed = checkpoints.remove_uncommitted(job_uri, keep_newer_than_s=keep_newer_than)
            aborted = storage.abort_multipart_uploads(job_uri, older_than_s=keep_newer_than)
        if as_json:
            print(json.dumps({"uncommitted": [u for u, _ in attempts],
                              "multipart_uploads": [u["uri"] for u in uploads], "removed": yes}, indent=2))
            return
        verb = "removed" if yes else "would remove"
        for uri, age in attempts:
            console.print(f"{verb} uncommitted checkpoint {uri} (last written {age:,.0f} s ago)")
        for u in uploads:
            console.print(f"{verb} unfinished multipart upload of {u['uri']} (id {u['upload_id'][:12]}...)")
        if yes:
            console.print(f"removed {len(removed)} uncommitted checkpoint(s), aborted {aborted} upload(s)")
        elif attempts or uploads:
            console.print("nothing removed: run again with --yes to remove these")
        else:
            console.print(f"no garbage older than {keep_newer_than:g} s")
        return
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
    paths: Annotated[list[str], typer.Argument(help="Job folders (each serves its chosen checkpoint) or checkpoint folders, local or s3://", metavar="PATH...")],
    name: Annotated[str | None, typer.Option(help="Model name in the URL, with one PATH (default: the job's name)")] = None,
    checkpoint: Annotated[str, typer.Option(help="best, latest, a 1-based index or a checkpoint name")] = "best",
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a new local cluster)")] = None,
) -> None:
    """Serve checkpoints on Ray Serve, one model name each: the seed API (POST /v1/models/<name>/complete,
    .../embed) and the OpenAI-compatible /v1/completions, /v1/embeddings, /v1/models. Bearer tokens come from
    FORGE_API_KEYS (comma-separated) or FORGE_API_KEYS_FILE; settings from the job's `deployment:` section."""
    from serve.app import resolve_target, run

    if name and len(paths) > 1:
        raise ForgeError("--name applies to one PATH only; with several, each model is named after its job")
    for path in paths:
        ckpt, model = resolve_target(path, checkpoint, name)
        console.print(f"serving {ckpt.uri} as [bold]{model}[/bold]")
    run(paths, name=name, port=port, host=host, blocking=True, which=checkpoint, address=address)


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
