"""The one place where the job spec becomes a DeepSpeed config."""

from __future__ import annotations

import copy
import json
from typing import Any

from orchestrator import storage
from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec


def resolve_precision(spec: JobSpec, on_gpu: bool) -> str:
    p = spec.training.precision
    if p == "auto":
        return "bf16" if on_gpu else "fp32"
    return p


def _scheduler(spec: JobSpec, total_steps: int) -> dict[str, Any]:
    """Warmup over ``warmup_ratio`` of the steps, then the schedule. DeepSpeed's schedulers need
    at least one warmup step: with ratio 0 that one step already starts at the full rate."""
    t = spec.training
    warmup = max(1, round(total_steps * t.warmup_ratio))
    start = 0.0 if t.warmup_ratio > 0 else 1.0  # as a fraction of the learning rate
    total = max(total_steps, warmup + 1)
    if t.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                                                     "warmup_min_ratio": start, "cos_min_ratio": 0.1,
                                                     "warmup_type": "linear"}}
    params = {"warmup_num_steps": warmup, "warmup_min_lr": start * t.learning_rate,
              "warmup_max_lr": t.learning_rate, "warmup_type": "linear"}
    if t.lr_schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": total}}
    return {"type": "WarmupLR", "params": params}


def _zero(spec: JobSpec) -> dict[str, Any]:
    t = spec.training
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # Checkpoints hold a consolidated 16-bit HF model, gathered one parameter at a time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def user_overrides(spec: JobSpec) -> dict[str, Any]:
    """``training.deepspeed``: a mapping, or a JSON file (local or s3://) holding one."""
    raw = spec.training.deepspeed
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        data = storage.read_json(raw)
    except (OSError, ValueError) as e:
        raise SpecError("training.deepspeed", [f"{raw}: cannot read a DeepSpeed JSON config: {e}"]) from None
    if not isinstance(data, dict):
        raise SpecError("training.deepspeed", [f"{raw}: expected a JSON object, got {type(data).__name__}"])
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` key by key (nested mappings merged, the rest replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(spec: JobSpec, total_steps: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ``spec`` over ``total_steps`` optimizer steps (no "auto" values).

    A user's raw config (``training.deepspeed``) is merged over forge's; the batch sizes stay
    forge's, because the data plan and checkpoint schedule are computed from them.
    """
    t = spec.training
    adam: dict[str, Any] = {"lr": t.learning_rate, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay}
    if not on_gpu and t.offload_optimizer == "none":
        adam["torch_adam"] = True  # FusedAdam needs CUDA; torch's AdamW is the CPU path
    precision = resolve_precision(spec, on_gpu)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": _scheduler(spec, total_steps),
        "zero_optimization": _zero(spec),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # forge prints its own progress
        "wall_clock_breakdown": False,
    }
    over = user_overrides(spec)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in over and over[key] != config.get(key, over[key]):
            raise SpecError("training.deepspeed", [
                f"{key}: set it with training.micro_batch_size / gradient_accumulation_steps, not in the "
                "DeepSpeed config (forge plans steps and checkpoints from them)"])
        over.pop(key, None)
    return merge(config, over)


def describe(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)
