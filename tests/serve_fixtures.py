"""A tiny committed checkpoint built with forge's own code, for the serving tests.

Built the way training writes one (preset model + trained tokenizer under ``model/``, then
``meta.json``, then the manifest), so the tests exercise the real ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator import checkpoints, models, storage

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\nCategory: animals<|endoftext|>",
    "Stocks rose sharply today as markets rallied.\nCategory: finance<|endoftext|>",
    "A new telescope saw light from the early universe.\nCategory: science<|endoftext|>",
    "The team won the final match in extra time.\nCategory: sports<|endoftext|>",
] * 25


def make_checkpoint(job_dir: Path, step: int = 10, seed: int = 0) -> str:
    """Write and commit ``<job_dir>/checkpoint-<step>`` holding a neox-tiny model; returns its URI."""
    ckpt = storage.join(str(job_dir), checkpoints.checkpoint_name(step))
    tok = models.train_tokenizer(TEXTS, 512)
    models.build_preset("neox-tiny", tok, seed, storage.join(ckpt, "model"))
    storage.write_json(
        storage.join(ckpt, checkpoints.META), {"step": step, "epoch": 1, "eval_loss": 1.0}
    )
    checkpoints.commit(ckpt, step, 1)
    return ckpt
