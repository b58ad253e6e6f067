"""The driver side of ``forge train``: data, base model, Ray Train objects, job record.

The spec maps onto Ray's own config objects here, once: ScalingConfig, RunConfig, CheckpointConfig,
FailureConfig, so a user who knows Ray Train sees Ray Train.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

from orchestrator import checkpoints, storage
from orchestrator.data.prepare import prepare, split_examples
from orchestrator.errors import DataError, ForgeError
from orchestrator.models import context_length, load_tokenizer, prepare_base_model
from orchestrator.spec import JobSpec, resolved_dict, resolved_epochs
from orchestrator.train.loop import train_loop_per_worker


@dataclass
class Plan:
    epochs: int
    steps_per_epoch: int
    total_steps: int
    checkpoint_steps: list[int]


def plan_steps(spec: JobSpec, n_train: int) -> Plan:
    """Optimizer steps per epoch and the evenly spaced checkpoint steps."""
    t, world = spec.training, spec.resources.num_workers
    per_worker = n_train // world
    steps_per_epoch = per_worker // t.micro_batch_size // t.gradient_accumulation_steps
    if steps_per_epoch < 1:
        need = world * t.micro_batch_size * t.gradient_accumulation_steps
        raise DataError(
            f"{spec.dataset.train}: {n_train} training examples are fewer than one optimizer step needs "
            f"({need} = resources.num_workers x training.micro_batch_size x "
            "training.gradient_accumulation_steps); add data or lower those settings"
        )
    epochs = resolved_epochs(spec)
    total = epochs * steps_per_epoch
    count = min(spec.checkpoints.count, total)
    steps = sorted({max(1, round(total * k / count)) for k in range(1, count + 1)})
    return Plan(epochs, steps_per_epoch, total, steps)


def init_ray(spec: JobSpec, address: str | None = None, log=print) -> None:
    """Join the cluster at ``address``/RAY_ADDRESS, or start a local one sized for the job."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}}
    if address:
        log(f"ray: joining the cluster at {address}")
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    need = spec.resources.num_workers * spec.resources.cpus_per_worker
    # Logical CPUs: the workers' share plus room for Ray Data and the trainer's controller.
    cpus = max(os.cpu_count() or 1, math.ceil(need) + 2)
    log(f"ray: starting a local cluster ({cpus} logical CPUs)")
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
             logging_level="WARNING")


def write_record(job_uri: str, record: dict[str, Any]) -> None:
    storage.write_json(storage.join(job_uri, "job.json"), record)


def build_trainer(spec: JobSpec, loop_config: dict[str, Any], train_uri: str):
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # forge prints its own progress
    ctx.print_on_execution_start = False
    fs, path = storage.filesystem(train_uri)
    # Read once into the object store: every epoch then streams blocks, not files.
    train_ds = ray.data.read_parquet(path, filesystem=fs).materialize()
    storage_path, storage_fs = storage.ray_storage(storage.join(spec.storage, "jobs"))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
        datasets={"train": train_ds},
    )


def run_training(spec: JobSpec, address: str | None = None, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Prepare, train and record one job; returns the final job record."""
    job_uri = spec.job_uri
    record_uri = storage.join(job_uri, "job.json")
    if storage.exists(record_uri) or checkpoints.list_checkpoints(job_uri):
        if not overwrite:
            raise ForgeError(f"job {spec.name!r} already exists at {job_uri}; pick another name or pass --overwrite")
        storage.delete_dir(job_uri)
    record: dict[str, Any] = {"name": spec.name, "status": "preparing", "created": time.time(),
                              "spec": resolved_dict(spec), "checkpoints": [], "best": None}
    write_record(job_uri, record)
    try:
        split = split_examples(spec)
        model_uri = prepare_base_model(spec, (e.prompt + e.completion for e in split[0]))
        tokenizer = load_tokenizer(model_uri)
        max_len = min(spec.training.max_seq_length, context_length(model_uri))
        data = prepare(spec, tokenizer, max_len, log=log, split=split)
        plan = plan_steps(spec, data.manifest["train"]["rows"])
        log(f"plan: {plan.epochs} epochs x {plan.steps_per_epoch} steps = {plan.total_steps} steps, "
            f"checkpoints at {plan.checkpoint_steps}")
        record.update(status="training", started=time.time(), model_uri=model_uri, dataset=data.uri,
                      plan=plan.__dict__)
        write_record(job_uri, record)
        init_ray(spec, address, log=log)
        loop_config = {
            "spec": spec.model_dump(mode="json"), "model_uri": model_uri, "job_uri": job_uri,
            "validation_uri": data.validation_uri, "epochs": plan.epochs,
            "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
            "checkpoint_steps": plan.checkpoint_steps, "log_every": max(1, plan.total_steps // 25),
        }
        result = build_trainer(spec, loop_config, data.train_uri).fit()
        if result.error:
            raise result.error
        record["status"] = "succeeded"
    except BaseException as e:
        record.update(status="cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                      error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        raise
    finally:
        record["finished"] = time.time()
        ckpts = checkpoints.list_checkpoints(job_uri)
        record["checkpoints"] = [
            {"name": c.name, "step": c.step, "eval_loss": c.meta.get("eval_loss"),
             "test_accuracy": c.meta.get("test_accuracy"), "train_loss": c.meta.get("train_loss")}
            for c in ckpts
        ]
        if ckpts:
            record["best"] = checkpoints.best_checkpoint(ckpts, spec.checkpoints.best_metric).name
        write_record(job_uri, record)
    return record
