"""The job spec: one YAML file per job, validated by pydantic, the single source of truth.

Every other part of forge reads a ``JobSpec``; nothing re-parses the YAML. Errors name the file,
the line, the field path and what was expected.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import SpecError

# Named base models built from a config with random weights (orchestrator.models has the shapes):
# for tests, demos and benchmarks. Pythia shapes follow the Pythia suite; GPT-J too.
PRESETS = (
    "neox-tiny", "gptj-tiny",
    "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b",
    "pythia-6.9b", "pythia-12b", "gpt-neox-20b", "gpt-j-6b",
)
EOT = "<|endoftext|>"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Model):
    base: str = Field(
        "neox-tiny",
        description="A preset (neox-tiny) or a Hugging Face model folder, local path or s3://.",
    )
    tokenizer_vocab_size: int = Field(
        1024, ge=256, le=65536, description="Presets only: vocabulary of the tokenizer trained on the data."
    )

    @property
    def is_preset(self) -> bool:
        return self.base in PRESETS


class DatasetSpec(_Model):
    train: str = Field(description="Training data: JSONL (one {\"prompt\", \"completion\"} per line), CSV or Parquet.")
    validation: str | None = Field(None, description="Validation data; if absent, a split of train.")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="auto: from the file extension (.jsonl/.json, .csv, .parquet)."
    )
    prompt_column: str = Field("prompt", description="CSV/Parquet: the column holding the prompt.")
    completion_column: str = Field("completion", description="CSV/Parquet: the column holding the completion.")
    packing: bool = Field(
        True, description="Pack examples into max_seq_length rows; attention and positions never cross examples."
    )
    rows_per_shard: int = Field(8192, ge=1, description="Rows per Parquet shard of the prepared dataset.")
    cache_max_mb: int = Field(
        256, ge=0, description="Prepared training data up to this size is read once per run into Ray's "
        "object store; larger data streams from storage every epoch."
    )


class TrainingSpec(_Model):
    epochs: int | None = Field(None, ge=1, le=100, description="Default: from the dataset-size table.")
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    micro_batch_size: int = Field(4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_seq_length: int = Field(2048, ge=8, le=131072)
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPUs."
    )
    gradient_clipping: float = Field(1.0, ge=0.0)
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, about 30% slower.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload of optimizer state (stage 1-3).")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-Infinity parameter offload (stage 3 only).")
    deepspeed: dict[str, Any] | str | None = Field(
        None, description="A raw DeepSpeed config (a mapping or a JSON file) merged over forge's, key by key."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (benchmarks, smoke runs).")
    log_every_steps: int | None = Field(None, ge=1, description="Progress line every N steps (default: 25 lines per run).")
    seed: int = 42

    @model_validator(mode="after")
    def _offload(self) -> TrainingSpec:
        if self.offload_params == "cpu" and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (parameters are partitioned only at stage 3)")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class CheckpointSpec(_Model):
    count: int = Field(5, ge=1, le=15, description="Checkpoints evenly spaced over the run.")
    best_metric: Literal["eval_loss", "eval_accuracy", "test_accuracy"] = Field(
        "eval_loss",
        description="How the best checkpoint is chosen: lowest eval_loss, or highest eval_accuracy "
        "(classification: exact match on the validation split) or test_accuracy (test prompts' expected).",
    )
    eval_max_examples: int = Field(
        1000, ge=1, description="Validation examples scored for loss and accuracy at each checkpoint."
    )
    upload_timeout_s: float = Field(
        1800, gt=0, description="A checkpoint not committed within this many seconds fails the job."
    )


class TestPrompt(_Model):
    prompt: str
    temperature: float = Field(0.7, gt=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000, description="0 disables top-k filtering.")
    length: int = Field(64, ge=1, description="Maximum new tokens (at most 500).")
    stop_sequences: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    expected: str | None = Field(
        None, description="Optional expected completion: checkpoints report exact-match accuracy."
    )

    @field_validator("temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and v == 0:
            raise ValueError(
                "temperature 0 is not allowed; for greedy output use temperature 0.01 or top_k 1"
            )
        return v

    @field_validator("length")
    @classmethod
    def _length_cap(cls, v: int) -> int:
        if v > 500:
            raise ValueError(
                f"length {v} is over the limit of 500 new tokens; test prompts are for comparing "
                "checkpoints, use a shorter length"
            )
        return v

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty strings")
        return v


class ResourcesSpec(_Model):
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts Ray Train may make, each from the latest committed checkpoint (-1: no limit)."
    )


class WandbSpec(_Model):
    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="online needs WANDB_API_KEY; offline writes runs to ./wandb for `wandb sync`."
    )
    project: str = "forge"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    dir: str | None = Field(None, description="Where W&B writes its run files (default: the working folder).")


class TrackingSpec(_Model):
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class DeploymentSpec(_Model):
    """How ``forge serve`` / ``forge deploy`` run the model on Ray Serve (autoscaling and batching)."""

    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    target_ongoing_requests: float = Field(8, gt=0, description="Autoscaling target per replica.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(128, ge=-1, description="Waiting requests beyond which clients get 503 (-1: no limit).")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (bf16 on GPU).")
    max_batch_size: int = Field(16, ge=1, le=256, description="Concurrent requests decoded together.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long a new batch waits for more requests (continuous batching adds late ones between steps)."
    )
    max_models_per_replica: int = Field(4, ge=1, description="Multiplexed fine-tunes one replica keeps loaded (LRU).")
    request_timeout_s: float | None = Field(120, gt=0, description="Requests running longer get 408.")

    @model_validator(mode="after")
    def _replicas(self) -> DeploymentSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        return self


class JobSpec(_Model):
    name: str = Field(description="Job name: letters, digits, '-', '_' and '.'; names the job folder.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    test_prompts: list[TestPrompt] = Field(min_length=1, max_length=15)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec)
    storage: str = Field("./forge-runs", description="Local folder or s3://bucket/prefix.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(
                f"invalid job name {v!r}: use 1-100 letters, digits, '-', '_' or '.', starting "
                "with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _checks(self) -> JobSpec:
        if self.checkpoints.best_metric == "test_accuracy" and not any(
            p.expected is not None for p in self.test_prompts
        ):
            raise ValueError(
                "checkpoints.best_metric test_accuracy needs test prompts with an 'expected' completion"
            )
        return self

    # --- resolved views -------------------------------------------------------------------
    @property
    def job_uri(self) -> str:
        from orchestrator import storage

        return storage.join(storage.normalize(self.storage), "jobs", self.name)


def recommended_epochs(size_bytes: int) -> int:
    """The hosted workflow's table: <1 MB: 4; <10 MB: 3-4; <100 MB: 2-3; <500 MB: 1-2; larger: 1."""
    mb = size_bytes / 1e6
    if mb < 1:
        return 4
    if mb < 10:
        return 3
    if mb < 100:
        return 2
    return 1


# --- loading ------------------------------------------------------------------------------


def yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node on ``loc`` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _describe(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    kind = err["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; `forge spec show` lists every field)"
    inp = err.get("input")
    if kind not in ("value_error", "model_type", "dict_type") and not isinstance(inp, (dict, list)):
        msg = f"{msg} (got {inp!r})"
    return msg


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise SpecError("--set", [f"{assignment!r}: expected FIELD.PATH=VALUE"])
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = raw
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


class InvalidYaml(ValueError):
    """Text that is not YAML; the message names the line."""


def load_yaml(text: str) -> tuple[Any, Any]:
    """(node tree, data) of YAML text: the nodes give a field's line."""
    try:
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        raise InvalidYaml(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def parse_spec(text: str, source: str = "<spec>", overrides: list[str] | None = None,
               base_dir: str | None = None) -> JobSpec:
    """Validate YAML text into a JobSpec; relative local paths resolve against ``base_dir``."""
    try:
        root, raw = load_yaml(text)
    except InvalidYaml as e:
        raise SpecError(source, [str(e)]) from None
    if raw is None:
        raise SpecError(source, ["the file is empty; a job needs at least name, dataset and test_prompts"])
    return spec_from_raw(raw, root, source, overrides, base_dir)


def spec_from_raw(raw: Any, node: yaml.Node | None, source: str, overrides: list[str] | None = None,
                  base_dir: str | None = None) -> JobSpec:
    """Validate one job's parsed YAML (``node`` is its YAML node, for line numbers in errors).

    The batch files of ``forge submit`` call this once per job, with each job's own node.
    """
    if not isinstance(raw, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise SpecError(source, [f"line {line}: expected a mapping of fields, got {type(raw).__name__}"])
    for o in overrides or []:
        _apply_override(raw, o)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = yaml_line(node, loc)
            where = f"line {line}: " if line else ""
            problems.append(f"{where}{field}: {_describe(err)}")
        raise SpecError(source, problems) from None
    if base_dir is not None:
        _resolve_paths(spec, base_dir)
    return spec


def _resolve_paths(spec: JobSpec, base_dir: str) -> None:
    def res(p: str) -> str:
        if "://" in p or os.path.isabs(p):
            return p
        return str((Path(base_dir) / p).resolve())

    spec.dataset.train = res(spec.dataset.train)
    if spec.dataset.validation:
        spec.dataset.validation = res(spec.dataset.validation)
    if not spec.model.is_preset:
        spec.model.base = res(spec.model.base)
    if isinstance(spec.training.deepspeed, str):
        spec.training.deepspeed = res(spec.training.deepspeed)
    # Storage is relative to where the user runs forge (./forge-runs by default), made absolute
    # here because Ray workers run in other folders.
    from orchestrator import storage

    spec.storage = storage.normalize(spec.storage)


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None,
              base_dir: str | None = None) -> JobSpec:
    """Load a job YAML; relative data and model paths resolve against the YAML's folder."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [f"not UTF-8 at byte {e.start}: save the file as UTF-8"]) from None
    return parse_spec(text, str(path), overrides, base_dir=base_dir or str(p.parent))


def resolved_epochs(spec: JobSpec) -> int:
    """The spec's epochs, or the size table's recommendation for the training file."""
    if spec.training.epochs is not None:
        return spec.training.epochs
    from orchestrator import storage

    fs, path = storage.filesystem(spec.dataset.train)
    size = fs.get_file_info(path).size or 0
    return recommended_epochs(size)


def resolved_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec with every default filled in (and epochs resolved where the data is readable)."""
    data = spec.model_dump(mode="json")
    with contextlib.suppress(OSError):
        data["training"]["epochs"] = resolved_epochs(spec)
    return data
