"""The training loop each Ray Train worker runs: one DeepSpeed engine, read top to bottom.

setup (model under ZeRO init, engine, resume from the latest committed checkpoint, this rank's
data slice) -> for each epoch, for each micro-batch: forward, backward, step -> every so often a
progress line -> at the planned steps a checkpoint (validation loss and accuracy, test prompts,
consolidated HF model, ZeRO state, RNG) committed with a manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import checkpoints, storage
from orchestrator.spec import JobSpec
from orchestrator.train.data import Shard, epoch_batches, read_validation
from orchestrator.train.deepspeed_config import build_ds_config
from orchestrator.train.evaluation import (
    all_reduce_sum,
    complete_test_prompts,
    evaluate,
    test_accuracy,
)
from orchestrator.train.state import Position, restore, save_checkpoint, seed_everything


def load_model(model_uri: str, ds_config: dict[str, Any], dtype: torch.dtype, seed: int,
               gradient_checkpointing: bool):
    """The base model, partitioned while it loads under ZeRO-3 (never whole on one worker).

    A HF folder loads with ``from_pretrained``; a big preset saved as config only is built from
    its config with random weights (same seed on every rank), also under ZeRO-3 init.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from orchestrator.models import RANDOM_INIT

    local = storage.local_copy(model_uri)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    if os.path.exists(os.path.join(local, RANDOM_INIT)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, use_safetensors=True)
    del keep_alive
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, AutoTokenizer.from_pretrained(local)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_ray_train_logs()
    spec = JobSpec.model_validate(cfg["spec"])
    t = spec.training
    _clear_stale_build_lock()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins Ray Train's process group
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    job_uri = cfg["job_uri"]

    # --- setup -------------------------------------------------------------------------------
    seed_everything(t.seed + rank)
    ds_config = build_ds_config(spec, cfg["total_steps"], device.type == "cuda")
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model, tokenizer = load_model(cfg["model_uri"], ds_config, dtype, t.seed, t.gradient_checkpointing)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    accum = t.gradient_accumulation_steps
    micro_per_epoch = cfg["steps_per_epoch"] * accum
    pos, history = Position(), []
    latest = checkpoints.latest_committed(job_uri)
    if latest is not None:  # a restarted worker group, or `forge train --resume`
        pos = restore(engine, latest.uri)
        if pos.micro >= micro_per_epoch:  # saved at the end of an epoch: start the next one
            pos.epoch, pos.micro = pos.epoch + 1, 0
        history = [e for e in _read_history(job_uri) if e["step"] <= pos.step]
        if rank == 0:
            say(f"[forge] resumed from {latest.name}: step {pos.step}, epoch {pos.epoch + 1}, "
                f"{pos.micro} micro-batches into it")
    tracker = _tracker(spec, cfg, rank, pos.step)

    val_rows = read_validation([Shard(**s) for s in cfg["validation_shards"]], rank, world,
                               spec.checkpoints.eval_max_examples)
    shard = ray.train.get_dataset_shard("train")

    # --- train -------------------------------------------------------------------------------
    try:
        _train(engine, tokenizer, scheduler, spec, cfg, shard, val_rows, pad_id, device, pos, history, tracker)
    except BaseException:
        tracker.finish("failed")
        raise
    tracker.finish("succeeded")


def _train(engine, tokenizer, scheduler, spec: JobSpec, cfg: dict[str, Any], shard, val_rows, pad_id: int,
           device, pos: Position, history: list[dict[str, Any]], tracker) -> None:
    t, rank, job_uri = spec.training, dist.get_rank(), cfg["job_uri"]
    accum = t.gradient_accumulation_steps
    micro_per_epoch = cfg["steps_per_epoch"] * accum
    total, checkpoint_steps = cfg["total_steps"], set(cfg["checkpoint_steps"])
    window_loss, window_micro, window_tokens = 0.0, 0, 0
    window_start = run_start = time.time()
    start_step = pos.step
    for epoch in range(pos.epoch, cfg["epochs"]):
        if pos.step >= total:
            break
        skip = pos.micro if epoch == pos.epoch else 0  # the data position of a resumed run
        pos.epoch, pos.micro = epoch, 0
        for batch in epoch_batches(shard, t.micro_batch_size, pad_id, t.seed, epoch, rank):
            if pos.micro < skip:
                pos.micro += 1
                continue
            if pos.micro == micro_per_epoch or pos.step >= total:
                break  # the planned steps keep every rank in lockstep
            window_tokens += int(batch.pop("num_tokens"))
            batch = {k: v.to(device) for k, v in batch.items()}
            # use_cache=False: with a KV cache transformers skips the packed-sequence mask
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            pos.micro += 1
            window_loss += loss.item()
            window_micro += 1
            if pos.micro % accum:
                continue
            pos.step += 1
            if pos.step % cfg["log_every"] == 0 or pos.step in checkpoint_steps or pos.step == total:
                loss_sum, n, toks = all_reduce_sum([window_loss, window_micro, window_tokens], device)
                pos.tokens_seen += int(toks)
                now = time.time()
                entry = {"step": pos.step, "epoch": epoch + 1, "loss": loss_sum / n,
                         "lr": scheduler.get_last_lr()[0] if scheduler else t.learning_rate,
                         "tokens_per_s": toks / max(now - window_start, 1e-9), "tokens_seen": pos.tokens_seen,
                         "time": now}
                history.append(entry)
                tracker.log_step(entry)
                if rank == 0:
                    eta = (now - run_start) / (pos.step - start_step) * (total - pos.step)
                    _print_progress(entry, cfg, eta)
                    storage.write_json(storage.join(job_uri, "progress.json"), {**entry, "total_steps": total,
                                       "epochs": cfg["epochs"], "eta_s": eta})
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, now
            if pos.step in checkpoint_steps:
                meta = checkpoint_meta(engine, tokenizer, spec, cfg, val_rows, pad_id, device, pos, history)
                tracker.log_checkpoint(meta)
                save_checkpoint(engine, tokenizer, job_uri, pos, meta)
                if rank == 0:
                    storage.write_json(storage.join(job_uri, "metrics.json"), history)
                window_start = time.time()  # checkpoint time is not training throughput
        if pos.micro < micro_per_epoch and pos.step < total:
            raise RuntimeError(f"rank {rank} got {pos.micro} micro-batches in epoch {epoch + 1}, "
                               f"expected {micro_per_epoch}")
    if rank == 0:
        storage.write_json(storage.join(job_uri, "metrics.json"), history)


def checkpoint_meta(engine, tokenizer, spec: JobSpec, cfg: dict[str, Any], val_rows, pad_id: int,
                    device, pos: Position, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint records: eval loss and accuracy, and every test prompt's completion."""
    t, world = spec.training, dist.get_world_size()
    scores = evaluate(engine, val_rows, t.micro_batch_size, pad_id, device, cfg["classification"])
    results = complete_test_prompts(engine.module, tokenizer, spec.test_prompts, t.seed,
                                    distributed=world > 1 and engine.zero_optimization_partition_weights())
    meta = {"step": pos.step, "epoch": pos.epoch + 1, "total_steps": cfg["total_steps"],
            "tokens_seen": pos.tokens_seen, "train_loss": history[-1]["loss"], **scores,
            "test_accuracy": test_accuracy(results), "test_prompts": results, "world_size": world,
            "time": time.time()}
    if dist.get_rank() == 0:
        acc = "".join(f" {k.replace('_', ' ')} {meta[k]:.0%}" for k in ("eval_accuracy", "test_accuracy")
                      if meta[k] is not None)
        say(f"[forge] checkpoint at step {pos.step}: eval loss {meta['eval_loss']:.4f}{acc}")
    return meta


def _read_history(job_uri: str) -> list[dict[str, Any]]:
    uri = storage.join(job_uri, "metrics.json")
    return storage.read_json(uri) if storage.exists(uri) else []


class _NoTracker:
    def log_step(self, entry: dict[str, Any]) -> None: ...
    def log_checkpoint(self, meta: dict[str, Any]) -> None: ...
    def finish(self, status: str) -> None: ...


def _tracker(spec: JobSpec, cfg: dict[str, Any], rank: int, resume_step: int):
    """W&B on rank 0 when the spec turns it on (``orchestrator.train.tracking``)."""
    if spec.tracking.wandb.mode == "disabled":
        return _NoTracker()
    from orchestrator.train.tracking import Tracker

    return Tracker(spec, cfg["job_uri"], cfg["run_config"], rank, resume_step=resume_step)


def _clear_stale_build_lock(name: str = "deepspeed_shm_comm", stale_s: float = 600) -> None:
    """DeepSpeed JIT-builds a small op on a node's first run, under a lock file that a process
    killed mid-build leaves behind; every later run would then wait on it forever. A build takes
    minutes, never ten: an older lock is stale and goes."""
    from torch.utils import cpp_extension

    with contextlib.suppress(Exception):
        lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > stale_s:
            os.remove(lock)
            say(f"[forge] removed a stale DeepSpeed build lock: {lock}")


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and Ray Data every epoch's execution at INFO (one logger is
    named by file path); forge prints its own progress, so keep only warnings."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _print_progress(e: dict[str, Any], cfg: dict[str, Any], eta: float) -> None:
    total = cfg["total_steps"]
    say(
        f"[forge] step {e['step']}/{total} ({e['step'] / total:.0%}) epoch {e['epoch']}/{cfg['epochs']} "
        f"loss {e['loss']:.4f} lr {e['lr']:.2e} {e['tokens_per_s']:,.0f} tok/s "
        f"eta {int(eta // 60)}m{int(eta % 60):02d}s"
    )


def say(msg: str) -> None:
    """A progress line on the driver's console, written straight to the worker's stdout: Ray
    Train's print patch would otherwise echo every line twice."""
    os.write(sys.__stdout__.fileno(), (msg + "\n").encode())
