"""forge submit's input: job files, batch files with shared defaults, folders; every problem of every
job with its file, job and line, before anything is submitted. No cluster needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from orchestrator.jobs.batch import load_batch
from orchestrator.jobs.submit import check_batch

PROMPT = '[{prompt: "Ticket: late parcel\\nTeam:", top_k: 1, length: 4}]'


@pytest.fixture
def data(tmp_path: Path, tiny_rows) -> Path:
    write_jsonl(tmp_path / "train.jsonl", tiny_rows)
    return tmp_path


def test_batch_file_merges_shared_defaults_under_each_job(data: Path):
    (data / "batch.yaml").write_text(f"""\
defaults:
  dataset: {{train: train.jsonl}}
  training: {{max_steps: 5, learning_rate: 0.001}}
  test_prompts: {PROMPT}
  storage: runs
jobs:
  - name: a
  - name: b
    training: {{max_steps: 9}}
""")
    jobs = load_batch([str(data / "batch.yaml")])
    assert [j.name for j in jobs] == ["a", "b"] and all(j.ok for j in jobs)
    a, b = (j.spec for j in jobs)
    assert a.training.max_steps == 5 and b.training.max_steps == 9
    assert b.training.learning_rate == 0.001  # merged key by key, not replaced
    assert a.dataset.train == str(data / "train.jsonl")  # relative to the batch file
    assert a.storage == str(Path.cwd() / "runs")  # storage is relative to where forge runs, as for train
    assert jobs[1].source.endswith("batch.yaml jobs[1]") and jobs[1].line == 8


def test_a_plain_list_and_a_folder_of_files(data: Path):
    folder = data / "jobs"
    folder.mkdir()
    (folder / "one.yaml").write_text(f"name: one\ndataset: {{train: ../train.jsonl}}\ntest_prompts: {PROMPT}\n")
    (folder / "two.yml").write_text(
        f"- name: two\n  dataset: {{train: ../train.jsonl}}\n  test_prompts: {PROMPT}\n"
        f"- name: three\n  dataset: {{train: ../train.jsonl}}\n  test_prompts: {PROMPT}\n")
    (folder / "notes.txt").write_text("not a job")
    jobs = load_batch([str(folder)])
    assert [j.name for j in jobs] == ["one", "two", "three"] and all(j.ok for j in jobs)
    assert jobs[2].source.endswith("two.yml [1]") and jobs[2].line == 4


def test_every_problem_of_every_job_with_file_and_line(data: Path):
    (data / "batch.yaml").write_text(f"""\
defaults:
  dataset: {{train: train.jsonl}}
  test_prompts: {PROMPT}
jobs:
  - name: good
  - name: cold
    test_prompts:
      - prompt: "x"
        temperature: 0
  - name: typo
    trainig: {{epochs: 2}}
    training: {{micro_batch_size: 0}}
  - name: nodata
    dataset: {{train: missing.jsonl}}
""")
    (data / "single.yaml").write_text("name: bad name\ndataset: {train: train.jsonl}\ntest_prompts: []\n")
    jobs = {j.name: j for j in load_batch([str(data / "batch.yaml"), str(data / "single.yaml")])}
    assert jobs["good"].ok
    assert jobs["cold"].problems == [
        "line 9: test_prompts.0.temperature: temperature 0 is not allowed; for greedy output use "
        "temperature 0.01 or top_k 1"]
    typo = "\n".join(jobs["typo"].problems)
    assert "line 11: trainig: unknown field" in typo and "line 12: training.micro_batch_size" in typo
    assert jobs["nodata"].problems == [f"line 14: dataset.train: no such file: {data / 'missing.jsonl'}"]
    bad = jobs["bad name"]
    assert bad.source.endswith("single.yaml") and any(p.startswith("line 1: name: invalid job name") for p in bad.problems)
    assert any(p.startswith("line 3: test_prompts") for p in bad.problems)
    assert "batch.yaml jobs[1]" in jobs["cold"].error_text()


def test_a_bad_default_points_at_the_defaults_line(data: Path):
    (data / "batch.yaml").write_text(f"""\
defaults:
  dataset: {{train: train.jsonl}}
  training: {{epochs: 0}}
  test_prompts: {PROMPT}
jobs:
  - name: a
  - name: b
""")
    jobs = load_batch([str(data / "batch.yaml")])
    assert [j.problems for j in jobs] == [["line 3: training.epochs: Input should be greater than or equal to 1 "
                                           "(got 0)"]] * 2


def test_duplicate_names_overrides_and_batch_shape_errors(data: Path):
    (data / "batch.yaml").write_text(f"""\
defaults: {{dataset: {{train: train.jsonl}}, test_prompts: {PROMPT}}}
jobs:
  - name: a
  - name: a
""")
    jobs = load_batch([str(data / "batch.yaml")], overrides=["training.max_steps=3"])
    assert jobs[0].ok and jobs[0].spec.training.max_steps == 3
    assert jobs[1].problems[0].startswith("line 4: name: 'a' is also the name of")
    (data / "shape.yaml").write_text("jobs: {name: a}\n")
    assert load_batch([str(data / "shape.yaml")])[0].problems == ["line 1: jobs: expected a non-empty list of jobs"]
    (data / "extra.yaml").write_text("defaults: {}\njobs: [{name: a}]\nname: x\n")
    assert "line 3: name: unknown top-level field of a batch file" in load_batch([str(data / "extra.yaml")])[0].problems[0]
    (data / "broken.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in load_batch([str(data / "broken.yaml")])[0].problems[0]
    assert load_batch([str(data / "nope.yaml")])[0].problems == ["file not found"]


def test_an_existing_job_is_refused_unless_overwrite(data: Path):
    runs = data / "runs"
    (data / "job.yaml").write_text(f"name: j\ndataset: {{train: train.jsonl}}\ntest_prompts: {PROMPT}\nstorage: {runs}\n")
    (runs / "jobs" / "j").mkdir(parents=True)
    (runs / "jobs" / "j" / "job.json").write_text(json.dumps({"name": "j", "status": "succeeded"}))
    [job] = check_batch([str(data / "job.yaml")])
    assert job.problems == [f"line 1: name: the job folder {runs}/jobs/j already exists; pick another name, "
                            "or pass --overwrite to delete it and start again"]
    assert check_batch([str(data / "job.yaml")], overwrite=True)[0].ok


def test_forge_submit_reports_all_rejections_and_submits_nothing_when_none_is_valid(data: Path):
    (data / "batch.yaml").write_text(f"""\
defaults: {{dataset: {{train: train.jsonl}}, test_prompts: {PROMPT}}}
jobs:
  - name: a
    training: {{epochs: 0}}
  - name: b
    resources: {{num_workers: 0}}
""")
    r = subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", "submit",
                        str(data / "batch.yaml"), "--address", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=120, cwd=data)
    assert r.returncode == 2, r.stderr
    assert "batch.yaml jobs[0]: 1 problem(s)" in r.stderr and "line 4: training.epochs" in r.stderr
    assert "batch.yaml jobs[1]: 1 problem(s)" in r.stderr and "line 6: resources.num_workers" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (data / "forge-runs").exists()
