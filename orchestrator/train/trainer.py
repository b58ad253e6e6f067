"""The driver side of ``forge train``: data, base model, Ray Train objects, job record.

The spec maps onto Ray's own config objects here, once: ScalingConfig, RunConfig, CheckpointConfig,
FailureConfig and a DataConfig, so a user who knows Ray Train sees Ray Train.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator import checkpoints, storage
from orchestrator.errors import DataError, ForgeError
from orchestrator.spec import JobSpec, resolved_dict, resolved_epochs

RECORD = "job.json"
ACTIVE = ("queued", "preparing", "training")


@dataclass
class Plan:
    epochs: int
    steps_per_epoch: int
    total_steps: int
    checkpoint_steps: list[int]


def plan_steps(spec: JobSpec, n_rows: int) -> Plan:
    """Optimizer steps per epoch (every rank gets rows // num_workers rows) and the evenly
    spaced checkpoint steps."""
    t, world = spec.training, spec.resources.num_workers
    steps_per_epoch = n_rows // world // t.micro_batch_size // t.gradient_accumulation_steps
    if steps_per_epoch < 1:
        need = world * t.micro_batch_size * t.gradient_accumulation_steps
        raise DataError(
            f"{spec.dataset.train}: {n_rows} training rows are fewer than one optimizer step needs "
            f"({need} = resources.num_workers x training.micro_batch_size x "
            "training.gradient_accumulation_steps); add data or lower those settings"
        )
    epochs = resolved_epochs(spec)
    total = epochs * steps_per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
        epochs = math.ceil(total / steps_per_epoch)
    count = min(spec.checkpoints.count, total)
    steps = sorted({max(1, round(total * k / count)) for k in range(1, count + 1)})
    return Plan(epochs, steps_per_epoch, total, steps)


def init_ray(spec: JobSpec, address: str | None = None, log=print) -> None:
    """Join the cluster at ``address``/RAY_ADDRESS, or start a local one sized for the job."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Dependencies' deprecation notices are noise in a user's training log.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
                        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}}
    if address:
        log(f"ray: joining the cluster at {address}")
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    need = spec.resources.num_workers * spec.resources.cpus_per_worker
    # Logical CPUs: the workers' share plus room for Ray Data and the trainer's controller.
    cpus = max(os.cpu_count() or 1, math.ceil(need) + 2)
    log(f"ray: starting a local cluster ({cpus} logical CPUs)")
    # address="local": always a new cluster of our own, never one a `ray start` left running.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
             logging_level="WARNING")


def read_record(job_uri: str) -> dict[str, Any] | None:
    uri = storage.join(job_uri, RECORD)
    return storage.read_json(uri) if storage.exists(uri) else None


def write_record(job_uri: str, record: dict[str, Any]) -> None:
    storage.write_json(storage.join(job_uri, RECORD), record)


def load_job_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    """The spec of a job YAML, or of a job folder's record (``forge train --resume <job folder>``)."""
    from orchestrator.spec import load_spec, spec_from_raw

    if path.endswith((".yaml", ".yml")) or os.path.isfile(path):
        return load_spec(path, overrides)
    record = read_record(storage.normalize(path))
    if record is None or "spec" not in record:
        raise ForgeError(f"{path}: neither a job YAML nor a job folder with a {RECORD}")
    return spec_from_raw(record["spec"], None, storage.join(storage.normalize(path), RECORD), overrides)


def build_trainer(spec: JobSpec, loop_config: dict[str, Any], shards, in_object_store: bool = False):
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train.data import RankSlices
    from orchestrator.train.loop import train_loop_per_worker

    r = spec.resources
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # forge prints its own progress
    ctx.print_on_execution_start = False
    fs, _ = storage.filesystem(shards[0].uri)
    # Named only: RankSlices gives every worker its own slice of these files.
    train_ds = ray.data.read_parquet([storage.filesystem(s.uri)[1] for s in shards], filesystem=fs)
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
        dataset_config=RankSlices(shards, in_object_store=in_object_store),
    )


def _claim(spec: JobSpec, overwrite: bool, resume: bool, submission_id: str | None) -> dict[str, Any]:
    """The job record this run continues or starts. A job folder is never silently reused: only
    a record queued for this submission, ``resume``, or ``overwrite`` lets a run proceed."""
    job_uri = spec.job_uri
    record = read_record(job_uri)
    if record and submission_id and record.get("submission_id") == submission_id and record["status"] == "queued":
        return record
    if resume:
        if not record:
            raise ForgeError(f"--resume: no job record at {storage.join(job_uri, RECORD)}")
        if record["status"] == "succeeded":
            raise ForgeError(f"job {spec.name!r} already succeeded; nothing to resume")
        return record
    if record or checkpoints.list_checkpoints(job_uri):
        if not overwrite:
            raise ForgeError(f"job {spec.name!r} already exists at {job_uri}; pick another name, pass "
                             "--resume to continue it, or --overwrite to start again")
        storage.delete_dir(job_uri)
    return {"name": spec.name, "status": "preparing", "created": time.time(), "submission_id": submission_id,
            "checkpoints": [], "best": None}


class Cancelled(KeyboardInterrupt):
    """SIGTERM (``forge jobs cancel``, Ray's job stop): stop cleanly and record ``cancelled``."""


_SIGTERM = threading.Event()  # set when SIGTERM came, so the record says why even if Ray swapped the exception


def _on_sigterm(*_: Any) -> None:
    _SIGTERM.set()
    raise Cancelled("cancelled (SIGTERM)")


def run_training(spec: JobSpec, address: str | None = None, overwrite: bool = False, log=print,
                 resume: bool = False, submission_id: str | None = None) -> dict[str, Any]:
    """Prepare, train and record one job; returns the final job record.

    ``resume`` continues a job whose driver died from its latest committed checkpoint (data,
    base model and plan are the same, so nothing is recomputed). ``submission_id`` runs the record
    that ``forge submit`` queued.
    """
    job_uri = spec.job_uri
    wandb_dir = _check_tracking(spec)  # a wrong tracking setup fails before anything starts
    record = _claim(spec, overwrite, resume, submission_id)
    record.update(status="preparing", spec=resolved_dict(spec), error=None, traceback=None)
    record.setdefault("attempts", []).append({"started": time.time(), "resume": resume})
    write_record(job_uri, record)
    previous = None
    try:
        init_ray(spec, address, log=log)
        # After ray.init, which installs a SIGTERM handler of its own that exits with status 1.
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
        _SIGTERM.clear()
        data, plan, loop_config = _prepare(spec, record, log, wandb_dir)
        latest = checkpoints.latest_committed(job_uri)
        if latest is not None:
            log(f"resume: from {latest.name} (step {latest.step} of {plan.total_steps})")
        record.update(status="training", started=record.get("started") or time.time())
        write_record(job_uri, record)
        from orchestrator.train.data import shards_of

        # int32 input ids, labels and positions: 12 bytes a token
        small = 12 * data.manifest["train"]["rows"] * data.manifest["max_seq_length"] <= spec.dataset.cache_max_mb << 20
        shards = shards_of(data.uri, data.manifest, "train")
        result = build_trainer(spec, loop_config, shards, in_object_store=small).fit()
        if result.error:
            raise result.error
        record["status"] = "succeeded"
    except BaseException as e:
        # A signal that lands inside ray.get comes back as a bare KeyboardInterrupt from Ray's core.
        if isinstance(e, KeyboardInterrupt) and _SIGTERM.is_set() and not isinstance(e, Cancelled):
            e = Cancelled("cancelled (SIGTERM)")
        record.update(status="cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                      error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        record["finished"] = time.time()
        _index_checkpoints(spec, record)
        write_record(job_uri, record)
        _plot(spec, record)
    return record


def _prepare(spec: JobSpec, record: dict[str, Any], log, wandb_dir: str | None) -> tuple[Any, Plan, dict[str, Any]]:
    """Base model, tokenized data and the step plan: the work before Ray Train starts."""
    from orchestrator.data.prepare import prepare, sample_texts
    from orchestrator.models import context_length, count_params, load_tokenizer, prepare_base_model
    from orchestrator.train.data import is_classification, read_validation, shards_of

    model_uri = prepare_base_model(spec, sample_texts(spec))
    tokenizer = load_tokenizer(model_uri)
    max_len = min(spec.training.max_seq_length, context_length(model_uri))
    data = prepare(spec, tokenizer, max_len, log=log)
    plan = plan_steps(spec, data.manifest["train"]["rows"])
    log(f"plan: {plan.epochs} epochs x {plan.steps_per_epoch} steps = {plan.total_steps} steps, "
        f"checkpoints at {plan.checkpoint_steps}")
    val_shards = shards_of(data.uri, data.manifest, "validation")
    classification = is_classification(read_validation(val_shards, 0, 1, spec.checkpoints.eval_max_examples))
    from transformers import AutoConfig

    params = count_params(AutoConfig.from_pretrained(storage.local_copy(model_uri)))
    record.update(model_uri=model_uri, dataset=data.uri, plan=asdict(plan), params=params,
                  classification=classification)
    run_config = {**resolved_dict(spec), "plan": asdict(plan), "params": params, "dataset": data.uri,
                  "world_size": spec.resources.num_workers, "wandb_dir": wandb_dir}
    loop_config = {
        "spec": spec.model_dump(mode="json"), "model_uri": model_uri, "job_uri": spec.job_uri,
        "validation_shards": [asdict(s) for s in val_shards], "classification": classification,
        "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
        "checkpoint_steps": plan.checkpoint_steps,
        "log_every": spec.training.log_every_steps or max(1, plan.total_steps // 25),
        "run_config": run_config,
    }
    return data, plan, loop_config


def _check_tracking(spec: JobSpec) -> str | None:
    """The folder W&B writes to (None when tracking is off); a ForgeError for a wrong setup."""
    if spec.tracking.wandb.mode == "disabled":
        return None
    from orchestrator.train.tracking import check_tracking

    return check_tracking(spec)


def _index_checkpoints(spec: JobSpec, record: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # the record is written even when storage is failing
        ckpts = checkpoints.list_checkpoints(spec.job_uri)
        record["checkpoints"] = [
            {"name": c.name, "step": c.step, "eval_loss": c.meta.get("eval_loss"),
             "eval_accuracy": c.meta.get("eval_accuracy"), "test_accuracy": c.meta.get("test_accuracy"),
             "train_loss": c.meta.get("train_loss")}
            for c in ckpts
        ]
        if ckpts:
            record["best"] = checkpoints.best_checkpoint(ckpts, spec.checkpoints.best_metric).name


def _plot(spec: JobSpec, record: dict[str, Any]) -> None:
    """The loss curve beside the job record (``loss.png``); never fails the job."""
    try:
        from orchestrator.train.tracking import plot_loss_curve

        metrics = storage.join(spec.job_uri, "metrics.json")
        history = storage.read_json(metrics) if storage.exists(metrics) else []
        if history:
            plot_loss_curve(history, record.get("checkpoints", []), storage.join(spec.job_uri, "loss.png"),
                            best=record.get("best"), title=spec.name)
    except Exception as e:  # a plot is a convenience
        print(f"forge: could not draw the loss curve: {type(e).__name__}: {e}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
