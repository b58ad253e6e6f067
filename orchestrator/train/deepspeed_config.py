"""The one place where the job spec becomes a DeepSpeed config."""

from __future__ import annotations

from typing import Any

from orchestrator.spec import JobSpec


def resolve_precision(spec: JobSpec, on_gpu: bool) -> str:
    p = spec.training.precision
    if p == "auto":
        return "bf16" if on_gpu else "fp32"
    return p


def build_ds_config(spec: JobSpec, total_steps: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ``spec`` over ``total_steps`` optimizer steps (no "auto" values)."""
    t = spec.training
    warmup = int(total_steps * t.warmup_ratio)
    adam: dict[str, Any] = {"lr": t.learning_rate, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay}
    if not on_gpu:
        adam["torch_adam"] = True  # FusedAdam needs CUDA; torch's AdamW is the CPU path
    if t.lr_schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup,
                                                          "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}
    elif t.lr_schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {"total_num_steps": max(total_steps, warmup + 1),
                                                         "warmup_num_steps": warmup, "warmup_min_lr": 0.0,
                                                         "warmup_max_lr": t.learning_rate, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": warmup, "warmup_min_lr": 0.0,
                                                    "warmup_max_lr": t.learning_rate, "warmup_type": "linear"}}
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    precision = resolve_precision(spec, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # forge prints its own progress
        "wall_clock_breakdown": False,
    }
