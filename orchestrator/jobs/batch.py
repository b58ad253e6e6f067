"""What ``forge submit`` reads: job YAMLs, batch YAMLs (a list of jobs with shared defaults) and
folders of them, each job validated by the one job spec, every problem of every job collected.

A batch file is either a YAML list of jobs, or a mapping::

    defaults:          # merged under every job; a job's own fields win (mappings merge key by key,
      training: ...    # lists such as test_prompts are replaced whole)
    jobs:
      - name: a
        dataset: {train: a.jsonl}

Relative paths resolve against the folder of the file that holds the job. Errors name the file,
the job (``jobs[1]``), the line and the field, exactly as for a single job file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError
from orchestrator.spec import InvalidYaml, JobSpec, load_yaml, spec_from_raw, yaml_line

BATCH_KEYS = {"defaults", "jobs"}


@dataclass
class BatchJob:
    """One job of a submission: its spec when valid, else the problems that rejected it."""

    source: str                      # "path" or "path jobs[2]"
    line: int | None                 # where the job starts in its file
    raw_name: str | None
    spec: JobSpec | None = None
    problems: list[str] = field(default_factory=list)
    node: yaml.Node | None = None    # the job's YAML (defaults merged), for the line of a field

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.problems

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else (self.raw_name or "?")

    def reject(self, field_path: tuple[Any, ...], message: str) -> None:
        """Add a problem found after validation (missing file, existing job), with its line."""
        line = yaml_line(self.node, field_path) if self.node is not None else None
        where = f"line {line}: " if line else ""
        self.problems.append(f"{where}{'.'.join(map(str, field_path))}: {message}")

    def error_text(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.source}: {len(self.problems)} problem(s) in the job spec:\n{lines}"


def load_batch(paths: list[str], overrides: list[str] | None = None) -> list[BatchJob]:
    """Every job under ``paths`` (files or folders of ``*.yaml``/``*.yml``), in order, each valid or
    carrying its problems. Nothing raises for a bad job: the caller reports them all at once."""
    jobs: list[BatchJob] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir()
                           if f.suffix in (".yaml", ".yml") and not f.name.startswith(".") and f.is_file())
            if not files:
                jobs.append(BatchJob(str(path), None, None, problems=["no *.yaml or *.yml files in this folder"]))
            for f in files:
                jobs.extend(_load_file(f, overrides))
        else:
            jobs.extend(_load_file(path, overrides))
    _reject_duplicate_names(jobs)
    return jobs


def _load_file(path: Path, overrides: list[str] | None) -> list[BatchJob]:
    src = str(path)
    if not path.is_file():
        return [BatchJob(src, None, None, problems=["file not found"])]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return [BatchJob(src, None, None, problems=[f"not UTF-8 at byte {e.start}: save the file as UTF-8"])]
    try:
        root, raw = load_yaml(text)
    except InvalidYaml as e:
        return [BatchJob(src, None, None, problems=[str(e)])]
    if raw is None:
        return [BatchJob(src, None, None, problems=["the file is empty"])]
    base_dir = str(path.parent.resolve())
    if isinstance(raw, list):
        return [_job(f"{src} [{i}]", item, node, base_dir, overrides)
                for i, (item, node) in enumerate(zip(raw, root.value, strict=True))]
    if isinstance(raw, dict) and "jobs" in raw:
        return _load_batch_mapping(src, raw, root, base_dir, overrides)
    return [_job(src, raw, root, base_dir, overrides)]


def _load_batch_mapping(src: str, raw: dict[str, Any], root: yaml.MappingNode, base_dir: str,
                        overrides: list[str] | None) -> list[BatchJob]:
    nodes = {k.value: v for k, v in root.value}
    unknown = sorted(set(raw) - BATCH_KEYS)
    if unknown:
        line = next(k.start_mark.line + 1 for k, _ in root.value if k.value == unknown[0])
        return [BatchJob(src, line, None, problems=[
            f"line {line}: {unknown[0]}: unknown top-level field of a batch file (expected "
            "'defaults' and 'jobs'; job fields go under defaults or each job)"])]
    defaults, jobs = raw.get("defaults") or {}, raw["jobs"]
    if not isinstance(defaults, dict):
        line = nodes["defaults"].start_mark.line + 1
        return [BatchJob(src, line, None, problems=[f"line {line}: defaults: expected a mapping of job fields"])]
    if not isinstance(jobs, list) or not jobs:
        line = nodes["jobs"].start_mark.line + 1
        return [BatchJob(src, line, None, problems=[f"line {line}: jobs: expected a non-empty list of jobs"])]
    out = []
    for i, (item, node) in enumerate(zip(jobs, nodes["jobs"].value, strict=True)):
        if isinstance(item, dict):
            item, node = deep_merge(defaults, item), merge_nodes(nodes.get("defaults"), node)
        out.append(_job(f"{src} jobs[{i}]", item, node, base_dir, overrides))
    return out


def _job(source: str, raw: Any, node: yaml.Node, base_dir: str, overrides: list[str] | None) -> BatchJob:
    name = raw.get("name") if isinstance(raw, dict) else None
    job = BatchJob(source, node.start_mark.line + 1, str(name) if name is not None else None, node=node)
    try:
        job.spec = spec_from_raw(copy.deepcopy(raw), node, source, overrides, base_dir=base_dir)
    except SpecError as e:
        job.problems = list(e.problems)
    if job.spec is not None:
        _check_inputs(job)
    return job


def _check_inputs(job: BatchJob) -> None:
    """Local inputs must exist before anything is submitted (s3:// ones are checked by the job:
    a HEAD per file here would be slow for big batches and needs the cluster's credentials)."""
    spec = job.spec
    assert spec is not None
    for key in ("train", "validation"):
        path = getattr(spec.dataset, key)
        if path and "://" not in path and not os.path.isfile(path):
            job.reject(("dataset", key), f"no such file: {path}")
    base = spec.model.base
    if not spec.model.is_preset and "://" not in base and not os.path.isdir(base):
        job.reject(("model", "base"), f"neither a preset nor a model folder: {base}")


def _reject_duplicate_names(jobs: list[BatchJob]) -> None:
    seen: dict[str, BatchJob] = {}
    for job in jobs:
        if job.spec is None:
            continue
        key = job.spec.job_uri
        if key in seen:
            first = seen[key]
            job.reject(("name",), f"{job.spec.name!r} is also the name of {first.source} (line "
                       f"{first.line}) with the same storage; names must be unique (they name the job folder)")
        else:
            seen[key] = job


# --- merging defaults under a job: values and YAML nodes alike ------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def merge_nodes(base: yaml.Node | None, over: yaml.Node) -> yaml.Node:
    """The YAML node of ``deep_merge``: each value keeps the line it came from, so an error in a
    default points at the defaults and an error in a job at the job."""
    if not isinstance(base, yaml.MappingNode) or not isinstance(over, yaml.MappingNode):
        return over
    pairs = list(over.value)
    mine = {k.value: i for i, (k, _) in enumerate(pairs)}
    for k, v in base.value:
        if k.value in mine:
            i = mine[k.value]
            pairs[i] = (pairs[i][0], merge_nodes(v, pairs[i][1]))
        else:
            pairs.append((k, v))
    return yaml.MappingNode(over.tag, pairs, over.start_mark, over.end_mark)
