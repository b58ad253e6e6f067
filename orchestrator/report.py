"""Tables a person reads: checkpoints side by side with their test-prompt completions."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.checkpoints import CheckpointInfo, best_checkpoint


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.0%}" if pct else f"{x:.4f}"


def checkpoint_tables(ckpts: list[CheckpointInfo], best_metric: str = "eval_loss",
                      console: Console | None = None) -> None:
    """Print the checkpoint index and the test prompts' completions at every checkpoint."""
    console = console or Console()
    if not console.is_terminal:  # logs and CI: wide enough for the side-by-side table
        console = Console(width=max(console.width, 160), file=console.file)
    if not ckpts:
        console.print("no committed checkpoints")
        return
    best = best_checkpoint(ckpts, best_metric)
    index = Table(title="Checkpoints", title_justify="left")
    with_eval_acc = any(c.meta.get("eval_accuracy") is not None for c in ckpts)
    cols = ["#", "checkpoint", "step", "epoch", "tokens", "train loss", "eval loss"]
    cols += ["eval acc"] * with_eval_acc + ["test acc", ""]
    for col in cols:
        index.add_column(col)
    for c in ckpts:
        m = c.meta
        acc = [_fmt(m.get("eval_accuracy"), pct=True)] * with_eval_acc
        index.add_row(
            str(c.index), c.name, str(c.step), str(m.get("epoch", "-")), f"{m.get('tokens_seen', 0):,}",
            _fmt(m.get("train_loss")), _fmt(m.get("eval_loss")), *acc, _fmt(m.get("test_accuracy"), pct=True),
            "best" if c is best else "",
        )
    console.print(index)

    prompts = ckpts[-1].meta.get("test_prompts", [])
    if not prompts:
        return
    table = Table(title="Test prompts at each checkpoint", title_justify="left")
    table.add_column("prompt", no_wrap=True, max_width=48, overflow="ellipsis")
    with_expected = any(p.get("expected") is not None for p in prompts)
    if with_expected:
        table.add_column("expected", overflow="fold")
    for c in ckpts:
        table.add_column(f"#{c.index} step {c.step}", overflow="fold")
    for i, p in enumerate(prompts):
        row = [_one_line(p["prompt"])]
        if with_expected:
            row.append(_one_line(p["expected"]) if p.get("expected") is not None else "")
        for c in ckpts:
            done = c.meta.get("test_prompts", [])
            row.append(_cell(done[i]) if i < len(done) else "-")
        table.add_row(*row)
    console.print(table)


def _one_line(text: str) -> str:
    """Text in one cell: newlines shown as \\n, leading/trailing spaces kept visible by quotes."""
    shown = text.replace("\n", "\\n")
    return f"'{shown}'" if shown != shown.strip() else shown


def _cell(done: dict) -> str:
    text = _one_line(done["completion"])
    if done.get("expected") is None:
        return text
    from orchestrator.train.evaluation import exact_match

    return f"{text} {'✓' if exact_match(done['completion'], done['expected']) else '✗'}"
