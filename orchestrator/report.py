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
    if not ckpts:
        console.print("no committed checkpoints")
        return
    best = best_checkpoint(ckpts, best_metric)
    index = Table(title="Checkpoints", title_justify="left")
    for col in ("#", "checkpoint", "step", "epoch", "tokens", "train loss", "eval loss", "test acc", ""):
        index.add_column(col)
    for c in ckpts:
        m = c.meta
        index.add_row(
            str(c.index), c.name, str(c.step), str(m.get("epoch", "-")), f"{m.get('tokens_seen', 0):,}",
            _fmt(m.get("train_loss")), _fmt(m.get("eval_loss")), _fmt(m.get("test_accuracy"), pct=True),
            "best" if c is best else "",
        )
    console.print(index)

    prompts = ckpts[-1].meta.get("test_prompts", [])
    if not prompts:
        return
    table = Table(title="Test prompts at each checkpoint", title_justify="left", show_lines=True)
    table.add_column("prompt", overflow="fold", max_width=40)
    if any(p.get("expected") is not None for p in prompts):
        table.add_column("expected", overflow="fold")
    for c in ckpts:
        table.add_column(f"#{c.index} (step {c.step})", overflow="fold")
    for i, p in enumerate(prompts):
        row = [p["prompt"]]
        if len(table.columns) - len(ckpts) == 2:
            row.append(repr(p.get("expected")) if p.get("expected") is not None else "")
        for c in ckpts:
            done = c.meta.get("test_prompts", [])
            row.append(repr(done[i]["completion"]) if i < len(done) else "-")
        table.add_row(*row)
    console.print(table)
