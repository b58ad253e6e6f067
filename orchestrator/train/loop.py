"""The training loop each Ray Train worker runs: one DeepSpeed engine, read top to bottom.

setup (model under ZeRO init, engine, data shard) -> for each epoch, for each micro-batch:
forward, backward, step -> every so often a progress line -> at the planned steps a checkpoint
(validation loss, test prompts, consolidated HF model, ZeRO state, meta) reported to Ray Train
and committed with a manifest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from orchestrator import checkpoints, storage
from orchestrator.data.prepare import read_table
from orchestrator.data.tokenize import pad_batch
from orchestrator.spec import JobSpec
from orchestrator.train.deepspeed_config import build_ds_config
from orchestrator.train.evaluation import (
    all_reduce_sum,
    complete_test_prompts,
    evaluate_loss,
    test_accuracy,
)


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate function: right-pad a column batch (see ``pad_batch``)."""

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pad_batch(batch, self.pad_id)


def load_model(model_uri: str, ds_config: dict[str, Any], dtype: torch.dtype):
    """The base model, partitioned while it loads under ZeRO-3 (never whole on one worker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    local = storage.local_copy(model_uri)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True)
    del keep_alive
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(local)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model's weights on rank 0 (None elsewhere), gathered one parameter at a time."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return None


def save_checkpoint(engine, tokenizer, cfg: dict[str, Any], state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint, report it to Ray Train, then commit it on rank 0."""
    import ray.train

    rank, world = dist.get_rank(), dist.get_world_size()
    name = checkpoints.checkpoint_name(state["step"])
    with tempfile.TemporaryDirectory(prefix="forge-ckpt-") as d:
        weights = consolidated_state_dict(engine)
        if rank == 0:
            engine.module.config.use_cache = True
            engine.module.save_pretrained(os.path.join(d, "model"), state_dict=weights)
            engine.module.config.use_cache = False
            tokenizer.save_pretrained(os.path.join(d, "model"))
            with open(os.path.join(d, checkpoints.META), "w") as f:
                json.dump(meta, f, indent=2)
        del weights
        engine.save_checkpoint(os.path.join(d, "zero"), tag="state", client_state=state)
        ray.train.report(
            {k: v for k, v in meta.items() if isinstance(v, (int, float)) and v is not None},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=name,
        )
    dist.barrier()  # every rank's files are in storage before the manifest says so
    if rank == 0:
        checkpoints.commit(storage.join(cfg["job_uri"], name), state["step"], world)
    dist.barrier()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_ray_train_logs()
    spec = JobSpec.model_validate(cfg["spec"])
    t = spec.training
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins Ray Train's process group
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(t.seed + rank)

    # --- setup -------------------------------------------------------------------------------
    ds_config = build_ds_config(spec, cfg["total_steps"], on_gpu)
    dtype = {True: torch.bfloat16, False: torch.float32}[bool(ds_config["bf16"]["enabled"])]
    model, tokenizer = load_model(cfg["model_uri"], ds_config, dtype)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    val_rows = read_table(cfg["validation_uri"]).to_pylist()[rank::world]
    shard = ray.train.get_dataset_shard("train")
    accum = t.gradient_accumulation_steps
    micro_per_epoch = cfg["steps_per_epoch"] * accum
    checkpoint_steps = set(cfg["checkpoint_steps"])

    # --- train -------------------------------------------------------------------------------
    step, tokens_seen, history = 0, 0, []
    window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.time()
    run_start = time.time()
    for epoch in range(cfg["epochs"]):
        batches = shard.iter_torch_batches(
            batch_size=t.micro_batch_size,
            collate_fn=PadCollate(pad_id),
            drop_last=True,
            local_shuffle_buffer_size=max(64, 8 * t.micro_batch_size),
            local_shuffle_seed=t.seed + epoch,
        )
        micro = 0
        for batch in batches:
            if micro == micro_per_epoch:
                break  # the planned steps keep every rank in lockstep
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            micro += 1
            window_loss += float(loss)
            window_micro += 1
            window_tokens += int(batch["attention_mask"].sum())
            if micro % accum:
                continue
            step += 1
            if step % cfg["log_every"] == 0 or step in checkpoint_steps or step == cfg["total_steps"]:
                loss_sum, n, toks = all_reduce_sum([window_loss, window_micro, window_tokens], device)
                tokens_seen += int(toks)
                now = time.time()
                entry = {"step": step, "epoch": epoch + 1, "loss": loss_sum / n,
                         "lr": scheduler.get_last_lr()[0] if scheduler else t.learning_rate,
                         "tokens_per_s": toks / max(now - window_start, 1e-9), "tokens_seen": tokens_seen}
                history.append(entry)
                if rank == 0:
                    _print_progress(entry, cfg, now - run_start)
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, now
            if step in checkpoint_steps:
                eval_loss = evaluate_loss(engine, val_rows, t.micro_batch_size, pad_id, device)
                results = complete_test_prompts(engine.module, tokenizer, spec.test_prompts, t.seed,
                                                distributed=world > 1 and engine.zero_optimization_partition_weights())
                meta = {"step": step, "epoch": epoch + 1, "total_steps": cfg["total_steps"],
                        "tokens_seen": tokens_seen, "train_loss": history[-1]["loss"], "eval_loss": eval_loss,
                        "test_accuracy": test_accuracy(results), "test_prompts": results,
                        "world_size": world, "time": time.time()}
                if rank == 0:
                    acc = "" if meta["test_accuracy"] is None else f" test accuracy {meta['test_accuracy']:.0%}"
                    say(f"[forge] checkpoint at step {step}: eval loss {eval_loss:.4f}{acc}")
                save_checkpoint(engine, tokenizer, cfg, {"step": step, "epoch": epoch, "tokens_seen": tokens_seen}, meta)
                if rank == 0:
                    storage.write_json(storage.join(cfg["job_uri"], "metrics.json"), history)
                window_start = time.time()  # checkpoint time is not training throughput
        if micro < micro_per_epoch:
            raise RuntimeError(f"rank {rank} got {micro} micro-batches in epoch {epoch + 1}, expected {micro_per_epoch}")


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO (one of its loggers is named by file path); forge
    prints its own progress, so keep only warnings."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _print_progress(e: dict[str, Any], cfg: dict[str, Any], elapsed: float) -> None:
    total = cfg["total_steps"]
    eta = elapsed / e["step"] * (total - e["step"])
    say(
        f"[forge] step {e['step']}/{total} ({e['step'] / total:.0%}) epoch {e['epoch']}/{cfg['epochs']} "
        f"loss {e['loss']:.4f} lr {e['lr']:.2e} {e['tokens_per_s']:,.0f} tok/s "
        f"eta {int(eta // 60)}m{int(eta % 60):02d}s"
    )


def say(msg: str) -> None:
    """A progress line on the driver's console, written straight to the worker's stdout: Ray
    Train's print patch would otherwise echo every line twice."""
    os.write(sys.__stdout__.fileno(), (msg + "\n").encode())
